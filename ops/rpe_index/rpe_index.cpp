// iRPE `rpe_index`: schema and CPU kernels (spec irpe.md §6).
//
//   forward   Y[n, i, j]  = X[n, i, P[i, j]]              X (N, Lq, nb), P (Lq, Lk) -> Y (N, Lq, Lk)
//   backward  dX[n, i, k] = sum_{j : P[i, j] = k} dY[n, i, j]   (in increasing j)
//
// n runs over all leading dimensions of X flattened (B*H for attention maps).
// Header-light on purpose (ATen core + TORCH_LIBRARY, no torch/extension.h):
// a first build takes seconds, not half a minute. Autograd and the fake
// (meta) kernels are registered from Python (zoo/ops.py).
//
// The CPU backward gives every (n, i) row to exactly one thread: the row owns
// its slice of dX, so no atomics or critical sections are needed, and the
// additions into each bucket happen in increasing j -- the same order as the
// pure-torch reference (gather's backward, scatter_add), hence bit-equal results
// in float32/float64.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "rpe_index.h"

namespace relzoo {
namespace rpe_index {

at::Tensor empty_backward_output(const at::Tensor& g, const at::Tensor& p, int64_t num_buckets) {
  TORCH_CHECK(num_buckets >= 0, "rpe_index_backward: num_buckets must be >= 0, got ", num_buckets);
  TORCH_CHECK(p.size(1) == g.size(-1), "rpe_index_backward: grad_output has Lk = ", g.size(-1),
              " (dim -1) but index has ", p.size(1), " columns");
  std::vector<int64_t> out_shape(g.sizes().begin(), g.sizes().end());
  out_shape.back() = num_buckets;
  return at::empty(out_shape, g.options());
}

void check_inputs(const at::Tensor& x, const at::Tensor& index, const char* x_name) {
  TORCH_CHECK(x.dim() >= 2, "rpe_index: ", x_name, " must have at least 2 dims (..., Lq, num_buckets), got shape ",
              x.sizes());
  TORCH_CHECK(index.dim() == 2, "rpe_index: index must be 2-D (Lq, Lk), got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
              "rpe_index: index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "rpe_index: ", x_name,
              " must be float64/float32/bfloat16/float16, got ", x.scalar_type());
  TORCH_CHECK(x.device() == index.device(), "rpe_index: ", x_name, " is on ", x.device(), " but index is on ",
              index.device());
  TORCH_CHECK(x.size(-2) == index.size(0), "rpe_index: ", x_name, " has Lq = ", x.size(-2),
              " rows (dim -2) but index has ", index.size(0), " rows");
}

namespace {

// Rows handed to one task: enough elements that scheduling costs are negligible.
int64_t grain_rows(int64_t row_len) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len));
}

template <typename index_t>
void check_bucket_range(const index_t* p, int64_t count, int64_t nb) {
  // A bucket id outside [0, nb) would read or write out of bounds: refuse it.
  // The scan is over Lq*Lk ids, 1/N of the gather's work.
  for (int64_t e = 0; e < count; ++e) {
    TORCH_CHECK(p[e] >= 0 && p[e] < nb, "rpe_index: index holds bucket id ", static_cast<int64_t>(p[e]),
                " at flat position ", e, ", outside [0, ", nb, ")");
  }
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& index) {
  check_inputs(input, index, "input");
  TORCH_CHECK(input.device().is_cpu(), "rpe_index (CPU kernel): expected CPU tensors");
  const at::Tensor x = input.contiguous();
  const at::Tensor p = index.contiguous();
  const int64_t Lq = x.size(-2), nb = x.size(-1), Lk = p.size(1);
  const int64_t rows = num_rows(x);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = Lk;
  at::Tensor y = at::empty(out_shape, x.options());
  if (y.numel() == 0) return y;

  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "rpe_index_forward_cpu_index", [&] {
    const index_t* pp = p.const_data_ptr<index_t>();
    check_bucket_range(pp, Lq * Lk, nb);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rpe_index_forward_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(Lk), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const index_t* prow = pp + (r % Lq) * Lk;
          const scalar_t* xrow = xp + r * nb;
          scalar_t* yrow = yp + r * Lk;
          for (int64_t j = 0; j < Lk; ++j) yrow[j] = xrow[prow[j]];
        }
      });
    });
  });
  return y;
}

at::Tensor backward_cpu(const at::Tensor& grad_output, const at::Tensor& index, int64_t num_buckets) {
  check_inputs(grad_output, index, "grad_output");
  TORCH_CHECK(grad_output.device().is_cpu(), "rpe_index_backward (CPU kernel): expected CPU tensors");
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor p = index.contiguous();
  const int64_t Lq = g.size(-2), Lk = g.size(-1), nb = num_buckets;
  const int64_t rows = num_rows(g);
  at::Tensor dx = empty_backward_output(g, p, num_buckets);
  if (dx.numel() == 0) return dx;
  if (Lk == 0) return dx.zero_();

  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "rpe_index_backward_cpu_index", [&] {
    const index_t* pp = p.const_data_ptr<index_t>();
    check_bucket_range(pp, Lq * Lk, nb);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rpe_index_backward_cpu", [&] {
      // Accumulate in float for half/bfloat16 (then round once), in the type itself otherwise.
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(Lk), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(nb);
        for (int64_t r = begin; r < end; ++r) {
          const index_t* prow = pp + (r % Lq) * Lk;
          const scalar_t* grow = gp + r * Lk;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t j = 0; j < Lk; ++j) acc[prow[j]] += static_cast<acc_t>(grow[j]);
          scalar_t* drow = dp + r * nb;
          for (int64_t k = 0; k < nb; ++k) drow[k] = static_cast<scalar_t>(acc[k]);
        }
      });
    });
  });
  return dx;
}

}  // namespace
}  // namespace rpe_index
}  // namespace relzoo

// FRAGMENT, not TORCH_LIBRARY: every op of the `relzoo` namespace lives in its
// own library (ops/<name>/), and only one TORCH_LIBRARY block may own a namespace.
TORCH_LIBRARY_FRAGMENT(relzoo, m) {
  m.def("rpe_index(Tensor input, Tensor index) -> Tensor");
  m.def("rpe_index_backward(Tensor grad_output, Tensor index, SymInt num_buckets) -> Tensor");
}

TORCH_LIBRARY_IMPL(relzoo, CPU, m) {
  m.impl("rpe_index", &relzoo::rpe_index::forward_cpu);
  m.impl("rpe_index_backward", &relzoo::rpe_index::backward_cpu);
}
