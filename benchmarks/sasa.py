"""SASAttention2d: native neighbourhood-attention op vs the unfold formulation, forward + backward.

    python benchmarks/sasa.py            # batch 2, 64 -> 128 channels, 56x56, k=7, 8 heads (the issue's size)
    python benchmarks/sasa.py --quick    # batch 1, 16 -> 32 channels, 20x20
    python benchmarks/sasa.py --device cuda

Each variant runs in its own child process so that its peak memory is its own: CPU peak = VmHWM -
VmRSS (extra resident memory during the timed iterations; VmHWM is reset through
/proc/self/clear_refs where the kernel allows it), CUDA peak = max_memory_allocated - allocated
before. Time = best of ``--repeat`` forward+backward passes after one warm-up. Goal of issue 7:
native >= 3x faster and >= 4x less peak memory than the unfold formulation.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _run(backend: str, cfg: dict, queue) -> None:
    import torch

    from zoo.layers.sasa import SASAttention2d

    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    layer = SASAttention2d(cfg["cin"], cfg["cout"], cfg["k"], 1, cfg["heads"], padding_mode=cfg["padding_mode"]).to(device)
    x = torch.randn(cfg["batch"], cfg["cin"], cfg["size"], cfg["size"], device=device, requires_grad=True)

    def step():
        y = layer(x, backend=backend)
        y.backward(torch.ones_like(y))
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and, for the native op, build/load it)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        base = _status_kib("VmRSS") * 1024
        exact = _reset_peak_rss()
    times = []
    for _ in range(cfg["repeat"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    if device.type == "cuda":
        peak, note = torch.cuda.max_memory_allocated() - base, ""
    else:
        peak = _status_kib("VmHWM") * 1024 - base
        note = "" if exact else " (VmHWM not resettable: includes warm-up)"
    queue.put({"backend": backend, "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
               "peak_mib": peak / 2 ** 20, "note": note})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
    parser.add_argument("--padding-mode", default="mask", choices=["mask", "zeros"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cfg = dict(batch=2, cin=64, cout=128, size=56, k=7, heads=8)
    if args.quick:
        cfg = dict(batch=1, cin=16, cout=32, size=20, k=7, heads=8)
    cfg.update(device=args.device, repeat=args.repeat, threads=args.threads, padding_mode=args.padding_mode)

    ctx = mp.get_context("spawn")
    results = {}
    for backend in ("native", "reference"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(backend, cfg, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{backend} run failed (exit code {proc.exitcode})")
        results[backend] = queue.get()

    ours, ref = results["native"], results["reference"]
    print(f"SASAttention2d fwd+bwd, batch {cfg['batch']}, {cfg['cin']}->{cfg['cout']} ch, "
          f"{cfg['size']}x{cfg['size']}, k={cfg['k']}, {cfg['heads']} heads, padding_mode={cfg['padding_mode']}, "
          f"{args.device}, {cfg['threads']} threads, best of {cfg['repeat']}")
    print("| variant | best fwd+bwd (s) | median (s) | peak extra memory (MiB) |")
    print("|---|---|---|---|")
    for name, r in (("ours: native neighbourhood-attention op", ours), ("reference: unfold formulation", ref)):
        print(f"| {name} | {r['best_s']:.3f} | {r['median_s']:.3f} | {r['peak_mib']:.1f}{r['note']} |")
    speed = ref["best_s"] / ours["best_s"]
    memory = ref["peak_mib"] / max(ours["peak_mib"], 1e-3)
    print(f"speed-up x{speed:.1f} (goal >= 3), memory reduction x{memory:.1f} (goal >= 4)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "results": results, "speedup": speed,
                                               "memory_reduction": memory}, indent=2))


if __name__ == "__main__":
    main()
