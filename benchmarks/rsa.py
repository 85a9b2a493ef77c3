"""RSA layer: memory-efficient (chunked) vs reference (the original's) formulation.

Measures, for the released layer3 configuration (256 channels, 8 heads, dk=dv=dd=32, kernel
(5, 7, 7), 'VplusR'/'VplusR') at batch 8, 16 frames, 14x14 (spec §1.4):

* training step (forward + backward) and inference (forward under ``torch.no_grad``);
* peak memory: on CPU the growth of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above what the inputs and weights already use, measured in a fresh
  process per (formulation, mode) with glibc's malloc told to return freed blocks at once
  (``MALLOC_MMAP_THRESHOLD_``) so the number tracks live tensors; on CUDA
  ``torch.cuda.max_memory_allocated``;
* CPU time (``time.process_time``: all threads of the process) and wall time, both
  formulations in one fresh process with the default allocator, timed alternately (so a
  shared machine's changing load affects both alike), best of ``--repeats`` after one warm-up
  each. Workers run with ``OMP_WAIT_POLICY=PASSIVE`` (unless set otherwise) so that OpenMP
  threads spinning at barriers, which on a loaded machine burn CPU time unrelated to the
  work, are not counted.

``--quick`` uses batch 2 (16 frames) for a smoke run.

    python benchmarks/rsa.py            # layer3 size, batch 8, 16 frames
    python benchmarks/rsa.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_kb() -> tuple[int, int]:
    """(current, peak) resident set of this process in kB."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(spec: dict, backend: str):
    import torch

    from zoo.layers.rsa import RSA

    torch.manual_seed(0)  # the same weights for both formulations
    return RSA(spec["channels"], spec["channels"], nh=8, dk=0, dv=0, dd=0, kernel_size=(5, 7, 7),
               kernel_type="VplusR", feat_type="VplusR", backend=backend).to(spec["device"])


def _step_fn(layer, x, train: bool):
    import torch

    def step():
        if train:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            out.backward(torch.ones_like(out))  # a fixed upstream gradient, no extra loss graph
            return out.detach()
        with torch.no_grad():
            return layer(x)

    return step


def _worker(spec: dict) -> dict:
    """Run in a fresh process. ``what='memory'``: peak memory of one step of ``spec['backend']``.
    ``what='time'``: both formulations in this process, timed alternately, best of ``repeats``."""
    import torch

    sys.path.insert(0, str(REPO))
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    n, t, hw, c = spec["batch"], spec["frames"], spec["size"], spec["channels"]
    train = spec["mode"] == "train"
    backends = [spec["backend"]] if spec["what"] == "memory" else ["reference", "auto"]
    steps = {}
    for backend in backends:
        layer = _build(spec, backend)
        torch.manual_seed(1)
        x = torch.randn(n, c, t, hw, hw, device=device, requires_grad=train)
        # Warm-up on a tiny clip: oneDNN's one-time set-up must not count as this run's memory.
        with torch.no_grad():
            layer(torch.randn(1, c, 2, hw, hw, device=device))
        steps[backend] = _step_fn(layer, x, train)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    result = {}
    if spec["what"] == "memory":
        step = steps[spec["backend"]]
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = step()
            sync()
            result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            if not _reset_peak():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); Linux only")
            base, _ = _rss_kb()
            out = step()
            _, peak = _rss_kb()
            result["peak_mb"] = (peak - base) / 1024
        result["sample"] = out.flatten()[:: max(1, out.numel() // 4096)].tolist()
        return result
    for step in steps.values():
        step()  # full-size warm-up
    for backend in backends:
        result[backend] = {"cpu_s": float("inf"), "wall_s": float("inf")}
    for _ in range(spec["repeats"]):
        for backend, step in steps.items():  # alternate, so load changes hit both alike
            sync()
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            sync()
            r = result[backend]
            r["cpu_s"] = min(r["cpu_s"], time.process_time() - c0)
            r["wall_s"] = min(r["wall_s"], time.perf_counter() - w0)
    return result


def _run(spec: dict) -> dict:
    env = dict(os.environ)
    # OpenMP threads that spin while waiting at a barrier burn CPU time that depends on the
    # machine's load, not on the formulation: let them sleep so CPU time counts work.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if spec["what"] == "memory":
        # Every block above 64 kB is its own mapping, unmapped on free: RSS follows live tensors.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 2 instead of 8, for a smoke run")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--size", type=int, default=14, help="spatial size H = W (14 = layer3 at 224 input)")
    ap.add_argument("--channels", type=int, default=256, help="planes of the stage (256 = layer3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="train,inference")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    batch = args.batch or (2 if args.quick else 8)
    frames = args.frames or 16
    repeats = args.repeats or (2 if args.quick else 3)
    base = dict(channels=args.channels, batch=batch, frames=frames, size=args.size, threads=args.threads,
                device=args.device, repeats=repeats)
    print(f"RSA layer ({args.channels} ch, nh 8, kernel (5,7,7), VplusR/VplusR), input "
          f"({batch}, {args.channels}, {frames}, {args.size}, {args.size}), device {args.device}")
    rows = []
    for mode in args.modes.split(","):
        times = _run({**base, "backend": None, "mode": mode, "what": "time"})
        ref, ours = ({**_run({**base, "backend": backend, "mode": mode, "what": "memory"}), **times[backend]}
                     for backend in ("reference", "auto"))
        diff = max(abs(a - b) for a, b in zip(ref["sample"], ours["sample"]))
        rows.append((mode, ref, ours, diff))

    head = f"{'mode':<10} {'formulation':<12} {'peak MB':>9} {'CPU s':>8} {'wall s':>8}"
    print(head)
    print("-" * len(head))
    for mode, ref, ours, diff in rows:
        for name, r in (("reference", ref), ("ours", ours)):
            print(f"{mode:<10} {name:<12} {r['peak_mb']:>9.0f} {r['cpu_s']:>8.2f} {r['wall_s']:>8.2f}")
        print(f"{mode:<10} {'ratio':<12} {ref['peak_mb'] / max(ours['peak_mb'], 1e-9):>8.1f}x "
              f"{ref['cpu_s'] / ours['cpu_s']:>7.2f}x {ref['wall_s'] / ours['wall_s']:>7.2f}x"
              f"   (reference / ours; output max |diff| on a sample {diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
