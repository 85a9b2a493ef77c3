// Neighbourhood attention (SASA): CUDA kernels, forward and backward.
//
// Same definition, layout and passes as the CPU kernels (neighborhood_attn.cpp, neighborhood_attn.h):
//   forward   one thread per query; the probabilities row (K values) doubles as the logits scratch
//   backward  1) one thread per query: dL = p * (dP - sum p dP), dq
//             2) one thread per (head, slot, channel): drel
//             3) one thread per key position: dk, dv gathered from the queries whose window holds it
//             4) one thread per (mixture, slot): dmix (only with a mixture; the stem is small)
// No atomics: every thread owns its outputs, so results are deterministic. Only c10/cuda headers
// (no ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers): quicker to build.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "neighborhood_attn.h"

namespace relzoo {
namespace neighborhood_attn {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

template <typename scalar_t>
struct Ptrs {
  const scalar_t *q, *k, *v, *rel, *mix;
};

__device__ inline bool inside(const Geometry& g, int64_t r, int64_t c) { return r >= 0 && r < g.Hk && c >= 0 && c < g.Wk; }

template <typename scalar_t>
__global__ void forward_kernel(Geometry g, Ptrs<scalar_t> in, scalar_t* out, scalar_t* probs) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t nq = g.B * g.G * g.Hq * g.Wq;
  if (n >= nq) return;
  const int64_t K = g.kh * g.kw, D = g.D, Dv = g.Dv, VD = g.M * g.Dv;
  const int64_t j = n % g.Wq, i = (n / g.Wq) % g.Hq, bg = n / (g.Hq * g.Wq), head = bg % g.G;
  const scalar_t* qn = in.q + n * D;
  const scalar_t* kb = in.k + bg * g.Hk * g.Wk * D;
  const scalar_t* vb = in.v + bg * g.Hk * g.Wk * VD;
  const scalar_t* relg = in.rel ? in.rel + head * K * D : nullptr;
  const int64_t r0 = g.sh * i + g.oh, c0 = g.sw * j + g.ow;
  scalar_t* pn = probs + n * K;
  scalar_t* on = out + n * Dv;
  scalar_t mx = 0;
  bool any = false;
  for (int64_t t = 0; t < K; ++t) {
    const int64_t r = r0 + t / g.kw, c = c0 + t % g.kw;
    if (!inside(g, r, c)) continue;
    const scalar_t* kp = kb + (r * g.Wk + c) * D;
    scalar_t s = 0;
    for (int64_t d = 0; d < D; ++d) s += qn[d] * (kp[d] + (relg ? relg[t * D + d] : scalar_t(0)));
    pn[t] = s;
    mx = any ? (s > mx ? s : mx) : s;
    any = true;
  }
  scalar_t sum = 0;
  for (int64_t t = 0; t < K; ++t) {
    const int64_t r = r0 + t / g.kw, c = c0 + t % g.kw;
    const scalar_t e = inside(g, r, c) ? exp(pn[t] - mx) : scalar_t(0);
    pn[t] = e;
    sum += e;
  }
  const scalar_t inv = any ? scalar_t(1) / sum : scalar_t(0);
  for (int64_t t = 0; t < K; ++t) pn[t] *= inv;
  for (int64_t e = 0; e < Dv; ++e) {
    scalar_t acc = 0;
    for (int64_t t = 0; t < K; ++t) {
      const int64_t r = r0 + t / g.kw, c = c0 + t % g.kw;
      if (!inside(g, r, c)) continue;
      const scalar_t* vp = vb + (r * g.Wk + c) * VD;
      if (in.mix) {
        for (int64_t m = 0; m < g.M; ++m) acc += pn[t] * in.mix[m * K + t] * vp[m * Dv + e];
      } else {
        acc += pn[t] * vp[e];
      }
    }
    on[e] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_query_kernel(Geometry g, Ptrs<scalar_t> in, const scalar_t* dout, const scalar_t* probs,
                                      scalar_t* dL, scalar_t* dq) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t nq = g.B * g.G * g.Hq * g.Wq;
  if (n >= nq) return;
  const int64_t K = g.kh * g.kw, D = g.D, Dv = g.Dv, VD = g.M * g.Dv;
  const int64_t j = n % g.Wq, i = (n / g.Wq) % g.Hq, bg = n / (g.Hq * g.Wq), head = bg % g.G;
  const int64_t r0 = g.sh * i + g.oh, c0 = g.sw * j + g.ow;
  const scalar_t* pn = probs + n * K;
  const scalar_t* gn = dout + n * Dv;
  const scalar_t* kb = in.k + bg * g.Hk * g.Wk * D;
  const scalar_t* vb = in.v + bg * g.Hk * g.Wk * VD;
  const scalar_t* relg = in.rel ? in.rel + head * K * D : nullptr;
  scalar_t* ln = dL + n * K;
  scalar_t total = 0;
  for (int64_t t = 0; t < K; ++t) {
    const int64_t r = r0 + t / g.kw, c = c0 + t % g.kw;
    ln[t] = 0;
    if (!inside(g, r, c)) continue;
    const scalar_t* vp = vb + (r * g.Wk + c) * VD;
    scalar_t dp = 0;
    for (int64_t m = 0; m < g.M; ++m) {
      scalar_t s = 0;
      for (int64_t e = 0; e < Dv; ++e) s += gn[e] * vp[m * Dv + e];
      dp += (in.mix ? in.mix[m * K + t] : scalar_t(1)) * s;
    }
    ln[t] = dp;
    total += pn[t] * dp;
  }
  for (int64_t t = 0; t < K; ++t) ln[t] = pn[t] * (ln[t] - total);  // 0 outside: p = 0 there
  for (int64_t d = 0; d < D; ++d) {
    scalar_t acc = 0;
    for (int64_t t = 0; t < K; ++t) {
      const int64_t r = r0 + t / g.kw, c = c0 + t % g.kw;
      if (!inside(g, r, c)) continue;
      acc += ln[t] * (kb[(r * g.Wk + c) * D + d] + (relg ? relg[t * D + d] : scalar_t(0)));
    }
    dq[n * D + d] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_rel_kernel(Geometry g, const scalar_t* q, const scalar_t* dL, scalar_t* drel) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t K = g.kh * g.kw, D = g.D, HWq = g.Hq * g.Wq;
  if (idx >= g.G * K * D) return;
  const int64_t d = idx % D, t = (idx / D) % K, head = idx / (D * K);
  scalar_t acc = 0;
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t n0 = (b * g.G + head) * HWq;
    for (int64_t n = n0; n < n0 + HWq; ++n) acc += dL[n * K + t] * q[n * D + d];
  }
  drel[idx] = acc;
}

template <typename scalar_t>
__global__ void backward_key_kernel(Geometry g, Ptrs<scalar_t> in, const scalar_t* dout, const scalar_t* probs,
                                    const scalar_t* dL, scalar_t* dk, scalar_t* dv) {
  const int64_t kn = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (kn >= g.B * g.G * g.Hk * g.Wk) return;
  const int64_t K = g.kh * g.kw, D = g.D, Dv = g.Dv, VD = g.M * g.Dv;
  const int64_t c = kn % g.Wk, r = (kn / g.Wk) % g.Hk, bg = kn / (g.Hk * g.Wk);
  int64_t ilo, ihi, jlo, jhi;
  queries_covering(r, g.oh, g.sh, g.kh, g.Hq, &ilo, &ihi);
  queries_covering(c, g.ow, g.sw, g.kw, g.Wq, &jlo, &jhi);
  for (int64_t d = 0; d < D; ++d) {
    scalar_t acc = 0;
    for (int64_t i = ilo; i <= ihi; ++i) {
      for (int64_t j = jlo; j <= jhi; ++j) {
        const int64_t t = (r - g.oh - g.sh * i) * g.kw + (c - g.ow - g.sw * j);
        const int64_t n = (bg * g.Hq + i) * g.Wq + j;
        acc += dL[n * K + t] * in.q[n * D + d];
      }
    }
    dk[kn * D + d] = acc;
  }
  for (int64_t me = 0; me < VD; ++me) {
    const int64_t m = me / Dv, e = me % Dv;
    scalar_t acc = 0;
    for (int64_t i = ilo; i <= ihi; ++i) {
      for (int64_t j = jlo; j <= jhi; ++j) {
        const int64_t t = (r - g.oh - g.sh * i) * g.kw + (c - g.ow - g.sw * j);
        const int64_t n = (bg * g.Hq + i) * g.Wq + j;
        const scalar_t w = in.mix ? probs[n * K + t] * in.mix[m * K + t] : probs[n * K + t];
        acc += w * dout[n * Dv + e];
      }
    }
    dv[kn * VD + me] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_mix_kernel(Geometry g, const scalar_t* v, const scalar_t* dout, const scalar_t* probs,
                                    scalar_t* dmix) {
  const int64_t mt = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t K = g.kh * g.kw, Dv = g.Dv, VD = g.M * g.Dv;
  if (mt >= g.M * K) return;
  const int64_t m = mt / K, t = mt % K, a = t / g.kw, b = t % g.kw;
  const int64_t nq = g.B * g.G * g.Hq * g.Wq;
  scalar_t acc = 0;
  for (int64_t n = 0; n < nq; ++n) {
    const int64_t j = n % g.Wq, i = (n / g.Wq) % g.Hq, bg = n / (g.Hq * g.Wq);
    const int64_t r = g.sh * i + g.oh + a, c = g.sw * j + g.ow + b;
    if (!inside(g, r, c)) continue;
    const scalar_t* vp = v + ((bg * g.Hk + r) * g.Wk + c) * VD + m * Dv;
    scalar_t s = 0;
    for (int64_t e = 0; e < Dv; ++e) s += dout[n * Dv + e] * vp[e];
    acc += probs[n * K + t] * s;
  }
  dmix[mt] = acc;
}

at::Tensor opt_contiguous(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

template <typename scalar_t>
Ptrs<scalar_t> pointers(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel,
                        const at::Tensor& mix) {
  return {q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          rel.defined() ? rel.const_data_ptr<scalar_t>() : nullptr,
          mix.defined() ? mix.const_data_ptr<scalar_t>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                const c10::optional<at::Tensor>& rel_,
                                                const c10::optional<at::Tensor>& mix_, at::IntArrayRef kernel_size,
                                                at::IntArrayRef stride, at::IntArrayRef offset) {
  const Geometry g = check_and_describe(q_, k_, v_, rel_, mix_, kernel_size, stride, offset);
  TORCH_CHECK(q_.is_cuda(), "neighborhood_attn (CUDA kernel): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor rel = opt_contiguous(rel_), mix = opt_contiguous(mix_);
  at::Tensor out = at::empty({g.B, g.G, g.Hq, g.Wq, g.Dv}, q.options());
  at::Tensor probs = at::empty({g.B, g.G, g.Hq, g.Wq, g.K()}, q.options());
  const int64_t nq = g.B * g.G * g.Hq * g.Wq;
  if (nq == 0) return {out, probs};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighborhood_attn_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(nq), kThreads, 0, stream>>>(
        g, pointers<scalar_t>(q, k, v, rel, mix), out.mutable_data_ptr<scalar_t>(), probs.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const c10::optional<at::Tensor>& rel_, const c10::optional<at::Tensor>& mix_, const at::Tensor& probs_,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef offset) {
  const Geometry g = check_and_describe(q_, k_, v_, rel_, mix_, kernel_size, stride, offset);
  TORCH_CHECK(q_.is_cuda(), "neighborhood_attn_backward (CUDA kernel): expected CUDA tensors");
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({g.B, g.G, g.Hq, g.Wq, g.Dv}) &&
                  grad_out_.scalar_type() == q_.scalar_type(),
              "neighborhood_attn_backward: grad_out must be (B, G, Hq, Wq, Dv) of q's dtype, got ", grad_out_.sizes());
  TORCH_CHECK(probs_.sizes() == at::IntArrayRef({g.B, g.G, g.Hq, g.Wq, g.K()}) &&
                  probs_.scalar_type() == q_.scalar_type(),
              "neighborhood_attn_backward: probs must be (B, G, Hq, Wq, K) of q's dtype, got ", probs_.sizes());
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor rel = opt_contiguous(rel_), mix = opt_contiguous(mix_);
  const at::Tensor dout = grad_out_.contiguous(), probs = probs_.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor drel = rel.defined() ? at::empty_like(rel) : at::empty({0}, q.options());
  at::Tensor dmix = mix.defined() ? at::empty_like(mix) : at::empty({0}, q.options());
  at::Tensor dL = at::empty_like(probs);
  const int64_t nq = g.B * g.G * g.Hq * g.Wq, nk = g.B * g.G * g.Hk * g.Wk;
  if (nq == 0 || nk == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), drel.zero_(), dmix.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighborhood_attn_backward_cuda", [&] {
    const Ptrs<scalar_t> in = pointers<scalar_t>(q, k, v, rel, mix);
    backward_query_kernel<scalar_t><<<blocks_for(nq), kThreads, 0, stream>>>(
        g, in, dout.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(), dL.mutable_data_ptr<scalar_t>(),
        dq.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (rel.defined()) {
      backward_rel_kernel<scalar_t><<<blocks_for(g.G * g.K() * g.D), kThreads, 0, stream>>>(
          g, q.const_data_ptr<scalar_t>(), dL.const_data_ptr<scalar_t>(), drel.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    backward_key_kernel<scalar_t><<<blocks_for(nk), kThreads, 0, stream>>>(
        g, in, dout.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(), dL.const_data_ptr<scalar_t>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mix.defined()) {
      backward_mix_kernel<scalar_t><<<blocks_for(g.M * g.K()), kThreads, 0, stream>>>(
          g, v.const_data_ptr<scalar_t>(), dout.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(),
          dmix.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv, drel, dmix};
}

}  // namespace
}  // namespace neighborhood_attn
}  // namespace relzoo

TORCH_LIBRARY_IMPL(relzoo, CUDA, m) {
  m.impl("neighborhood_attn", &relzoo::neighborhood_attn::forward_cuda);
  m.impl("neighborhood_attn_backward", &relzoo::neighborhood_attn::backward_cuda);
}
