// Softmax attention of one query over cached keys/values; head_dim = 8 * NQ keeps q and the output in registers.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "simd.h"

namespace mfk {

#if MF_AVX2
// sc[t] = scale * <q, k_t> for t in [0, n); keys are rows of 8 * NQ, four at a time.
template <int NQ, typename KV>
inline void qk_scores(const float* q, const KV* kc, int64_t n, float scale, float* sc, int64_t t0 = 0) {
  constexpr int64_t hd = 8 * NQ;
  __m256 qv[NQ];
  for (int i = 0; i < NQ; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  const __m128 s4 = _mm_set1_ps(scale);
  int64_t t = t0;  // a multiple of 4: the groups of 4 keys are those of a start at 0
  for (; t + 4 <= n; t += 4) {
    const KV *k0 = kc + t * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
    __m256 a0 = _mm256_mul_ps(qv[0], load8(k0)), a1 = _mm256_mul_ps(qv[0], load8(k1)),
           a2 = _mm256_mul_ps(qv[0], load8(k2)), a3 = _mm256_mul_ps(qv[0], load8(k3));
    for (int i = 1; i < NQ; ++i) {
      a0 = _mm256_fmadd_ps(qv[i], load8(k0 + 8 * i), a0);
      a1 = _mm256_fmadd_ps(qv[i], load8(k1 + 8 * i), a1);
      a2 = _mm256_fmadd_ps(qv[i], load8(k2 + 8 * i), a2);
      a3 = _mm256_fmadd_ps(qv[i], load8(k3 + 8 * i), a3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // [s0..s3 | s0..s3] halves
    const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(sc + t, _mm_mul_ps(r, s4));
  }
  for (; t < n; ++t) {
    const KV* k = kc + t * hd;
    __m256 a = _mm256_mul_ps(qv[0], load8(k));
    for (int i = 1; i < NQ; ++i) a = _mm256_fmadd_ps(qv[i], load8(k + 8 * i), a);
    sc[t] = hsum(a) * scale;
  }
}

// out = sum_t p[t] * v_t over t in [0, n).
template <int NQ, typename KV>
inline void pv_sum(const float* p, const KV* vc, int64_t n, float* out) {
  constexpr int64_t hd = 8 * NQ;
  __m256 o[NQ];
  for (int i = 0; i < NQ; ++i) o[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const KV* v = vc + t * hd;
    const __m256 pv = _mm256_set1_ps(p[t]);
    for (int i = 0; i < NQ; ++i) o[i] = _mm256_fmadd_ps(pv, load8(v + 8 * i), o[i]);
  }
  for (int i = 0; i < NQ; ++i) _mm256_storeu_ps(out + 8 * i, o[i]);
}

// G queries over the same keys (a prompt's consecutive tokens, one head): each group of 4 keys is loaded and widened
// once for all of them. Every (query, key) score and every output sum takes the operations of qk_scores / pv_sum in
// their order, so each query's numbers are those of attend() alone.
template <int NQ, int G, typename KV>
inline void qk_scores_g(const float* const* q, const KV* kc, int64_t T4, float scale, float* const* sc) {
  constexpr int64_t hd = 8 * NQ;
  const __m128 s4 = _mm_set1_ps(scale);
  for (int64_t t = 0; t < T4; t += 4) {
    const KV* k[4] = {kc + t * hd, kc + (t + 1) * hd, kc + (t + 2) * hd, kc + (t + 3) * hd};
    __m256 a[G][4];
    for (int i = 0; i < NQ; ++i) {
      const __m256 x[4] = {load8(k[0] + 8 * i), load8(k[1] + 8 * i), load8(k[2] + 8 * i), load8(k[3] + 8 * i)};
      for (int g = 0; g < G; ++g) {
        const __m256 qv = _mm256_loadu_ps(q[g] + 8 * i);
        for (int j = 0; j < 4; ++j) a[g][j] = i == 0 ? _mm256_mul_ps(qv, x[j]) : _mm256_fmadd_ps(qv, x[j], a[g][j]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]), _mm256_hadd_ps(a[g][2], a[g][3]));
      const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(sc[g] + t, _mm_mul_ps(r, s4));
    }
  }
}

template <int NQ, int G, typename KV>
inline void pv_sum_g(const float* const* p, const KV* vc, const int64_t* n, float* const* out) {
  constexpr int64_t hd = 8 * NQ;
  constexpr int H = NQ < 4 ? NQ : 4;  // vectors of the head per pass (G x H accumulators)
  int64_t nmin = n[0];
  for (int g = 1; g < G; ++g) nmin = std::min(nmin, n[g]);
  for (int v0 = 0; v0 < NQ; v0 += H) {
    __m256 o[G][H];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < H; ++j) o[g][j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < nmin; ++t) {
      const KV* v = vc + t * hd + 8 * v0;
      __m256 x[H];
      for (int j = 0; j < H; ++j) x[j] = load8(v + 8 * j);
      for (int g = 0; g < G; ++g) {
        const __m256 pv = _mm256_set1_ps(p[g][t]);
        for (int j = 0; j < H; ++j) o[g][j] = _mm256_fmadd_ps(pv, x[j], o[g][j]);
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int64_t t = nmin; t < n[g]; ++t) {
        const KV* v = vc + t * hd + 8 * v0;
        const __m256 pv = _mm256_set1_ps(p[g][t]);
        for (int j = 0; j < H; ++j) o[g][j] = _mm256_fmadd_ps(pv, load8(v + 8 * j), o[g][j]);
      }
      for (int j = 0; j < H; ++j) _mm256_storeu_ps(out[g] + 8 * (v0 + j), o[g][j]);
    }
  }
}
#endif

// f(std::integral_constant<int, NQ>) for head_dim = 8 * NQ of the vector kernels (8 ... 128); nothing otherwise.
template <typename F>
inline void with_nq(int64_t hd, F&& f) {
  switch (hd) {
    case 8: f(std::integral_constant<int, 1>{}); break;
    case 16: f(std::integral_constant<int, 2>{}); break;
    case 32: f(std::integral_constant<int, 4>{}); break;
    case 64: f(std::integral_constant<int, 8>{}); break;
    case 128: f(std::integral_constant<int, 16>{}); break;
    default: break;
  }
}

// sc[0:n) -= max, exp, in place; returns the sum (double), as attend() normalises by.
inline double softmax_unnormalised(float* sc, int64_t n) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sc[t]);
  for (int64_t t = 0; t < n; ++t) sc[t] -= mx;
  exp_neg_inplace(sc, n);
  double sum = 0;
  for (int64_t t = 0; t < n; ++t) sum += sc[t];
  return sum;
}

// Softmax attention of q (hd) over keys/values [0, n) -> out (hd); sc: n floats of scratch.
template <typename KV>
inline void attend(const float* q, const KV* kc, const KV* vc, int64_t n, int64_t hd, float* sc, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  bool done = false;
#if MF_AVX2
  auto vec = [&](auto nq) {
    constexpr int NQ = decltype(nq)::value;
    qk_scores<NQ>(q, kc, n, scale, sc);
    const double sum = softmax_unnormalised(sc, n);
    pv_sum<NQ>(sc, vc, n, out);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
    done = true;
  };
  with_nq(hd, vec);
#endif
  if (done) return;
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const KV* k = kc + t * hd;
    float s = 0.f;
    for (int64_t i = 0; i < hd; ++i) s += q[i] * to_f(k[i]);
    sc[t] = s * scale;
    mx = std::max(mx, sc[t]);
  }
  for (int64_t t = 0; t < n; ++t) sc[t] -= mx;
  exp_neg_inplace(sc, n);
  double sum = 0;
  for (int64_t t = 0; t < n; ++t) sum += sc[t];
  std::fill(out, out + hd, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < hd; ++i) out[i] += sc[t] * to_f(vc[t * hd + i]);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

// Four queries of one head over the same cache (a prompt's tokens at positions p .. p+3 of one row: query g sees
// n[g] keys): attend() of each, its numbers bit for bit, the keys and values read once for the four. sc: four rows
// of scratch. False (nothing done) where attend()'s vector path does not apply.
template <typename KV>
inline bool attend4(const float* const* q, const KV* kc, const KV* vc, const int64_t* n, int64_t hd, float* const* sc,
                    float* const* out) {
#if MF_AVX2
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  bool done = false;
  auto vec = [&](auto nq) {
    constexpr int NQ = decltype(nq)::value;
    const int64_t T4 = std::min(std::min(n[0], n[1]), std::min(n[2], n[3])) / 4 * 4;
    qk_scores_g<NQ, 4>(q, kc, T4, scale, sc);
    double sum[4];
    for (int g = 0; g < 4; ++g) {
      qk_scores<NQ>(q[g], kc, n[g], scale, sc[g], T4);
      sum[g] = softmax_unnormalised(sc[g], n[g]);
    }
    pv_sum_g<NQ, 4>(sc, vc, n, out);
    for (int g = 0; g < 4; ++g) {
      const float inv = static_cast<float>(1.0 / sum[g]);
      for (int64_t i = 0; i < hd; ++i) out[g][i] *= inv;
    }
    done = true;
  };
  with_nq(hd, vec);
  return done;
#else
  return false;
#endif
}
}  // namespace mfk
