// The LM head: y (M, V) = x (M, d) W^T (* per-row scale) for fp32 / bf16 / fp16 / int8 rows, dequantised in
// registers, fp32 accumulation; the vocabulary rows are split over the threads in chunks of kHeadChunk.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace mfk {

// f(T{}) for the row dtype t of a table, embedding or head: float32, bfloat16, float16 or int8.
template <typename F>
void dispatch_rows(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kChar: f(int8_t{}); break;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16, float16 or int8");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV over rows [r0, r1): y[r] = (scale ? scale[r] : 1) * <W[r, :d], x>.

// Rows are read 4 at a time, each a short stream (768 B for an int8 row of d = 768): too short for the hardware
// prefetchers to train on (left to them, the int8 head reads a third of the fp32 one's bytes/s). Each 4-row group
// therefore prefetches the group kPrefetchGroups ahead (rows below `r_pf`, the end of the caller's chunk), a slice
// per step.
constexpr int64_t kPrefetchGroups = 2;

template <typename T>
inline void gemv_rows(const T* W, const float* scale, const float* x, int64_t d, int64_t r0, int64_t r1, float* y,
                      int64_t r_pf = -1) {
  int64_t r = r0;
  if (r_pf < 0) r_pf = r1;
#if MF_AVX2
  const int64_t dv = d / 8 * 8;
  constexpr int64_t step_bytes = 32 * sizeof(T);  // bytes of a 4-row group consumed per inner step
  for (; r + 4 <= r1; r += 4) {
    const T *a = W + r * d, *b = a + d, *c = b + d, *e = c + d;
    const bool pf = r + 4 * kPrefetchGroups + 4 <= r_pf;
    const char* nxt = reinterpret_cast<const char*>(W + (r + 4 * kPrefetchGroups) * d);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t j = 0; j < dv; j += 8) {
      if (pf) {
        const int64_t o = (j / 8) * step_bytes;
        for (int64_t k = (o + 63) / 64 * 64; k < o + step_bytes; k += 64) _mm_prefetch(nxt + k, _MM_HINT_T0);
      }
      const __m256 xv = _mm256_loadu_ps(x + j);
      s0 = _mm256_fmadd_ps(load8(a + j), xv, s0);
      s1 = _mm256_fmadd_ps(load8(b + j), xv, s1);
      s2 = _mm256_fmadd_ps(load8(c + j), xv, s2);
      s3 = _mm256_fmadd_ps(load8(e + j), xv, s3);
    }
    float t[4] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3)};
    for (int64_t j = dv; j < d; ++j) {
      t[0] += to_f(a[j]) * x[j];
      t[1] += to_f(b[j]) * x[j];
      t[2] += to_f(c[j]) * x[j];
      t[3] += to_f(e[j]) * x[j];
    }
    for (int i = 0; i < 4; ++i) y[r + i] = scale ? t[i] * scale[r + i] : t[i];
  }
#endif
  for (; r < r1; ++r) {
    const T* a = W + r * d;
    float t = 0.f;
    for (int64_t j = 0; j < d; ++j) t += to_f(a[j]) * x[j];
    y[r] = scale ? t * scale[r] : t;
  }
}
// int8 rows against x quantised to int16 (one scale for the whole vector, 14 bits: error ~6e-5 of max|x|, far
// below the weights' int8 rounding): 16 multiply-adds per vpmaddwd instead of a convert and an FMA per 8, so the
// int8 head is bound by memory, not by dequantising. Lane sums stay below 2^31 for d <= 4096.
constexpr int64_t kI16MaxD = 4096;

#if MF_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#endif

inline float quantize_x16(const float* x, int64_t d, int16_t* x16) {
  float mx = 0.f;
  for (int64_t j = 0; j < d; ++j) mx = std::max(mx, std::fabs(x[j]));
  const float sx = mx > 0.f ? mx / 16383.f : 1.f, inv = 1.f / sx;
  for (int64_t j = 0; j < d; ++j) x16[j] = static_cast<int16_t>(std::lrint(x[j] * inv));
  return sx;
}

inline void gemv_rows_i16(const int8_t* W, const float* scale, const int16_t* x16, float sx, int64_t d, int64_t r0,
                          int64_t r1, float* y, int64_t r_pf = -1) {
  int64_t r = r0;
  if (r_pf < 0) r_pf = r1;
#if MF_AVX2
  const int64_t dv = d / 16 * 16;
  for (; r + 4 <= r1; r += 4) {
    const int8_t *a = W + r * d, *b = a + d, *c = b + d, *e = c + d;
    const bool pf = r + 4 * kPrefetchGroups + 4 <= r_pf;
    const char* nxt = reinterpret_cast<const char*>(W + (r + 4 * kPrefetchGroups) * d);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t j = 0; j < dv; j += 16) {
      if (pf) _mm_prefetch(nxt + 4 * j, _MM_HINT_T0);  // 64 bytes of the group per 16 columns
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + j));
      s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + j))), xv));
      s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j))), xv));
      s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j))), xv));
      s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e + j))), xv));
    }
    int32_t t[4] = {hsum_i32(s0), hsum_i32(s1), hsum_i32(s2), hsum_i32(s3)};
    for (int64_t j = dv; j < d; ++j) {
      t[0] += a[j] * x16[j];
      t[1] += b[j] * x16[j];
      t[2] += c[j] * x16[j];
      t[3] += e[j] * x16[j];
    }
    for (int i = 0; i < 4; ++i) y[r + i] = static_cast<float>(t[i]) * sx * scale[r + i];
  }
#endif
  for (; r < r1; ++r) {
    const int8_t* a = W + r * d;
    int32_t t = 0;
    for (int64_t j = 0; j < d; ++j) t += a[j] * x16[j];
    y[r] = static_cast<float>(t) * sx * scale[r];
  }
}

// Several activation rows at once: each group of 4 W rows is loaded (and widened) once for MB rows of x, the
// products of every (W row, x row) pair accumulated exactly as the one-row kernels do (the same lanes, the same
// order, integer sums exact), so a row's logits do not depend on the rows beside it.
template <int MB, typename T>
inline void gemv_rows_m(const T* W, const float* scale, const float* x, int64_t d, int64_t V, int64_t r0, int64_t r1,
                        float* y, int64_t r_pf) {
  int64_t r = r0;
#if MF_AVX2
  const int64_t dv = d / 8 * 8;
  constexpr int64_t step_bytes = 32 * sizeof(T);  // as gemv_rows: the group 2 ahead, a slice per step
  for (; r + 4 <= r1; r += 4) {
    const T* a[4] = {W + r * d, W + (r + 1) * d, W + (r + 2) * d, W + (r + 3) * d};
    const bool pf = r + 4 * kPrefetchGroups + 4 <= r_pf;
    const char* nxt = reinterpret_cast<const char*>(W + (r + 4 * kPrefetchGroups) * d);
    __m256 s[4][MB];
    for (int i = 0; i < 4; ++i)
      for (int m = 0; m < MB; ++m) s[i][m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < dv; j += 8) {
      if (pf) {
        const int64_t o = (j / 8) * step_bytes;
        for (int64_t k = (o + 63) / 64 * 64; k < o + step_bytes; k += 64) _mm_prefetch(nxt + k, _MM_HINT_T0);
      }
      const __m256 w0 = load8(a[0] + j), w1 = load8(a[1] + j), w2 = load8(a[2] + j), w3 = load8(a[3] + j);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * d + j);
        s[0][m] = _mm256_fmadd_ps(w0, xv, s[0][m]);
        s[1][m] = _mm256_fmadd_ps(w1, xv, s[1][m]);
        s[2][m] = _mm256_fmadd_ps(w2, xv, s[2][m]);
        s[3][m] = _mm256_fmadd_ps(w3, xv, s[3][m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float* xm = x + m * d;
      for (int i = 0; i < 4; ++i) {
        float t = hsum(s[i][m]);
        for (int64_t j = dv; j < d; ++j) t += to_f(a[i][j]) * xm[j];
        y[m * V + r + i] = scale ? t * scale[r + i] : t;
      }
    }
  }
#endif
  for (int m = 0; m < MB; ++m) gemv_rows(W, scale, x + m * d, d, r, r1, y + m * V, 0);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MF_VNNI512 1
constexpr int kI16Rows = 4;  // x rows per pass: 16 accumulators, 4 widened W rows, one x vector of 32 registers
#else
#define MF_VNNI512 0
constexpr int kI16Rows = 2;  // of 16 AVX2 registers: 8 accumulators, 4 widened W rows, one x vector
#endif

// int8 W against MB rows of int16 x: with AVX-512 VNNI one vpdpwssd does 32 multiply-adds into int32 lanes (the
// CPU's integer dot product), else AVX2 vpmaddwd + vpaddd 16. Integer sums are exact (wrapping int32 addition is
// associative), so every path gives the one-row kernel's numbers bit for bit.
template <int MB>
inline void gemv_rows_i16_m(const int8_t* W, const float* scale, const int16_t* x16, const float* sx, int64_t d,
                            int64_t V, int64_t r0, int64_t r1, float* y, int64_t r_pf) {
  int64_t r = r0;
#if MF_AVX2
  for (; r + 4 <= r1; r += 4) {
    const int8_t* a[4] = {W + r * d, W + (r + 1) * d, W + (r + 2) * d, W + (r + 3) * d};
    const bool pf = r + 4 * kPrefetchGroups + 4 <= r_pf;  // as gemv_rows_i16: the group 2 ahead, a slice a step
    const char* nxt = reinterpret_cast<const char*>(W + (r + 4 * kPrefetchGroups) * d);
    int32_t t[4][MB];
    int64_t j = 0;
#if MF_VNNI512
    __m512i z[4][MB];
    for (int i = 0; i < 4; ++i)
      for (int m = 0; m < MB; ++m) z[i][m] = _mm512_setzero_si512();
    for (; j + 32 <= d; j += 32) {
      if (pf) {
        _mm_prefetch(nxt + 4 * j, _MM_HINT_T0);
        _mm_prefetch(nxt + 4 * j + 64, _MM_HINT_T0);
      }
      __m512i w[4];
      for (int i = 0; i < 4; ++i)
        w[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[i] + j)));
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(x16 + m * d + j);
        for (int i = 0; i < 4; ++i) z[i][m] = _mm512_dpwssd_epi32(z[i][m], w[i], xv);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int m = 0; m < MB; ++m) t[i][m] = _mm512_reduce_add_epi32(z[i][m]);
#else
    __m256i s[4][MB];
    for (int i = 0; i < 4; ++i)
      for (int m = 0; m < MB; ++m) s[i][m] = _mm256_setzero_si256();
    for (; j + 16 <= d; j += 16) {
      if (pf) _mm_prefetch(nxt + 4 * j, _MM_HINT_T0);
      __m256i w[4];
      for (int i = 0; i < 4; ++i)
        w[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a[i] + j)));
      for (int m = 0; m < MB; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + m * d + j));
        for (int i = 0; i < 4; ++i) s[i][m] = _mm256_add_epi32(s[i][m], _mm256_madd_epi16(w[i], xv));
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int m = 0; m < MB; ++m) t[i][m] = hsum_i32(s[i][m]);
#endif
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < 4; ++i) {
        uint32_t u = static_cast<uint32_t>(t[i][m]);  // the tail, wrapping as the vector lanes do
        for (int64_t q = j; q < d; ++q) u += static_cast<uint32_t>(a[i][q] * x16[m * d + q]);
        y[m * V + r + i] = static_cast<float>(static_cast<int32_t>(u)) * sx[m] * scale[r + i];
      }
  }
#endif
  for (int m = 0; m < MB; ++m) gemv_rows_i16(W, scale, x16 + m * d, sx[m], d, r, r1, y + m * V, 0);
}

// The head: y (M, V) = x (M, d) W^T (* scale) over rows [r0, r1), each block of W rows read once for all M: one
// row with the one-row kernels (which prefetch the next W rows: at batch 1 the head is bound by memory), more in
// passes of kI16Rows (int16 x) or 2 (float x) rows of x.
// x16/sx: x quantised by quantize_x16 (int8 W with scales and d <= kI16MaxD), else null.
template <typename T>
inline void head_rows(const T* W, const float* scale, const float* x, const int16_t* x16, const float* sx, int64_t M,
                      int64_t d, int64_t V, int64_t r0, int64_t r1, float* y) {
  if (M == 1) {
    if constexpr (std::is_same_v<T, int8_t>) {
      if (x16 != nullptr) return gemv_rows_i16(W, scale, x16, sx[0], d, r0, r1, y, r1);
    }
    return gemv_rows(W, scale, x, d, r0, r1, y, r1);
  }
  for (int64_t r = r0; r < r1; r += 4) {  // each group of 4 W rows for every x row; the first pass prefetches
    const int64_t e = std::min(r1, r + 4);
    int64_t m = 0;
    if constexpr (std::is_same_v<T, int8_t>) {
      if (x16 != nullptr) {
        for (; m + kI16Rows <= M; m += kI16Rows)
          gemv_rows_i16_m<kI16Rows>(W, scale, x16 + m * d, sx + m, d, V, r, e, y + m * V, m == 0 ? r1 : 0);
        for (; m < M; ++m) gemv_rows_i16_m<1>(W, scale, x16 + m * d, sx + m, d, V, r, e, y + m * V, m == 0 ? r1 : 0);
        continue;
      }
    }
    for (; m + 2 <= M; m += 2) gemv_rows_m<2>(W, scale, x + m * d, d, V, r, e, y + m * V, m == 0 ? r1 : 0);
    for (; m < M; ++m) gemv_rows_m<1>(W, scale, x + m * d, d, V, r, e, y + m * V, m == 0 ? r1 : 0);
  }
}

constexpr int64_t kHeadChunk = 512;  // vocabulary rows per parallel chunk

// Scratch of the int16 activations, kept by a caller that runs the head every step.
struct HeadScratch {
  std::vector<int16_t> x16;
  std::vector<float> sx;
};

// y (M, V) = x (M, d) W^T (* scale) for W (V, d) contiguous, the rows split over the threads in chunks of
// kHeadChunk. int16_x: int8 W with scales and d <= kI16MaxD runs on x quantised to int16 (gemv_rows_i16).
// reverse: the chunks in the opposite order (the numbers do not change): a caller alternating the direction step
// after step finds what the last step read last still in the L3 cache, so a head a little larger than the L3 is
// partly read from it instead of DRAM.
inline void head_gemv(const at::Tensor& W, const float* scale, const float* x, int64_t M, float* y, bool int16_x,
                      HeadScratch& s, bool reverse = false) {
  const int64_t V = W.size(0), d = W.size(1);
  const bool i16 = int16_x && W.scalar_type() == at::kChar && scale != nullptr && d <= kI16MaxD;
  s.sx.resize(M);
  if (i16) {
    s.x16.resize(M * d);
    for (int64_t m = 0; m < M; ++m) s.sx[m] = quantize_x16(x + m * d, d, s.x16.data() + m * d);
  }
  dispatch_rows(W.scalar_type(), "head: W", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = reinterpret_cast<const T*>(W.data_ptr());
    const int64_t nc = (V + kHeadChunk - 1) / kHeadChunk;
    parallel_chunks(nc, [&](int64_t c) {
      if (reverse) c = nc - 1 - c;
      const int64_t r0 = c * kHeadChunk, r1 = std::min(V, r0 + kHeadChunk);
      head_rows(wp, scale, x, i16 ? s.x16.data() : nullptr, s.sx.data(), M, d, V, r0, r1, y);
    });
  });
}

}  // namespace mfk
