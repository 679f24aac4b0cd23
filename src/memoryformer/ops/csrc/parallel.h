// How the kernels spread a job of n independent chunks over threads, chosen at run time (set_parallel):
// - kPool: the persistent pool below (a worker per extra core that spins briefly between jobs, then sleeps;
//   chunks claimed dynamically, so a descheduled worker only means the caller runs more of them);
// - kAten: at::parallel_for, torch's intra-op pool (OpenMP here; the extension is compiled with -fopenmp so the
//   pragma in ATen's header is live and runs on the libgomp torch has loaded), a static split of the chunks over
//   at::get_num_threads() threads.
// The chunks are the same in both, and each chunk's arithmetic does not depend on which thread runs it, so the
// outputs are bitwise the same.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "simd.h"

namespace mfk {

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
//
// Kept as the default over at::parallel_for (benchmarks/pool.py, 2 threads on 2 cores, medians of 9 interleaved
// rounds, int8 MF-micro / MF-tiny / MF-small): on an idle machine (load 0.55-0.97) the two are level, 4406 / 1245 /
// 359 tokens/s against 4827 / 1228 / 383 (0.91x / 1.01x / 0.94x); while other processes compete for the cores it is
// 3-10x faster, 1220 / 199 / 103 against 402 / 71 / 30 at a load of 3.7-7 and 1433 / 192 / 119 against 228 / 19 / 27
// at 2.5-5.6 (benchmarks/results/pool_amd-epyc-2-threads_2026-12-04*.md). A static split waits at each parallel
// loop's barrier for a thread that is descheduled; here the caller claims that thread's chunks itself. A server
// (HTTP and scheduler threads beside the kernels) is the loaded case. cpu_ext.parallel("aten") switches.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  int size() const { return size_.load(); }
  // How long an idle worker spins before it sleeps: long enough to catch the next job of a decode loop, short
  // enough that other threads of the process (a server's) get the core between steps.
  void set_spin_us(int64_t us) { spin_us_.store(std::max<int64_t>(0, us)); }
  int64_t spin_us() const { return spin_us_.load(); }

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
  std::atomic<int64_t> spin_us_{2000};  // a decode step comes back within this; past it the worker sleeps
};


enum class Parallel : int { kPool = 0, kAten = 1 };
inline std::atomic<int> g_parallel{static_cast<int>(Parallel::kPool)};

inline bool use_aten() { return g_parallel.load(std::memory_order_relaxed) == static_cast<int>(Parallel::kAten); }

// Threads a job is spread over (1 = the caller only).
inline int parallel_threads() { return use_aten() ? at::get_num_threads() : Pool::get().size(); }

// f(chunk) for chunk in [0, n); returns when all are done.
template <typename F>
void parallel_chunks(int64_t n, const F& f) {
  if (use_aten()) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) f(c);
    });
    return;
  }
  Pool::get().run(n, std::function<void(int64_t)>(std::cref(f)));
}

// Chunks a job of n items is cut into: `per_thread` for each thread, each at least `min_items`.
inline int64_t n_chunks(int64_t n, int64_t min_items, int per_thread = 2) {
  const int64_t want = static_cast<int64_t>(parallel_threads()) * per_thread;
  return std::max<int64_t>(1, std::min(want, n / std::max<int64_t>(1, min_items)));
}

// [lo, hi) of n items for thread tid of nt, boundaries multiples of `align`.
inline std::pair<int64_t, int64_t> split(int64_t n, int tid, int nt, int64_t align) {
  const int64_t blocks = (n + align - 1) / align;
  const int64_t lo = std::min(n, blocks * tid / nt * align), hi = std::min(n, blocks * (tid + 1) / nt * align);
  return {lo, hi};
}

}  // namespace mfk
