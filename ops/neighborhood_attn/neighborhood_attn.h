// Neighbourhood attention: declarations and window geometry shared by the CPU
// (neighborhood_attn.cpp) and CUDA (neighborhood_attn_cuda.cu) kernels.
//
// Layout (heads last, one head's channels contiguous):
//   q     (B, G, Hq, Wq, D)          queries on the output grid
//   k     (B, G, Hk, Wk, D)          keys
//   v     (B, G, Hk, Wk, M, Dv)      values (M = 1 without a mixture; 5-D v is accepted then)
//   rel   (G, K, D)      optional    relative key term, K = kh * kw
//   mix   (M, K)         optional    value-mixture weight per window slot
//   out   (B, G, Hq, Wq, Dv), probs (B, G, Hq, Wq, K) (softmax, 0 on slots outside the key grid)
//
// Query (i, j) looks at key (sh*i + oh + a, sw*j + ow + b), slot t = a*kw + b. The definition is the
// unfold formulation in zoo/layers/_na_op.py (neighborhood_attention_reference).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __CUDACC__
#define NA_HOST_DEVICE __host__ __device__
#else
#define NA_HOST_DEVICE
#endif

namespace relzoo {
namespace neighborhood_attn {

// Sizes and geometry of one call, validated once by check_and_describe.
struct Geometry {
  int64_t B, G, Hq, Wq, D, Hk, Wk, M, Dv;
  int64_t kh, kw, sh, sw, oh, ow;
  bool has_rel, has_mix;
  int64_t K() const { return kh * kw; }
};

// Validates shapes, dtypes and devices; returns the geometry. The tensors are not modified.
Geometry check_and_describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& rel, const c10::optional<at::Tensor>& mix,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef offset);

// floor(a / b) and ceil(a / b) for b > 0 and any sign of a (C++ division truncates towards zero).
NA_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
NA_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Range [lo, hi] of query indices along one axis whose window contains key index r:
// 0 <= r - off - s*i < kernel  and  0 <= i < n_query. Empty when lo > hi.
NA_HOST_DEVICE inline void queries_covering(int64_t r, int64_t off, int64_t s, int64_t kernel, int64_t n_query,
                                            int64_t* lo, int64_t* hi) {
  int64_t a = ceil_div(r - off - kernel + 1, s);
  int64_t b = floor_div(r - off, s);
  *lo = a > 0 ? a : 0;
  *hi = b < n_query - 1 ? b : n_query - 1;
}

}  // namespace neighborhood_attn
}  // namespace relzoo
