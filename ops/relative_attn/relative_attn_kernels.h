// The CPU kernels of relative_attn.h, written once and compiled twice by relative_attn.cpp: namespace
// `generic` (any CPU) and `avx2` (AVX2 + FMA, picked at run time when the CPU has them). No include
// guard on purpose. The includer defines
//   RZ_ISA     the namespace
//   RZ_TARGET  the function attribute of the instruction set ("" or target("avx2,fma"))
//   RZ_FMA     a * b + c, fused where the instruction set has it
//   RZ_AVX2    1: float32 products, exp and softmax in AVX2 intrinsics (the compiler's own vectorisation
//              of them was measured 3-5x slower); 0: portable C++ only
// Every function here carries RZ_TARGET: one without it would be compiled for the baseline CPU.
//
// Work is split into jobs of `block_rows` query rows of one (batch, head); a block's r x Lk scores
// live in a per-thread scratch buffer (cache sized), so no Lq x Lk tensor is ever written to memory.
// Forward per block:  S = Q K^T (+ terms, masks) -> softmax -> dropout -> O = P V, G += P (scatter).
// Backward per block: recompute P from the saved log-sum-exp, dP = dO V^T (+ value-term gather),
// dS = P (dP - sum P dP), then dQ = dS K, dK += dS^T Q, dV += P^T dO and the terms' scatters.

namespace relzoo {
namespace relative_attn {
namespace RZ_ISA {

#define RZ_INLINE RZ_TARGET inline __attribute__((always_inline))

template <typename T>
struct Lanes {
  static constexpr int value = 64 / sizeof(T);  // one 64-byte line of columns per register tile row
};

// C (m x n, row stride ldc) = [C +] sum_k A(i, k) B[k, j], A(i, k) = a[i a_m + k a_k], B row-major (ldb).
// 4 x (64-byte) register tiles, vectorised along n; covers every product the kernels need
// (A = Q, P, dS or their transposes through the strides).
#if RZ_AVX2
// C rows [i0, i0 + MR) x columns [j0, j0 + 16) of a float32 product: MR x 2 ymm accumulators,
// per step two loads of B and MR broadcasts of A.
template <int MR>
RZ_INLINE void gemm_tile_avx2(int64_t i0, int64_t j0, int64_t kdim, const float* a, int64_t a_m, int64_t a_k,
                              const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  __m256 lo[MR], hi[MR];
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  const float* ap = a + i0 * a_m;
  const float* bp = b + j0;
  for (int64_t kk = 0; kk < kdim; ++kk, bp += ldb, ap += a_k) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
    for (int r = 0; r < MR; ++r) {  // unrolled: MR is a constant
      const __m256 av = _mm256_broadcast_ss(ap + r * a_m);
      lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* cp = c + (i0 + r) * ldc + j0;
    if (accumulate) {
      lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(cp));
      hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(cp + 8));
    }
    _mm256_storeu_ps(cp, lo[r]);
    _mm256_storeu_ps(cp + 8, hi[r]);
  }
}

// float32 products: 6 x 16 tiles (12 accumulators), then 1-row tiles, then a scalar column tail.
RZ_TARGET void gemm_avx2(int64_t m, int64_t n, int64_t kdim, const float* a, int64_t a_m, int64_t a_k, const float* b,
                         int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j0 = 0;
  for (; j0 + 16 <= n; j0 += 16) {
    int64_t i0 = 0;
    for (; i0 + 6 <= m; i0 += 6) gemm_tile_avx2<6>(i0, j0, kdim, a, a_m, a_k, b, ldb, c, ldc, accumulate);
    for (; i0 < m; ++i0) gemm_tile_avx2<1>(i0, j0, kdim, a, a_m, a_k, b, ldb, c, ldc, accumulate);
  }
  if (j0 == n) return;
  const int64_t nc = n - j0;  // fewer than 16 columns left
  for (int64_t i = 0; i < m; ++i) {
    float acc[16] = {0};
    const float* bp = b + j0;
    for (int64_t kk = 0; kk < kdim; ++kk, bp += ldb) {
      const float av = a[i * a_m + kk * a_k];
      for (int64_t jj = 0; jj < nc; ++jj) acc[jj] = std::fma(av, bp[jj], acc[jj]);
    }
    float* cp = c + i * ldc + j0;
    for (int64_t jj = 0; jj < nc; ++jj) cp[jj] = accumulate ? cp[jj] + acc[jj] : acc[jj];
  }
}
#endif

template <typename T>
RZ_TARGET void gemm(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t a_m, int64_t a_k, const T* b,
                    int64_t ldb, T* c, int64_t ldc, bool accumulate) {
#if RZ_AVX2
  if constexpr (std::is_same_v<T, float>) {
    gemm_avx2(m, n, kdim, a, a_m, a_k, b, ldb, c, ldc, accumulate);
    return;
  }
#endif
  constexpr int MR = 4, NR = Lanes<T>::value;
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const int64_t nc = n - j0 < NR ? n - j0 : NR;
    int64_t i0 = 0;
    if (nc == NR) {
      for (; i0 + MR <= m; i0 += MR) {
        T acc[MR][NR];
        for (int r = 0; r < MR; ++r)
          for (int jj = 0; jj < NR; ++jj) acc[r][jj] = T(0);
        const T* ap = a + i0 * a_m;
        const T* bp = b + j0;
        for (int64_t kk = 0; kk < kdim; ++kk, bp += ldb) {
          for (int r = 0; r < MR; ++r) {
            const T av = ap[r * a_m + kk * a_k];
#pragma omp simd
            for (int jj = 0; jj < NR; ++jj) acc[r][jj] = RZ_FMA(av, bp[jj], acc[r][jj]);
          }
        }
        for (int r = 0; r < MR; ++r) {
          T* cp = c + (i0 + r) * ldc + j0;
          if (accumulate) {
#pragma omp simd
            for (int jj = 0; jj < NR; ++jj) cp[jj] += acc[r][jj];
          } else {
#pragma omp simd
            for (int jj = 0; jj < NR; ++jj) cp[jj] = acc[r][jj];
          }
        }
      }
    }
    for (int64_t i = i0; i < m; ++i) {  // rows left over, or every row of a narrow last column block
      T acc[NR];
      for (int jj = 0; jj < NR; ++jj) acc[jj] = T(0);
      const T* bp = b + j0;
      for (int64_t kk = 0; kk < kdim; ++kk, bp += ldb) {
        const T av = a[i * a_m + kk * a_k];
        for (int64_t jj = 0; jj < nc; ++jj) acc[jj] = RZ_FMA(av, bp[jj], acc[jj]);
      }
      T* cp = c + i * ldc + j0;
      for (int64_t jj = 0; jj < nc; ++jj) cp[jj] = accumulate ? cp[jj] + acc[jj] : acc[jj];
    }
  }
}

// exp(x) for x <= 0 (softmax arguments), -inf -> 0. Float: Cephes' expf (2^n times a degree-6
// polynomial, within 2 ulp), branch-free so the loops vectorise; double: the library exp.
RZ_INLINE float exp_nonpositive(float x) {
  const float lowest = -87.33654475f;  // below: the result underflows; return 0
  const float xc = x < lowest ? lowest : x;
  const float y = xc * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(y);  // truncation, then floor:
  n -= static_cast<float>(n) > y ? 1 : 0;
  const float fn = static_cast<float>(n);
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = RZ_FMA(poly, r, 1.3981999507e-3f);
  poly = RZ_FMA(poly, r, 8.3334519073e-3f);
  poly = RZ_FMA(poly, r, 4.1665795894e-2f);
  poly = RZ_FMA(poly, r, 1.6666665459e-1f);
  poly = RZ_FMA(poly, r, 5.0000001201e-1f);
  poly = RZ_FMA(poly, r * r, r + 1.0f);
  const int32_t bits = (n + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x < lowest ? 0.0f : poly * scale;
}

RZ_INLINE double exp_nonpositive(double x) { return std::exp(x); }

#if RZ_AVX2
// exp_nonpositive on 8 lanes (same polynomial); NaN stays NaN.
RZ_INLINE __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654475f);
  const __m256 inside = _mm256_cmp_ps(x, lowest, _CMP_NLT_UQ);  // x >= lowest, or NaN
  const __m256 xc = _mm256_max_ps(lowest, x);                   // (NaN passes through)
  const __m256 fn = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fn), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(bits)), inside);
}

RZ_INLINE float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

RZ_INLINE float horizontal_max(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// s[j] <- exp(s[j] - shift), returns the sum.
template <typename T>
RZ_TARGET T exp_shifted(T* s, int64_t n, T shift) {
  int64_t j = 0;
  T sum = 0;
#if RZ_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh));
      _mm256_storeu_ps(s + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = horizontal_sum(acc);
  }
#endif
  for (; j < n; ++j) {
    const T e = exp_nonpositive(s[j] - shift);
    s[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T>
RZ_TARGET T row_max(const T* s, int64_t n) {
  int64_t j = 0;
  T mx = -std::numeric_limits<T>::infinity();
#if RZ_AVX2
  if constexpr (std::is_same_v<T, float>) {
    __m256 acc = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(s + j));
    mx = horizontal_max(acc);
  }
#endif
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// In place: s <- softmax(s); returns the log-sum-exp, -inf (and s = 0) when every entry is -inf.
template <typename T>
RZ_TARGET T softmax_row(T* s, int64_t n) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const T mx = row_max(s, n);
  if (mx == neg_inf) {
    for (int64_t j = 0; j < n; ++j) s[j] = T(0);
    return neg_inf;
  }
  const T sum = exp_shifted(s, n, mx);
  const T inv = T(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return mx + std::log(sum);
}

// Dropout without a stored mask: keep(b, h, i, j) is a hash of (seed, row, j), the same in forward
// and backward; each element is kept with probability 1 - p (resolution 2^-24).
RZ_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

RZ_INLINE uint32_t row_key(uint64_t seed, uint64_t row) {
  const uint32_t r = mix32(static_cast<uint32_t>(row) ^ mix32(static_cast<uint32_t>(row >> 32) + 0x9e3779b9U));
  return mix32(r ^ static_cast<uint32_t>(seed)) ^ mix32(static_cast<uint32_t>(seed >> 32) + r);
}

RZ_INLINE uint32_t drop_threshold(double p) {
  return p >= 1.0 ? (1U << 24) : static_cast<uint32_t>(p * 16777216.0);
}

RZ_INLINE bool kept(uint32_t key, int64_t j, uint32_t threshold) {
  return (mix32(key + static_cast<uint32_t>(j) * 0x9e3779b9U) >> 8) >= threshold;
}

// ---- the relative terms: per pair, sum_t w_t(o) x[idx_t(o)] ------------------------------------------

enum TermOp { kGatherQuery, kGatherKey, kScatterQuery, kScatterKey };

// One row segment: keys j0 .. j0 + n - 1 with offsets o0 + step * c (step -1: spatial keys along a
// grid row; step 0: pairs touching a skip token, column O). Query-side ops read/write the row's own
// entries x[idx]; key-side ops use key j's entries x[j * ldx + idx] at the reversed offset O - 1 - o.
//   kGatherQuery  s[j] += w x[idx(o)]           kScatterQuery  x[idx(o)] += w s[j]
//   kGatherKey    s[j] += w x[j, idx(o')]       kScatterKey    x[j, idx(o')] += w s[j]
// Both sides read their tables with unit stride: O - 1 - o grows by one per key (query side: the
// reversed table). kScatterQuery spreads consecutive keys over four accumulator rows (x and the three
// of `spare`, summed by term_row) so that keys in one bucket do not wait on each other's stores.
template <typename T, int NT, bool WT, int OP>
struct Segment {
  const Taps<T>* taps;
  int64_t O;
  T* s;
  T* x;
  int64_t ldx;
  T* spare;  // kScatterQuery: 3 x K zeroed accumulators, or null

  RZ_INLINE void operator()(int64_t j0, int64_t n, int64_t o0, int64_t step) const {
    T* sp = s + j0;
    const bool query_side = OP == kGatherQuery || OP == kScatterQuery;
    if (step == 0) {  // pairs touching a skip token: one column
      const int32_t e0 = taps->idx[0][O], e1 = NT == 2 ? taps->idx[1][O] : 0;
      const T w0 = WT ? taps->w[0][O] : T(1), w1 = WT && NT == 2 ? taps->w[1][O] : T(1);
      if (OP == kGatherQuery) {
        const T add = w0 * x[e0] + (NT == 2 ? w1 * x[e1] : T(0));
        for (int64_t c = 0; c < n; ++c) sp[c] += add;
      } else if (OP == kScatterQuery) {
        T total = 0;
        for (int64_t c = 0; c < n; ++c) total += sp[c];
        x[e0] += w0 * total;
        if (NT == 2) x[e1] += w1 * total;
      } else {
        T* xj = x + j0 * ldx;
        for (int64_t c = 0; c < n; ++c, xj += ldx) {
          if (OP == kGatherKey) {
            sp[c] += w0 * xj[e0] + (NT == 2 ? w1 * xj[e1] : T(0));
          } else {
            xj[e0] += w0 * sp[c];
            if (NT == 2) xj[e1] += w1 * sp[c];
          }
        }
      }
      return;
    }
    const int64_t r0 = O - 1 - o0;  // first reversed offset; unit stride from here
    const int32_t* i0 = (query_side ? taps->ridx[0] : taps->idx[0]) + r0;
    const int32_t* i1 = NT == 2 ? (query_side ? taps->ridx[1] : taps->idx[1]) + r0 : nullptr;
    const T* w0 = WT ? (query_side ? taps->rw[0] : taps->w[0]) + r0 : nullptr;
    const T* w1 = WT && NT == 2 ? (query_side ? taps->rw[1] : taps->w[1]) + r0 : nullptr;
    int64_t c = 0;
#if RZ_AVX2
    if constexpr (std::is_same_v<T, float> && (OP == kGatherQuery || OP == kGatherKey)) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i row_step = _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(ldx)));
      const float* base = OP == kGatherKey ? x + j0 * ldx : x;
      for (; c + 8 <= n; c += 8) {
        __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i0 + c));
        if (OP == kGatherKey) e = _mm256_add_epi32(e, _mm256_add_epi32(row_step, _mm256_set1_epi32(static_cast<int32_t>(c * ldx))));
        __m256 add = _mm256_i32gather_ps(base, e, 4);
        if (WT) add = _mm256_mul_ps(add, _mm256_loadu_ps(w0 + c));
        if (NT == 2) {
          __m256i f = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i1 + c));
          if (OP == kGatherKey) f = _mm256_add_epi32(f, _mm256_add_epi32(row_step, _mm256_set1_epi32(static_cast<int32_t>(c * ldx))));
          __m256 more = _mm256_i32gather_ps(base, f, 4);
          add = WT ? _mm256_fmadd_ps(more, _mm256_loadu_ps(w1 + c), add) : _mm256_add_ps(add, more);
        }
        _mm256_storeu_ps(sp + c, _mm256_add_ps(_mm256_loadu_ps(sp + c), add));
      }
    }
#endif
    if (OP == kGatherQuery) {
      for (; c < n; ++c) sp[c] += (WT ? w0[c] : T(1)) * x[i0[c]] + (NT == 2 ? (WT ? w1[c] : T(1)) * x[i1[c]] : T(0));
    } else if (OP == kScatterQuery) {
      T* rows[4] = {x, spare ? spare : x, spare ? spare + ldx : x, spare ? spare + 2 * ldx : x};
      for (; c < n; ++c) {
        T* g = rows[c & 3];
        g[i0[c]] += (WT ? w0[c] : T(1)) * sp[c];
        if (NT == 2) g[i1[c]] += (WT ? w1[c] : T(1)) * sp[c];
      }
    } else {
      T* xj = x + (j0 + c) * ldx;
      for (; c < n; ++c, xj += ldx) {
        if (OP == kGatherKey) {
          sp[c] += (WT ? w0[c] : T(1)) * xj[i0[c]] + (NT == 2 ? (WT ? w1[c] : T(1)) * xj[i1[c]] : T(0));
        } else {
          xj[i0[c]] += (WT ? w0[c] : T(1)) * sp[c];
          if (NT == 2) xj[i1[c]] += (WT ? w1[c] : T(1)) * sp[c];
        }
      }
    }
  }
};

// Calls seg(j0, n, o0, step) over the keys of query row i (relative_attn.h: offsets, skip tokens).
template <typename T, typename F>
RZ_INLINE void for_each_segment(const Problem<T>& p, int64_t i, const F& seg) {
  const int64_t S = p.skip;
  if (S > 0) seg(0, S < p.Lk ? S : p.Lk, p.O, 0);
  if (i < S) {
    if (p.Lk > S) seg(S, p.Lk - S, p.O, 0);
    return;
  }
  const int64_t s = i - S, plane = p.gh * p.gw;
  const int64_t ti = s / plane, ri = (s / p.gw) % p.gh, ci = s % p.gw;
  const int64_t wd = 2 * p.gw - 1, area = (2 * p.gh - 1) * wd;
  int64_t j = S;
  for (int64_t tj = 0; tj < p.gt; ++tj)
    for (int64_t rj = 0; rj < p.gh; ++rj, j += p.gw)
      seg(j, p.gw, (ti - tj + p.gt - 1) * area + (ri - rj + p.gh - 1) * wd + ci + p.gw - 1, -1);
}

template <typename T, int NT, bool WT, int OP>
RZ_TARGET void term_row_as(const Problem<T>& p, const Taps<T>& taps, int64_t i, T* s, T* x, int64_t ldx, T* spare) {
  const Segment<T, NT, WT, OP> seg{&taps, p.O, s, x, ldx, spare};
  for_each_segment(p, i, seg);
}

// One term applied along query row i (OP: TermOp), dispatched on the taps' count and weights.
// kScatterQuery: ldx is the row's entry count K, `spare` 3 K zeroed accumulators (or null), folded
// into x and zeroed again here.
template <typename T, int OP>
RZ_TARGET void term_row(const Problem<T>& p, const Taps<T>& taps, int64_t i, T* s, T* x, int64_t ldx,
                        T* spare = nullptr) {
  const bool weighted = taps.w[0] != nullptr;
  if (taps.n == 1) {
    if (weighted) term_row_as<T, 1, true, OP>(p, taps, i, s, x, ldx, spare);
    else term_row_as<T, 1, false, OP>(p, taps, i, s, x, ldx, spare);
  } else {
    if (weighted) term_row_as<T, 2, true, OP>(p, taps, i, s, x, ldx, spare);
    else term_row_as<T, 2, false, OP>(p, taps, i, s, x, ldx, spare);
  }
  if (OP == kScatterQuery && spare) {
    for (int64_t e = 0; e < ldx; ++e) {
      x[e] += spare[e] + spare[ldx + e] + spare[2 * ldx + e];
      spare[e] = spare[ldx + e] = spare[2 * ldx + e] = T(0);
    }
  }
}

// Spread a query-side scatter over four rows when the row is long enough to pay for the fold.
inline bool use_spare(int64_t Lk, int64_t K) { return Lk >= 8 * K; }

// ---- forward ---------------------------------------------------------------------------------------

// Scores of rows i0 .. i0 + r - 1 of (batch, head) bh into S (r x Lk): q.k, the q/k terms, masks.
template <typename T>
RZ_TARGET void scores_block(const Problem<T>& p, int64_t bh, int64_t i0, int64_t r, T* S) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t b = bh / p.H, h = bh % p.H;
  gemm<T>(r, p.Lk, p.D, p.q + (bh * p.Lq + i0) * p.D, p.D, 1, p.kt + bh * p.D * p.Lk, p.Lk, S, p.Lk, false);
  for (int64_t ii = 0; ii < r; ++ii) {
    const int64_t i = i0 + ii;
    T* s = S + ii * p.Lk;
    if (p.tq.n) term_row<T, kGatherQuery>(p, p.tq, i, s, const_cast<T*>(p.xq + (bh * p.Lq + i) * p.Kq), 0);
    if (p.tk.n) term_row<T, kGatherKey>(p, p.tk, i, s, const_cast<T*>(p.xk + bh * p.Lk * p.Kk), p.Kk);
    if (p.bias) {
      const T* m = p.bias + b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2];
      const int64_t step = p.bias_stride[3];
      for (int64_t j = 0; j < p.Lk; ++j) s[j] += m[j * step];
    }
    if (p.pad) {
      const bool* padded = p.pad + b * p.Lk;
      for (int64_t j = 0; j < p.Lk; ++j) s[j] = padded[j] ? neg_inf : s[j];
    }
  }
}

template <typename T>
RZ_TARGET void forward_jobs(const Problem<T>& p, const Outputs<T>& out, int64_t rows, int64_t begin, int64_t end,
                            T* S, T* spare) {
  const int64_t nblk = (p.Lq + rows - 1) / rows;
  const uint32_t threshold = drop_threshold(p.dropout_p);
  const T keep_scale = p.dropout_p < 1.0 ? T(1.0 / (1.0 - p.dropout_p)) : T(0);
  for (int64_t job = begin; job < end; ++job) {
    const int64_t bh = job / nblk, i0 = (job % nblk) * rows;
    const int64_t r = p.Lq - i0 < rows ? p.Lq - i0 : rows;
    scores_block(p, bh, i0, r, S);
    for (int64_t ii = 0; ii < r; ++ii) {
      const int64_t i = i0 + ii;
      T* s = S + ii * p.Lk;
      out.lse[bh * p.Lq + i] = softmax_row(s, p.Lk);
      if (p.dropout_p > 0) {
        const uint32_t key = row_key(p.seed, static_cast<uint64_t>(bh * p.Lq + i));
        for (int64_t j = 0; j < p.Lk; ++j) s[j] = kept(key, j, threshold) ? s[j] * keep_scale : T(0);
      }
      if (p.tv.n) {
        T* g = out.G + (bh * p.Lq + i) * p.Kv;
        for (int64_t e = 0; e < p.Kv; ++e) g[e] = T(0);
        term_row<T, kScatterQuery>(p, p.tv, i, s, g, p.Kv, spare);
      }
    }
    gemm<T>(r, p.Dv, p.Lk, S, p.Lk, 1, p.v + bh * p.Lk * p.Dv, p.Dv, out.out + (bh * p.Lq + i0) * p.Dv, p.Dv, false);
  }
}

// Below this many multiply-adds a call runs on the calling thread: waking a thread pool costs more
// than the work (and, on a loaded machine, a whole scheduler time slice).
constexpr int64_t kInlineWork = int64_t(1) << 21;

template <typename T>
RZ_TARGET void forward_impl(const Problem<T>& p, const Outputs<T>& out) {
  const int64_t rows = block_rows(p.Lk, sizeof(T));
  const int64_t njobs = p.B * p.H * ((p.Lq + rows - 1) / rows);
  const int64_t work = p.B * p.H * p.Lq * p.Lk * (p.D + p.Dv + 8);
  const int64_t spare_n = p.tv.n && use_spare(p.Lk, p.Kv) ? 3 * p.Kv : 0;
  at::parallel_for(0, njobs, work < kInlineWork ? njobs : 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(rows * p.Lk + spare_n));
    forward_jobs(p, out, rows, begin, end, scratch.data(), spare_n ? scratch.data() + rows * p.Lk : nullptr);
  });
}

void forward(const Problem<float>& p, const Outputs<float>& out) { forward_impl(p, out); }
void forward(const Problem<double>& p, const Outputs<double>& out) { forward_impl(p, out); }

// ---- backward --------------------------------------------------------------------------------------

template <typename T>
RZ_TARGET void backward_jobs(const Problem<T>& p, const Grads<T>& g, int64_t rows, int64_t chunks, int64_t begin,
                             int64_t end, T* S, T* DP, T* PD, T* spare, T* dk_part, T* dv_part, T* dxk_part) {
  const int64_t nblk = (p.Lq + rows - 1) / rows, per_chunk = (nblk + chunks - 1) / chunks;
  const int64_t BH = p.B * p.H;
  const uint32_t threshold = drop_threshold(p.dropout_p);
  const T keep_scale = p.dropout_p < 1.0 ? T(1.0 / (1.0 - p.dropout_p)) : T(0);
  const bool dropout = p.dropout_p > 0;
  for (int64_t job = begin; job < end; ++job) {
    const int64_t bh = job / chunks, chunk = job % chunks;
    // with one chunk per (batch, head) this job owns its dk/dv/dxk rows; else its own partial sums
    T* dk = chunks == 1 ? g.dk + bh * p.Lk * p.D : dk_part + (chunk * BH + bh) * p.Lk * p.D;
    T* dv = chunks == 1 ? g.dv + bh * p.Lk * p.Dv : dv_part + (chunk * BH + bh) * p.Lk * p.Dv;
    T* dxk = nullptr;
    if (p.tk.n) dxk = chunks == 1 ? g.dxk + bh * p.Lk * p.Kk : dxk_part + (chunk * BH + bh) * p.Lk * p.Kk;
    const int64_t blk_end = (chunk + 1) * per_chunk < nblk ? (chunk + 1) * per_chunk : nblk;
    for (int64_t blk = chunk * per_chunk; blk < blk_end; ++blk) {
      const int64_t i0 = blk * rows, r = p.Lq - i0 < rows ? p.Lq - i0 : rows;
      const T* dout = g.dout + (bh * p.Lq + i0) * p.Dv;
      scores_block(p, bh, i0, r, S);
      for (int64_t ii = 0; ii < r; ++ii) {  // P from the forward's log-sum-exp
        const T lse = g.lse[bh * p.Lq + i0 + ii];
        T* s = S + ii * p.Lk;
        if (lse == -std::numeric_limits<T>::infinity()) {
          for (int64_t j = 0; j < p.Lk; ++j) s[j] = T(0);
        } else {
          exp_shifted(s, p.Lk, lse);
        }
      }
      gemm<T>(r, p.Lk, p.Dv, dout, p.Dv, 1, p.vt + bh * p.Dv * p.Lk, p.Lk, DP, p.Lk, false);  // dO V^T
      for (int64_t ii = 0; ii < r; ++ii) {
        const int64_t i = i0 + ii;
        const T* P = S + ii * p.Lk;
        T* dp = DP + ii * p.Lk;
        if (p.tv.n) term_row<T, kGatherQuery>(p, p.tv, i, dp, const_cast<T*>(g.dG + (bh * p.Lq + i) * p.Kv), 0);
        if (dropout) {
          const uint32_t key = row_key(p.seed, static_cast<uint64_t>(bh * p.Lq + i));
          T* pd = PD + ii * p.Lk;
          for (int64_t j = 0; j < p.Lk; ++j) {
            const bool keep = kept(key, j, threshold);
            pd[j] = keep ? P[j] * keep_scale : T(0);
            dp[j] = keep ? dp[j] * keep_scale : T(0);
          }
        }
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < p.Lk; ++j) total += P[j] * dp[j];
#pragma omp simd
        for (int64_t j = 0; j < p.Lk; ++j) dp[j] = P[j] * (dp[j] - total);  // dS
        if (p.tq.n) term_row<T, kScatterQuery>(p, p.tq, i, dp, g.dxq + (bh * p.Lq + i) * p.Kq, p.Kq, spare);
        if (p.tk.n) term_row<T, kScatterKey>(p, p.tk, i, dp, dxk, p.Kk);
      }
      gemm<T>(p.Lk, p.Dv, r, dropout ? PD : S, 1, p.Lk, dout, p.Dv, dv, p.Dv, true);               // dV += P^T dO
      gemm<T>(r, p.D, p.Lk, DP, p.Lk, 1, p.k + bh * p.Lk * p.D, p.D, g.dq + (bh * p.Lq + i0) * p.D, p.D,
              false);                                                                             // dQ = dS K
      gemm<T>(p.Lk, p.D, r, DP, 1, p.Lk, p.q + (bh * p.Lq + i0) * p.D, p.D, dk, p.D, true);        // dK += dS^T Q
    }
  }
}

template <typename T>
RZ_TARGET void backward_impl(const Problem<T>& p, const Grads<T>& g, int64_t chunks) {
  const int64_t rows = block_rows(p.Lk, sizeof(T));
  const int64_t BH = p.B * p.H, njobs = BH * chunks;
  const int64_t work = BH * p.Lq * p.Lk * (2 * p.D + 2 * p.Dv + 16);
  T* dk_part = nullptr;
  T* dv_part = nullptr;
  T* dxk_part = nullptr;
  std::vector<T> parts;
  if (chunks > 1) {  // zeroed partial sums, (chunks, B*H, Lk, .) each; the caller adds them up
    const int64_t dk_n = chunks * BH * p.Lk * p.D, dv_n = chunks * BH * p.Lk * p.Dv;
    const int64_t dxk_n = p.tk.n ? chunks * BH * p.Lk * p.Kk : 0;
    parts.assign(static_cast<size_t>(dk_n + dv_n + dxk_n), T(0));
    dk_part = parts.data(), dv_part = dk_part + dk_n, dxk_part = p.tk.n ? dv_part + dv_n : nullptr;
  }
  const int64_t spare_n = p.tq.n && use_spare(p.Lk, p.Kq) ? 3 * p.Kq : 0;
  at::parallel_for(0, njobs, work < kInlineWork ? njobs : 1, [&](int64_t begin, int64_t end) {
    const bool dropout = p.dropout_p > 0;
    const int64_t block = rows * p.Lk;
    std::vector<T> scratch(static_cast<size_t>(block * (dropout ? 3 : 2) + spare_n));
    T* S = scratch.data();
    T* spare = spare_n ? S + block * (dropout ? 3 : 2) : nullptr;
    backward_jobs(p, g, rows, chunks, begin, end, S, S + block, dropout ? S + 2 * block : nullptr, spare, dk_part,
                  dv_part, dxk_part);
  });
  if (chunks > 1) {
    const int64_t sizes[3] = {BH * p.Lk * p.D, BH * p.Lk * p.Dv, p.tk.n ? BH * p.Lk * p.Kk : 0};
    T* targets[3] = {g.dk, g.dv, g.dxk};
    T* sources[3] = {dk_part, dv_part, dxk_part};
    for (int t = 0; t < 3; ++t) {
      if (!sizes[t]) continue;
      at::parallel_for(0, sizes[t], 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t c = 0; c < chunks; ++c) {
          const T* src = sources[t] + c * sizes[t];
          for (int64_t e = begin; e < end; ++e) targets[t][e] += src[e];
        }
      });
    }
  }
}

void backward(const Problem<float>& p, const Grads<float>& g, int64_t chunks) { backward_impl(p, g, chunks); }
void backward(const Problem<double>& p, const Grads<double>& g, int64_t chunks) { backward_impl(p, g, chunks); }

// ---- the drop-in 2-D attend ops of the RPA original (relative_attn.cpp) ------------------------------
// x (B, C, N), pairs (B, N, N), table (C, 2H-1, 2W-1) read at cell (yj - yi + H - 1, xj - xi + W - 1):
//   attend_pairs       out[b, i, j] = sum_c x[b, c, i] table[c, cell(i, j)]        (B, N, N)
//   attend_dot         out[b, c, i] = sum_j pairs[b, i, j] table[c, cell(i, j)]    (B, C, N)
//   attend_table_grad  out[c, cell] = sum_{b, i, j -> cell} x[b, c, i] pairs[b, i, j]   (C, 2H-1, 2W-1)
// For a query row, the cells of one key row are contiguous: every inner loop is unit stride.

template <typename T>
RZ_TARGET void attend_pairs_rows(const T* x, const T* table, T* out, int64_t C, int64_t H, int64_t W, int64_t begin,
                                 int64_t end) {
  const int64_t N = H * W, wd = 2 * W - 1, P = (2 * H - 1) * wd;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / N, i = row % N, yi = i / W, xi = i % W;
    T* o = out + row * N;
    for (int64_t j = 0; j < N; ++j) o[j] = T(0);
    for (int64_t c = 0; c < C; ++c) {
      const T xv = x[(b * C + c) * N + i];
      const T* tc = table + c * P + (H - 1 - yi) * wd + (W - 1 - xi);
      for (int64_t yj = 0; yj < H; ++yj) {
        const T* cells = tc + yj * wd;
        T* oy = o + yj * W;
#pragma omp simd
        for (int64_t xj = 0; xj < W; ++xj) oy[xj] = RZ_FMA(xv, cells[xj], oy[xj]);
      }
    }
  }
}

template <typename T>
RZ_TARGET void attend_dot_rows(const T* pairs, const T* table, T* out, int64_t C, int64_t H, int64_t W, int64_t begin,
                               int64_t end) {
  const int64_t N = H * W, wd = 2 * W - 1, P = (2 * H - 1) * wd;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / N, i = row % N, yi = i / W, xi = i % W;
    const T* pr = pairs + row * N;
    for (int64_t c = 0; c < C; ++c) {
      const T* tc = table + c * P + (H - 1 - yi) * wd + (W - 1 - xi);
      T total = 0;
      for (int64_t yj = 0; yj < H; ++yj) {
        const T* cells = tc + yj * wd;
        const T* py = pr + yj * W;
#pragma omp simd reduction(+ : total)
        for (int64_t xj = 0; xj < W; ++xj) total += py[xj] * cells[xj];
      }
      out[(b * C + c) * N + i] = total;
    }
  }
}

template <typename T>
RZ_TARGET void attend_table_grad_channels(const T* x, const T* pairs, T* out, int64_t B, int64_t C, int64_t H,
                                          int64_t W, int64_t begin, int64_t end) {
  const int64_t N = H * W, wd = 2 * W - 1, P = (2 * H - 1) * wd;
  for (int64_t c = begin; c < end; ++c) {
    T* oc = out + c * P;
    for (int64_t e = 0; e < P; ++e) oc[e] = T(0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < N; ++i) {
        const T xv = x[(b * C + c) * N + i];
        const int64_t yi = i / W, xi = i % W;
        const T* pr = pairs + (b * N + i) * N;
        T* tc = oc + (H - 1 - yi) * wd + (W - 1 - xi);
        for (int64_t yj = 0; yj < H; ++yj) {
          T* cells = tc + yj * wd;
          const T* py = pr + yj * W;
#pragma omp simd
          for (int64_t xj = 0; xj < W; ++xj) cells[xj] = RZ_FMA(xv, py[xj], cells[xj]);
        }
      }
    }
  }
}

template <typename T>
RZ_TARGET void attend_impl(AttendOp op, const T* a, const T* b, T* out, int64_t B, int64_t C, int64_t H, int64_t W) {
  const int64_t N = H * W, tasks = op == kAttendTableGrad ? C : B * N;
  const bool inline_work = B * C * N * N < kInlineWork;
  at::parallel_for(0, tasks, inline_work ? tasks : 1, [&](int64_t begin, int64_t end) {
    if (op == kAttendPairs) attend_pairs_rows(a, b, out, C, H, W, begin, end);
    else if (op == kAttendDot) attend_dot_rows(a, b, out, C, H, W, begin, end);
    else attend_table_grad_channels(a, b, out, B, C, H, W, begin, end);
  });
}

void attend(AttendOp op, const float* a, const float* b, float* o, int64_t B, int64_t C, int64_t H, int64_t W) {
  attend_impl(op, a, b, o, B, C, H, W);
}
void attend(AttendOp op, const double* a, const double* b, double* o, int64_t B, int64_t C, int64_t H, int64_t W) {
  attend_impl(op, a, b, o, B, C, H, W);
}

#undef RZ_INLINE

}  // namespace RZ_ISA
}  // namespace relative_attn
}  // namespace relzoo
