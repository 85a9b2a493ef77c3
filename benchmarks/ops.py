"""The iRPE index step and the whole RPE attention: native op vs pure-torch formulations.

    python benchmarks/ops.py                  # DETR encoder size, CPU, median of 5 runs
    python benchmarks/ops.py --quick          # L = 12x17, 3 runs: a fast look
    python benchmarks/ops.py --device cuda    # on a GPU (compiles the CUDA sources on first use)

Sizes (spec irpe §6): batch 2, 8 heads, L = 25x34 = 850 tokens, d_model 256,
``rpe-2.0-product-ctx-1-k`` (81 buckets, the product method's real bucket map).

Table 1, the index step Y[b, h, i, j] = X[b, h, i, P[i, j]], forward and backward:
  * ours-native            ``zoo.ops.rpe_index`` -> ``torch.ops.relzoo.rpe_index`` (row-owned backward, no atomics)
  * ours-reference         ``zoo.ops.rpe_index_reference`` (``gather``; backward = ``scatter_add``)
  * torch advanced indexing  ``X.flatten(2)[:, :, P + i*nb]``: the original's pure-python path;
                           its backward is ``index_put_(accumulate=True)``
  * original op (emulated) the original ``rpe_ops`` algorithm as spec §6 describes it, compiled
                           here from the C++/CUDA text below: 32-bit indexing, one OpenMP loop
                           over all elements, every backward add inside ``#pragma omp critical``;
                           on CUDA one atomicAdd per element with the original's capped grid
                           (at most 127 blocks of <= 512 threads).
Goal: ours-native fwd+bwd >= 2x faster than torch advanced indexing.

Table 2, one ``RPEMultiheadAttention`` (zoo.layers.irpe) in training mode, forward + backward:
no RPE vs iRPE ``k`` through each index-step implementation. Goal: with ours-native <= 1.3x no RPE.

Timing: each run builds fresh leaf inputs, times forward and backward separately
(synchronising on CUDA); the table shows medians over ``--runs`` after one warm-up.
Peak memory of one forward + backward: on CUDA ``max_memory_allocated`` above the
baseline; on CPU the resident-set high-water mark above the baseline (Linux:
``/proc/self/clear_refs`` resets it; the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` fixed so freed tensors go back to the OS and the
figure follows live memory), else "n/a".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import zoo.ops as ops  # noqa: E402

SPEC = "rpe-2.0-product-ctx-1-k"

# ----------------------------------------------------------------------------- the original op, emulated

ORIGINAL_CPP = r"""
// Emulation of the ORIGINAL iRPE rpe_index CPU algorithm (spec irpe.md §6), for benchmarks only.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace {
// Loops outside the dispatch macro: a #pragma cannot sit inside a macro argument.
template <typename scalar_t>
void forward_loop(const scalar_t* xp, const int* pp, scalar_t* yp, int numel, int per_map, int Lq, int Lk, int nb) {
#pragma omp parallel for
  for (int e = 0; e < numel; ++e) {  // 32-bit, as the original
    const int ind = e % per_map;
    yp[e] = xp[(e / per_map) * Lq * nb + (ind / Lk) * nb + pp[ind]];
  }
}

template <typename scalar_t>
void backward_loop(const scalar_t* gp, const int* pp, scalar_t* dp, int numel, int per_map, int Lq, int Lk, int nb) {
#pragma omp parallel for
  for (int e = 0; e < numel; ++e) {
    const int ind = e % per_map;
    const int target = (e / per_map) * Lq * nb + (ind / Lk) * nb + pp[ind];
#pragma omp critical
    dp[target] += gp[e];
  }
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& index) {
  TORCH_CHECK(index.scalar_type() == at::kInt, "index must be int32");
  const at::Tensor x = input.contiguous(), p = index.contiguous();
  const int Lq = x.size(2), nb = x.size(3), Lk = p.size(1);
  at::Tensor y = at::empty({x.size(0), x.size(1), Lq, Lk}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "original_forward", [&] {
    forward_loop<scalar_t>(x.const_data_ptr<scalar_t>(), p.const_data_ptr<int>(), y.mutable_data_ptr<scalar_t>(),
                           y.numel(), Lq * Lk, Lq, Lk, nb);
  });
  return y;
}

at::Tensor backward_cpu(const at::Tensor& grad_output, const at::Tensor& index, int64_t num_buckets) {
  const at::Tensor g = grad_output.contiguous(), p = index.contiguous();
  const int Lq = g.size(2), Lk = g.size(3), nb = num_buckets;
  at::Tensor dx = at::zeros({g.size(0), g.size(1), Lq, nb}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "original_backward", [&] {
    backward_loop<scalar_t>(g.const_data_ptr<scalar_t>(), p.const_data_ptr<int>(), dx.mutable_data_ptr<scalar_t>(),
                            g.numel(), Lq * Lk, Lq, Lk, nb);
  });
  return dx;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(relzoo_bench, m) {
  m.def("rpe_index_original(Tensor input, Tensor index) -> Tensor");
  m.def("rpe_index_original_backward(Tensor grad_output, Tensor index, int num_buckets) -> Tensor");
}
TORCH_LIBRARY_IMPL(relzoo_bench, CPU, m) {
  m.impl("rpe_index_original", &forward_cpu);
  m.impl("rpe_index_original_backward", &backward_cpu);
}
"""

ORIGINAL_CU = r"""
// Emulation of the ORIGINAL iRPE rpe_index CUDA algorithm (spec irpe.md §6), for benchmarks only.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {
void launch_shape(int numel, int* blocks, int* threads) {  // the original's grid
  *threads = std::min(512, (numel + 31) / 32 * 32);
  *blocks = std::min(65535, numel + *threads - 1) / *threads;
}

template <typename scalar_t>
__global__ void fwd(const scalar_t* x, const int* p, scalar_t* y, int numel, int per_map, int Lq, int Lk, int nb) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < numel; e += blockDim.x * gridDim.x) {
    const int ind = e % per_map;
    y[e] = x[(e / per_map) * Lq * nb + (ind / Lk) * nb + p[ind]];
  }
}

template <typename scalar_t>
__global__ void bwd(const scalar_t* g, const int* p, scalar_t* dx, int numel, int per_map, int Lq, int Lk, int nb) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < numel; e += blockDim.x * gridDim.x) {
    const int ind = e % per_map;
    atomicAdd(dx + (e / per_map) * Lq * nb + (ind / Lk) * nb + p[ind], g[e]);
  }
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& index) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), p = index.contiguous();
  const int Lq = x.size(2), nb = x.size(3), Lk = p.size(1);
  at::Tensor y = at::empty({x.size(0), x.size(1), Lq, Lk}, x.options());
  int blocks, threads;
  launch_shape(y.numel(), &blocks, &threads);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "original_forward_cuda", [&] {
    fwd<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), p.const_data_ptr<int>(), y.mutable_data_ptr<scalar_t>(), y.numel(), Lq * Lk, Lq,
        Lk, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor backward_cuda(const at::Tensor& grad_output, const at::Tensor& index, int64_t num_buckets) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor g = grad_output.contiguous(), p = index.contiguous();
  const int Lq = g.size(2), Lk = g.size(3), nb = num_buckets;
  at::Tensor dx = at::zeros({g.size(0), g.size(1), Lq, nb}, g.options());
  int blocks, threads;
  launch_shape(g.numel(), &blocks, &threads);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "original_backward_cuda", [&] {
    bwd<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), p.const_data_ptr<int>(), dx.mutable_data_ptr<scalar_t>(), g.numel(), Lq * Lk, Lq,
        Lk, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}
}  // namespace

TORCH_LIBRARY_IMPL(relzoo_bench, CUDA, m) {
  m.impl("rpe_index_original", &forward_cuda);
  m.impl("rpe_index_original_backward", &backward_cuda);
}
"""


class _OriginalOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index32):
        ctx.save_for_backward(index32)
        ctx.num_buckets = x.shape[-1]
        return torch.ops.relzoo_bench.rpe_index_original(x, index32)

    @staticmethod
    def backward(ctx, grad):
        (index32,) = ctx.saved_tensors
        return torch.ops.relzoo_bench.rpe_index_original_backward(grad, index32, ctx.num_buckets), None


def load_original_op(device: torch.device):
    """Compile (once, cached like every op) and load the emulation; returns f(x, index) or None."""
    folder = ops.extensions_dir() / "_benchmark_sources" / "rpe_index_original"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("rpe_index_original.cpp", ORIGINAL_CPP), ("rpe_index_original_cuda.cu", ORIGINAL_CU)):
        path = folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    try:
        ops.load("rpe_index_original", cuda=device.type == "cuda", source_dir=folder)
    except ops.OpsError as exc:
        print(f"(original op emulation unavailable: {str(exc).splitlines()[0]})", file=sys.stderr)
        return None
    return lambda x, index: _OriginalOp.apply(x, index.to(torch.int32))


# ----------------------------------------------------------------------------- measuring

def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M).group(1)) * 1024


def _cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def peak_bytes(fn, device: torch.device) -> float | None:
    """Memory high-water mark of ``fn()`` above the memory in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not _cpu_peak_supported():
        return None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(make_inputs, forward, grad_out, runs: int, device: torch.device) -> dict:
    """Median forward / backward seconds over ``runs`` (after one warm-up) and the peak of one fwd+bwd."""
    def once():
        inputs = make_inputs()
        _sync(device)
        t0 = time.perf_counter()
        out = forward(*inputs)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(grad_out)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    once()  # warm-up: kernel loading, bucket maps, allocator
    times = [once() for _ in range(runs)]
    fwd = statistics.median(t[0] for t in times)
    bwd = statistics.median(t[1] for t in times)
    tot = statistics.median(t[0] + t[1] for t in times)
    return {"fwd": fwd, "bwd": bwd, "total": tot, "peak": peak_bytes(once, device)}


def print_table(title: str, rows: list[tuple[str, dict]], baseline: str, speedup: bool, goal: str) -> None:
    """Markdown table; last-but-one column: speed-up over ``baseline`` (``speedup``) or time relative to it."""
    base = dict(rows)[baseline]["total"]
    relation = f"speed-up vs {baseline}" if speedup else f"time vs {baseline}"
    print(f"\n{title}\n")
    print(f"| variant | forward ms | backward ms | fwd+bwd ms | fwd+bwd {relation} | peak MiB (one fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2 ** 20:.0f}"
        ratio = base / r["total"] if speedup else r["total"] / base
        print(f"| {label} | {r['fwd'] * 1e3:.1f} | {r['bwd'] * 1e3:.1f} | {r['total'] * 1e3:.1f} | "
              f"{ratio:.2f}x | {peak} |")
    print(f"\n{goal}")


# ----------------------------------------------------------------------------- the two tables

def bucket_map(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The (L, L) bucket ids of rpe-2.0-product and the bucket count (81)."""
    from zoo.layers.irpe import get_bucket_ids_2d

    return get_bucket_ids_2d("product", h, w, 0, 2.0, 4.0, 16.0, device=device)


def bench_index_step(h: int, w: int, runs: int, device: torch.device, original) -> list[tuple[str, dict]]:
    B, H, L = 2, 8, h * w
    index, nb = bucket_map(h, w, device)
    index32 = index.to(torch.int32)
    flat = index + torch.arange(L, device=device).view(-1, 1) * nb  # the original python path's flat ids
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(B, H, L, nb, generator=gen).to(device)
    grad = torch.randn(B, H, L, L, generator=gen).to(device)

    def make():
        return (x0.clone().requires_grad_(True),)

    variants = [
        ("ours-native", lambda x: ops.rpe_index(x, index32)),
        ("ours-reference (gather)", lambda x: ops.rpe_index_reference(x, index)),
        ("torch advanced indexing", lambda x: x.flatten(2)[:, :, flat]),
    ]
    if original is not None:
        variants.append(("original op (emulated)", lambda x: original(x, index32)))
    # values agree before anything is timed
    expected = variants[1][1](x0)
    for label, fn in variants:
        if not torch.equal(fn(x0), expected):
            raise AssertionError(f"{label} disagrees with the reference")
    return [(label, measure(make, fn, grad, runs, device)) for label, fn in variants]


def bench_attention(h: int, w: int, runs: int, device: torch.device, original) -> list[tuple[str, dict]]:
    from zoo.layers import irpe as irpe_layers

    L, N, E, heads = h * w, 2, 256, 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(L, N, E, generator=gen).to(device)
    grad = torch.randn(L, N, E, generator=gen).to(device)

    def make():
        return (x0.clone().requires_grad_(True),)

    def build(spec: str, backend: str = "auto"):
        torch.manual_seed(0)
        config = irpe_layers.rpe_config_from_spec(spec) if spec else None
        attn = irpe_layers.RPEMultiheadAttention(E, heads, dropout=0.1, rpe_config=config).to(device).train()
        for module in attn.modules():
            if isinstance(module, irpe_layers.iRPE):
                module.backend = backend
        return lambda x: attn(x, x, x, hw=(h, w), need_weights=False)[0]

    def python_path(x, index):
        """The original's pure-python index step: advanced indexing with flat ids index[i, j] + i * nb."""
        rows = torch.arange(index.shape[0], device=x.device).view(-1, 1)
        return x.flatten(2)[:, :, index.long() + rows * x.shape[-1]]

    @contextlib.contextmanager
    def index_step(fn):
        """Swap another implementation of the index step into the layer (it calls zoo.ops.rpe_index)."""
        old = irpe_layers.rpe_index
        irpe_layers.rpe_index = lambda x, index, backend: fn(x, index)
        try:
            yield
        finally:
            irpe_layers.rpe_index = old

    rows = [("no RPE", measure(make, build(""), grad, runs, device))]
    for label, backend in (("iRPE k, ours-native", "auto"), ("iRPE k, ours-reference (gather)", "reference")):
        rows.append((label, measure(make, build(SPEC, backend), grad, runs, device)))
    swaps = [("iRPE k, original python path (advanced indexing)", python_path)]
    if original is not None:
        swaps.append(("iRPE k, original op (emulated)", original))
    for label, fn in swaps:
        layer = build(SPEC)
        with index_step(fn):
            rows.append((label, measure(make, layer, grad, runs, device)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L = 12x17 and 3 runs")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (default 5, --quick 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip-attention", action="store_true", help="only the index-step table")
    args = parser.parse_args()

    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # fixed threshold: large freed blocks return to the OS, so the RSS high-water mark follows live memory
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = (12, 17) if args.quick else (25, 34)
    runs = args.runs or (3 if args.quick else 5)
    if ops.get_op("rpe_index") is None:
        print("note: the native op is not available (RELZOO_OPS or a build failure); 'ours-native' rows "
              "show the reference path", file=sys.stderr)
    original = load_original_op(device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"{datetime.date.today()}  device {device} ({where}), {torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}, float32, median of {runs} runs after 1 warm-up")

    rows = bench_index_step(h, w, runs, device, original)
    print_table(f"Index step, X (2, 8, {h * w}, 81) -> Y (2, 8, {h * w}, {h * w}), bucket map of {SPEC} ({h}x{w})",
                rows, "torch advanced indexing", True, "Goal: ours-native fwd+bwd >= 2x faster than torch advanced indexing.")
    if not args.skip_attention:
        rows = bench_attention(h, w, runs, device, original)
        print_table(f"RPEMultiheadAttention, L = {h}x{w} = {h * w}, batch 2, d_model 256, 8 heads, training mode, "
                    f"{SPEC}", rows, "no RPE", False, "Goal: iRPE k with ours-native <= 1.3x no RPE (fwd+bwd).")


if __name__ == "__main__":
    main()
