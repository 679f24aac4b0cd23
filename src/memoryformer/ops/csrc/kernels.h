// The Memory Layer's CPU kernels for a few tokens (Eq. 3-12): the hash of one token's K chunks and the gather-sum of
// the rows it selects, plus 2 MB-aligned table storage.
//
// - hash_chunks: codes and weights of the K chunks of one token (Eq. 3-10), exp vectorised.
// - gather_cols: out[c0:c1] += sum_k w_k * T[row_k, c0:c1] with software prefetch of the rows a few ahead: the row
//   addresses are known once the hash is done, so up to `dist` rows are in flight at once instead of one.
// Everything accumulates in fp32.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "simd.h"

namespace mfk {

// ---------------------------------------------------------------------------------------------------------------
// Huge pages: table storage aligned to 2 MB with MADV_HUGEPAGE, so a random row costs one TLB entry per 2 MB.

constexpr size_t kHuge = size_t(1) << 21;

inline void* alloc_huge(size_t bytes) {
  const size_t n = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, n);
  if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, n, MADV_HUGEPAGE);
#endif
  return p;
}

// ---------------------------------------------------------------------------------------------------------------
// Hash (Eq. 3-10): codes and weights of the K chunks of one token.
//
// x: K*tau floats. Bit j of chunk k is [x >= 0], weighted 2^(tau-1-j) (msb) or 2^j (lsb). Weight
// p = prod_j sigmoid(c |x_j|) = 1 / prod_j (1 + exp(-c |x_j|)) with c = 2 / temperature, times ||x_k||_1 for the
// "code" weighting, times the row's int8 scale if given. rows[k] = k*R + code. tmp: K*tau floats of scratch.
// Once the codes are known, the first line of each row of `tab` (rows of `row_bytes` bytes, if given) is requested.
// apply_scale false: the scales are only requested, and the caller multiplies them in later (scale_weights), once
// their lines have arrived.
inline void hash_chunks(const float* x, int64_t K, int64_t tau, bool msb, bool code_weighting, float c,
                        const float* scale, int64_t* rows, float* w, float* tmp, const void* tab = nullptr,
                        int64_t row_bytes = 0, bool apply_scale = true) {
  const int64_t R = int64_t(1) << tau;
  int64_t k0 = 0;
#if MF_AVX2
  // 8 chunks per vector: element j of chunks k..k+7 side by side (tmp holds x transposed to (tau, K)), so codes,
  // products and sums are plain vertical operations for any tau
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < tau; ++j) tmp[j * K + k] = x[k * tau + j];
  const __m256 vc = _mm256_set1_ps(-c), one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (; k0 + 8 <= K; k0 += 8) {
    __m256i code = _mm256_setzero_si256();
    __m256 den = one, l1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < tau; ++j) {
      const __m256 v = _mm256_loadu_ps(tmp + j * K + k0);
      const __m256 a = _mm256_andnot_ps(sign, v);
      const __m256i bit = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
      code = _mm256_or_si256(code, _mm256_and_si256(bit, _mm256_set1_epi32(1 << (msb ? tau - 1 - j : j))));
      den = _mm256_mul_ps(den, _mm256_add_ps(one, exp_neg(_mm256_mul_ps(vc, a))));
      l1 = _mm256_add_ps(l1, a);
    }
    __m256 p = _mm256_div_ps(one, den);
    if (code_weighting) p = _mm256_mul_ps(p, l1);
    _mm256_storeu_ps(w + k0, p);
    alignas(32) int32_t cs[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(cs), code);
    for (int i = 0; i < 8; ++i) {
      const int64_t r = (k0 + i) * R + cs[i];
      rows[k0 + i] = r;
      // requested now, in flight while the next chunks hash: the row's first line, the int8 scale
      if (tab) __builtin_prefetch(static_cast<const char*>(tab) + r * row_bytes, 0, 3);
      if (scale) __builtin_prefetch(scale + r, 0, 3);
    }
  }
#endif
  for (int64_t k = k0; k < K; ++k) {
    const float* z = x + k * tau;
    int64_t code = 0;
    float den = 1.f, l1 = 0.f;
    for (int64_t j = 0; j < tau; ++j) {
      const float a = std::fabs(z[j]);
      code |= static_cast<int64_t>(z[j] >= 0.f) << (msb ? tau - 1 - j : j);
      den *= 1.f + std::exp(-c * a);
      l1 += a;
    }
    rows[k] = k * R + code;
    const float p = 1.f / den;
    w[k] = code_weighting ? p * l1 : p;
    if (tab) __builtin_prefetch(static_cast<const char*>(tab) + rows[k] * row_bytes, 0, 3);
  }
  if (scale && apply_scale)
    for (int64_t k = 0; k < K; ++k) w[k] *= scale[rows[k]];
}

inline void scale_weights(const float* scale, const int64_t* rows, float* w, int64_t K) {
  for (int64_t k = 0; k < K; ++k) w[k] *= scale[rows[k]];
}

// ---------------------------------------------------------------------------------------------------------------
// Gather: out[c0:c1] += sum_k w[k] * tab[rows[k] * h + c0 : ... + c1], rows prefetched `dist` ahead.

template <typename T>
inline void prefetch_row(const T* row, int64_t c0, int64_t c1, bool to_l2 = false) {
  const char* p = reinterpret_cast<const char*>(row + c0);
  const int64_t bytes = (c1 - c0) * static_cast<int64_t>(sizeof(T));
  if (to_l2)
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);  // prefetcht1
  else
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);  // prefetcht0
}

// Rows a gather prefetches ahead of the one it adds (0: none); `set_prefetch` in the bindings, for measurements.
inline std::atomic<int> g_prefetch_rows{8};
// The same for whole rows requested into L2 (Prefetch::kL2).
inline std::atomic<int> g_prefetch_rows_l2{16};

// How a gather requests the rows ahead of the one it adds: a slice of each into L1 (kL1: the column split of one
// token, every thread a slice of every row), or whole rows into L2 (kL2: each thread whole rows of its own tokens).
// Whole rows in L1 evict the rows being added before their turn; whole rows left to the hardware prefetchers arrive
// late at every row start. MF-small int8, 144-token prompt / 8 rows decoding: 1909 / 940 tokens/s with no software
// prefetch, 2270 / 997 with whole rows 16 ahead into L2 (8 or 32: the same); in another run 1885 / 849 with none,
// 1896 / 827 with whole rows 8 ahead into L1.
enum class Prefetch { kL1, kL2 };

// kpf: rows of `rows` that may be prefetched (>= K; the rows of the tokens gathered next, so that one token's
// prefetches run on into the next one's); warm: the first `dist` rows were requested by such a predecessor.
template <typename T>
inline void gather_cols(const T* tab, const int64_t* rows, const float* w, int64_t K, int64_t h, int64_t c0,
                        int64_t c1, float* out, int64_t kpf = -1, bool warm = false, Prefetch mode = Prefetch::kL1) {
  const bool l2 = mode == Prefetch::kL2;
  const int dist = (l2 ? g_prefetch_rows_l2 : g_prefetch_rows).load(std::memory_order_relaxed);
  if (c1 <= c0) return;
  if (kpf < K) kpf = K;
  if (!warm)
    for (int64_t k = 0; k < std::min<int64_t>(dist, K); ++k) prefetch_row(tab + rows[k] * h, c0, c1, l2);
  int64_t k = 0;
#if MF_AVX2
  const int64_t cv = c0 + (c1 - c0) / 8 * 8;
  for (; k + 4 <= K; k += 4) {  // four rows per pass over out: a quarter of the load/store traffic on out
    if (dist > 0)
      for (int64_t q = k + dist; q < std::min(kpf, k + dist + 4); ++q) prefetch_row(tab + rows[q] * h, c0, c1, l2);
    const T *r0 = tab + rows[k] * h, *r1 = tab + rows[k + 1] * h, *r2 = tab + rows[k + 2] * h, *r3 = tab + rows[k + 3] * h;
    const __m256 w0 = _mm256_set1_ps(w[k]), w1 = _mm256_set1_ps(w[k + 1]), w2 = _mm256_set1_ps(w[k + 2]),
                 w3 = _mm256_set1_ps(w[k + 3]);
    int64_t j = c0;
#if MF_AVX512
    for (; j + 16 <= c1; j += 16) {
      const __m512 v0 = _mm512_set1_ps(w[k]), v1 = _mm512_set1_ps(w[k + 1]), v2 = _mm512_set1_ps(w[k + 2]),
                   v3 = _mm512_set1_ps(w[k + 3]);
      __m512 a = _mm512_fmadd_ps(v0, load16(r0 + j), _mm512_loadu_ps(out + j));
      __m512 b = _mm512_mul_ps(v1, load16(r1 + j));
      a = _mm512_fmadd_ps(v2, load16(r2 + j), a);
      b = _mm512_fmadd_ps(v3, load16(r3 + j), b);
      _mm512_storeu_ps(out + j, _mm512_add_ps(a, b));
    }
#endif
    for (; j < cv; j += 8) {
      __m256 a = _mm256_fmadd_ps(w0, load8(r0 + j), _mm256_loadu_ps(out + j));
      __m256 b = _mm256_mul_ps(w1, load8(r1 + j));
      a = _mm256_fmadd_ps(w2, load8(r2 + j), a);
      b = _mm256_fmadd_ps(w3, load8(r3 + j), b);
      _mm256_storeu_ps(out + j, _mm256_add_ps(a, b));
    }
    for (; j < c1; ++j)
      out[j] += w[k] * to_f(r0[j]) + w[k + 1] * to_f(r1[j]) + (w[k + 2] * to_f(r2[j]) + w[k + 3] * to_f(r3[j]));
  }
#endif
  for (; k < K; ++k) {
    if (dist > 0 && k + dist < kpf) prefetch_row(tab + rows[k + dist] * h, c0, c1, l2);
    const T* r = tab + rows[k] * h;
    const float wk = w[k];
    for (int64_t j = c0; j < c1; ++j) out[j] += wk * to_f(r[j]);
  }
}
}  // namespace mfk
