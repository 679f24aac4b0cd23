// Memory Layer inference for a few tokens on CPU (hash + weight + gather-sum in one call), the GEMV of the
// quantised LM head, huge-page tensors, the choice of parallel implementation, and the bindings of the decode
// engine (engine.cpp).
//
// At batch 1 a layer reads K scattered rows of h entries: its cost is DRAM latency, not arithmetic, so the kernel
// hashes all chunks first, then gathers with the next rows prefetched, the output columns split over the threads
// (parallel.h). Numbers match memoryformer.ops.chunk_hash + memory_lookup (Eq. 3-12): bit j of a chunk is
// [z_j >= 0] with weight 2^(tau-1-j); p = prod_j sigmoid(2|z_j| / t); "code" weighting multiplies p by ||z||_1;
// int8 tables fold their per-row scale into the weight. Accumulation is fp32 for every table dtype.
#include <torch/extension.h>

#include <string>

#include "head.h"
#include "kernels.h"
#include "parallel.h"

void register_engine(pybind11::module& m);  // engine.cpp

// x (..., K*tau) floating; tables (K, R, h) fp32/bf16/fp16/int8; scale (K, R) fp32 or None; bias (h,) or None.
// Returns (N, h) float32, N = x.numel() / (K*tau).
torch::Tensor decode(torch::Tensor x, torch::Tensor tables, c10::optional<torch::Tensor> scale,
                     c10::optional<torch::Tensor> bias, int64_t tau, bool code_weighting, double temperature) {
  TORCH_CHECK(tables.dim() == 3 && tables.device().is_cpu() && x.device().is_cpu(), "decode: CPU tensors expected");
  const int64_t K = tables.size(0), R = tables.size(1), h = tables.size(2);
  TORCH_CHECK(R == (int64_t(1) << tau) && x.size(-1) == K * tau, "decode: shapes do not match tau");
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t n_tok = xf.numel() / (K * tau);
  std::vector<int64_t> rows(n_tok * K);
  std::vector<float> w(n_tok * K), tmp(K * tau);
  torch::Tensor sc;
  if (scale.has_value()) sc = scale->to(torch::kFloat).contiguous();
  const float* sp = scale.has_value() ? sc.data_ptr<float>() : nullptr;
  const float c = static_cast<float>(2.0 / temperature);
  auto tc = tables.contiguous();
  for (int64_t n = 0; n < n_tok; ++n)
    mfk::hash_chunks(xf.data_ptr<float>() + n * K * tau, K, tau, true, code_weighting, c, sp, rows.data() + n * K,
                     w.data() + n * K, tmp.data(), tc.data_ptr(), h * static_cast<int64_t>(tc.element_size()));
  // a fresh buffer: never accumulate into the bias parameter itself
  auto out = bias.has_value() ? bias->to(torch::kFloat).expand({n_tok, h}).clone(at::MemoryFormat::Contiguous)
                              : torch::zeros({n_tok, h}, xf.options());
  float* op = out.data_ptr<float>();
  mfk::dispatch_rows(tc.scalar_type(), "decode: tables", [&](auto tag) {
    using T = decltype(tag);
    const T* tab = reinterpret_cast<const T*>(tc.data_ptr());
    const int64_t nc = mfk::n_chunks(h, 64);
    mfk::parallel_chunks(nc, [&](int64_t c) {
      auto [c0, c1] = mfk::split(h, static_cast<int>(c), static_cast<int>(nc), 64);
      for (int64_t n = 0; n < n_tok; ++n)
        mfk::gather_cols(tab, rows.data() + n * K, w.data() + n * K, K, h, c0, c1, op + n * h);
    });
  });
  return out;
}

// x (M, d) floating; W (V, d) fp32/bf16/fp16/int8; scale (V,) fp32 or None -> (M, V) float32 = x W^T * scale.
torch::Tensor gemv(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> scale, bool int16_head) {
  TORCH_CHECK(W.dim() == 2 && x.dim() == 2 && x.size(1) == W.size(1), "gemv: x (M, d) and W (V, d) expected");
  auto xf = x.to(torch::kFloat).contiguous();
  auto Wc = W.contiguous();
  torch::Tensor sc;
  if (scale.has_value()) sc = scale->to(torch::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), Wc.size(0)}, xf.options());
  mfk::HeadScratch scratch;
  mfk::head_gemv(Wc, scale.has_value() ? sc.data_ptr<float>() : nullptr, xf.data_ptr<float>(), xf.size(0),
                 y.data_ptr<float>(), int16_head, scratch);
  return y;
}

// An uninitialised CPU tensor on 2 MB-aligned memory advised MADV_HUGEPAGE (transparent huge pages).
torch::Tensor huge_empty(std::vector<int64_t> sizes, at::ScalarType dtype) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  const size_t bytes = std::max<size_t>(1, n * c10::elementSize(dtype));
  void* p = mfk::alloc_huge(bytes);
  return torch::from_blob(p, sizes, [](void* q) { std::free(q); }, torch::TensorOptions().dtype(dtype));
}

// The pool under stress: `jobs` back-to-back jobs, of n and 2n chunks in turn (a job larger than the one before is
// where a worker still finishing that one could claim a chunk of it), each chunk adding its job's tag to its own
// slot; returns how many jobs had a chunk that did not run exactly once, for its own job (0: sound).
int64_t pool_selftest(int64_t jobs, int64_t n, int64_t spin) {
  std::vector<int64_t> slot(static_cast<size_t>(std::max<int64_t>(2 * n, 1)), 0);
  int64_t bad = 0;
  for (int64_t j = 1; j <= jobs; ++j) {
    const int64_t m = (j & 1) ? n : 2 * n;
    std::fill(slot.begin(), slot.begin() + m, 0);
    mfk::Pool::get().run(m, [&slot, j, spin](int64_t c) {
      for (volatile int64_t i = 0; i < spin; i = i + 1) {
      }  // a chunk long enough for the workers to claim some
      slot[c] += j;
    });
    bool ok = true;
    for (int64_t c = 0; c < m; ++c) ok &= slot[c] == j;
    bad += !ok;
    for (volatile int64_t i = 0; i < (j * 7) % 61; i = i + 1) {
    }  // a varying gap before the next job, to sweep across a worker's last claim
  }
  return bad;
}

void set_threads(int64_t n) { mfk::Pool::get().resize(static_cast<int>(n)); }
int64_t get_threads() { return mfk::parallel_threads(); }

// "pool" (the kernels' own, parallel.h) or "aten" (at::parallel_for, torch's intra-op threads).
void set_parallel(const std::string& name) {
  TORCH_CHECK(name == "pool" || name == "aten", "set_parallel: expected 'pool' or 'aten', got '", name, "'");
  mfk::g_parallel.store(static_cast<int>(name == "aten" ? mfk::Parallel::kAten : mfk::Parallel::kPool));
}
std::string get_parallel() { return mfk::use_aten() ? "aten" : "pool"; }
void set_prefetch(int64_t rows) { mfk::g_prefetch_rows.store(static_cast<int>(std::max<int64_t>(0, rows))); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "Memory Layer hash + gather for a few tokens");
  m.def("gemv", &gemv, "x W^T * scale for a few rows x (fp32/bf16/fp16/int8 W)", pybind11::arg("x"), pybind11::arg("W"),
        pybind11::arg("scale"), pybind11::arg("int16_x") = true);
  m.def("huge_empty", &huge_empty, "uninitialised tensor on transparent huge pages");
  m.def("set_threads", &set_threads, "threads of the kernels' pool (including the caller)");
  m.def("get_threads", &get_threads);
  m.def("set_parallel", &set_parallel, "which threads run the kernels' parallel loops: 'pool' or 'aten'");
  m.def("get_parallel", &get_parallel);
  m.def("set_spin_us", [](int64_t us) { mfk::Pool::get().set_spin_us(us); }, "idle workers spin this long, then sleep");
  m.def("get_spin_us", [] { return mfk::Pool::get().spin_us(); });
  m.def("set_prefetch", &set_prefetch, "rows a gather prefetches ahead (0: none)");
  m.def("set_prefetch_l2", [](int64_t rows) { mfk::g_prefetch_rows_l2.store(static_cast<int>(std::max<int64_t>(0, rows))); },
        "whole rows a gather of several tokens requests into L2 ahead (0: none)");
  m.def("pool_selftest", &pool_selftest, "back-to-back jobs through the thread pool; chunks not run exactly once",
        pybind11::arg("jobs"), pybind11::arg("n"), pybind11::arg("spin") = 0);
  register_engine(m);
}
