// Declarations shared by the CPU (rpe_index.cpp) and CUDA (rpe_index_cuda.cu) kernels.
#pragma once
#include <ATen/core/Tensor.h>

namespace relzoo {
namespace rpe_index {

// Validates ranks, dtypes, devices and Lq of (x, index); x_name names x in messages.
void check_inputs(const at::Tensor& x, const at::Tensor& index, const char* x_name);

// Checks num_buckets and Lk of a contiguous grad_output g (..., Lq, Lk) against the contiguous index
// p (Lq, Lk) and returns the uninitialised gradient (..., Lq, num_buckets): the part of the backward
// the CPU and CUDA kernels share.
at::Tensor empty_backward_output(const at::Tensor& g, const at::Tensor& p, int64_t num_buckets);

// Number of rows n*Lq of a (..., Lq, len) tensor: the product of all dims but the last.
inline int64_t num_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

}  // namespace rpe_index
}  // namespace relzoo
