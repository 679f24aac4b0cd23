// Memory Layer inference for a few tokens on CPU: hash + weight + gather-sum in one call.
//
// At batch 1 the layer reads K rows of h entries (1/tau of a dense layer's weight), so its cost is set by how many
// separate operations run, not by bytes; here the hash of all chunks is one loop and the gather one more.
// Numbers match memoryformer.ops.chunk_hash + memory_lookup: bit j of a chunk is
// [z_j >= 0] with weight 2^(tau-1-j); p = prod_j sigmoid(2|z_j| / t); "code" weighting multiplies p by ||z||_1;
// int8 tables fold their per-row scale into the weight. Accumulation is fp32 for every table dtype.
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

// Serial on purpose: for 1-2 tokens the work (K rows of h entries) is a few microseconds, less than waking a
// second thread; the rows are read once, in order, and the inner loop is vectorised.
template <typename T>
void gather_sum(const T* tab, const int64_t* rows, const float* w, float* out, int64_t n_tok, int64_t K, int64_t h) {
  for (int64_t n = 0; n < n_tok; ++n) {
    float* o = out + n * h;
    for (int64_t k = 0; k < K; ++k) {
      const T* row = tab + rows[n * K + k] * h;
      const float wk = w[n * K + k];
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) o[j] += wk * static_cast<float>(row[j]);
    }
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
  std::vector<float> w(n_tok * K);
  const float* xp = xf.data_ptr<float>();
  const float c = static_cast<float>(2.0 / temperature);
  torch::Tensor sc;
  if (scale.has_value()) sc = scale->to(torch::kFloat).contiguous();
  const float* sp = scale.has_value() ? sc.data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < n_tok * K; ++i) {
    const float* z = xp + i * tau;
    int64_t code = 0;
    float p = 1.f, l1 = 0.f;
    for (int64_t j = 0; j < tau; ++j) {
      const float v = z[j], a = std::fabs(v);
      code = (code << 1) | static_cast<int64_t>(v >= 0.f);
      p *= 1.f / (1.f + std::exp(-c * a));
      l1 += a;
    }
    const int64_t r = (i % K) * R + code;
    rows[i] = r;
    w[i] = (code_weighting ? p * l1 : p) * (sp ? sp[r] : 1.f);
  }
  // a fresh buffer: never accumulate into the bias parameter itself
  auto out = bias.has_value() ? bias->to(torch::kFloat).expand({n_tok, h}).clone(at::MemoryFormat::Contiguous)
                              : torch::zeros({n_tok, h}, xf.options());
  auto tc = tables.contiguous();
  float* op = out.data_ptr<float>();
  switch (tc.scalar_type()) {
    case torch::kFloat: gather_sum(tc.data_ptr<float>(), rows.data(), w.data(), op, n_tok, K, h); break;
    case torch::kBFloat16: gather_sum(tc.data_ptr<at::BFloat16>(), rows.data(), w.data(), op, n_tok, K, h); break;
    case torch::kHalf: gather_sum(tc.data_ptr<at::Half>(), rows.data(), w.data(), op, n_tok, K, h); break;
    case torch::kChar: gather_sum(tc.data_ptr<int8_t>(), rows.data(), w.data(), op, n_tok, K, h); break;
    default: TORCH_CHECK(false, "decode: tables must be float32, bfloat16, float16 or int8");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode", &decode, "Memory Layer hash + gather for a few tokens"); }
