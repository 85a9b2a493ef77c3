// iRPE `rpe_index`: CUDA kernels (spec irpe.md §6); the schema is in rpe_index.cpp.
//
// Differences from the original op, on purpose:
//  * 64-bit indexing throughout (the original overflowed past 2^31 elements);
//  * the grid scales with the problem (the original capped it at ~127 blocks);
//  * kernels run on the current stream under a device guard; no legacy THC headers;
//  * the backward uses no global atomics: one warp owns one (n, i) row of dX,
//    accumulates it in shared memory, and adds each bucket's terms in increasing
//    j. The result is deterministic and bit-equal to the CPU kernel (and to the
//    pure-torch reference on CPU) in float32/float64.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rpe_index.h"

namespace relzoo {
namespace rpe_index {
namespace {

constexpr int kThreads = 256;               // threads per block, both kernels
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr size_t kSharedLimit = 48 * 1024;  // usable without opting in to more

int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Enough blocks to cover the work, at most a few waves of resident blocks: the
// kernels use grid-stride loops, so any grid size is correct.
int64_t grid_size(int64_t work_items, int64_t items_per_block) {
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * (2048 / kThreads) * 4;
  return std::max<int64_t>(1, std::min(needed, cap));
}

template <typename scalar_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ p,
                               scalar_t* __restrict__ y, int64_t total, int64_t Lq, int64_t Lk, int64_t nb) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t row = e / Lk;  // n * Lq + i
    const int64_t j = e - row * Lk;
    const int64_t k = static_cast<int64_t>(p[(row % Lq) * Lk + j]);
    CUDA_KERNEL_ASSERT(k >= 0 && k < nb);
    y[e] = x[row * nb + k];
  }
}

// One warp per (n, i) row. Per 32-key tile, lanes that hold the same bucket id
// form a group (__match_any_sync); the group's lowest lane adds the group's
// values in lane (= j) order into the row's accumulator. Groups have distinct
// buckets, so no two lanes touch the same accumulator entry.
template <typename scalar_t, typename index_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ g, const index_t* __restrict__ p,
                                scalar_t* __restrict__ dx, acc_t* __restrict__ acc_global, bool acc_in_shared,
                                int64_t rows, int64_t Lq, int64_t Lk, int64_t nb) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* shared = reinterpret_cast<acc_t*>(shared_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  acc_t* tile = shared + warp * 32;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * warps;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < rows; row += row_stride) {
    acc_t* acc = acc_in_shared ? shared + warps * 32 + static_cast<int64_t>(warp) * nb : acc_global + row * nb;
    for (int64_t k = lane; k < nb; k += 32) acc[k] = acc_t(0);
    __syncwarp();
    const index_t* prow = p + (row % Lq) * Lk;
    const scalar_t* grow = g + row * Lk;
    for (int64_t j0 = 0; j0 < Lk; j0 += 32) {
      const int64_t j = j0 + lane;
      const bool active = j < Lk;
      const long long k = active ? static_cast<long long>(prow[j]) : -1LL;
      CUDA_KERNEL_ASSERT(!active || (k >= 0 && k < nb));
      tile[lane] = active ? static_cast<acc_t>(grow[j]) : acc_t(0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
      // No __match_any_sync before Volta: lane 0 adds the tile in j order (same result, slower).
      __syncwarp();
      if (lane == 0) {
        for (int s = 0; s < 32 && j0 + s < Lk; ++s) acc[prow[j0 + s]] += tile[s];
      }
#else
      const unsigned peers = __match_any_sync(0xffffffffu, k);
      __syncwarp();
      if (active && lane == __ffs(peers) - 1) {
        acc_t sum = acc[k];
        for (unsigned m = peers; m != 0u; m &= m - 1u) sum += tile[__ffs(m) - 1];
        acc[k] = sum;
      }
#endif
      __syncwarp();
    }
    for (int64_t k = lane; k < nb; k += 32) dx[row * nb + k] = static_cast<scalar_t>(acc[k]);
    __syncwarp();
  }
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& index) {
  check_inputs(input, index, "input");
  TORCH_CHECK(input.is_cuda(), "rpe_index (CUDA kernel): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor p = index.contiguous();
  const int64_t Lq = x.size(-2), nb = x.size(-1), Lk = p.size(1);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = Lk;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t total = y.numel();
  if (total == 0) return y;
  TORCH_CHECK(nb > 0, "rpe_index: input has 0 buckets but index is not empty");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = grid_size(total, kThreads);
  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "rpe_index_forward_cuda_index", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rpe_index_forward_cuda", [&] {
      forward_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), p.const_data_ptr<index_t>(), y.mutable_data_ptr<scalar_t>(), total, Lq, Lk,
          nb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

at::Tensor backward_cuda(const at::Tensor& grad_output, const at::Tensor& index, int64_t num_buckets) {
  check_inputs(grad_output, index, "grad_output");
  TORCH_CHECK(grad_output.is_cuda(), "rpe_index_backward (CUDA kernel): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor p = index.contiguous();
  const int64_t Lq = g.size(-2), Lk = g.size(-1), nb = num_buckets;
  const int64_t rows = num_rows(g);
  at::Tensor dx = empty_backward_output(g, p, num_buckets);
  if (dx.numel() == 0) return dx;
  if (Lk == 0) return dx.zero_();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "rpe_index_backward_cuda_index", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rpe_index_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // Shared memory per warp: a 32-value staging tile plus, when it fits, the
      // row's nb accumulators; very large nb falls back to a global workspace.
      int warps = kWarpsPerBlock;
      while (warps > 1 && static_cast<size_t>(warps) * (32 + nb) * sizeof(acc_t) > kSharedLimit) warps /= 2;
      const bool in_shared = static_cast<size_t>(warps) * (32 + nb) * sizeof(acc_t) <= kSharedLimit;
      at::Tensor workspace;
      if (!in_shared) {
        workspace = at::empty({rows, nb}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      }
      const size_t shared_bytes = static_cast<size_t>(warps) * (32 + (in_shared ? nb : 0)) * sizeof(acc_t);
      const int64_t blocks = grid_size(rows, warps);
      backward_kernel<scalar_t, index_t, acc_t><<<blocks, warps * 32, shared_bytes, stream>>>(
          g.const_data_ptr<scalar_t>(), p.const_data_ptr<index_t>(), dx.mutable_data_ptr<scalar_t>(),
          in_shared ? nullptr : workspace.mutable_data_ptr<acc_t>(), in_shared, rows, Lq, Lk, nb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

}  // namespace
}  // namespace rpe_index
}  // namespace relzoo

TORCH_LIBRARY_IMPL(relzoo, CUDA, m) {
  m.impl("rpe_index", &relzoo::rpe_index::forward_cuda);
  m.impl("rpe_index_backward", &relzoo::rpe_index::backward_cuda);
}
