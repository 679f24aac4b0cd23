// The decode engine's seam with Python and its small per-token steps: entries of a Python dict read by name (an
// unread one is an error), a Memory Layer's tensors, RMSNorm, LayerNorm and GELU (engine.cpp).
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <set>
#include <string>

namespace mfe {

struct MemW {
  at::Tensor tables, scale, bias;  // kept alive
  const void* tab = nullptr;
  at::ScalarType dt = at::kFloat;
  const float* sc = nullptr;
  const float* b = nullptr;
  int64_t K = 0, R = 0, h = 0, tau = 0;
};

struct BlockW {
  at::Tensor norm1, norm2, ln_w, ln_b;
  MemW qkv, l1, l2;
};

inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Entries of a Python dict read by name; `finish()` fails on any entry nobody read.
class Named {
 public:
  Named(pybind11::dict d, std::string what) : d_(std::move(d)), what_(std::move(what)) {}
  bool has(const std::string& k) const { return d_.contains(k) && !d_[pybind11::str(k)].is_none(); }
  template <typename T>
  T get(const std::string& k) {
    TORCH_CHECK(d_.contains(k), "engine: ", what_, " has no '", k, "'");
    read_.insert(k);
    return d_[pybind11::str(k)].cast<T>();
  }
  at::Tensor need(const std::string& k) {
    TORCH_CHECK(has(k), "engine: ", what_, " '", k, "' is missing");
    read_.insert(k);
    return d_[pybind11::str(k)].cast<at::Tensor>();
  }
  c10::optional<at::Tensor> opt(const std::string& k) {
    read_.insert(k);
    if (!has(k)) return c10::nullopt;
    return d_[pybind11::str(k)].cast<at::Tensor>();
  }
  void finish() const {
    for (auto item : d_) {
      const auto k = item.first.cast<std::string>();
      TORCH_CHECK(read_.count(k), "engine: ", what_, " '", k, "' is not read by the engine (teach ",
                  "ops/csrc/engine.cpp to use it, or keep it out of memoryformer/inference/engine.py)");
    }
  }

 private:
  pybind11::dict d_;
  std::string what_;
  std::set<std::string> read_;
};

// A Memory Layer's `tables` (K, R, h), `scale` (K, R) for int8 and `bias` (h,) under `prefix` (MemoryLayer's
// state-dict names).
inline MemW mem_w(Named& t, const std::string& prefix, int64_t tau, int64_t h_expected) {
  auto tables = t.opt(prefix + "tables"), scale = t.opt(prefix + "scale"), bias = t.opt(prefix + "bias");
  TORCH_CHECK(tables.has_value() && tables->dim() == 3 && tables->is_contiguous(), "engine: ", prefix,
              "tables (K, R, h) contiguous");
  MemW m;
  m.tables = *tables;
  m.K = m.tables.size(0);
  m.R = m.tables.size(1);
  m.h = m.tables.size(2);
  m.tau = tau;
  TORCH_CHECK(m.R == (int64_t(1) << tau) && m.h == h_expected, "engine: ", prefix, "tables shape does not match the config");
  m.dt = m.tables.scalar_type();
  m.tab = m.tables.data_ptr();
  if (scale.has_value()) {
    m.scale = f32(*scale);
    m.sc = m.scale.data_ptr<float>();
  }
  TORCH_CHECK(m.dt != at::kChar || m.sc != nullptr, "engine: int8 tables need their row scales");
  if (bias.has_value()) {
    m.bias = f32(*bias);
    m.b = m.bias.data_ptr<float>();
  }
  return m;
}

// Sums in double over 8 independent lanes (one chain of dependent additions would bound a norm by the adder's
// latency): the float results are those of a sequential double sum but for a rounding of ~1e-16 relative.
template <typename F>
inline double sum8(int64_t n, const F& term) {
  double acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += term(i + l);
  for (; i < n; ++i) acc[0] += term(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const double ss = sum8(n, [&](int64_t i) { return double(x[i]) * x[i]; });
  const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

inline void layer_norm(float* x, const float* w, const float* b, int64_t n, float eps) {
  const double mean = sum8(n, [&](int64_t i) { return double(x[i]); }) / n;
  const double ss = sum8(n, [&](int64_t i) { return (x[i] - mean) * (x[i] - mean); });
  const float m = static_cast<float>(mean), r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - m) * r * w[i] + b[i];
}

inline void gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
}

}  // namespace mfe
