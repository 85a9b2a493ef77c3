// Fused attention with relative terms: the problem description shared by the kernels.
//
//   s[i, j] = q_i . k_j                                   (q is pre-scaled by the caller)
//           + sum_t wq_t(o) xq[i, iq_t(o)]                query term   (iRPE rpe_k, RPA key term)
//           + sum_t wk_t(o') xk[j, ik_t(o')]              key term     (iRPE rpe_q: keys act as queries)
//           + attn_bias[b, h, i, j]                       additive mask (-inf = masked), broadcast strides
//           (-inf where key_padding_mask[b, j])
//   p       = softmax_j(s)          (a query with every key masked: p = 0, output 0, lse = -inf)
//   pd      = dropout(p)            (counter-based: keep(b, h, i, j) is a hash of the seed, no mask stored)
//   out_i   = sum_j pd[i, j] v_j
//   G[i, e] = sum_j pd[i, j] sum_t wv_t(o) [iv_t(o) == e]  value term: per-entry probability sums,
//                                                           the caller adds G @ table
//
// o = o(i, j) is the pair's offset on the token grid (t, h, w), query minus key, flattened:
//   ((ti - tj) + T - 1) (2H-1)(2W-1) + ((ri - rj) + H - 1)(2W-1) + (ci - cj) + W - 1   in [0, O)
// o' = o(j, i) = O - 1 - o. Pairs touching one of the `skip` leading tokens use column O.
// A term's taps table is (T, O + 1): T <= 2 entry ids (int32) per offset, with weights (or none = 1).
#pragma once

#include <cstdint>
#include <vector>

namespace relzoo {
namespace relative_attn {

template <typename T>
struct Taps {
  int n = 0;                                   // 0: no term; else 1 or 2 taps per offset
  const int32_t* idx[2] = {nullptr, nullptr};  // (O + 1) entry ids per tap
  const T* w[2] = {nullptr, nullptr};          // (O + 1) weights per tap, or null (weight 1)
  // the same, offsets reversed (ridx[t][o] = idx[t][O - 1 - o], o < O): along a grid row of keys a
  // query's offsets decrease, so the query-side loops read these with unit stride
  const int32_t* ridx[2] = {nullptr, nullptr};
  const T* rw[2] = {nullptr, nullptr};
  std::vector<int32_t> ridx_store;
  std::vector<T> rw_store;

  // moves keep the stores' buffers (and so ridx/rw valid); a copy would not
  Taps() = default;
  Taps(Taps&&) = default;
  Taps& operator=(Taps&&) = default;
  Taps(const Taps&) = delete;
  Taps& operator=(const Taps&) = delete;

  void reverse(int64_t O) {  // fills ridx/rw from idx/w
    ridx_store.resize(static_cast<size_t>(n * O));
    if (w[0]) rw_store.resize(static_cast<size_t>(n * O));
    for (int t = 0; t < n; ++t) {
      for (int64_t o = 0; o < O; ++o) {
        ridx_store[t * O + o] = idx[t][O - 1 - o];
        if (w[0]) rw_store[t * O + o] = w[t][O - 1 - o];
      }
      ridx[t] = ridx_store.data() + t * O;
      rw[t] = w[0] ? rw_store.data() + t * O : nullptr;
    }
  }
};

template <typename T>
struct Problem {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  int64_t skip = 0, gt = 1, gh = 1, gw = 1, O = 0;  // token grid and number of offsets
  const T *q = nullptr, *k = nullptr, *v = nullptr;  // (B, H, L, D) contiguous
  const T *kt = nullptr, *vt = nullptr;             // (B, H, D, Lk), (B, H, Dv, Lk): transposed copies
  const T *xq = nullptr, *xk = nullptr;             // (B, H, Lq, Kq), (B, H, Lk, Kk)
  int64_t Kq = 0, Kk = 0, Kv = 0;
  Taps<T> tq, tk, tv;
  const T* bias = nullptr;                          // attn_bias with strides (b, h, i, j)
  int64_t bias_stride[4] = {0, 0, 0, 0};
  const bool* pad = nullptr;                        // (B, Lk), true = key ignored
  double dropout_p = 0.0;
  uint64_t seed = 0;
  bool has_terms() const { return tq.n || tk.n || tv.n; }
};

template <typename T>
struct Outputs {          // forward
  T *out = nullptr, *lse = nullptr, *G = nullptr;
};

template <typename T>
struct Grads {            // backward: inputs dout, dG; outputs the rest (dk, dv, dxk accumulated)
  const T *dout = nullptr, *dG = nullptr, *lse = nullptr;
  T *dq = nullptr, *dk = nullptr, *dv = nullptr, *dxq = nullptr, *dxk = nullptr;
};

// Row blocks: rows of one (batch, head) processed together, sized so a block's r x Lk scores stay in cache.
inline int64_t block_rows(int64_t Lk, int64_t elem_size) {
  int64_t r = (192 * 1024) / (elem_size * (Lk > 0 ? Lk : 1));
  r = r < 6 ? 6 : (r > 60 ? 60 : r);
  return r - r % 6;  // whole 6-row product tiles
}

// The RPA original's 2-D attend ops (relative_attn_kernels.h): which product attend() computes.
enum AttendOp { kAttendPairs, kAttendDot, kAttendTableGrad };

// The kernels, once per instruction set (relative_attn_kernels.h; relative_attn.cpp picks one at run time).
// backward: `chunks` splits each (batch, head)'s rows between tasks; dk, dv, dxk then sum per-chunk partials.
#define RZ_DECLARE(ns)                                                                                     \
  namespace ns {                                                                                           \
  void forward(const Problem<float>&, const Outputs<float>&);                                              \
  void forward(const Problem<double>&, const Outputs<double>&);                                            \
  void backward(const Problem<float>&, const Grads<float>&, int64_t chunks);                               \
  void backward(const Problem<double>&, const Grads<double>&, int64_t chunks);                             \
  void attend(AttendOp, const float*, const float*, float*, int64_t B, int64_t C, int64_t H, int64_t W);     \
  void attend(AttendOp, const double*, const double*, double*, int64_t B, int64_t C, int64_t H, int64_t W);  \
  }

RZ_DECLARE(generic)
RZ_DECLARE(avx2)
#undef RZ_DECLARE

}  // namespace relative_attn
}  // namespace relzoo
