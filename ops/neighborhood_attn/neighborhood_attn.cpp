// Neighbourhood attention (SASA): schema and CPU kernels, forward and backward.
//
//   logit_t = sum_d q_d * (k_d(t) + rel[g, t, d])        t over the kh x kw window of the query
//   p       = softmax over the slots inside the key grid  (others: probability 0)
//   out_e   = sum_t p_t * sum_m mix[m, t] * v_{m,e}(t)    (no mix: M = 1, weight 1)
//
// Shapes and geometry: neighborhood_attn.h. The definition is the unfold formulation in
// zoo/layers/_na_op.py. Only O(B*G*Hq*Wq*K) probabilities are kept for backward, never the
// K copies of k and v that the unfold formulation materialises.
//
// Parallelisation without atomics: every pass gives each output element to exactly one task.
//   forward   one task per query
//   backward  1) per query: dL = p * (dP - sum p dP), dq            (dL kept, size of probs)
//             2) per head: drel = sum over queries dL * q
//             3) per key position: dk, dv gathered from the queries whose window holds it
//             4) per (mixture, slot): dmix (only with a mixture)
// Header-light (ATen core + TORCH_LIBRARY), see ops/rpe_index for the same pattern.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "neighborhood_attn.h"

namespace relzoo {
namespace neighborhood_attn {

Geometry check_and_describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& rel, const c10::optional<at::Tensor>& mix,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef offset) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && offset.size() == 2,
              "neighborhood_attn: kernel_size, stride and offset must have 2 entries each");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && stride[0] >= 1 && stride[1] >= 1,
              "neighborhood_attn: kernel_size and stride must be >= 1, got ", kernel_size, " and ", stride);
  TORCH_CHECK(q.dim() == 5, "neighborhood_attn: q must be (B, G, Hq, Wq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 5, "neighborhood_attn: k must be (B, G, Hk, Wk, D), got shape ", k.sizes());
  Geometry g;
  g.B = q.size(0), g.G = q.size(1), g.Hq = q.size(2), g.Wq = q.size(3), g.D = q.size(4);
  g.Hk = k.size(2), g.Wk = k.size(3);
  g.kh = kernel_size[0], g.kw = kernel_size[1], g.sh = stride[0], g.sw = stride[1];
  g.oh = offset[0], g.ow = offset[1];
  TORCH_CHECK(k.size(0) == g.B && k.size(1) == g.G && k.size(4) == g.D, "neighborhood_attn: k ", k.sizes(),
              " does not match q ", q.sizes(), " in batch, heads or head width");
  g.has_mix = mix.has_value() && mix->defined();
  g.has_rel = rel.has_value() && rel->defined();
  if (g.has_mix) {
    TORCH_CHECK(v.dim() == 6, "neighborhood_attn: with mix, v must be (B, G, Hk, Wk, M, Dv), got ", v.sizes());
    g.M = v.size(4), g.Dv = v.size(5);
    TORCH_CHECK(mix->dim() == 2 && mix->size(0) == g.M && mix->size(1) == g.K(), "neighborhood_attn: mix must be (M=",
                g.M, ", K=", g.K(), "), got ", mix->sizes());
  } else {
    TORCH_CHECK(v.dim() == 5, "neighborhood_attn: v must be (B, G, Hk, Wk, Dv), got ", v.sizes());
    g.M = 1, g.Dv = v.size(4);
  }
  TORCH_CHECK(v.size(0) == g.B && v.size(1) == g.G && v.size(2) == g.Hk && v.size(3) == g.Wk,
              "neighborhood_attn: v ", v.sizes(), " does not match k ", k.sizes());
  if (g.has_rel) {
    TORCH_CHECK(rel->dim() == 3 && rel->size(0) == g.G && rel->size(1) == g.K() && rel->size(2) == g.D,
                "neighborhood_attn: rel must be (G=", g.G, ", K=", g.K(), ", D=", g.D, "), got ", rel->sizes());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "neighborhood_attn: expected float32 or float64 tensors, got ", dtype);
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == q.device(),
                "neighborhood_attn: all inputs must share q's dtype and device (", dtype, ", ", q.device(), ")");
  }
  if (g.has_rel) TORCH_CHECK(rel->scalar_type() == dtype && rel->device() == q.device(), "neighborhood_attn: rel dtype/device");
  if (g.has_mix) TORCH_CHECK(mix->scalar_type() == dtype && mix->device() == q.device(), "neighborhood_attn: mix dtype/device");
  return g;
}

namespace {

// Queries per task: a query costs about K * (2 D + M Dv) multiply-adds.
int64_t grain(const Geometry& g) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.K() * (g.D + g.M * g.Dv))); }

// Raw pointers of the (contiguous) inputs, null for absent optional ones.
template <typename scalar_t>
struct Inputs {
  const scalar_t *q, *k, *v, *rel, *mix;
};

// Calls f(std::integral_constant<int, W>) with W = the head width when D == Dv is one of the common
// widths (the compiler then unrolls and vectorises the channel loops), else W = 0 (width read at run time).
template <typename F>
void with_width(const Geometry& g, F&& f) {
  if (g.D == g.Dv) {
    switch (g.D) {
      case 1: return f(std::integral_constant<int, 1>{});
      case 8: return f(std::integral_constant<int, 8>{});
      case 16: return f(std::integral_constant<int, 16>{});
      case 32: return f(std::integral_constant<int, 32>{});
      case 64: return f(std::integral_constant<int, 64>{});
      default: break;
    }
  }
  f(std::integral_constant<int, 0>{});
}

template <typename scalar_t, int W>
void forward_kernel(const Geometry& g, Inputs<scalar_t> in, scalar_t* out, scalar_t* probs) {
  const int64_t D = W > 0 ? W : g.D, Dv = W > 0 ? W : g.Dv;
  const int64_t K = g.K(), VD = g.M * Dv;
  const int64_t nq = g.B * g.G * g.Hq * g.Wq;
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, nq, grain(g), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc(Dv);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t j = n % g.Wq, i = (n / g.Wq) % g.Hq, bg = n / (g.Hq * g.Wq), head = bg % g.G;
      const scalar_t* qn = in.q + n * D;
      const scalar_t* kb = in.k + bg * g.Hk * g.Wk * D;
      const scalar_t* vb = in.v + bg * g.Hk * g.Wk * VD;
      const scalar_t* relg = in.rel ? in.rel + head * K * D : nullptr;
      const int64_t r0 = g.sh * i + g.oh, c0 = g.sw * j + g.ow;
      scalar_t* pn = probs + n * K;  // holds the logits first
      scalar_t mx = kNegInf;
      for (int64_t a = 0; a < g.kh; ++a) {
        const int64_t r = r0 + a;
        const bool row_inside = r >= 0 && r < g.Hk;
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t t = a * g.kw + b, c = c0 + b;
          if (!row_inside || c < 0 || c >= g.Wk) {
            pn[t] = kNegInf;  // outside the key grid: excluded from the softmax
            continue;
          }
          const scalar_t* kp = kb + (r * g.Wk + c) * D;
          scalar_t s = 0;
          if (relg) {
            const scalar_t* rp = relg + t * D;
            for (int64_t d = 0; d < D; ++d) s += qn[d] * (kp[d] + rp[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) s += qn[d] * kp[d];
          }
          pn[t] = s;
          mx = std::max(mx, s);
        }
      }
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      if (mx == kNegInf) {  // window entirely outside the key grid: no attention, output 0
        std::fill(pn, pn + K, scalar_t(0));
      } else {
        scalar_t sum = 0;
        for (int64_t t = 0; t < K; ++t) sum += (pn[t] = std::exp(pn[t] - mx));  // exp(-inf) = 0
        const scalar_t inv = scalar_t(1) / sum;
        for (int64_t a = 0; a < g.kh; ++a) {
          for (int64_t b = 0; b < g.kw; ++b) {
            const int64_t t = a * g.kw + b, r = r0 + a, c = c0 + b;
            const scalar_t p = pn[t] * inv;
            pn[t] = p;
            if (p == scalar_t(0)) continue;  // outside (or underflowed): contributes nothing
            const scalar_t* vp = vb + (r * g.Wk + c) * VD;
            if (in.mix) {
              for (int64_t m = 0; m < g.M; ++m) {
                const scalar_t w = p * in.mix[m * K + t];
                for (int64_t e = 0; e < Dv; ++e) acc[e] += w * vp[m * Dv + e];
              }
            } else {
              for (int64_t e = 0; e < Dv; ++e) acc[e] += p * vp[e];
            }
          }
        }
      }
      std::copy(acc.begin(), acc.end(), out + n * Dv);
    }
  });
}

template <typename scalar_t, int W>
void backward_kernel(const Geometry& g, Inputs<scalar_t> in, const scalar_t* dout, const scalar_t* probs,
                     scalar_t* dL, scalar_t* dq, scalar_t* dk, scalar_t* dv, scalar_t* drel, scalar_t* dmix) {
  const int64_t D = W > 0 ? W : g.D, Dv = W > 0 ? W : g.Dv;
  const int64_t K = g.K(), M = g.M, VD = g.M * Dv;
  const int64_t nq = g.B * g.G * g.Hq * g.Wq, HWq = g.Hq * g.Wq;

  // 1) per query: dP_t = dout . v(t) (mixed), dL_t = p_t (dP_t - sum_s p_s dP_s); dq = sum_t dL_t (k(t) + rel_t)
  at::parallel_for(0, nq, grain(g), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc(D);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t j = n % g.Wq, i = (n / g.Wq) % g.Hq, bg = n / HWq, head = bg % g.G;
      const int64_t r0 = g.sh * i + g.oh, c0 = g.sw * j + g.ow;
      const scalar_t* pn = probs + n * K;
      const scalar_t* gn = dout + n * Dv;
      const scalar_t* kb = in.k + bg * g.Hk * g.Wk * D;
      const scalar_t* vb = in.v + bg * g.Hk * g.Wk * VD;
      const scalar_t* relg = in.rel ? in.rel + head * K * D : nullptr;
      scalar_t* ln = dL + n * K;
      scalar_t total = 0;
      for (int64_t a = 0; a < g.kh; ++a) {
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t t = a * g.kw + b, r = r0 + a, c = c0 + b;
          ln[t] = 0;
          if (pn[t] == scalar_t(0)) continue;  // outside the grid (or no weight): dL = p * (...) = 0
          const scalar_t* vp = vb + (r * g.Wk + c) * VD;
          scalar_t dp = 0;
          for (int64_t m = 0; m < M; ++m) {
            scalar_t s = 0;
            for (int64_t e = 0; e < Dv; ++e) s += gn[e] * vp[m * Dv + e];
            dp += (in.mix ? in.mix[m * K + t] : scalar_t(1)) * s;
          }
          ln[t] = dp;
          total += pn[t] * dp;
        }
      }
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t a = 0; a < g.kh; ++a) {
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t t = a * g.kw + b, r = r0 + a, c = c0 + b;
          if (pn[t] == scalar_t(0)) continue;
          const scalar_t l = pn[t] * (ln[t] - total);
          ln[t] = l;
          const scalar_t* kp = kb + (r * g.Wk + c) * D;
          if (relg) {
            const scalar_t* rp = relg + t * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += l * (kp[d] + rp[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += l * kp[d];
          }
        }
      }
      std::copy(acc.begin(), acc.end(), dq + n * D);
    }
  });

  // 2) drel[head] = sum over batch and queries of dL (K) x q (D); one task per head reads dL and q
  //    contiguously (dL is 0 on slots outside the grid)
  if (drel) {
    at::parallel_for(0, g.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(K * D);
      for (int64_t head = begin; head < end; ++head) {
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t b = 0; b < g.B; ++b) {
          const int64_t n0 = (b * g.G + head) * HWq;
          for (int64_t n = n0; n < n0 + HWq; ++n) {
            const scalar_t* ln = dL + n * K;
            const scalar_t* qn = in.q + n * D;
            for (int64_t t = 0; t < K; ++t) {
              const scalar_t l = ln[t];
              if (l == scalar_t(0)) continue;
              scalar_t* at = acc.data() + t * D;
              for (int64_t d = 0; d < D; ++d) at[d] += l * qn[d];
            }
          }
        }
        std::copy(acc.begin(), acc.end(), drel + head * K * D);
      }
    });
  }

  // 3) per key position: dk = sum dL * q, dv_m = sum p * mix_m * dout over the queries whose window holds it
  const int64_t nk = g.B * g.G * g.Hk * g.Wk;
  at::parallel_for(0, nk, grain(g), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc_k(D), acc_v(VD);
    for (int64_t kn = begin; kn < end; ++kn) {
      const int64_t c = kn % g.Wk, r = (kn / g.Wk) % g.Hk, bg = kn / (g.Hk * g.Wk);
      std::fill(acc_k.begin(), acc_k.end(), scalar_t(0));
      std::fill(acc_v.begin(), acc_v.end(), scalar_t(0));
      int64_t ilo, ihi, jlo, jhi;
      queries_covering(r, g.oh, g.sh, g.kh, g.Hq, &ilo, &ihi);
      queries_covering(c, g.ow, g.sw, g.kw, g.Wq, &jlo, &jhi);
      for (int64_t i = ilo; i <= ihi; ++i) {
        const int64_t a = r - g.oh - g.sh * i;
        for (int64_t j = jlo; j <= jhi; ++j) {
          const int64_t t = a * g.kw + (c - g.ow - g.sw * j);
          const int64_t n = (bg * g.Hq + i) * g.Wq + j;
          const scalar_t l = dL[n * K + t], p = probs[n * K + t];
          const scalar_t* qn = in.q + n * D;
          const scalar_t* gn = dout + n * Dv;
          for (int64_t d = 0; d < D; ++d) acc_k[d] += l * qn[d];
          if (in.mix) {
            for (int64_t m = 0; m < M; ++m) {
              const scalar_t w = p * in.mix[m * K + t];
              for (int64_t e = 0; e < Dv; ++e) acc_v[m * Dv + e] += w * gn[e];
            }
          } else {
            for (int64_t e = 0; e < Dv; ++e) acc_v[e] += p * gn[e];
          }
        }
      }
      std::copy(acc_k.begin(), acc_k.end(), dk + kn * D);
      std::copy(acc_v.begin(), acc_v.end(), dv + kn * VD);
    }
  });

  // 4) dmix[m, t] = sum over queries of p_t * (dout . v_m(t))
  if (dmix) {
    at::parallel_for(0, M * K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t mt = begin; mt < end; ++mt) {
        const int64_t m = mt / K, t = mt % K, a = t / g.kw, b = t % g.kw;
        scalar_t acc = 0;
        for (int64_t n = 0; n < nq; ++n) {
          const scalar_t p = probs[n * K + t];
          if (p == scalar_t(0)) continue;  // includes every slot outside the grid
          const int64_t j = n % g.Wq, i = (n / g.Wq) % g.Hq, bg = n / HWq;
          const int64_t r = g.sh * i + g.oh + a, c = g.sw * j + g.ow + b;
          const scalar_t* vp = in.v + ((bg * g.Hk + r) * g.Wk + c) * VD + m * Dv;
          const scalar_t* gn = dout + n * Dv;
          scalar_t s = 0;
          for (int64_t e = 0; e < Dv; ++e) s += gn[e] * vp[e];
          acc += p * s;
        }
        dmix[mt] = acc;
      }
    });
  }
}

at::Tensor opt_contiguous(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                               const c10::optional<at::Tensor>& rel_,
                                               const c10::optional<at::Tensor>& mix_, at::IntArrayRef kernel_size,
                                               at::IntArrayRef stride, at::IntArrayRef offset) {
  const Geometry g = check_and_describe(q_, k_, v_, rel_, mix_, kernel_size, stride, offset);
  TORCH_CHECK(q_.device().is_cpu(), "neighborhood_attn (CPU kernel): expected CPU tensors");
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor rel = opt_contiguous(rel_), mix = opt_contiguous(mix_);
  at::Tensor out = at::empty({g.B, g.G, g.Hq, g.Wq, g.Dv}, q.options());
  at::Tensor probs = at::empty({g.B, g.G, g.Hq, g.Wq, g.K()}, q.options());
  if (out.numel() == 0 && probs.numel() == 0) return {out, probs};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighborhood_attn_cpu", [&] {
    Inputs<scalar_t> in{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                        rel.defined() ? rel.const_data_ptr<scalar_t>() : nullptr,
                        mix.defined() ? mix.const_data_ptr<scalar_t>() : nullptr};
    with_width(g, [&](auto width) {
      forward_kernel<scalar_t, decltype(width)::value>(g, in, out.mutable_data_ptr<scalar_t>(),
                                                       probs.mutable_data_ptr<scalar_t>());
    });
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const c10::optional<at::Tensor>& rel_, const c10::optional<at::Tensor>& mix_, const at::Tensor& probs_,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef offset) {
  const Geometry g = check_and_describe(q_, k_, v_, rel_, mix_, kernel_size, stride, offset);
  TORCH_CHECK(q_.device().is_cpu(), "neighborhood_attn_backward (CPU kernel): expected CPU tensors");
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({g.B, g.G, g.Hq, g.Wq, g.Dv}) &&
                  grad_out_.scalar_type() == q_.scalar_type(),
              "neighborhood_attn_backward: grad_out must be (B, G, Hq, Wq, Dv) of q's dtype, got ", grad_out_.sizes());
  TORCH_CHECK(probs_.sizes() == at::IntArrayRef({g.B, g.G, g.Hq, g.Wq, g.K()}) &&
                  probs_.scalar_type() == q_.scalar_type(),
              "neighborhood_attn_backward: probs must be (B, G, Hq, Wq, K) of q's dtype, got ", probs_.sizes());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor rel = opt_contiguous(rel_), mix = opt_contiguous(mix_);
  const at::Tensor dout = grad_out_.contiguous(), probs = probs_.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor drel = rel.defined() ? at::empty_like(rel) : at::empty({0}, q.options());
  at::Tensor dmix = mix.defined() ? at::empty_like(mix) : at::empty({0}, q.options());
  at::Tensor dL = at::empty_like(probs);
  if (q.numel() == 0 || k.numel() == 0) {
    return {dq.zero_(), dk.zero_(), dv.zero_(), drel.zero_(), dmix.zero_()};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighborhood_attn_backward_cpu", [&] {
    Inputs<scalar_t> in{q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                        rel.defined() ? rel.const_data_ptr<scalar_t>() : nullptr,
                        mix.defined() ? mix.const_data_ptr<scalar_t>() : nullptr};
    with_width(g, [&](auto width) {
      backward_kernel<scalar_t, decltype(width)::value>(
          g, in, dout.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(), dL.mutable_data_ptr<scalar_t>(),
          dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
          rel.defined() ? drel.mutable_data_ptr<scalar_t>() : nullptr,
          mix.defined() ? dmix.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  return {dq, dk, dv, drel, dmix};
}

}  // namespace
}  // namespace neighborhood_attn
}  // namespace relzoo

// FRAGMENT: the `relzoo` namespace is shared by every op library under ops/.
TORCH_LIBRARY_FRAGMENT(relzoo, m) {
  m.def(
      "neighborhood_attn(Tensor q, Tensor k, Tensor v, Tensor? rel, Tensor? mix, int[2] kernel_size, "
      "int[2] stride, int[2] offset) -> (Tensor out, Tensor probs)");
  m.def(
      "neighborhood_attn_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rel, Tensor? mix, "
      "Tensor probs, int[2] kernel_size, int[2] stride, int[2] offset) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_rel, Tensor grad_mix)");
}

TORCH_LIBRARY_IMPL(relzoo, CPU, m) {
  m.impl("neighborhood_attn", &relzoo::neighborhood_attn::forward_cpu);
  m.impl("neighborhood_attn_backward", &relzoo::neighborhood_attn::backward_cpu);
}
