"""Training memory: parameters, gradients, optimizer state, activations and transients, per preset and option.

    from memoryformer.footprint import footprint, report
    print(report("base", batch=4, seq_len=2048, table_optim="rowwise", table_dtype="bfloat16", gpu_mem="80GB"))
    memoryformer memory base --batch 4 --seq-len 2048 --gpu-mem 80GB      # every option

What is counted (bytes; P_d dense and P_t table parameters, tb = 4 (fp32) or 2 (bf16) bytes per table entry):
- parameters: 4 P_d + tb P_t.
- gradients: 4 P_d, and the tables' dense gradient tb P_t (accumulated in `.grad` until the step) or, with sparse
  rows (CPU, row-wise rules), the touched rows: (h tb + 16) bytes per row, U rows per table per micro-batch
  (`hit_fraction` of the rows; default: the uniform-hashing expectation R (1 - (1 - 1/R)^N) for N tokens; a
  trained model hits fewer), summed over the micro-batches of a step.
- optimizer state: AdamW 8 bytes per dense parameter; tables: AdamW 8 per entry (fp32 moments, whatever the table
  dtype), "rowwise" 4 S + 4 per row (S segments: 3 n_head for the Q/K/V table, else 1), "partial-rowwise-adam" that
  plus 4 per entry.
- activations, what autograd saves per token of a micro-batch (fp32, a = 4 bytes; int64 codes; checked against
  `torch.autograd.graph.saved_tensors_hooks` in the tests):
    MemoryFormer block: a (16 d + 4 H + 9 K + n_head + 4) + 24 K, H = (tau + 2) K: RMSNorm input + rstd (2x),
      each hash keeps 4 input-sized tensors (|z| and the log-sigmoid input, output and buffer) + 2 per-chunk sums
      (the operands of ||z||_1 * p(z); none with weighting="paper": 3 K instead of 9 K), each lookup its codes
      (int64) and weights; attention: q and k after rotary, the Q/K/V output, the output and the log-sum-exp; the
      inner LayerNorm its input + mean + rstd. (No hash projection, no GELU: the paper's block.)
    dense block: a ((10 + 2 m) d + n_head + 4), m = ffn_mult: LayerNorm inputs and stats, the Q/K/V input and output,
      rotary q and k, attention output, output-projection input, FFN input, GELU input and output.
    LM head: a (V + 3 d + 1) + 16 (MemoryFormer) or a (V + 2 d + 2) + 16 (dense): the log-softmax output dominates.
    The head's backward adds 3 V a per token for a moment (the logits, which the training loop holds, and the
    gradients of the log-probabilities and of the logits).
  On CUDA with bf16 autocast the dense control saves bf16 matmul outputs; the MemoryFormer's hash weights and fp32
  lookups stay fp32. The fp32 count is kept there too, an upper bound.
- transients: the backward widens one bf16 table to fp32 (4 bytes x its largest table, twice: the fp32 gradient sum
  and the fp32 copy the weight gradient reads); accumulating a dense gradient adds the new one before it is summed;
  the CPU foreach AdamW holds a square root of its second moments (4 bytes x its parameters) during the step; the
  table optimizers work in slices (< 0.1 GB).
Peak = max over three moments: the head's backward (all activations alive, plus the gradients of earlier
micro-batches), the end of the backward (all gradients, one block's activations, the backward transient, the held
logits) and the optimizer step (all gradients, the step transient, the held logits). On CUDA add the runtime's own
memory (`runtime_gb`, 1.5 GB: context, cuBLAS workspace) and a fragmentation reserve (`reserve`, 10 %).
"""

from __future__ import annotations

import re

import torch

from memoryformer.config import ModelConfig, get_config
from memoryformer.optim import TABLE_DTYPES, TABLE_OPTIMS

GB = 1e9
_TB = {"float32": 4, "bfloat16": 2}  # bytes per table entry, by table_dtype
_STEP_SLICES = 6 * (1 << 22) * 4  # the table optimizers' fp32 temporaries of one slice


def _model_shapes(cfg: ModelConfig) -> dict:
    """Dense/table parameter counts and the (K, R, h, segments) of every table, from a meta-device model."""
    from memoryformer.model import MemoryAttention, build_model

    with torch.device("meta"):
        model = build_model(cfg)
    seg = {id(m.qkv.tables): 3 * m.n_head for m in model.modules() if isinstance(m, MemoryAttention)}
    dense = table = 0
    tables = []
    for name, p in model.named_parameters():
        if name.endswith("tables"):
            table += p.numel()
            tables.append((*p.shape, seg.get(id(p), 1)))
        else:
            dense += p.numel()
    return dict(dense=dense, table=table, tables=tables)


def block_activation_bytes(cfg: ModelConfig, act_bytes: int = 4) -> int:
    """Bytes autograd saves per token in one block (see the module docstring)."""
    d, nh = cfg.d_model, cfg.n_head
    if cfg.arch == "memoryformer":
        K = cfg.n_tables
        H = cfg.block_hidden
        per_hash = 2 * K if cfg.weighting == "release" else 0  # ||z||_1 and p(z), the operands of their product
        return act_bytes * (16 * d + 4 * H + 3 * K + 3 * per_hash + nh + 4) + 24 * K
    return act_bytes * ((10 + 2 * cfg.ffn_mult) * d + nh + 4)


def head_activation_bytes(cfg: ModelConfig, act_bytes: int = 4) -> int:
    """Bytes saved per token by the embedding, the final norm, the LM head and the loss."""
    d, V = cfg.d_model, cfg.vocab_size
    extra = 3 * d + 1 if cfg.arch == "memoryformer" else 2 * d + 2
    return act_bytes * (V + extra) + 16


def parse_bytes(text: str | float | int) -> float:
    """'80GB', '80 GiB', '141G', 8e10 -> bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"gpu_mem: expected a size like '80GB' or '141GiB', got {text!r}")
    base = 1024 if m.group(3) else 1000
    return float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")


def _touched_rows(R: int, tokens: int, hit_fraction: float | None) -> float:
    if hit_fraction is not None:
        return hit_fraction * R
    return R * (1.0 - (1.0 - 1.0 / R) ** tokens)  # expected distinct rows of `tokens` uniform draws


def _check_options(table_optim: str, table_dtype: str, device: str, sparse_rows: bool) -> None:
    if table_optim not in TABLE_OPTIMS:
        raise ValueError(f"table_optim: expected one of {TABLE_OPTIMS}, got {table_optim!r}")
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype: expected one of {TABLE_DTYPES}, got {table_dtype!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if sparse_rows and (device != "cpu" or table_optim == "adamw"):
        raise ValueError("sparse_rows: sparse table gradients exist for the row-wise rules on the CPU only")


def _state_bytes(shapes: dict, tb: int, table_optim: str, sparse_rows: bool, accum: int, N: int,
                 hit_fraction: float | None) -> dict:
    """Parameters, gradients and optimizer state (the module docstring's first three terms)."""
    Pd, Pt, tables = shapes["dense"], shapes["table"], shapes["tables"]
    params = 4 * Pd + tb * Pt
    if sparse_rows:
        rows = [min(K * R, accum * K * _touched_rows(R, N, hit_fraction)) for K, R, h, _ in tables]
        table_grads = sum(r * (h * tb + 16) for r, (K, R, h, _) in zip(rows, tables))
    else:
        table_grads = tb * Pt
    if table_optim == "adamw":
        opt_tables = 8 * Pt
    else:
        opt_tables = sum(K * R * (4 * S + 4) for K, R, h, S in tables)
        if table_optim == "partial-rowwise-adam":
            opt_tables += 4 * Pt
    grads, optimizer = 4 * Pd + table_grads, 8 * Pd + opt_tables
    return dict(params=params, grads=grads, table_grads=table_grads, optimizer=optimizer, optimizer_tables=opt_tables,
                state=params + grads + optimizer)


def _transient_bytes(shapes: dict, tb: int, table_optim: str, sparse_rows: bool, accum: int, N: int,
                     hit_fraction: float | None, device: str) -> tuple[float, float]:
    """(backward, optimizer step) transients (the module docstring's last term)."""
    Pd, Pt, tables = shapes["dense"], shapes["table"], shapes["tables"]
    bf16, fp32_adamw = tb == 2, (table_optim, tb) == ("adamw", 4)
    largest = max((K * R * h for K, R, h, _ in tables), default=0)
    if not tables:
        bwd_transient = 0
    elif sparse_rows:
        hit_max = max(K * _touched_rows(R, N, hit_fraction) * h for K, R, h, _ in tables)
        bwd_transient = 4 * hit_max + (4 * largest if bf16 else 0)
    else:
        bwd_transient = (8 * largest if bf16 else 0) + (tb * largest if accum > 1 else 0)
    foreach_params = (Pd + (Pt if fp32_adamw else 0)) if device == "cpu" else 0
    step_transient = 4 * foreach_params + (_STEP_SLICES if tables and not fp32_adamw else 0)
    return bwd_transient, step_transient


def footprint(config: str | ModelConfig, batch: int = 1, seq_len: int | None = None, *,
              table_optim: str = "adamw", table_dtype: str = "float32", accum: int = 1, sparse_rows: bool = False,
              device: str = "cuda", hit_fraction: float | None = None, gpu_mem: str | float | None = None,
              runtime_gb: float | None = None, reserve: float | None = None) -> dict:
    """Training memory of one process (bytes) for `batch` sequences of `seq_len` tokens per forward.

    Args:
        config: a preset name or a ModelConfig.
        batch: micro-batch, sequences per forward; `accum` micro-batches per optimizer step.
        table_optim, table_dtype: as TrainConfig (memoryformer.optim).
        sparse_rows: sparse touched-row table gradients (row-wise rules, CPU only).
        device: "cuda" (fused AdamW; runtime and reserve added) or "cpu" (foreach AdamW transient; nothing added).
        hit_fraction: rows hit per micro-batch as a fraction of a table (sparse rows); None: uniform hashing.
        gpu_mem: memory of the device to check the total against ("80GB"); None: no check.
    Returns a dict of byte counts ("params", "grads", "optimizer", "state" = their sum, "activations",
    "transient", "peak", "total" = peak + runtime + reserve, ...) and "fits" when gpu_mem is given.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    _check_options(table_optim, table_dtype, device, sparse_rows)
    seq_len = seq_len or cfg.max_seq_len
    N = batch * seq_len
    shapes = _model_shapes(cfg)
    tb = _TB[table_dtype]
    st = _state_bytes(shapes, tb, table_optim, sparse_rows, accum, N, hit_fraction)
    bwd_transient, step_transient = _transient_bytes(shapes, tb, table_optim, sparse_rows, accum, N, hit_fraction,
                                                     device)

    act_block = block_activation_bytes(cfg) * N
    act_blocks = cfg.n_layer * act_block
    act_head = head_activation_bytes(cfg) * N
    head_bwd = 3 * cfg.vocab_size * 4 * N
    logits = cfg.vocab_size * 4 * N
    grads_prev = st["grads"] * (accum - 1) / accum if accum > 1 else 0.0
    moments = {
        "head backward": st["params"] + st["optimizer"] + grads_prev + act_blocks + act_head + head_bwd,
        "end of backward": st["state"] + act_block + bwd_transient + logits,
        "optimizer step": st["state"] + step_transient + logits,
    }
    when = max(moments, key=moments.get)
    peak = moments[when]
    if runtime_gb is None:
        runtime_gb = 1.5 if device == "cuda" else 0.0
    if reserve is None:
        reserve = 0.1 if device == "cuda" else 0.0
    total = peak * (1 + reserve) + runtime_gb * GB
    out = dict(
        config=cfg.arch if isinstance(config, ModelConfig) else config, arch=cfg.arch, batch=batch, seq_len=seq_len,
        accum=accum, tokens_per_micro_batch=N, table_optim=table_optim, table_dtype=table_dtype,
        sparse_rows=sparse_rows, device=device, dense_params=shapes["dense"], table_params=shapes["table"], **st,
        activations=act_blocks + act_head + head_bwd, activations_blocks=act_blocks,
        activations_head=act_head + head_bwd, transient_backward=bwd_transient, transient_step=step_transient,
        moments=moments, peak_at=when, peak=peak, runtime=runtime_gb * GB, reserve=reserve, total=total,
    )
    if gpu_mem is not None:
        out["gpu_mem"] = parse_bytes(gpu_mem)
        out["fits"] = total <= out["gpu_mem"]
    return out


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB" if x < 10 * GB else f"{x / GB:.1f} GB"


def report(config: str | ModelConfig, batch: int = 1, seq_len: int | None = None, table_optim: str = "adamw",
           table_dtype: str = "float32", gpu_mem: str | float | None = "80GB", **kw) -> str:
    """`footprint` as text: each term, the peak and whether it fits `gpu_mem`."""
    f = footprint(config, batch, seq_len, table_optim=table_optim, table_dtype=table_dtype, gpu_mem=gpu_mem, **kw)
    name = config if isinstance(config, str) else f"{f['arch']} {config.n_layer}x{config.d_model}"
    lines = [
        f"{name}: {f['dense_params'] / 1e6:,.1f} M dense + {f['table_params'] / 1e6:,.1f} M table parameters; "
        f"tables {table_optim}/{table_dtype}{', sparse rows' if f['sparse_rows'] else ''} on {f['device']}",
        f"  micro-batch {batch} x {f['seq_len']} = {f['tokens_per_micro_batch']:,} tokens, {f['accum']} per step",
        f"  parameters     {_gb(f['params'])}",
        f"  gradients      {_gb(f['grads'])} (tables {_gb(f['table_grads'])})",
        f"  optimizer      {_gb(f['optimizer'])} (tables {_gb(f['optimizer_tables'])})",
        f"  training state {_gb(f['state'])}",
        f"  activations    {_gb(f['activations'])} (blocks {_gb(f['activations_blocks'])}, LM head "
        f"{_gb(f['activations_head'])})",
        f"  transients     backward {_gb(f['transient_backward'])}, step {_gb(f['transient_step'])}",
        f"  peak           {_gb(f['peak'])} at the {f['peak_at']}",
    ]
    if f["device"] == "cuda":
        lines.append(f"  total          {_gb(f['total'])} (+ {int(100 * f['reserve'])} % reserve, "
                     f"{f['runtime'] / GB:.1f} GB runtime)")
    if "fits" in f:
        lines.append(f"  fits {f['gpu_mem'] / GB:.0f} GB: {'yes' if f['fits'] else 'no'}")
    return "\n".join(lines)


OPTIONS = [(o, d) for d in TABLE_DTYPES for o in TABLE_OPTIMS]


def options_table(config: str, batch: int = 1, seq_len: int | None = None, gpu_mem="80GB", **kw) -> str:
    """One markdown row per table option: state, activations, total and fit."""
    rows = ["| table_optim | table_dtype | params | grads | optimizer | state | activations | total | fits |",
            "|---|---|---|---|---|---|---|---|---|"]
    for o, d in OPTIONS:
        f = footprint(config, batch, seq_len, table_optim=o, table_dtype=d, gpu_mem=gpu_mem, **kw)
        rows.append(f"| {o} | {d} | {_gb(f['params'])} | {_gb(f['grads'])} | {_gb(f['optimizer'])} | "
                    f"{_gb(f['state'])} | {_gb(f['activations'])} | {_gb(f['total'])} | "
                    f"{'yes' if f.get('fits') else 'no'} |")
    return "\n".join(rows)


def max_batch(config: str, seq_len: int | None = None, gpu_mem="80GB", limit: int = 1 << 12, **kw) -> int:
    """The largest micro-batch (sequences, at most `limit`) whose total fits `gpu_mem`; 0 if none does."""
    fits = lambda b: footprint(config, b, seq_len, gpu_mem=gpu_mem, **kw)["fits"]  # noqa: E731
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
