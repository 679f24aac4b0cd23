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
inline void qk_scores(const float* q, const KV* kc, int64_t n, float scale, float* sc) {
  constexpr int64_t hd = 8 * NQ;
  __m256 qv[NQ];
  for (int i = 0; i < NQ; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  const __m128 s4 = _mm_set1_ps(scale);
  int64_t t = 0;
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
#endif

// Softmax attention of q (hd) over keys/values [0, n) -> out (hd); sc: n floats of scratch.
template <typename KV>
inline void attend(const float* q, const KV* kc, const KV* vc, int64_t n, int64_t hd, float* sc, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  bool done = false;
#if MF_AVX2
  auto vec = [&](auto nq) {
    constexpr int NQ = decltype(nq)::value;
    qk_scores<NQ>(q, kc, n, scale, sc);
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sc[t]);
    double sum = 0;
    for (int64_t t = 0; t < n; ++t) sc[t] -= mx;
    exp_neg_inplace(sc, n);
    for (int64_t t = 0; t < n; ++t) sum += sc[t];
    pv_sum<NQ>(sc, vc, n, out);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
    done = true;
  };
  switch (hd) {
    case 8: vec(std::integral_constant<int, 1>{}); break;
    case 16: vec(std::integral_constant<int, 2>{}); break;
    case 32: vec(std::integral_constant<int, 4>{}); break;
    case 64: vec(std::integral_constant<int, 8>{}); break;
    case 128: vec(std::integral_constant<int, 16>{}); break;
    default: break;
  }
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

// int8 rows against x quantised to int16 (one scale for the whole vector, 14 bits: error ~6e-5 of max|x|, far
}  // namespace mfk
