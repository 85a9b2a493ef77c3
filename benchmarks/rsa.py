"""RSA layer: memory-efficient (chunked) vs reference (the original's) formulation.

Measures, for the released layer3 configuration (256 channels, 8 heads, dk=dv=dd=32, kernel
(5, 7, 7), 'VplusR'/'VplusR') at batch 8, 16 frames, 14x14 (spec §1.4):

* training step (forward + backward) and inference (forward under ``torch.no_grad``);
* peak memory: on CPU the growth of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above what the inputs and weights already use, measured in a fresh
  process per (formulation, mode) with glibc's malloc told to return freed blocks at once
  (``MALLOC_MMAP_THRESHOLD_``) so the number tracks live tensors; on CUDA
  ``torch.cuda.max_memory_allocated``;
* CPU time (``time.process_time``: all threads of the process) and wall time, in their own
  fresh process with the default allocator, best of ``--repeats`` after one warm-up.

Both formulations are measured in the same run, alternating, so a shared machine's load
affects both alike. ``--quick`` uses a small size (batch 2, 8 frames) for a smoke run.

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


def _worker(spec: dict) -> dict:
    """Run in a fresh process: build the layer, measure one (impl, mode, what) combination."""
    import torch

    sys.path.insert(0, str(REPO))
    from zoo.layers.rsa import RSA

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    layer = RSA(spec["channels"], spec["channels"], nh=8, dk=0, dv=0, dd=0, kernel_size=(5, 7, 7),
                kernel_type="VplusR", feat_type="VplusR", impl=spec["impl"]).to(device)
    n, t, hw = spec["batch"], spec["frames"], spec["size"]
    x = torch.randn(n, spec["channels"], t, hw, hw, device=device)
    train = spec["mode"] == "train"
    if train:
        x.requires_grad_(True)

    def step():
        if train:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            out.backward(torch.ones_like(out))  # a fixed upstream gradient, no extra loss graph
            return out.detach()
        with torch.no_grad():
            return layer(x)

    # Warm-up on a tiny clip: oneDNN's one-time set-up must not count as this run's memory.
    with torch.no_grad():
        layer(torch.randn(1, spec["channels"], 2, hw, hw, device=device))
    result = {}
    if spec["what"] == "memory":
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = step()
            torch.cuda.synchronize()
            result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            if not _reset_peak():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); Linux only")
            base, _ = _rss_kb()
            out = step()
            _, peak = _rss_kb()
            result["peak_mb"] = (peak - base) / 1024
        result["checksum"] = out.double().abs().sum().item()
        result["sample"] = out.flatten()[:: max(1, out.numel() // 4096)].tolist()
    else:
        step()  # full-size warm-up
        best_cpu = best_wall = float("inf")
        for _ in range(spec["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best_cpu = min(best_cpu, time.process_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - w0)
        result["cpu_s"], result["wall_s"] = best_cpu, best_wall
    return result


def _run(spec: dict) -> dict:
    env = dict(os.environ)
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
    ap.add_argument("--quick", action="store_true", help="small size (batch 2, 8 frames) for a smoke run")
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
    frames = args.frames or (8 if args.quick else 16)
    repeats = args.repeats or (2 if args.quick else 3)
    base = dict(channels=args.channels, batch=batch, frames=frames, size=args.size, threads=args.threads,
                device=args.device, repeats=repeats)
    print(f"RSA layer ({args.channels} ch, nh 8, kernel (5,7,7), VplusR/VplusR), input "
          f"({batch}, {args.channels}, {frames}, {args.size}, {args.size}), device {args.device}")
    rows = []
    for mode in args.modes.split(","):
        res = {}
        for impl in ("reference", "chunked"):
            res[impl] = {**_run({**base, "impl": impl, "mode": mode, "what": "memory"}),
                         **_run({**base, "impl": impl, "mode": mode, "what": "time"})}
        ref, ours = res["reference"], res["chunked"]
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
