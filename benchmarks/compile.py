"""torch.compile of every RelZoo-mini: graph breaks, compile time, parity with eager, speed.

For each mini (its committed weights, eval mode, the exported graph of :class:`zoo.export.ExportedGraph`:
one input of its preprocessing size, batch 2):

- ``graph breaks``: ``torch._dynamo.explain`` (with ``capture_dynamic_output_shape_ops``, which the
  detector's NMS, an op whose output size is the data's, needs to stay in the graph);
- ``compile s``: the first call of ``torch.compile(graph)`` (inductor by default: tracing, code generation
  and the C++ compiler), in a process whose inductor cache starts empty (a temporary cache folder);
- ``max abs diff``: compiled vs eager outputs;
- ``eager ms`` / ``compiled ms``: median of ``--repeats`` calls after the first.

Full-size models: ``--random-weights`` (no download; seeded), at ``--input-size`` (C H W) and with
``--kwargs`` (JSON constructor arguments), e.g. the smallest inputs of ``tests/test_export.py``'s full-size
models::

    python benchmarks/compile.py --random-weights --models rga_sc_resnet50 --input-size 3 256 128
    python benchmarks/compile.py --random-weights --models rsanet_r50 --input-size 24 64 64 --kwargs '{"num_segments": 8}'

``--module backbone`` compiles that submodule instead (for a detector with random weights, whose detections are
near-tied, so float rounding reorders them: its feature pyramid is what parity means there).

Usage: ``python benchmarks/compile.py [--backend inductor|aot_eager] [--models NAME ...] [--repeats 5]
[--random-weights] [--input-size C H W] [--kwargs JSON] [--module ATTR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="relzoo-inductor-"))  # cold cache

import torch  # noqa: E402

from _timing import median_ms  # noqa: E402
import zoo  # noqa: E402
from zoo import demo  # noqa: E402
from zoo.export import ExportedGraph, example_input  # noqa: E402


def measure(name: str, backend: str, repeats: int, random_weights: bool = False, input_size=None,
            kwargs=None, module=None) -> dict:
    torch.manual_seed(0)  # random weights: the same in every run
    model = zoo.create_model(name, pretrained=not random_weights, **(kwargs or {})).eval()
    x = example_input(model, input_size, batch=2)
    graph = ExportedGraph(model if module is None else getattr(model, module))  # a submodule's dict: its tensors
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        expected = graph(x)
        explained = torch._dynamo.explain(graph)(x)
        torch._dynamo.reset()
        compiled = torch.compile(graph, backend=backend)
        start = time.perf_counter()
        got = compiled(x)
        compile_s = time.perf_counter() - start
        diff = max(float((e.double() - g.double()).abs().max()) for e, g in zip(expected, got) if e.numel())
        eager_ms = median_ms(lambda: graph(x), repeats)
        compiled_ms = median_ms(lambda: compiled(x), repeats)
        torch._dynamo.reset()
    return {"model": name, "breaks": explained.graph_break_count, "reasons": [str(r.reason) for r in explained.break_reasons],
            "compile_s": compile_s, "diff": diff, "eager_ms": eager_ms, "compiled_ms": compiled_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--models", nargs="+", default=[m.name for m in demo.MINIS])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights, not the default ones")
    parser.add_argument("--module", metavar="ATTR", help="compile this submodule of the model (e.g. backbone)")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="N", help="C H W (default: the preprocessing's)")
    parser.add_argument("--kwargs", type=json.loads, default={}, help="JSON constructor arguments of every model")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, batch 2\n")
    print("| model | graph breaks | compile s | max abs diff vs eager | eager ms | compiled ms |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        row = measure(name, args.backend, args.repeats, args.random_weights, args.input_size, args.kwargs,
                      args.module)
        print(f"| `{name}` | {row['breaks']} | {row['compile_s']:.1f} | {row['diff']:.1e} | {row['eager_ms']:.1f} | "
              f"{row['compiled_ms']:.1f} |", flush=True)
        for reason in row["reasons"]:
            print(f"  break: {reason[:200]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
