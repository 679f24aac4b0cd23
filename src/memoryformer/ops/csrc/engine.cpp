// The MemoryFormer decode step in one C++ call: embedding -> every block -> final RMSNorm -> LM head.
//
// Block: RMSNorm -> fused Q/K/V Memory Layer (one hash, a (K, R, 3d) table) -> partial rotary (GPT-NeoX
// rotate-half on the first `rot` dims of each head) -> K/V written in place into a static cache
// (layer, batch, head, max_seq_len, head_dim) -> causal softmax attention over the cache -> no output projection
// -> residual; RMSNorm -> Memory Layer d -> (tau+e)K -> LayerNorm -> [GELU] -> Memory Layer -> d -> residual.
// The same numbers as the eager model (memoryformer.model), in fp32 for every table, head and cache dtype.
// Each step below names the Python function it mirrors; a change to one needs the same change in the other
// (tests/test_inference_engine.py compares them field by field).
//
// The seam with Python (memoryformer/inference/engine.py) is named: a dict of config fields (`engine_config`),
// a dict of the model's tensors outside the blocks by state-dict name (`model_tensors`) and one dict per block of
// its tensors by `MemoryFormerBlock` state-dict name (`block_tensors`). Each entry is read by name, and one that
// is never read is an error, so a field added on the Python side cannot be silently ignored here.
//
// Threads (parallel.h) split each gather's output columns, the attention's (row, head) pairs and the head's
// vocabulary rows; hashes, norms and rotary (a few thousand floats) stay on the calling thread.
#include <torch/extension.h>

#include <map>
#include <set>
#include <string>

#include "attention.h"
#include "head.h"
#include "kernels.h"
#include "parallel.h"

namespace {

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

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

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
MemW mem_w(Named& t, const std::string& prefix, int64_t tau, int64_t h_expected) {
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

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

void layer_norm(float* x, const float* w, const float* b, int64_t n, float eps) {
  double s = 0, ss = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const double mean = s / n;
  for (int64_t i = 0; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float m = static_cast<float>(mean), r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - m) * r * w[i] + b[i];
}

void gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
}

}  // namespace

class Engine {
 public:
  // config: engine_config(); model: model_tensors(); blocks: block_tensors() of each block (inference/engine.py).
  Engine(pybind11::dict config, pybind11::dict model, std::vector<pybind11::dict> blocks) {
    Named c(config, "config field");
    L_ = c.get<int64_t>("n_layer"), d_ = c.get<int64_t>("d_model"), nh_ = c.get<int64_t>("n_head");
    rot_ = c.get<int64_t>("rotary_dims"), S_ = c.get<int64_t>("cache_len"), B_ = c.get<int64_t>("batch_size");
    V_ = c.get<int64_t>("vocab_size"), tau_ = c.get<int64_t>("tau");
    tau2_ = tau_ + c.get<int64_t>("expand_bits");
    hid_ = tau2_ * (d_ / tau_);  // ModelConfig.block_hidden
    hd_ = d_ / nh_;
    c_ = static_cast<float>(2.0 / c.get<double>("temperature"));
    rms_eps_ = static_cast<float>(c.get<double>("rms_eps"));
    ln_eps_ = static_cast<float>(c.get<double>("ln_eps"));
    const auto weighting = c.get<std::string>("weighting"), bit_order = c.get<std::string>("bit_order");
    const auto activation = c.get<std::string>("block_activation");
    TORCH_CHECK(weighting == "release" || weighting == "paper", "engine: weighting '", weighting, "' unknown");
    TORCH_CHECK(bit_order == "msb" || bit_order == "lsb", "engine: bit_order '", bit_order, "' unknown");
    TORCH_CHECK(activation == "none" || activation == "gelu", "engine: block_activation '", activation, "' unknown");
    code_w_ = weighting == "release", msb_ = bit_order == "msb", gelu_ = activation == "gelu";
    kv_dtype_ = c.get<at::ScalarType>("kv_dtype");
    c.finish();
    TORCH_CHECK(kv_dtype_ == at::kFloat || kv_dtype_ == at::kBFloat16, "engine: kv cache must be float32 or bfloat16");

    Named m(model, "model tensor");
    embed_ = m.need("embed.weight").contiguous();
    head_ = m.need("head.weight").contiguous();
    TORCH_CHECK(embed_.size(0) >= V_ && embed_.size(1) == d_ && head_.size(0) == V_ && head_.size(1) == d_,
                "engine: embedding / head shapes do not match the config");
    if (auto s = m.opt("embed.scale")) embed_scale_ = f32(*s);
    if (auto s = m.opt("head.scale")) head_scale_ = f32(*s);
    final_norm_ = f32(m.need("norm.weight"));
    cos_ = f32(m.need("rotary.cos"));
    sin_ = f32(m.need("rotary.sin"));
    m.finish();
    TORCH_CHECK(rot_ == 0 || (cos_.size(0) >= S_ && cos_.size(1) == rot_), "engine: rotary tables do not match");

    TORCH_CHECK(static_cast<int64_t>(blocks.size()) == L_, "engine: ", L_, " blocks expected, got ", blocks.size());
    for (auto& names : blocks) {
      Named t(names, "block tensor");
      BlockW b;  // MemoryFormerBlock's state-dict names
      b.norm1 = f32(t.need("norm1.weight"));
      b.qkv = mem_w(t, "attn.qkv.", tau_, 3 * d_);
      b.norm2 = f32(t.need("norm2.weight"));
      b.l1 = mem_w(t, "mlp.l1.", tau_, hid_);
      b.ln_w = f32(t.need("mlp.norm.weight"));
      b.ln_b = f32(t.need("mlp.norm.bias"));
      b.l2 = mem_w(t, "mlp.l2.", tau2_, d_);
      t.finish();
      TORCH_CHECK(b.qkv.K * tau_ == d_ && b.l1.K * tau_ == d_ && b.l2.K * tau2_ == hid_, "engine: K does not match");
      blocks_.push_back(std::move(b));
    }
    auto opt = at::TensorOptions().dtype(kv_dtype_);
    kc_ = at::zeros({L_, B_, nh_, S_, hd_}, opt);
    vc_ = at::zeros({L_, B_, nh_, S_, hd_}, opt);
    x_.assign(B_ * d_, 0.f);
    xn_.assign(B_ * std::max(d_, hid_), 0.f);
    qkv_.assign(B_ * 3 * d_, 0.f);
    att_.assign(B_ * d_, 0.f);
    hid_buf_.assign(B_ * hid_, 0.f);
    out_.assign(B_ * d_, 0.f);
    const int64_t kmax = std::max(d_ / tau_, hid_ / tau2_);
    rows_.assign(B_ * kmax, 0);
    w_.assign(B_ * kmax, 0.f);
    tmp_.assign(std::max(d_, hid_), 0.f);
    scores_.assign(static_cast<size_t>(B_ * nh_) * S_, 0.f);
  }

  int64_t pos() const { return pos_; }
  void set_pos(int64_t p) {
    TORCH_CHECK(p >= 0 && p <= S_, "engine: position out of range");
    pos_ = p;
  }
  at::Tensor kcache() const { return kc_; }
  void set_option(const std::string& name, int64_t v) {
    TORCH_CHECK(name == "profile", "engine: unknown option ", name, " (expected: profile)");
    profile_ = v != 0;
    std::fill(prof_, prof_ + kPhases, 0.0);
  }
  at::Tensor vcache() const { return vc_; }

  // ids (B, T) int64 at positions pos() .. pos()+T-1 -> logits (B, V) float32 of the last one. Each token's K/V are
  // written at its position; pos() advances by T. T = 1 is a decode step, T > 1 a prefill (token by token).
  at::Tensor forward(at::Tensor ids) {
    TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B_ && ids.size(1) >= 1, "forward: ids must be (batch=", B_, ", T >= 1)");
    const int64_t T = ids.size(1);
    TORCH_CHECK(pos_ + T <= S_, "forward: ", pos_ + T, " positions exceed the cache (max_seq_len=", S_, ")");
    auto id = ids.to(at::kLong).contiguous();
    const int64_t* ip = id.data_ptr<int64_t>();
    for (int64_t i = 0; i < B_ * T; ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < embed_.size(0), "forward: token id ", ip[i], " out of range [0, ", embed_.size(0), ")");
    if (profile_) t_ = std::chrono::steady_clock::now();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B_; ++b) embed_row(ip[b * T + t], x_.data() + b * d_);
      mark(kEmbed);
      for (int64_t l = 0; l < L_; ++l) block(l);
      ++pos_;
    }
    for (int64_t b = 0; b < B_; ++b) rms_norm(x_.data() + b * d_, final_norm_.data_ptr<float>(), d_, rms_eps_, xn_.data() + b * d_);
    mark(kNorm);
    auto logits = head_logits(xn_.data(), B_);
    mark(kHead);
    return logits;
  }

  // The LM head alone: hidden (M, d) (already normalised) -> (M, V) float32.
  at::Tensor head(at::Tensor hidden) {
    auto h = hidden.to(at::kFloat).contiguous();
    TORCH_CHECK(h.dim() == 2 && h.size(1) == d_, "head: hidden must be (M, d)");
    return head_logits(h.data_ptr<float>(), h.size(0));
  }

 private:
  void embed_row(int64_t id, float* out) {
    mfk::dispatch_rows(embed_.scalar_type(), "engine: embedding", [&](auto tag) {
      using T = decltype(tag);
      const T* r = reinterpret_cast<const T*>(embed_.data_ptr()) + id * d_;
      const float s = embed_scale_.defined() ? embed_scale_.data_ptr<float>()[id] : 1.f;
      for (int64_t i = 0; i < d_; ++i) out[i] = mfk::to_f(r[i]) * s;
    });
  }

  // y (B, h) = Memory Layer m of x (B, K*tau), each row with its own hash. Mirrors MemoryLayer.forward
  // (layers.py): ops.reference.chunk_hash (Eq. 3-10) then the weighted gather of Eq. 11-12.
  void memory_layer(const MemW& m, const float* x, float* y, int phase) {
    for (int64_t b = 0; b < B_; ++b)
      mfk::hash_chunks(x + b * m.K * m.tau, m.K, m.tau, msb_, code_w_, c_, m.sc, rows_.data() + b * m.K,
                       w_.data() + b * m.K, tmp_.data(), m.tab, m.h * static_cast<int64_t>(c10::elementSize(m.dt)));
    mark(kHash);
    mfk::dispatch_rows(m.dt, "engine: tables", [&](auto tag) {
      using T = decltype(tag);
      const T* tab = reinterpret_cast<const T*>(m.tab);
      const int64_t nc = mfk::n_chunks(m.h, 64);
      mfk::parallel_chunks(nc, [&](int64_t c) {
        auto [c0, c1] = mfk::split(m.h, static_cast<int>(c), static_cast<int>(nc), 64);
        for (int64_t b = 0; b < B_; ++b) {
          float* o = y + b * m.h;
          if (m.b) std::memcpy(o + c0, m.b + c0, (c1 - c0) * sizeof(float));
          else std::fill(o + c0, o + c1, 0.f);
          mfk::gather_cols(tab, rows_.data() + b * m.K, w_.data() + b * m.K, m.K, m.h, c0, c1, o);
        }
      });
    });
    mark(phase);
  }

  void rotate(float* v, const float* cs, const float* sn) const {
    const int64_t half = rot_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cs[i] - b * sn[i];
      v[i + half] = b * cs[i + half] + a * sn[i + half];
    }
  }

  template <typename KV>
  void store(KV* dst, const float* src) const {
    if constexpr (std::is_same_v<KV, float>) {
      std::memcpy(dst, src, hd_ * sizeof(float));
    } else {
      auto* u = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < hd_; ++i) u[i] = mfk::f32_to_bf16_bits(src[i]);
    }
  }

  // Mirrors attention() and KVCache.attend (model.py): rotary (Rotary.forward) on q and k, the new k/v written
  // at position pos_, causal softmax over the cache; no output projection (MemoryAttention.forward).
  template <typename KV>
  void attention(int64_t l) {
    KV* kc = reinterpret_cast<KV*>(kc_.data_ptr()) + l * B_ * nh_ * S_ * hd_;
    KV* vc = reinterpret_cast<KV*>(vc_.data_ptr()) + l * B_ * nh_ * S_ * hd_;
    const float* cs = rot_ ? cos_.data_ptr<float>() + pos_ * rot_ : nullptr;
    const float* sn = rot_ ? sin_.data_ptr<float>() + pos_ * rot_ : nullptr;
    for (int64_t b = 0; b < B_; ++b)
      for (int64_t h = 0; h < nh_; ++h) {
        float* base = qkv_.data() + b * 3 * d_ + h * 3 * hd_;  // per head [q | k | v] (GPT-NeoX order)
        if (rot_) {
          rotate(base, cs, sn);
          rotate(base + hd_, cs, sn);
        }
        const int64_t at = ((b * nh_ + h) * S_ + pos_) * hd_;
        store(kc + at, base + hd_);
        store(vc + at, base + 2 * hd_);
      }
    const int64_t pairs = B_ * nh_, n = pos_ + 1;
    mfk::parallel_chunks(pairs, [&](int64_t p) {
      const int64_t b = p / nh_, h = p % nh_;
      const int64_t off = (b * nh_ + h) * S_ * hd_;
      mfk::attend(qkv_.data() + b * 3 * d_ + h * 3 * hd_, kc + off, vc + off, n, hd_, scores_.data() + p * S_,
                  att_.data() + b * d_ + h * hd_);
    });
  }

  // Mirrors MemoryFormerBlock.forward (model.py): x + attn(norm1 x), then x + mlp(norm2 x), with mlp
  // MemoryFFN.forward (layers.py): l2(norm(act(l1 x))).
  void block(int64_t l) {
    const BlockW& bw = blocks_[l];
    for (int64_t b = 0; b < B_; ++b) rms_norm(x_.data() + b * d_, bw.norm1.data_ptr<float>(), d_, rms_eps_, xn_.data() + b * d_);
    mark(kNorm);
    memory_layer(bw.qkv, xn_.data(), qkv_.data(), kQKV);
    if (kv_dtype_ == at::kFloat) attention<float>(l);
    else attention<at::BFloat16>(l);
    mark(kAttention);
    for (int64_t i = 0; i < B_ * d_; ++i) x_[i] += att_[i];
    for (int64_t b = 0; b < B_; ++b) rms_norm(x_.data() + b * d_, bw.norm2.data_ptr<float>(), d_, rms_eps_, xn_.data() + b * d_);
    mark(kNorm);
    memory_layer(bw.l1, xn_.data(), hid_buf_.data(), kL1);
    for (int64_t b = 0; b < B_; ++b) {
      float* hb = hid_buf_.data() + b * hid_;
      if (gelu_) gelu(hb, hid_);  // nn.GELU before the LayerNorm, as MemoryBlock.forward
      layer_norm(hb, bw.ln_w.data_ptr<float>(), bw.ln_b.data_ptr<float>(), hid_, ln_eps_);
    }
    mark(kNorm);
    memory_layer(bw.l2, hid_buf_.data(), out_.data(), kL2);
    for (int64_t i = 0; i < B_ * d_; ++i) x_[i] += out_[i];
    mark(kNorm);
  }

  // Optional per-phase wall time (set_option("profile", 1)), for the benchmark's breakdown.
  enum Phase { kEmbed, kNorm, kHash, kQKV, kAttention, kL1, kL2, kHead, kPhases };
  void mark(int phase) {
    if (!profile_) return;
    const auto now = std::chrono::steady_clock::now();
    prof_[phase] += std::chrono::duration<double>(now - t_).count();
    t_ = now;
  }

 public:
  std::map<std::string, double> profile() const {
    static const char* names[kPhases] = {"embed", "norms_residuals", "hash", "gather_qkv", "attention",
                                         "gather_block_l1", "gather_block_l2", "head"};
    std::map<std::string, double> out;
    for (int i = 0; i < kPhases; ++i) out[names[i]] = prof_[i];
    return out;
  }

 private:
  at::Tensor head_logits(const float* x, int64_t M) {
    auto y = at::empty({M, V_}, at::TensorOptions().dtype(at::kFloat));
    const float* sp = head_scale_.defined() ? head_scale_.data_ptr<float>() : nullptr;
    mfk::head_gemv(head_, sp, x, M, y.data_ptr<float>(), true, head_scratch_, (head_calls_++ & 1) != 0);
    return y;
  }

  int64_t L_, d_, nh_, hd_, rot_, S_, B_, V_, tau_, tau2_, hid_;
  float c_, rms_eps_, ln_eps_;
  bool code_w_, msb_, gelu_;
  at::ScalarType kv_dtype_;
  at::Tensor embed_, embed_scale_, head_, head_scale_, final_norm_, cos_, sin_, kc_, vc_;
  std::vector<BlockW> blocks_;
  std::vector<float> x_, xn_, qkv_, att_, hid_buf_, out_, w_, tmp_, scores_;
  std::vector<int64_t> rows_;
  mfk::HeadScratch head_scratch_;
  int64_t pos_ = 0;
  int64_t head_calls_ = 0;
  bool profile_ = false;
  double prof_[kPhases] = {};
  std::chrono::steady_clock::time_point t_;
};

void register_engine(pybind11::module& m) {
  pybind11::class_<Engine>(m, "Engine")
      .def(pybind11::init<pybind11::dict, pybind11::dict, std::vector<pybind11::dict>>(), pybind11::arg("config"),
           pybind11::arg("model"), pybind11::arg("blocks"))
      .def("forward", &Engine::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("head", &Engine::head, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("pos", &Engine::pos)
      .def("set_pos", &Engine::set_pos)
      .def("kcache", &Engine::kcache)
      .def("vcache", &Engine::vcache)
      .def("set_option", &Engine::set_option)
      .def("profile", &Engine::profile);
}
