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
#include "engine_parts.h"
#include "head.h"
#include "kernels.h"
#include "parallel.h"

using mfe::BlockW;
using mfe::f32;
using mfe::gelu;
using mfe::layer_norm;
using mfe::MemW;
using mfe::Named;
using mfe::rms_norm;

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
      b.qkv = mfe::mem_w(t, "attn.qkv.", tau_, 3 * d_);
      b.norm2 = f32(t.need("norm2.weight"));
      b.l1 = mfe::mem_w(t, "mlp.l1.", tau_, hid_);
      b.ln_w = f32(t.need("mlp.norm.weight"));
      b.ln_b = f32(t.need("mlp.norm.bias"));
      b.l2 = mfe::mem_w(t, "mlp.l2.", tau2_, d_);
      t.finish();
      TORCH_CHECK(b.qkv.K * tau_ == d_ && b.l1.K * tau_ == d_ && b.l2.K * tau2_ == hid_, "engine: K does not match");
      blocks_.push_back(std::move(b));
    }
    auto opt = at::TensorOptions().dtype(kv_dtype_);
    kc_ = at::zeros({L_, B_, nh_, S_, hd_}, opt);
    vc_ = at::zeros({L_, B_, nh_, S_, hd_}, opt);
    pos_.assign(B_, 0);
    // a pass holds up to cap_ tokens (rows of a decode step, or a prompt's tokens): their buffers side by side
    cap_ = std::max<int64_t>(B_, std::min<int64_t>(kPrefillChunk, S_));
    kmax_ = std::max(d_ / tau_, hid_ / tau2_);
    x_.assign(cap_ * d_, 0.f);
    xn_.assign(cap_ * std::max(d_, hid_), 0.f);
    qkv_.assign(cap_ * 3 * d_, 0.f);
    att_.assign(cap_ * d_, 0.f);
    hid_buf_.assign(cap_ * hid_, 0.f);
    out_.assign(cap_ * d_, 0.f);
    rows_.assign(cap_ * kmax_, 0);
    w_.assign(cap_ * kmax_, 0.f);
    tmp_.assign(cap_ * std::max(d_, hid_), 0.f);
    it_row_.assign(cap_, 0);
    it_pos_.assign(cap_, 0);
  }

  // The position every row is at (the tokens in its cache); an error when the rows differ (see positions()).
  int64_t pos() const {
    for (int64_t b = 1; b < B_; ++b)
      TORCH_CHECK(pos_[b] == pos_[0], "engine: the rows are at different positions (positions() lists them)");
    return pos_[0];
  }
  std::vector<int64_t> positions() const { return pos_; }
  void set_pos(int64_t p) {
    TORCH_CHECK(p >= 0 && p <= S_, "engine: position out of range");
    std::fill(pos_.begin(), pos_.end(), p);
  }
  void set_row_pos(int64_t row, int64_t p) {
    TORCH_CHECK(row >= 0 && row < B_, "engine: row ", row, " out of range [0, ", B_, ")");
    TORCH_CHECK(p >= 0 && p <= S_, "engine: position out of range");
    pos_[row] = p;
  }
  at::Tensor kcache() const { return kc_; }
  void set_option(const std::string& name, int64_t v) {
    TORCH_CHECK(name == "profile", "engine: unknown option ", name, " (expected: profile)");
    profile_ = v != 0;
    std::fill(prof_, prof_ + kPhases, 0.0);
  }
  at::Tensor vcache() const { return vc_; }

  // ids (B, T) int64, row b's tokens at positions pos(b) .. pos(b)+T-1 -> logits (B, V) float32 of the last one.
  at::Tensor forward(at::Tensor ids) {
    TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B_ && ids.size(1) >= 1, "forward: ids must be (batch=", B_, ", T >= 1)");
    const int64_t T = ids.size(1);
    auto id = ids.to(at::kLong).contiguous();
    const int64_t* ip = id.data_ptr<int64_t>();
    std::vector<int64_t> rows, toks;
    std::vector<uint8_t> last;
    for (int64_t t = 0; t < T; ++t)  // token-major: a pass takes whole steps of every row
      for (int64_t b = 0; b < B_; ++b) {
        rows.push_back(b);
        toks.push_back(ip[b * T + t]);
        last.push_back(t == T - 1);
      }
    return run(rows, toks, last);
  }

  // Tokens of any rows, each row at its own position: token i goes to row rows[i] at that row's next position
  // (a row's tokens in order), and the logits (n_last, V) of the tokens with last[i] != 0 come back in order. A
  // decode step lists one token per active row; a prompt lists its tokens (only the last wanting logits); both
  // can share a call. Rows not listed cost nothing.
  at::Tensor forward_rows(at::Tensor rows, at::Tensor ids, at::Tensor last) {
    TORCH_CHECK(rows.dim() == 1 && ids.dim() == 1 && last.dim() == 1 && rows.numel() == ids.numel() &&
                    ids.numel() == last.numel(), "forward_rows: rows, ids and last must be 1-D of one length");
    auto r = rows.to(at::kLong).contiguous(), t = ids.to(at::kLong).contiguous(), l = last.to(at::kByte).contiguous();
    const int64_t n = r.numel();
    return run(std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + n),
               std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n),
               std::vector<uint8_t>(l.data_ptr<uint8_t>(), l.data_ptr<uint8_t>() + n));
  }

  // The LM head alone: hidden (M, d) (already normalised) -> (M, V) float32.
  at::Tensor head(at::Tensor hidden) {
    auto h = hidden.to(at::kFloat).contiguous();
    TORCH_CHECK(h.dim() == 2 && h.size(1) == d_, "head: hidden must be (M, d)");
    return head_logits(h.data_ptr<float>(), h.size(0));
  }

 private:
  // Tokens of one pass at most (beside the rows of a decode step). A pass takes each layer for all its tokens
  // before the next layer, so a table row one token reads is often still in the L3 cache when a later token of
  // the pass reads it: a 512-token MF-small int8 prompt took 1460 tokens/s in passes of 64, 1807-1848 in one
  // (docs/SERVING.md). The buffers of a pass: ~16 MB for MF-small.
  static constexpr int64_t kPrefillChunk = 512;

  at::Tensor run(const std::vector<int64_t>& rows, const std::vector<int64_t>& toks, const std::vector<uint8_t>& last) {
    const int64_t n = static_cast<int64_t>(rows.size());
    TORCH_CHECK(n >= 1, "forward: no tokens");
    std::vector<int64_t> p(n), next(pos_);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(rows[i] >= 0 && rows[i] < B_, "forward: row ", rows[i], " out of range [0, ", B_, ")");
      TORCH_CHECK(toks[i] >= 0 && toks[i] < embed_.size(0), "forward: token id ", toks[i], " out of range [0, ",
                  embed_.size(0), ")");
      p[i] = next[rows[i]]++;
      TORCH_CHECK(p[i] < S_, "forward: row ", rows[i], ": ", p[i] + 1, " positions exceed the cache (max_seq_len=", S_, ")");
    }
    int64_t n_last = 0;
    for (auto v : last) n_last += v != 0;
    std::vector<float> hl(std::max<int64_t>(1, n_last) * d_);
    if (profile_) t_ = std::chrono::steady_clock::now();
    int64_t j = 0;
    for (int64_t a = 0; a < n; a += cap_) {
      n_ = std::min(cap_, n - a);
      for (int64_t i = 0; i < n_; ++i) {
        it_row_[i] = rows[a + i], it_pos_[i] = p[a + i];
        embed_row(toks[a + i], x_.data() + i * d_);
      }
      mark(kEmbed);
      for (int64_t l = 0; l < L_; ++l) block(l);
      for (int64_t i = 0; i < n_; ++i)
        if (last[a + i]) rms_norm(x_.data() + i * d_, final_norm_.data_ptr<float>(), d_, rms_eps_, hl.data() + d_ * j++);
      mark(kNorm);
    }
    pos_ = next;
    auto logits = head_logits(hl.data(), n_last);
    mark(kHead);
    return logits;
  }

  void embed_row(int64_t id, float* out) {
    mfk::dispatch_rows(embed_.scalar_type(), "engine: embedding", [&](auto tag) {
      using T = decltype(tag);
      const T* r = reinterpret_cast<const T*>(embed_.data_ptr()) + id * d_;
      const float s = embed_scale_.defined() ? embed_scale_.data_ptr<float>()[id] : 1.f;
      for (int64_t i = 0; i < d_; ++i) out[i] = mfk::to_f(r[i]) * s;
    });
  }

  // y (n, h) = Memory Layer m of x (n, K*tau), each token with its own hash. Mirrors MemoryLayer.forward
  // (layers.py): ops.reference.chunk_hash (Eq. 3-10) then the weighted gather of Eq. 11-12. Several tokens hash
  // on the threads; each thread then gathers its columns of every token, the next token's rows prefetched while
  // the last ones of the one before are added.
  void memory_layer(const MemW& m, const float* x, float* y, int phase) {
    // several tokens: each token's int8 row scales are multiplied in by the thread that gathers its rows, when the
    // lines the hash requested have had the other tokens' hashing to arrive; and the hash requests no row lines (the
    // gathers request whole rows into L2 themselves; a hash that also asked for the first line of each of K rows
    // of every token filled the miss buffers and waited: MF-small int8 144-token prompt 2515 -> 2900 tok/s without,
    // 16-row decode 1036 -> 1059)
    const bool late_scale = n_ >= 2 && m.sc != nullptr;
    auto hash = [&](int64_t i) {
      mfk::hash_chunks(x + i * m.K * m.tau, m.K, m.tau, msb_, code_w_, c_, m.sc, rows_.data() + i * m.K,
                       w_.data() + i * m.K, tmp_.data() + i * m.K * m.tau, n_ < 2 ? m.tab : nullptr,
                       m.h * static_cast<int64_t>(c10::elementSize(m.dt)), !late_scale);
    };
    per_token(hash);
    mark(kHash);
    mfk::dispatch_rows(m.dt, "engine: tables", [&](auto tag) {
      using T = decltype(tag);
      const T* tab = reinterpret_cast<const T*>(m.tab);
      if (n_ >= 2) {  // whole rows, each thread a run of tokens, the next rows (of its next tokens too) into L2
        const int64_t nc = std::min<int64_t>(n_, mfk::parallel_threads());
        mfk::parallel_chunks(nc, [&](int64_t c) {
          const int64_t i0 = c * n_ / nc, i1 = (c + 1) * n_ / nc;
          for (int64_t i = i0; i < i1; ++i) {
            if (late_scale) mfk::scale_weights(m.sc, rows_.data() + i * m.K, w_.data() + i * m.K, m.K);
            float* o = y + i * m.h;
            if (m.b) std::memcpy(o, m.b, m.h * sizeof(float));
            else std::fill(o, o + m.h, 0.f);
            mfk::gather_cols(tab, rows_.data() + i * m.K, w_.data() + i * m.K, m.K, m.h, 0, m.h, o, (i1 - i) * m.K,
                             i > i0, mfk::Prefetch::kL2);
          }
        });
        return;
      }
      const int64_t nc = mfk::n_chunks(m.h, 64);
      mfk::parallel_chunks(nc, [&](int64_t c) {
        auto [c0, c1] = mfk::split(m.h, static_cast<int>(c), static_cast<int>(nc), 64);
        for (int64_t i = 0; i < n_; ++i) {
          float* o = y + i * m.h;
          if (m.b) std::memcpy(o + c0, m.b + c0, (c1 - c0) * sizeof(float));
          else std::fill(o + c0, o + c1, 0.f);
          mfk::gather_cols(tab, rows_.data() + i * m.K, w_.data() + i * m.K, m.K, m.h, c0, c1, o, (n_ - i) * m.K, i > 0);
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

  // Mirrors attention() and KVCache.attend (model.py): rotary (Rotary.forward) on q and k, each token's k/v
  // written at its row's position, then causal softmax over that row's cache up to the token (every k/v of the
  // pass is written first, so a prompt's tokens see each other); no output projection (MemoryAttention.forward).
  template <typename KV>
  void attention(int64_t l) {
    KV* kc = reinterpret_cast<KV*>(kc_.data_ptr()) + l * B_ * nh_ * S_ * hd_;
    KV* vc = reinterpret_cast<KV*>(vc_.data_ptr()) + l * B_ * nh_ * S_ * hd_;
    auto place = [&](int64_t q) {  // rotary on (token, head)'s q and k, its k / v into the cache
      const int64_t i = q / nh_, h = q % nh_, b = it_row_[i], p = it_pos_[i];
      float* base = qkv_.data() + i * 3 * d_ + h * 3 * hd_;  // per head [q | k | v] (GPT-NeoX order)
      if (rot_) {
        const float* cs = cos_.data_ptr<float>() + p * rot_;
        const float* sn = sin_.data_ptr<float>() + p * rot_;
        rotate(base, cs, sn);
        rotate(base + hd_, cs, sn);
      }
      const int64_t at = ((b * nh_ + h) * S_ + p) * hd_;
      store(kc + at, base + hd_);
      store(vc + at, base + 2 * hd_);
    };
    if (n_ >= 2) mfk::parallel_chunks(n_ * nh_, place);  // all of them before any attention reads the cache
    else for (int64_t q = 0; q < nh_; ++q) place(q);
    // runs of 4 tokens of one row at consecutive positions (a prompt) attend together: attend4 reads each key and
    // value once for the four; any other token (a decode step's) alone
    groups_.clear();
    for (int64_t i = 0; i < n_;) {
      const bool four = i + 4 <= n_ && it_row_[i + 3] == it_row_[i] && it_pos_[i + 3] == it_pos_[i] + 3 &&
                        it_row_[i + 1] == it_row_[i] && it_row_[i + 2] == it_row_[i];
      groups_.push_back(i);
      i += four ? 4 : 1;
    }
    const int64_t ng = static_cast<int64_t>(groups_.size());
    mfk::parallel_chunks(ng * nh_, [&](int64_t q) {
      const int64_t g = q / nh_, h = q % nh_, i = groups_[g];
      const int64_t size = (g + 1 < ng ? groups_[g + 1] : n_) - i;
      const int64_t off = (it_row_[i] * nh_ + h) * S_ * hd_;
      thread_local std::vector<float> scores;  // softmax scratch per thread: a row per query of a group
      if (static_cast<int64_t>(scores.size()) < 4 * S_) scores.resize(4 * S_);
      auto qp = [&](int64_t j) { return qkv_.data() + (i + j) * 3 * d_ + h * 3 * hd_; };
      auto op = [&](int64_t j) { return att_.data() + (i + j) * d_ + h * hd_; };
      if (size == 4) {
        const float* qs[4] = {qp(0), qp(1), qp(2), qp(3)};
        float* sc[4] = {scores.data(), scores.data() + S_, scores.data() + 2 * S_, scores.data() + 3 * S_};
        float* os[4] = {op(0), op(1), op(2), op(3)};
        const int64_t n[4] = {it_pos_[i] + 1, it_pos_[i] + 2, it_pos_[i] + 3, it_pos_[i] + 4};
        if (mfk::attend4(qs, kc + off, vc + off, n, hd_, sc, os)) return;
      }
      for (int64_t j = 0; j < size; ++j)
        mfk::attend(qp(j), kc + off, vc + off, it_pos_[i + j] + 1, hd_, scores.data(), op(j));
    });
  }

  // Mirrors MemoryFormerBlock.forward (model.py): x + attn(norm1 x), then x + mlp(norm2 x), with mlp
  // MemoryFFN.forward (layers.py): l2(norm(act(l1 x))).
  void block(int64_t l) {
    const BlockW& bw = blocks_[l];
    per_token([&](int64_t i) { rms_norm(x_.data() + i * d_, bw.norm1.data_ptr<float>(), d_, rms_eps_, xn_.data() + i * d_); });
    mark(kNorm);
    memory_layer(bw.qkv, xn_.data(), qkv_.data(), kQKV);
    if (kv_dtype_ == at::kFloat) attention<float>(l);
    else attention<at::BFloat16>(l);
    mark(kAttention);
    per_token([&](int64_t i) {
      float* x = x_.data() + i * d_;
      const float* a = att_.data() + i * d_;
      for (int64_t j = 0; j < d_; ++j) x[j] += a[j];
      rms_norm(x, bw.norm2.data_ptr<float>(), d_, rms_eps_, xn_.data() + i * d_);
    });
    mark(kNorm);
    memory_layer(bw.l1, xn_.data(), hid_buf_.data(), kL1);
    per_token([&](int64_t i) {
      float* hb = hid_buf_.data() + i * hid_;
      if (gelu_) gelu(hb, hid_);  // nn.GELU before the LayerNorm, as MemoryBlock.forward
      layer_norm(hb, bw.ln_w.data_ptr<float>(), bw.ln_b.data_ptr<float>(), hid_, ln_eps_);
    });
    mark(kNorm);
    memory_layer(bw.l2, hid_buf_.data(), out_.data(), kL2);
    per_token([&](int64_t i) {
      float* x = x_.data() + i * d_;
      const float* o = out_.data() + i * d_;
      for (int64_t j = 0; j < d_; ++j) x[j] += o[j];
    });
    mark(kNorm);
  }

  // f(i) for every token of the pass: on the threads from 4 tokens on (each token's numbers are its own).
  template <typename F>
  void per_token(const F& f) {
    if (n_ >= 4) mfk::parallel_chunks(n_, [&](int64_t i) { f(i); });
    else for (int64_t i = 0; i < n_; ++i) f(i);
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
    if (M == 0) return y;
    const float* sp = head_scale_.defined() ? head_scale_.data_ptr<float>() : nullptr;
    mfk::head_gemv(head_, sp, x, M, y.data_ptr<float>(), true, head_scratch_, (head_calls_++ & 1) != 0);
    return y;
  }

  int64_t L_, d_, nh_, hd_, rot_, S_, B_, V_, tau_, tau2_, hid_, cap_, kmax_;
  float c_, rms_eps_, ln_eps_;
  bool code_w_, msb_, gelu_;
  at::ScalarType kv_dtype_;
  at::Tensor embed_, embed_scale_, head_, head_scale_, final_norm_, cos_, sin_, kc_, vc_;
  std::vector<BlockW> blocks_;
  std::vector<float> x_, xn_, qkv_, att_, hid_buf_, out_, w_, tmp_;
  std::vector<int64_t> rows_, pos_, it_row_, it_pos_, groups_;
  int64_t n_ = 0;  // tokens in the current pass: token i is row it_row_[i] at position it_pos_[i]
  mfk::HeadScratch head_scratch_;
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
      .def("forward_rows", &Engine::forward_rows, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("pos", &Engine::pos)
      .def("positions", &Engine::positions)
      .def("set_pos", &Engine::set_pos)
      .def("set_row_pos", &Engine::set_row_pos)
      .def("kcache", &Engine::kcache)
      .def("vcache", &Engine::vcache)
      .def("set_option", &Engine::set_option)
      .def("profile", &Engine::profile);
}
