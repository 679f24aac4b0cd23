// CPU inference kernels shared by the layer op (decode.cpp) and the decode engine (engine.cpp).
//
// - Pool: a persistent worker per extra core that spins briefly between jobs, then sleeps. The extension is built
//   without -fopenmp, so torch's OpenMP runtime stays the only one in the process.
// - hash_chunks: codes and weights of the K chunks of one token (Eq. 3-10), exp vectorised.
// - gather_cols: out[c0:c1] += sum_k w_k * T[row_k, c0:c1] with software prefetch of the rows a few ahead: the row
//   addresses are known once the hash is done, so up to `dist` rows are in flight at once instead of one.
// - gemv_rows: y[r] = s_r * <W[r], x> for fp32 / bf16 / fp16 / int8 rows (the LM head), dequantised in registers.
// Everything accumulates in fp32.
#pragma once

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MF_AVX2 1
#else
#define MF_AVX2 0
#endif

namespace mfk {

// ---------------------------------------------------------------------------------------------------------------
// Threads

inline void cpu_relax() {
#if MF_AVX2
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Runs a job of n chunks: the caller and the workers claim chunks from a shared counter until none is left, so a
// worker that is asleep or descheduled (a loaded machine) only means the caller does more of the chunks itself.
// The counter carries the job's epoch: a late worker cannot claim a chunk of a job that has moved on. A job is
// published in two steps: first an epoch with no chunks to claim (kClosed), then the job (job_, n_) and a second
// epoch with chunk 0. job_ and n_ only change under a closed epoch, so a worker that read the previous job's
// exhausted counter and then the next job's n_ can never win its claim (the counter moved on) - without the
// closed epoch it could, between the caller's `n_ = n` and its publishing store, and run a chunk of a job that
// was gone (a crash) or count a chunk twice (the caller returning while a worker still wrote its output).
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  int size() const { return size_.load(); }

  // Threads in use (1 = the caller only); at most the hardware's cores.
  void resize(int n) {
    n = std::max(1, std::min(n, static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))));
    std::lock_guard<std::mutex> no_job(run_m_);
    if (n == size()) return;
    stop_workers();
    const uint64_t start = ticket_.load() >> 32;  // a worker that starts late must still see the first job
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, start] { loop(start); });
    size_.store(n);
  }

  void set_spin_us(int64_t us) { spin_us_ = us; }

  // f(chunk) for chunk in [0, n), spread over the threads; returns when all are done.
  void run(int64_t n, const std::function<void(int64_t)>& f) {
    if (n <= 0) return;
    if (size() == 1 || n == 1 || static_cast<uint64_t>(n) >= kClosed) {
      for (int64_t c = 0; c < n; ++c) f(c);
      return;
    }
    std::lock_guard<std::mutex> one_caller(run_m_);  // two Python threads may call kernels at once
    const uint32_t closed = static_cast<uint32_t>(ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    ticket_.store(static_cast<uint64_t>(closed) << 32 | kClosed, std::memory_order_seq_cst);
    job_ = &f;
    n_.store(n, std::memory_order_release);  // after the closed epoch, for any worker that reads it
    done_.store(0, std::memory_order_relaxed);
    const uint32_t e = closed + 1;
    ticket_.store(static_cast<uint64_t>(e) << 32, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    work(e);
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 20000) cpu_relax();
      else std::this_thread::yield();  // the worker holding the last chunk was descheduled
    }
  }

  ~Pool() { stop_workers(); }

 private:
  Pool() { resize(at::get_num_threads()); }

  void work(uint32_t e) {
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      if ((t >> 32) != e || static_cast<int64_t>(t & 0xffffffffu) >= n_.load(std::memory_order_acquire)) return;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        (*job_)(static_cast<int64_t>(t & 0xffffffffu));  // the job stays alive until this chunk is counted done
        done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  void stop_workers() {
    if (workers_.empty()) return;
    stop_.store(true);
    ticket_.fetch_add(uint64_t(1) << 32);
    {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
    size_.store(1);
  }

  void loop(uint64_t seen) {
    auto epoch = [this] { return ticket_.load(std::memory_order_seq_cst) >> 32; };
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      for (int64_t spins = 1; epoch() == seen; ++spins) {
        cpu_relax();
        if ((spins & 1023) == 0 &&
            std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count() > spin_us_) {
          std::unique_lock<std::mutex> lk(m_);  // idle: sleep until the next job
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return epoch() != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = epoch();
      if (stop_.load()) return;
      work(static_cast<uint32_t>(seen));
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<int> size_{1}, sleepers_{0};
  static constexpr uint64_t kClosed = 0xffffffffu;  // the chunk index of a closed epoch: above any n
  std::atomic<uint64_t> ticket_{0};  // epoch << 32 | next chunk
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> n_{0};
  std::mutex m_, run_m_;
  std::condition_variable cv_;
  int64_t spin_us_ = 2000;  // a decode step comes back within this; past it the worker sleeps
};

// Chunks a job of n items is cut into: `per_thread` for each thread of the pool, each at least `min_items`.
inline int64_t n_chunks(int64_t n, int64_t min_items, int per_thread = 2) {
  const int64_t want = static_cast<int64_t>(Pool::get().size()) * per_thread;
  return std::max<int64_t>(1, std::min(want, n / std::max<int64_t>(1, min_items)));
}

// [lo, hi) of n items for thread tid of nt, boundaries multiples of `align`.
inline std::pair<int64_t, int64_t> split(int64_t n, int tid, int nt, int64_t align) {
  const int64_t blocks = (n + align - 1) / align;
  const int64_t lo = std::min(n, blocks * tid / nt * align), hi = std::min(n, blocks * (tid + 1) / nt * align);
  return {lo, hi};
}

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
// Scalar and vector conversions

inline float to_f(float v) { return v; }
inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(at::Half v) { return static_cast<float>(v); }
inline float to_f(int8_t v) { return static_cast<float>(v); }

inline uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, as torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if MF_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (Cephes' range reduction and degree-5 polynomial; ~1 ulp); x < -87 gives ~0.
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// v[i] = exp(v[i]) for v[i] <= 0, in place.
inline void exp_neg_inplace(float* v, int64_t n) {
  int64_t i = 0;
#if MF_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp_neg(_mm256_loadu_ps(v + i)));
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// ---------------------------------------------------------------------------------------------------------------
// Hash (Eq. 3-10): codes and weights of the K chunks of one token.
//
// x: K*tau floats. Bit j of chunk k is [x >= 0], weighted 2^(tau-1-j) (msb) or 2^j (lsb). Weight
// p = prod_j sigmoid(c |x_j|) = 1 / prod_j (1 + exp(-c |x_j|)) with c = 2 / temperature, times ||x_k||_1 for the
// "code" weighting, times the row's int8 scale if given. rows[k] = k*R + code. tmp: K*tau floats of scratch.
// Once the codes are known, the first line of each row of `tab` (rows of `row_bytes` bytes, if given) is requested.
inline void hash_chunks(const float* x, int64_t K, int64_t tau, bool msb, bool code_weighting, float c,
                        const float* scale, int64_t* rows, float* w, float* tmp, const void* tab = nullptr,
                        int64_t row_bytes = 0) {
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
  if (scale)
    for (int64_t k = 0; k < K; ++k) w[k] *= scale[rows[k]];
}

// ---------------------------------------------------------------------------------------------------------------
// Gather: out[c0:c1] += sum_k w[k] * tab[rows[k] * h + c0 : ... + c1], rows prefetched `dist` ahead.

template <typename T>
inline void prefetch_row(const T* row, int64_t c0, int64_t c1) {
  const char* p = reinterpret_cast<const char*>(row + c0);
  const int64_t bytes = (c1 - c0) * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// Rows a gather prefetches ahead of the one it adds (0: none); `set_prefetch` in the bindings, for measurements.
inline std::atomic<int> g_prefetch_rows{8};

template <typename T>
inline void gather_cols(const T* tab, const int64_t* rows, const float* w, int64_t K, int64_t h, int64_t c0,
                        int64_t c1, float* out) {
  if (c1 <= c0) return;
  const int dist = g_prefetch_rows.load(std::memory_order_relaxed);
  for (int64_t k = 0; k < std::min<int64_t>(dist, K); ++k) prefetch_row(tab + rows[k] * h, c0, c1);
  int64_t k = 0;
#if MF_AVX2
  const int64_t cv = c0 + (c1 - c0) / 8 * 8;
  for (; k + 4 <= K; k += 4) {  // four rows per pass over out: a quarter of the load/store traffic on out
    if (dist > 0)
      for (int64_t q = k + dist; q < std::min(K, k + dist + 4); ++q) prefetch_row(tab + rows[q] * h, c0, c1);
    const T *r0 = tab + rows[k] * h, *r1 = tab + rows[k + 1] * h, *r2 = tab + rows[k + 2] * h, *r3 = tab + rows[k + 3] * h;
    const __m256 w0 = _mm256_set1_ps(w[k]), w1 = _mm256_set1_ps(w[k + 1]), w2 = _mm256_set1_ps(w[k + 2]),
                 w3 = _mm256_set1_ps(w[k + 3]);
    int64_t j = c0;
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
    if (dist > 0 && k + dist < K) prefetch_row(tab + rows[k + dist] * h, c0, c1);
    const T* r = tab + rows[k] * h;
    const float wk = w[k];
    for (int64_t j = c0; j < c1; ++j) out[j] += wk * to_f(r[j]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV over rows [r0, r1): y[r] = (scale ? scale[r] : 1) * <W[r, :d], x>.

// Rows are read 4 at a time, each a short stream (768 B for an int8 row of d = 768): too short for the hardware
// prefetchers to train on, so the int8 head ran at a third of the fp32 one's bytes/s. Each 4-row group therefore
// prefetches the group kPrefetchGroups ahead (rows below `r_pf`, the end of the caller's chunk), a slice per step.
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

// ---------------------------------------------------------------------------------------------------------------
// Attention of one query over cached keys/values, head_dim = 8 * NQ: q and the output stay in registers.

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

}  // namespace mfk
