// Memory Layer inference for a few tokens on CPU (hash + weight + gather-sum in one call), the GEMV of the
// quantised LM head, huge-page tensors, and the bindings of the decode engine (engine.cpp).
//
// At batch 1 a layer reads K scattered rows of h entries: its cost is DRAM latency, not arithmetic, so the kernel
// hashes all chunks first, then gathers with the next rows prefetched, the output columns split over the pool's
// threads. Numbers match memoryformer.ops.chunk_hash + memory_lookup: bit j of a chunk is [z_j >= 0] with weight
// 2^(tau-1-j); p = prod_j sigmoid(2|z_j| / t); "code" weighting multiplies p by ||z||_1; int8 tables fold their
// per-row scale into the weight. Accumulation is fp32 for every table dtype.
#include <torch/extension.h>

#include "kernels.h"

void register_engine(pybind11::module& m);  // engine.cpp

namespace {

constexpr int64_t kHeadChunk = 512;  // GEMV rows per claimed chunk

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

}  // namespace

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
  dispatch_rows(tc.scalar_type(), "decode: tables", [&](auto tag) {
    using T = decltype(tag);
    const T* tab = reinterpret_cast<const T*>(tc.data_ptr());
    const int64_t nc = mfk::n_chunks(h, 64);
    mfk::Pool::get().run(nc, [&](int64_t c) {
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
  const int64_t M = xf.size(0), V = Wc.size(0), d = Wc.size(1);
  torch::Tensor sc;
  if (scale.has_value()) sc = scale->to(torch::kFloat).contiguous();
  const float* sp = scale.has_value() ? sc.data_ptr<float>() : nullptr;
  auto y = torch::empty({M, V}, xf.options());
  const float* xp = xf.data_ptr<float>();
  std::vector<int16_t> x16;
  std::vector<float> sx(M);
  if (Wc.scalar_type() == at::kChar && sp != nullptr && d <= mfk::kI16MaxD && int16_head) {
    x16.resize(M * d);
    for (int64_t m = 0; m < M; ++m) sx[m] = mfk::quantize_x16(xp + m * d, d, x16.data() + m * d);
  }
  dispatch_rows(Wc.scalar_type(), "gemv: W", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = reinterpret_cast<const T*>(Wc.data_ptr());
    const int64_t nc = (V + kHeadChunk - 1) / kHeadChunk;
    mfk::Pool::get().run(nc, [&](int64_t c) {
      const int64_t r0 = c * kHeadChunk, r1 = std::min(V, r0 + kHeadChunk);
      mfk::head_rows(wp, sp, xp, x16.empty() ? nullptr : x16.data(), sx.data(), M, d, V, r0, r1, y.data_ptr<float>());
    });
  });
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
int64_t get_threads() { return mfk::Pool::get().size(); }
void set_spin_us(int64_t us) { mfk::Pool::get().set_spin_us(us); }
void set_prefetch(int64_t rows) { mfk::g_prefetch_rows.store(static_cast<int>(std::max<int64_t>(0, rows))); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "Memory Layer hash + gather for a few tokens");
  m.def("gemv", &gemv, "x W^T * scale for a few rows x (fp32/bf16/fp16/int8 W)", pybind11::arg("x"), pybind11::arg("W"),
        pybind11::arg("scale"), pybind11::arg("int16_x") = true);
  m.def("huge_empty", &huge_empty, "uninitialised tensor on transparent huge pages");
  m.def("set_threads", &set_threads, "threads of the kernels' pool (including the caller)");
  m.def("get_threads", &get_threads);
  m.def("set_spin_us", &set_spin_us, "how long idle pool workers spin before sleeping");
  m.def("set_prefetch", &set_prefetch, "rows a gather prefetches ahead (0: none)");
  m.def("pool_selftest", &pool_selftest, "back-to-back jobs through the thread pool; chunks not run exactly once",
        pybind11::arg("jobs"), pybind11::arg("n"), pybind11::arg("spin") = 0);
  register_engine(m);
}
