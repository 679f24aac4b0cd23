"""FLOP and memory accounting (paper §1, §2.4, Table 1, Figure 1).

The paper's convention: one multiply-accumulate = one FLOP, one block, inference, s = 2048 tokens; norms, softmax,
hashing, embeddings and the LM head are left out.
- dense (Pythia) block: 2 s^2 d + 12 s d^2  (QK^T and AV; QKV 3 + output 1 + FFN 8 d^2 per token)
- MemoryFormer block:   2 s^2 d + 6 K s d   (the paper rounds its Memory Layers' sK(3d + (tau+2)K + d) up to 6Ksd)
`layer_flops` gives the exact per-layer counts instead: a Memory Layer costs s*K*(tau + h) (paper §2.3, Table 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from memoryformer.config import ModelConfig, get_config
from memoryformer.integrity import save_figure

PAPER_SEQ_LEN = 2048

# Table 1 rows: (our name, preset, paper's "FLOPs w/o Attn", paper's "Total FLOPs"), in units of 1e9.
TABLE1 = [
    ("pythia-70m", "pythia-70m", 6.4, 10.7),
    ("mf-tiny", "tiny", 0.4, 4.7),
    ("pythia-160m", "pythia-160m", 14.5, 20.9),
    ("mf-small", "small", 1.0, 7.4),
    ("pythia-410m", "pythia-410m", 25.8, 34.4),
    ("mf-base", "base", 1.6, 10.2),
]
PAPER_MISMATCH = {
    "mf-small": "the paper prints 1.0 G / 7.4 G, but its own formula 6Ksd (K=96, d=768, s=2048) gives 0.91 G / 7.35 G; "
    "we print the formula's value",
}
# Table 2 rows: (our name, attention of the dense Pythia-410M control, paper's "FLOPs" per block), in units of 1e9.
# The paper gives neither Linformer's k nor Performer's feature count; ours are the config defaults.
TABLE2 = [
    ("pythia-410m", "softmax", 34.4),
    ("linformer", "linformer", 26.1),
    ("cosformer", "cosformer", 30.0),
    ("performer", "performer", 26.7),
]
FIGURE1_D = list(range(512, 3072 + 1, 512))
FIGURE1_S = (1024, 2048)


def attention_flops(d: int, s: int) -> int:
    """QK^T and AV for one block: 2 s^2 d."""
    return 2 * s * s * d


def attention_variant_flops(cfg: ModelConfig, s: int) -> int:
    """Multiply-accumulates of the attention itself (no Q/K/V/O projections) for s tokens of one block.

    Counted like the paper's softmax 2 s^2 d (full score matrix, masking not subtracted); element-wise work
    (exp, ReLU, cos/sin re-weighting) is left out as softmax and norms are.
    - softmax:   2 s^2 d
    - linformer: 2 s d (compress keys and values) + 2 s (n_blocks + c) d, c = max_seq_len / k tokens per block,
                 n_blocks = ceil(s / c) compressed rows (k at s = max_seq_len) plus the query's own block
    - cosformer: 4 s d hd (prefix-sum state and read-out with 2 hd cos/sin features) + 4 s d (normaliser)
    - performer: 2 s m d (features of q and k) + 2 s m d (state and read-out) + 2 s m n_head (normaliser)
    """
    d, h, hd = cfg.d_model, cfg.n_head, cfg.head_dim
    att = getattr(cfg, "attention", "softmax")
    if att == "softmax":
        return attention_flops(d, s)
    if att == "linformer":
        c = cfg.max_seq_len // cfg.linformer_k
        return 2 * s * d + 2 * s * (-(-s // c) + c) * d
    if att == "cosformer":
        return 4 * s * d * hd + 4 * s * d
    if att == "performer":
        m = cfg.performer_features
        return 4 * s * m * d + 2 * s * m * h
    raise ValueError(f"attention: unknown {att!r}")


def table2(s: int = PAPER_SEQ_LEN) -> list[dict]:
    """Table 2: total FLOPs per block of Pythia-410M with each attention (ours: exact count of our layers)."""
    rows = []
    for model, att, paper_total in TABLE2:
        cfg = get_config("pythia-410m", attention=att)
        costs = layer_flops(cfg, s)
        rows.append(dict(model=model, attention=att, flops_attention=attention_variant_flops(cfg, s),
                         flops_total=sum(c.flops for c in costs), paper_flops_total=paper_total * 1e9,
                         linformer_k=cfg.linformer_k if att == "linformer" else None,
                         performer_features=cfg.performer_features if att == "performer" else None))
    return rows


def paper_block_flops(arch: str, d: int, s: int = PAPER_SEQ_LEN, tau: int = 8) -> dict[str, int]:
    """{"flops_wo_attn", "flops_total"} for one block, the paper's formula."""
    if arch == "transformer":
        wo_attn = 12 * s * d * d
    elif arch == "memoryformer":
        wo_attn = 6 * (d // tau) * s * d
    else:
        raise ValueError(f"arch: expected 'transformer' or 'memoryformer', got {arch!r}")
    return {"flops_wo_attn": wo_attn, "flops_total": wo_attn + attention_flops(d, s)}


def table1(s: int = PAPER_SEQ_LEN) -> list[dict]:
    rows = []
    for model, preset, paper_wo, paper_total in TABLE1:
        cfg = get_config(preset)
        f = paper_block_flops(cfg.arch, cfg.d_model, s, cfg.tau)
        rows.append(dict(model=model, **f, paper_flops_wo_attn=paper_wo * 1e9, paper_flops_total=paper_total * 1e9))
    return rows


def figure1() -> list[dict]:
    return [
        dict(arch=arch, d_model=d, seq_len=s, flops_total=paper_block_flops(arch, d, s)["flops_total"])
        for s in FIGURE1_S
        for arch in ("transformer", "memoryformer")
        for d in FIGURE1_D
    ]


@dataclass
class LayerCost:
    name: str
    flops: int  # multiply-accumulates for s tokens
    table_params: int  # memory-table entries (0 for dense layers)
    dense_params: int


def memory_layer_flops(s: int, in_features: int, out_features: int, tau: int) -> int:
    """s * K * (tau + h): tau for the hash of each chunk, h for adding its row (paper §2.3)."""
    return s * (in_features // tau) * (tau + out_features)


def layer_flops(cfg: ModelConfig, s: int = PAPER_SEQ_LEN) -> list[LayerCost]:
    """Exact per-layer cost of one block (multiply-accumulates for s tokens; norms and softmax excluded)."""
    d = cfg.d_model
    out = []
    if cfg.arch == "memoryformer":
        K, t, t2, hid = cfg.n_tables, cfg.tau, cfg.tau + cfg.expand_bits, cfg.block_hidden
        # Q, K and V share one hash: count the hash once and the three row-sums.
        out.append(LayerCost("qkv (memory)", s * K * (t + 3 * d), K * 2**t * 3 * d, 3 * d if cfg.memory_bias else 0))
        out.append(LayerCost("attention (QK^T, AV)", attention_flops(d, s), 0, 0))
        out.append(LayerCost("block.l1 (memory)", memory_layer_flops(s, d, hid, t), K * 2**t * hid, hid if cfg.memory_bias else 0))
        out.append(LayerCost("block.l2 (memory)", memory_layer_flops(s, hid, d, t2), K * 2**t2 * d, d if cfg.memory_bias else 0))
        if getattr(cfg, "hash_projection", False):  # a dense Linear(in, in) before each of the three hashes
            for name, n in (("qkv", d), ("block.l1", d), ("block.l2", hid)):
                out.append(LayerCost(f"{name} hash projection (dense)", s * n * n, 0, n * n + n))
    else:
        f = cfg.ffn_mult * d
        out.append(LayerCost("qkv (dense)", s * d * 3 * d, 0, 3 * d * d + 3 * d))
        att = getattr(cfg, "attention", "softmax")
        if att == "softmax":
            out.append(LayerCost("attention (QK^T, AV)", attention_flops(d, s), 0, 0))
        else:
            extra = 2 * cfg.linformer_k * (cfg.max_seq_len // cfg.linformer_k) if att == "linformer" else 0
            out.append(LayerCost(f"attention ({att})", attention_variant_flops(cfg, s), 0, extra))
        out.append(LayerCost("proj (dense)", s * d * d, 0, d * d + d))
        out.append(LayerCost("mlp.fc (dense)", s * d * f, 0, d * f + f))
        out.append(LayerCost("mlp.proj (dense)", s * f * d, 0, f * d + d))
    return out


def block_flops(cfg: ModelConfig, s: int = PAPER_SEQ_LEN) -> int:
    return sum(c.flops for c in layer_flops(cfg, s))


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Multiply-accumulates per token of a whole forward pass at `seq_len` (all blocks + the LM head)."""
    s = seq_len or cfg.max_seq_len
    return (cfg.n_layer * block_flops(cfg, s) + s * cfg.d_model * cfg.vocab_size) // s


def table_bytes(cfg: ModelConfig, bytes_per_entry: int = 4) -> int:
    """Bytes of all memory tables of the model (0 for the dense control)."""
    return cfg.n_layer * sum(c.table_params for c in layer_flops(cfg, 1)) * bytes_per_entry


def weight_bytes(cfg: ModelConfig, s: int, bytes_per_entry: int = 2) -> dict[str, int]:
    """Estimated bytes one block's projections move for s tokens (attention and norms excluded: the same in both).

    - dense layer in -> out: its weight once (a GEMM reuses it across tokens) + activations s * (in + out);
    - Memory Layer: the gathered rows, s * K * h (every token reads K rows of h entries; rows repeated across
      tokens may come from cache, so this is the traffic the gather issues, not a DRAM lower bound) + activations.
    Returns {"weights": ..., "activations": ..., "total": ...}; at s = 1 this is what batch-1 decoding reads.
    """
    b, d = bytes_per_entry, cfg.d_model
    if cfg.arch == "memoryformer":
        K, hid = cfg.n_tables, cfg.block_hidden
        layers = [(d, 3 * d, K), (d, hid, K), (hid, d, K)]  # (in, out, rows gathered per token)
        weights = sum(s * k * out for _, out, k in layers)
        if getattr(cfg, "hash_projection", False):
            weights += d * d + d * d + hid * hid
    else:
        f = cfg.ffn_mult * d
        layers = [(d, 3 * d, 0), (d, d, 0), (d, f, 0), (f, d, 0)]
        weights = sum(i * o for i, o, _ in layers)
    acts = sum(s * (i + o) for i, o, _ in layers)
    return {"weights": weights * b, "activations": acts * b, "total": (weights + acts) * b}


BYTES_PRESETS = ("micro", "micro-dense", "tiny", "pythia-70m", "small", "pythia-160m", "base", "pythia-410m")


def as_dict(s: int = PAPER_SEQ_LEN) -> dict:
    """What `memoryformer flops --json` prints: Table 1, Figure 1, the paper's mismatches, bytes per block."""
    table = [{k: r[k] for k in ("model", "flops_wo_attn", "flops_total")} for r in table1(s)]
    bytes_ = {n: {"decode": weight_bytes(get_config(n), 1), f"prefill_{s}": weight_bytes(get_config(n), s)}
              for n in BYTES_PRESETS}
    return {"table1": table, "figure1": figure1(), "notes": PAPER_MISMATCH, "bytes_per_block_bf16": bytes_}


def _g(x: float) -> str:
    return f"{x / 1e9:.2f} G" if x >= 1e8 else f"{x / 1e6:.1f} M"


def report(s: int = PAPER_SEQ_LEN) -> str:
    """The text `memoryformer flops` prints."""
    lines = [f"Table 1 — FLOPs per block (1 multiply-add = 1 FLOP, s = {s}; paper's formula)", ""]
    lines.append(f"{'model':<12} {'w/o attn':>10} {'paper':>8} {'total':>10} {'paper':>8}")
    for r in table1(s):
        mark = " *" if r["model"] in PAPER_MISMATCH else ""
        lines.append(
            f"{r['model']:<12} {_g(r['flops_wo_attn']):>10} {r['paper_flops_wo_attn'] / 1e9:>6.1f} G "
            f"{_g(r['flops_total']):>10} {r['paper_flops_total'] / 1e9:>6.1f} G{mark}"
        )
    for model, why in PAPER_MISMATCH.items():
        lines.append(f"* {model}: {why}.")
    lines += ["", f"Table 2 — Pythia-410M with efficient attention, FLOPs per block (s = {s}; our exact count)", ""]
    lines.append(f"{'model':<12} {'attention':>10} {'total':>10} {'paper':>8}  key setting")
    for r in table2(s):
        key = (f"k = {r['linformer_k']}" if r["linformer_k"] else f"m = {r['performer_features']} features"
               if r["performer_features"] else "M = max_seq_len" if r["attention"] == "cosformer" else "")
        lines.append(f"{r['model']:<12} {_g(r['flops_attention']):>10} {_g(r['flops_total']):>10} "
                     f"{r['paper_flops_total'] / 1e9:>6.1f} G  {key}")
    lines.append("The paper gives no k / m and no counting rule for these; see attention_variant_flops.")
    lines += ["", f"Exact per-layer count of one block (s = {s}) and memory tables of the whole model", ""]
    for name in ("micro", "tiny", "small", "base", "micro-dense", "pythia-70m", "pythia-160m", "pythia-410m"):
        cfg = get_config(name)
        costs = layer_flops(cfg, s)
        parts = ", ".join(f"{c.name} {_g(c.flops)}" for c in costs)
        lines.append(f"{name:<12} block {_g(sum(c.flops for c in costs)):>9} = {parts}")
        if cfg.arch == "memoryformer":
            lines.append(
                f"{'':<12} tables: {table_bytes(cfg, 1) / 1e6:,.1f} M entries, "
                f"{table_bytes(cfg, 4) / 1e9:.2f} GB fp32, {table_bytes(cfg, 2) / 1e9:.2f} GB bf16"
            )
    lines += ["", "Bytes one block's projections move, bf16 (weights or gathered rows + activations; attention excluded)", ""]
    lines.append(f"{'model':<12} {'decode, 1 token':>16} {f'prefill, {s} tokens':>22}")
    for name in BYTES_PRESETS:
        cfg = get_config(name)
        lines.append(f"{name:<12} {_b(weight_bytes(cfg, 1)['total']):>16} {_b(weight_bytes(cfg, s)['total']):>22}")
    lines.append("A Memory Layer reads K rows per token (1/tau of a dense layer's weight at batch 1), but a GEMM reads its")
    lines.append("weight once for all tokens: MemoryFormer moves fewer bytes when decoding and more when prefilling/training.")
    return "\n".join(lines)


def _b(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.1f} KB"


def plot_figure1(path: str) -> None:
    """Figure 1: FLOPs per block vs hidden size, Transformer vs MemoryFormer, s in {1024, 2048}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    rows = figure1()
    for s, style in zip(FIGURE1_S, ("--", "-")):
        for arch, color in (("transformer", "tab:blue"), ("memoryformer", "tab:red")):
            pts = [r for r in rows if r["arch"] == arch and r["seq_len"] == s]
            ax.plot([r["d_model"] for r in pts], [r["flops_total"] / 1e9 for r in pts], style, color=color,
                    marker="o", label=f"{'Transformer' if arch == 'transformer' else 'MemoryFormer'}, s={s}")
    ax.set_xlabel("hidden size d")
    ax.set_ylabel("FLOPs per block (×10⁹)")
    ax.set_title("FLOPs per block (τ = 8, K = d/8)")
    ax.set_xticks(FIGURE1_D)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
