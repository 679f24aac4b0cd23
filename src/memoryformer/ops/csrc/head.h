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
  auto hsum_i = [](__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
  };
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
    int32_t t[4] = {hsum_i(s0), hsum_i(s1), hsum_i(s2), hsum_i(s3)};
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

// The head: y (M, V) = x (M, d) W^T (* scale) over rows [r0, r1), each block of W rows read once for all M.
// x16/sx: x quantised by quantize_x16 (int8 W with scales and d <= kI16MaxD), else null.
template <typename T>
inline void head_rows(const T* W, const float* scale, const float* x, const int16_t* x16, const float* sx, int64_t M,
                      int64_t d, int64_t V, int64_t r0, int64_t r1, float* y) {
  for (int64_t r = r0; r < r1; r += 16)
    for (int64_t m = 0; m < M; ++m) {
      const int64_t e = std::min(r1, r + 16);
      if constexpr (std::is_same_v<T, int8_t>) {
        if (x16 != nullptr) {
          gemv_rows_i16(W, scale, x16 + m * d, sx[m], d, r, e, y + m * V, m == 0 ? r1 : 0);
          continue;
        }
      }
      gemv_rows(W, scale, x + m * d, d, r, e, y + m * V, m == 0 ? r1 : 0);
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
