// Fused attention with relative terms (iRPE, RPA): schema, checks and the CPU entry points.
//
// relative_attn           out, lse, G = softmax(q k^T + terms + masks) (dropout) v, see relative_attn.h
// relative_attn_backward  dq, dk, dv, dxq, dxk from dout and dG, recomputing the probabilities block by
//                         block from the saved log-sum-exp (nothing of size Lq x Lk is stored)
// relative_attend_pairs / relative_attend_dot / relative_attend_table_grad
//                         the RPA original's 2-D attend ops and their gradients, as direct loops
//
// The Python side (zoo/ops/relative_attn.py) is the definition and registers autograd and fake kernels.
// The kernels (relative_attn_kernels.h) are compiled twice, for any CPU and for AVX2 + FMA; the CPU's
// features pick one when the library loads. Header-light (ATen core + TORCH_LIBRARY), like ops/rpe_index.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "relative_attn.h"

#define RZ_ISA generic
#define RZ_TARGET
#define RZ_FMA(a, b, c) ((a) * (b) + (c))
#define RZ_AVX2 0
#include "relative_attn_kernels.h"
#undef RZ_ISA
#undef RZ_TARGET
#undef RZ_FMA
#undef RZ_AVX2

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RZ_HAVE_AVX2 1
#define RZ_ISA avx2
#define RZ_TARGET __attribute__((target("avx2,fma")))
#define RZ_FMA(a, b, c) std::fma((a), (b), (c))
#define RZ_AVX2 1
#include "relative_attn_kernels.h"
#undef RZ_ISA
#undef RZ_TARGET
#undef RZ_FMA
#undef RZ_AVX2
#else
#define RZ_HAVE_AVX2 0
#endif

namespace relzoo {
namespace relative_attn {
namespace {

bool use_avx2() {
#if RZ_HAVE_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// The terms' taps: (index, weight) of the query, key and value terms.
using TapsArgs = std::array<c10::optional<at::Tensor>, 6>;

void check_dense(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "relative_attn: ", name, " must be ", like.scalar_type(),
              " like q, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "relative_attn: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "relative_attn: ", name, " must be contiguous");
}

template <typename T>
Taps<T> taps_of(const TapsArgs& taps, int which, int64_t O, int64_t entries,
                const at::Tensor& q, const char* name) {
  Taps<T> out;
  const c10::optional<at::Tensor>& index = taps[2 * which];
  const c10::optional<at::Tensor>& weight = taps[2 * which + 1];
  if (!present(index)) {
    TORCH_CHECK(!present(weight), "relative_attn: ", name, " weights without an index");
    return out;
  }
  const at::Tensor& idx = *index;
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 2 && (idx.size(0) == 1 || idx.size(0) == 2) &&
                  idx.size(1) == O + 1 && idx.is_contiguous() && idx.device().is_cpu(),
              "relative_attn: ", name, " index must be a contiguous int32 (1 or 2, ", O + 1, ") CPU tensor, got ",
              idx.scalar_type(), " ", idx.sizes());
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < idx.numel(); ++e) {
    TORCH_CHECK(ip[e] >= 0 && ip[e] < entries, "relative_attn: ", name, " index holds entry ", ip[e],
                " outside [0, ", entries, ")");
  }
  out.n = static_cast<int>(idx.size(0));
  for (int t = 0; t < out.n; ++t) out.idx[t] = ip + t * (O + 1);
  if (const at::Tensor* w = present(weight)) {
    TORCH_CHECK(w->sizes() == idx.sizes(), "relative_attn: ", name, " weights ", w->sizes(), " must match the index ",
                idx.sizes());
    check_dense(*w, q, name);
    for (int t = 0; t < out.n; ++t) out.w[t] = w->const_data_ptr<T>() + t * (O + 1);
  }
  out.reverse(O);
  return out;
}

// Everything but the tensors' data: shapes, the grid, the terms, the masks. Checks every argument.
template <typename T>
Problem<T> describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& xq, const c10::optional<at::Tensor>& xk,
                    const TapsArgs& taps, int64_t num_value_entries,
                    const c10::optional<at::Tensor>& attn_bias, const c10::optional<at::Tensor>& key_padding_mask,
                    at::IntArrayRef grid, int64_t skip, double dropout_p, int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "relative_attn: q, k, v must be (B, H, L, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  for (const auto* t : {&q, &k, &v}) check_dense(*t, q, "q/k/v");
  Problem<T> p;
  p.B = q.size(0), p.H = q.size(1), p.Lq = q.size(2), p.D = q.size(3), p.Lk = k.size(2), p.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == p.B && k.size(1) == p.H && k.size(3) == p.D && v.size(0) == p.B && v.size(1) == p.H &&
                  v.size(2) == p.Lk,
              "relative_attn: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not fit together");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "relative_attn: dropout_p must be in [0, 1], got ", dropout_p);
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed);
  const bool any_term = present(taps[0]) || present(taps[2]) || present(taps[4]);
  if (any_term) {
    TORCH_CHECK(grid.size() == 3 && grid[0] >= 1 && grid[1] >= 1 && grid[2] >= 1 && skip >= 0,
                "relative_attn: grid must be 3 positive sizes (t, h, w) and skip >= 0, got ", grid, ", ", skip);
    p.skip = skip, p.gt = grid[0], p.gh = grid[1], p.gw = grid[2];
    p.O = (2 * p.gt - 1) * (2 * p.gh - 1) * (2 * p.gw - 1);
    TORCH_CHECK(p.Lq == p.Lk && p.Lq == skip + p.gt * p.gh * p.gw, "relative_attn: relative terms need ", skip,
                " + ", p.gt, "x", p.gh, "x", p.gw, " tokens for queries and keys, got ", p.Lq, " and ", p.Lk);
  }
  // a query or key term: its per-entry values (B, H, L, K) and taps
  auto term = [&](const c10::optional<at::Tensor>& values, int which, int64_t length, const T*& data, int64_t& K,
                  Taps<T>& out, const char* name) {
    const at::Tensor* x = present(values);
    if (!x) {
      TORCH_CHECK(!present(taps[2 * which]), "relative_attn: ", name, " taps given without its values");
      return;
    }
    check_dense(*x, q, name);
    TORCH_CHECK(x->dim() == 4 && x->size(0) == p.B && x->size(1) == p.H && x->size(2) == length,
                "relative_attn: ", name, " values must be (B, H, ", length, ", K), got ", x->sizes());
    data = x->const_data_ptr<T>(), K = x->size(3);
    out = taps_of<T>(taps, which, p.O, K, q, name);
    TORCH_CHECK(out.n, "relative_attn: ", name, " values given without its taps");
  };
  term(xq, 0, p.Lq, p.xq, p.Kq, p.tq, "query term");
  term(xk, 1, p.Lk, p.xk, p.Kk, p.tk, "key term");
  if (present(taps[4])) {
    TORCH_CHECK(num_value_entries >= 1, "relative_attn: a value term needs num_value_entries >= 1");
    p.Kv = num_value_entries;
    p.tv = taps_of<T>(taps, 2, p.O, p.Kv, q, "value term");
  }
  if (const at::Tensor* m = present(attn_bias)) {
    TORCH_CHECK(m->dim() == 4 && m->scalar_type() == q.scalar_type() && m->device().is_cpu(),
                "relative_attn: attn_bias must be a 4-D ", q.scalar_type(), " CPU tensor, got ", m->scalar_type(), " ",
                m->sizes());
    const int64_t full[4] = {p.B, p.H, p.Lq, p.Lk};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(m->size(d) == full[d] || m->size(d) == 1, "relative_attn: attn_bias ", m->sizes(),
                  " does not broadcast to (", p.B, ", ", p.H, ", ", p.Lq, ", ", p.Lk, ")");
      p.bias_stride[d] = m->size(d) == 1 ? 0 : m->stride(d);
    }
    p.bias = m->const_data_ptr<T>();
  }
  if (const at::Tensor* m = present(key_padding_mask)) {
    TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == p.B && m->size(1) == p.Lk &&
                    m->is_contiguous() && m->device().is_cpu(),
                "relative_attn: key_padding_mask must be a contiguous bool (B, Lk) = (", p.B, ", ", p.Lk,
                ") CPU tensor, got ", m->scalar_type(), " ", m->sizes());
    p.pad = m->const_data_ptr<bool>();
  }
  return p;
}

template <typename T>
void run_forward(const Problem<T>& p, const Outputs<T>& o) {
#if RZ_HAVE_AVX2
  if (use_avx2()) return avx2::forward(p, o);
#endif
  generic::forward(p, o);
}

template <typename T>
void run_backward(const Problem<T>& p, const Grads<T>& g, int64_t chunks) {
#if RZ_HAVE_AVX2
  if (use_avx2()) return avx2::backward(p, g, chunks);
#endif
  generic::backward(p, g, chunks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& xq,
    const c10::optional<at::Tensor>& xk, const c10::optional<at::Tensor>& q_index,
    const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_index,
    const c10::optional<at::Tensor>& k_weight, const c10::optional<at::Tensor>& v_index,
    const c10::optional<at::Tensor>& v_weight, int64_t num_value_entries, const c10::optional<at::Tensor>& attn_bias,
    const c10::optional<at::Tensor>& key_padding_mask, at::IntArrayRef grid, int64_t skip, double dropout_p,
    int64_t seed) {
  const TapsArgs taps{q_index, q_weight, k_index, k_weight, v_index, v_weight};
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "relative_attn: expected float32 or float64, got ", q.scalar_type());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const bool value_term = present(taps[4]) != nullptr;
  at::Tensor G = at::empty(value_term ? std::vector<int64_t>{q.size(0), q.size(1), q.size(2), num_value_entries}
                                      : std::vector<int64_t>{0},
                           q.options());
  const at::Tensor kt = k.transpose(2, 3).contiguous();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto p = describe<T>(q, k, v, xq, xk, taps, num_value_entries, attn_bias, key_padding_mask, grid, skip, dropout_p,
                         seed);
    p.q = q.const_data_ptr<T>(), p.k = k.const_data_ptr<T>(), p.v = v.const_data_ptr<T>();
    p.kt = kt.const_data_ptr<T>();
    run_forward(p, Outputs<T>{out.data_ptr<T>(), lse.data_ptr<T>(), value_term ? G.data_ptr<T>() : nullptr});
  };
  if (q.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
  return {out, lse, G};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_value_entries, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& xq, const c10::optional<at::Tensor>& xk,
    const c10::optional<at::Tensor>& q_index, const c10::optional<at::Tensor>& q_weight,
    const c10::optional<at::Tensor>& k_index, const c10::optional<at::Tensor>& k_weight,
    const c10::optional<at::Tensor>& v_index, const c10::optional<at::Tensor>& v_weight,
    const c10::optional<at::Tensor>& attn_bias, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& lse, at::IntArrayRef grid, int64_t skip, double dropout_p, int64_t seed) {
  const TapsArgs taps{q_index, q_weight, k_index, k_weight, v_index, v_weight};
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "relative_attn_backward: expected float32 or float64, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2);
  const bool value_term = present(taps[4]) != nullptr;
  const at::Tensor* dG = present(grad_value_entries);
  TORCH_CHECK(value_term == (dG != nullptr),
              "relative_attn_backward: the value entries' gradient is needed exactly when there is a value term");
  check_dense(grad_out, q, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == H && grad_out.size(2) == Lq &&
                  grad_out.size(3) == v.size(3),
              "relative_attn_backward: grad_out must be (B, H, Lq, Dv), got ", grad_out.sizes());
  check_dense(lse, q, "lse");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Lq,
              "relative_attn_backward: lse must be (B, H, Lq), got ", lse.sizes());
  if (dG) {
    check_dense(*dG, q, "grad_value_entries");
    TORCH_CHECK(dG->dim() == 4 && dG->size(0) == B && dG->size(1) == H && dG->size(2) == Lq,
                "relative_attn_backward: grad_value_entries must be (B, H, Lq, Kv), got ", dG->sizes());
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), q.options());
  at::Tensor dv = at::zeros(v.sizes(), q.options());
  const at::Tensor* xq_t = present(xq);
  const at::Tensor* xk_t = present(xk);
  at::Tensor dxq = xq_t ? at::zeros(xq_t->sizes(), q.options()) : at::empty({0}, q.options());
  at::Tensor dxk = xk_t ? at::zeros(xk_t->sizes(), q.options()) : at::empty({0}, q.options());
  const at::Tensor kt = k.transpose(2, 3).contiguous();
  const at::Tensor vt = v.transpose(2, 3).contiguous();
  // rows of one (batch, head) are split between tasks only when there are fewer (batch, head)s than threads
  const int64_t threads = at::get_num_threads(), BH = B * H;
  const int64_t rows = block_rows(k.size(2), q.element_size()), nblk = (Lq + rows - 1) / rows;
  int64_t chunks = BH >= threads ? 1 : (threads + BH - 1) / BH;
  chunks = chunks > nblk ? nblk : chunks;
  chunks = chunks < 1 ? 1 : chunks;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto p = describe<T>(q, k, v, xq, xk, taps, dG ? dG->size(3) : 0, attn_bias, key_padding_mask, grid, skip,
                         dropout_p, seed);
    p.q = q.const_data_ptr<T>(), p.k = k.const_data_ptr<T>(), p.v = v.const_data_ptr<T>();
    p.kt = kt.const_data_ptr<T>(), p.vt = vt.const_data_ptr<T>();
    Grads<T> g;
    g.dout = grad_out.const_data_ptr<T>();
    g.dG = dG ? dG->const_data_ptr<T>() : nullptr;
    g.lse = lse.const_data_ptr<T>();
    g.dq = dq.data_ptr<T>(), g.dk = dk.data_ptr<T>(), g.dv = dv.data_ptr<T>();
    g.dxq = xq_t ? dxq.data_ptr<T>() : nullptr;
    g.dxk = xk_t ? dxk.data_ptr<T>() : nullptr;
    run_backward(p, g, chunks);
  };
  if (q.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
  return {dq, dk, dv, dxq, dxk};
}

// ---- the RPA attend ops ----------------------------------------------------------------------------

void check_attend(const at::Tensor& a, const at::Tensor& table, int64_t height, int64_t width, const char* op) {
  TORCH_CHECK(height >= 1 && width >= 1, op, ": height and width must be >= 1, got ", height, ", ", width);
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(table.scalar_type() == a.scalar_type() && a.device().is_cpu() && table.device().is_cpu() &&
                  a.is_contiguous() && table.is_contiguous(),
              op, ": inputs must be contiguous CPU tensors of one dtype");
  TORCH_CHECK(table.dim() == 3 && table.size(1) == 2 * height - 1 && table.size(2) == 2 * width - 1, op,
              ": table must be (C, 2H-1, 2W-1) = (C, ", 2 * height - 1, ", ", 2 * width - 1, "), got ", table.sizes());
}

// out = op(a, b) on the instruction set the CPU has; a, b, out contiguous of one float dtype.
void run_attend(AttendOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out, int64_t B, int64_t C,
                int64_t height, int64_t width) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
#if RZ_HAVE_AVX2
    if (use_avx2())
      return avx2::attend(op, a.const_data_ptr<T>(), b.const_data_ptr<T>(), out.data_ptr<T>(), B, C, height, width);
#endif
    generic::attend(op, a.const_data_ptr<T>(), b.const_data_ptr<T>(), out.data_ptr<T>(), B, C, height, width);
  };
  if (a.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
}

// x (B, C, N), table (C, 2H-1, 2W-1) -> (B, N, N)
at::Tensor attend_pairs_cpu(const at::Tensor& x, const at::Tensor& table, int64_t height, int64_t width) {
  check_attend(x, table, height, width, "relative_attend_pairs");
  const int64_t N = height * width;
  TORCH_CHECK(x.dim() == 3 && x.size(1) == table.size(0) && x.size(2) == N,
              "relative_attend_pairs: x must be (B, C, H*W) = (B, ", table.size(0), ", ", N, "), got ", x.sizes());
  at::Tensor out = at::empty({x.size(0), N, N}, x.options());
  run_attend(kAttendPairs, x, table, out, x.size(0), x.size(1), height, width);
  return out;
}

// pairs (B, N, N), table (C, 2H-1, 2W-1) -> (B, C, N)
at::Tensor attend_dot_cpu(const at::Tensor& pairs, const at::Tensor& table, int64_t height, int64_t width) {
  check_attend(pairs, table, height, width, "relative_attend_dot");
  const int64_t N = height * width;
  TORCH_CHECK(pairs.dim() == 3 && pairs.size(1) == N && pairs.size(2) == N,
              "relative_attend_dot: pairs must be (B, H*W, H*W) with H*W = ", N, ", got ", pairs.sizes());
  at::Tensor out = at::empty({pairs.size(0), table.size(0), N}, pairs.options());
  run_attend(kAttendDot, pairs, table, out, pairs.size(0), table.size(0), height, width);
  return out;
}

// x (B, C, N), pairs (B, N, N) -> (C, 2H-1, 2W-1)
at::Tensor attend_table_grad_cpu(const at::Tensor& x, const at::Tensor& pairs, int64_t height, int64_t width) {
  const int64_t N = height * width;
  TORCH_CHECK(height >= 1 && width >= 1, "relative_attend_table_grad: height and width must be >= 1");
  TORCH_CHECK(x.dim() == 3 && x.size(2) == N && pairs.dim() == 3 && pairs.size(0) == x.size(0) &&
                  pairs.size(1) == N && pairs.size(2) == N && x.scalar_type() == pairs.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && x.is_contiguous() &&
                  pairs.is_contiguous() && x.device().is_cpu() && pairs.device().is_cpu(),
              "relative_attend_table_grad: x (B, C, N) and pairs (B, N, N) must be contiguous float CPU tensors of one "
              "dtype with N = ", N, ", got ", x.sizes(), " and ", pairs.sizes());
  at::Tensor out = at::empty({x.size(1), 2 * height - 1, 2 * width - 1}, x.options());
  run_attend(kAttendTableGrad, x, pairs, out, x.size(0), x.size(1), height, width);
  return out;
}

}  // namespace
}  // namespace relative_attn
}  // namespace relzoo

// FRAGMENT: the `relzoo` namespace is shared by every op library (ops/<name>/).
TORCH_LIBRARY_FRAGMENT(relzoo, m) {
  m.def(
      "relative_attn(Tensor q, Tensor k, Tensor v, Tensor? xq, Tensor? xk, Tensor? q_index, Tensor? q_weight, "
      "Tensor? k_index, Tensor? k_weight, Tensor? v_index, Tensor? v_weight, int num_value_entries, "
      "Tensor? attn_bias, Tensor? key_padding_mask, int[] grid, int skip, float dropout_p, int seed) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "relative_attn_backward(Tensor grad_out, Tensor? grad_value_entries, Tensor q, Tensor k, Tensor v, Tensor? xq, "
      "Tensor? xk, Tensor? q_index, Tensor? q_weight, Tensor? k_index, Tensor? k_weight, Tensor? v_index, "
      "Tensor? v_weight, Tensor? attn_bias, Tensor? key_padding_mask, Tensor lse, int[] grid, int skip, "
      "float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("relative_attend_pairs(Tensor x, Tensor table, int height, int width) -> Tensor");
  m.def("relative_attend_dot(Tensor pairs, Tensor table, int height, int width) -> Tensor");
  m.def("relative_attend_table_grad(Tensor x, Tensor pairs, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(relzoo, CPU, m) {
  m.impl("relative_attn", &relzoo::relative_attn::forward_cpu);
  m.impl("relative_attn_backward", &relzoo::relative_attn::backward_cpu);
  m.impl("relative_attend_pairs", &relzoo::relative_attn::attend_pairs_cpu);
  m.impl("relative_attend_dot", &relzoo::relative_attn::attend_dot_cpu);
  m.impl("relative_attend_table_grad", &relzoo::relative_attn::attend_table_grad_cpu);
}
