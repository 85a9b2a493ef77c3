"""RPA-SA block speed: ours vs the original op algorithm vs the same block without relative terms.

    python benchmarks/rpa.py            # issue sizes: batch 2, 64 channels, 2 heads, 32x32, relative_position
                                        # slerp, rpa_kernel_size 5, forward+backward, CPU 1 and 2 threads
    python benchmarks/rpa.py --quick    # small sizes (seconds)
    python benchmarks/rpa.py --device cuda --flat-iters 1000   # on a GPU: ours vs no-rpa, and the time per
                                        # window of training iterations (the original slowed down over time)

Columns (same block weights, same input, measured in the same run, median of --repeats, Markdown table):

* ``ours``: zoo.layers.rpa.MultiheadNonlocal2d (plain tensor ops, spec §5).
* ``original algorithm``: the library's reference formulation (``backend="reference"``: per head, the
  tables expanded for the map, the q.k and alpha.v products as matrix products, as the original block
  does) with its two attend ops replaced by the original's CPU op algorithm as spec §4/§5 describes
  it, compiled here from a short C++ source: scalar single-threaded loops over (b, i, j, c) with
  strided accessor reads, forward and backward. The original rebuilt the tables on every call; here
  they come from the library's cache (about 1 % of the original's time, spec §5). CPU only; needs a
  C++ compiler (first run compiles it, about a minute).
* ``no relative terms``: the same block with rpa_mode=None.

Goal (issue 8): ours >= 10x faster than the original algorithm and <= 2x the block without relative terms.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.layers import rpa  # noqa: E402
from zoo.layers.rpa import MultiheadNonlocal2d  # noqa: E402
from zoo.paths import extensions_dir  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# The original op algorithm (spec §4): one scalar loop nest per op and direction, no threading.
# ---------------------------------------------------------------------------------------------------

_CPP = r"""
#include <torch/extension.h>

// A[c, ah, aw] with ah = y_j - y_i + H - 1, aw = x_j - x_i + W - 1; i, j row-major over H x W.
template <typename T>
static inline T affinity_at(const at::TensorAccessor<T, 3>& A, int64_t c, int64_t i, int64_t j, int64_t W, int64_t H) {
  return A[c][j / W - i / W + H - 1][j % W - i % W + W - 1];
}

at::Tensor query_fwd(at::Tensor q, at::Tensor A, int64_t H, int64_t W) {       // q (B, d, N) -> (B, N, N)
  auto B = q.size(0), d = q.size(1), N = q.size(2);
  auto out = at::zeros({B, N, N}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "query_fwd", [&] {
    auto qa = q.accessor<scalar_t, 3>(); auto Aa = A.accessor<scalar_t, 3>(); auto o = out.accessor<scalar_t, 3>();
    for (int64_t b = 0; b < B; ++b) for (int64_t i = 0; i < N; ++i) for (int64_t j = 0; j < N; ++j) {
      scalar_t s = 0;
      for (int64_t c = 0; c < d; ++c) s += qa[b][c][i] * affinity_at(Aa, c, i, j, W, H);
      o[b][i][j] = s;
    }
  });
  return out;
}

std::vector<at::Tensor> query_bwd(at::Tensor g, at::Tensor q, at::Tensor A, int64_t H, int64_t W) {
  auto B = q.size(0), d = q.size(1), N = q.size(2);
  auto gq = at::zeros_like(q); auto gA = at::zeros_like(A);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "query_bwd", [&] {
    auto ga = g.accessor<scalar_t, 3>(); auto qa = q.accessor<scalar_t, 3>(); auto Aa = A.accessor<scalar_t, 3>();
    auto gqa = gq.accessor<scalar_t, 3>(); auto gAa = gA.accessor<scalar_t, 3>();
    for (int64_t b = 0; b < B; ++b) for (int64_t i = 0; i < N; ++i) for (int64_t j = 0; j < N; ++j) {
      scalar_t gv = ga[b][i][j];
      int64_t ah = j / W - i / W + H - 1, aw = j % W - i % W + W - 1;
      for (int64_t c = 0; c < d; ++c) {
        gqa[b][c][i] += gv * Aa[c][ah][aw];
        gAa[c][ah][aw] += gv * qa[b][c][i];
      }
    }
  });
  return {gq, gA};
}

at::Tensor weight_fwd(at::Tensor w, at::Tensor A, int64_t H, int64_t W) {      // w (B, N, N) -> (B, d, N)
  auto B = w.size(0), N = w.size(1), d = A.size(0);
  auto out = at::zeros({B, d, N}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "weight_fwd", [&] {
    auto wa = w.accessor<scalar_t, 3>(); auto Aa = A.accessor<scalar_t, 3>(); auto o = out.accessor<scalar_t, 3>();
    for (int64_t b = 0; b < B; ++b) for (int64_t c = 0; c < d; ++c) for (int64_t i = 0; i < N; ++i) {
      scalar_t s = 0;
      for (int64_t j = 0; j < N; ++j) s += wa[b][i][j] * affinity_at(Aa, c, i, j, W, H);
      o[b][c][i] = s;
    }
  });
  return out;
}

std::vector<at::Tensor> weight_bwd(at::Tensor g, at::Tensor w, at::Tensor A, int64_t H, int64_t W) {
  auto B = w.size(0), N = w.size(1), d = A.size(0);
  auto gw = at::zeros_like(w); auto gA = at::zeros_like(A);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "weight_bwd", [&] {
    auto ga = g.accessor<scalar_t, 3>(); auto wa = w.accessor<scalar_t, 3>(); auto Aa = A.accessor<scalar_t, 3>();
    auto gwa = gw.accessor<scalar_t, 3>(); auto gAa = gA.accessor<scalar_t, 3>();
    for (int64_t b = 0; b < B; ++b) for (int64_t c = 0; c < d; ++c) for (int64_t i = 0; i < N; ++i) {
      scalar_t gv = ga[b][c][i];
      for (int64_t j = 0; j < N; ++j) {
        int64_t ah = j / W - i / W + H - 1, aw = j % W - i % W + W - 1;
        gwa[b][i][j] += gv * Aa[c][ah][aw];
        gAa[c][ah][aw] += gv * wa[b][i][j];
      }
    }
  });
  return {gw, gA};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("query_fwd", &query_fwd); m.def("query_bwd", &query_bwd);
  m.def("weight_fwd", &weight_fwd); m.def("weight_bwd", &weight_bwd);
}
"""


def _load_reference_ops():
    """Compile (once, cached) the original-algorithm kernels; None when no compiler is available."""
    from torch.utils.cpp_extension import load_inline

    build = extensions_dir() / "bench_rpa_original_algorithm"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load_inline("bench_rpa_original_algorithm", cpp_sources=_CPP, build_directory=str(build),
                           extra_cflags=["-O2"], verbose=False)
    except Exception as exc:  # a missing compiler must not stop the other rows
        print(f"[original algorithm unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}]")
        return None


def _original_algorithm(block: MultiheadNonlocal2d, ops):
    """A function x -> block(x) computed the original's way: the library's reference formulation with
    the scalar-loop attend ops (the reference's own attend ops, which gather a (d, N, N) table, swapped out)."""

    class Query(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, a, height, width):
            q, a = q.contiguous(), a.contiguous()
            ctx.save_for_backward(q, a)
            ctx.hw = (height, width)
            return ops.query_fwd(q, a, height, width)

        @staticmethod
        def backward(ctx, g):
            q, a = ctx.saved_tensors
            gq, ga = ops.query_bwd(g.contiguous(), q, a, *ctx.hw)
            return gq, ga, None, None

    class Weight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, a, height, width):
            w, a = w.contiguous(), a.contiguous()
            ctx.save_for_backward(w, a)
            ctx.hw = (height, width)
            return ops.weight_fwd(w, a, height, width)

        @staticmethod
        def backward(ctx, g):
            w, a = ctx.saved_tensors
            gw, ga = ops.weight_bwd(g.contiguous(), w, a, *ctx.hw)
            return gw, ga, None, None

    reference = copy.deepcopy(block)  # same weights
    reference.backend = "reference"

    def forward(x):
        with mock.patch.multiple(rpa, relative_attend_query_reference=lambda q, a, sizes: Query.apply(q, a, *sizes),
                                 relative_attend_weight_reference=lambda w, a, sizes: Weight.apply(w, a, *sizes)):
            return reference(x)

    return forward


# ---------------------------------------------------------------------------------------------------

def _time(fns: dict, x, repeats: int, backward: bool, device: torch.device) -> dict:
    """Median wall time of each fn(x) (+ backward of its sum) over ``repeats`` rounds after one warm-up.

    The candidates take turns within each round, so a load spike on a shared machine hits them alike.
    """
    def once(fn):
        if x.grad is not None:
            x.grad = None
        out = fn(x)
        if backward:
            out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    samples = {name: [] for name in fns}
    for fn in fns.values():
        once(fn)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            once(fn)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: batch 1, 32 channels, 16x16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    parser.add_argument("--mode", default="relative_position", choices=rpa.RPA_MODES)
    parser.add_argument("--interpolation", default="slerp")
    parser.add_argument("--rpa-kernel-size", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the original-algorithm rows")
    parser.add_argument("--flat-iters", type=int, default=0,
                        help="also run this many training iterations of ours and print the time per window")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.channels, args.size, args.repeats = 1, 32, (16, 16), 3

    device = torch.device(args.device)
    torch.manual_seed(0)
    common = dict(num_heads=args.heads)
    ours = MultiheadNonlocal2d(args.channels, rpa_mode=args.mode, rpa_kernel_size=args.rpa_kernel_size,
                               rpa_interpolation=args.interpolation, rpa_zero_init=False, **common).to(device)
    plain = MultiheadNonlocal2d(args.channels, **common).to(device)
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith(("a_k", "a_v"))})
    x = torch.randn(args.batch, args.channels, *args.size, device=device, requires_grad=True)

    ops = _load_reference_ops() if device.type == "cpu" and not args.no_reference else None
    reference = _original_algorithm(ours, ops) if ops is not None else None
    if reference is not None:
        with torch.no_grad():
            diff = (reference(x) - ours(x)).abs().max().item()
        print(f"check: max |original algorithm - ours| = {diff:.2e}")

    print(f"MultiheadNonlocal2d({args.channels}, num_heads={args.heads}, rpa_mode={args.mode!r}, "
          f"rpa_kernel_size={args.rpa_kernel_size}, rpa_interpolation={args.interpolation!r}), "
          f"input {args.batch}x{args.channels}x{args.size[0]}x{args.size[1]}, device {device}, "
          f"median of {args.repeats}\n")
    print("| threads | pass | ours [s] | original algorithm [s] | no relative terms [s] | original / ours | ours / no rpa |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    threads = args.threads if device.type == "cpu" else (torch.get_num_threads(),)
    for n in threads:
        torch.set_num_threads(n)
        for backward in (False, True):
            fns = {"ours": ours, "plain": plain, **({"reference": reference} if reference else {})}
            times = _time(fns, x, args.repeats, backward, device)
            t_ours, t_plain, t_ref = times["ours"], times["plain"], times.get("reference", float("nan"))
            print(f"| {n} | {'fwd+bwd' if backward else 'fwd'} | {t_ours:.4f} | {t_ref:.4f} | {t_plain:.4f} | "
                  f"{t_ref / t_ours:.1f} | {t_ours / t_plain:.2f} |")
    print("\ngoal (issue 8, forward+backward): original / ours >= 10, ours / no rpa <= 2")

    if args.flat_iters:
        optimizer = torch.optim.SGD(ours.parameters(), lr=1e-4)
        window = max(1, args.flat_iters // 10)
        start = time.perf_counter()
        for it in range(1, args.flat_iters + 1):
            optimizer.zero_grad()
            ours(x).square().mean().backward()
            optimizer.step()
            if it % window == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                print(f"iterations {it - window + 1:>5}-{it:<5} {1000 * (now - start) / window:8.2f} ms/iter")
                start = now


if __name__ == "__main__":
    main()
