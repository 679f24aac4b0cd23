"""Optimizers for training: AdamW on the dense weights, and a choice of rules and storage for the memory tables.

The faithful recipe (the authors' released configs) is the default: AdamW (0.9, 0.95), eps 1e-8, decoupled weight
decay 0.1 on the matrices and the tables, global gradient-norm clipping at 1.0, fp32 tables (`table_optim="adamw"`,
`table_dtype="float32"`: one `torch.optim.AdamW` over all groups).

The tables hold nearly all parameters (MF-tiny 415 M of 466 M, MF-base 6.64 B of 6.75 B), and AdamW keeps two
fp32 moments per table element besides the dense table gradient. The other options (see `memoryformer.footprint`
for what each costs):

table_optim
    "adamw"  AdamW on the tables. Every row moves every step (momentum and decay), hit or not.
    "rowwise"  `RowwiseAdam(momentum=False)`: one second moment per row segment, no per-element state; only
        the rows hit this step change.
    "partial-rowwise-adam"  `RowwiseAdam(momentum=True)`: as "rowwise" plus a per-element first moment (FBGEMM's
        PARTIAL_ROWWISE_ADAM, with per-row step counts).

table_dtype
    "float32"
    "bfloat16"  tables stored in bfloat16. The kernels sum in fp32; each update is computed in fp32 and written back
        by stochastic rounding (`stochastic_round`, unbiased: E[round(x)] = x), so updates far below bf16's
        resolution (2^-8 relative) are not lost; there is no fp32 master copy.

With a row-wise rule on CPU and one process, the table gradient also skips the dense (K, 2^tau, h) tensor:
`build_optimizer` sets `sparse_grad` on the Memory Layers whose tables the rule holds (`sparse_table_grads`), their
CPU backward then returns a sparse COO gradient of the touched rows (as `nn.Embedding(sparse=True)`), and the step
reads only those rows (`sparse_rows`; same rule, same numbers up to summation order). Global-norm clipping includes
them.

    opt = build_optimizer(model, tcfg, lr=3e-3)  # tcfg: a TrainConfig or anything with its optimizer fields
    gnorm = opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from typing import Iterable

import torch

from memoryformer.config import TABLE_DTYPES, TABLE_OPTIMS, ConfigError
from memoryformer.layers import MemoryLayer
from memoryformer.ops.quant import torch_dtype

__all__ = ["TABLE_DTYPES", "TABLE_OPTIMS", "RowwiseAdam", "TableAdamW", "TrainingOptimizer", "build_optimizer",
           "cast_tables", "sparse_table_grads", "stochastic_round"]
_CHUNK_ELEMS = 1 << 22  # elements per slice of a table update: bounds the fp32 temporaries (16 MB each)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic rounding


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased: E[result] = x).

    Adds 16 uniform random bits below the bf16 mantissa of the fp32 bit pattern and truncates; the sign bit is
    apart from the magnitude, so negative values round symmetrically. Draws from `generator` (default: the global
    generator of x's device, which training checkpoints save and restore).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round: expected a float32 tensor, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return noise.add_(bits).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are 0


def _write_back(dst: torch.Tensor, x32: torch.Tensor) -> torch.Tensor:
    """x32 in dst's dtype: itself for fp32, stochastically rounded for bf16."""
    if dst.dtype == torch.float32:
        return x32
    if dst.dtype == torch.bfloat16:
        return stochastic_round(x32)
    raise TypeError(f"table dtype {dst.dtype}: expected float32 or bfloat16")


def cast_tables(model: torch.nn.Module, table_dtype: str) -> torch.nn.Module:
    """Store every Memory Layer table of `model` as `table_dtype` ("float32" or "bfloat16", round to nearest), in
    place.

    Call it before wrapping the model (DDP) and before loading a checkpoint into it, then build the optimizer.
    """
    if table_dtype not in TABLE_DTYPES:
        raise ConfigError(f"table_dtype: expected one of {TABLE_DTYPES}, got {table_dtype!r}")
    dtype = torch_dtype(table_dtype, "table_dtype", TABLE_DTYPES)
    for p in _tables(model):
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def _tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.endswith("tables")]


def _chunks(n_rows: int, h: int):
    step = max(1, _CHUNK_ELEMS // max(1, h))
    for s in range(0, n_rows, step):
        yield s, min(n_rows, s + step)


# ---------------------------------------------------------------------------------------------------------------
# Table optimizers


class _StateKeepsItsDtype(torch.optim.Optimizer):
    """`load_state_dict` without the base class's cast of floating state to the parameter's dtype, which would
    turn fp32 moments of bf16 tables into bf16 and int32 row counts into floats."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)


class TableAdamW(_StateKeepsItsDtype):
    """AdamW for low-precision (bf16) tables: fp32 moments, the step in fp32, stochastic rounding on write.

    Same rule as `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, every element every step):
        t <- t + 1;  w <- w (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    State per parameter: "step" (scalar), "exp_avg", "exp_avg_sq" (fp32, the parameter's shape).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = dict(step=torch.zeros((), dtype=torch.float32),
                                     exp_avg=torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                                     exp_avg_sq=torch.zeros(p.shape, dtype=torch.float32, device=p.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["step"] += 1
                t = st["step"].item()
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                h = p.shape[-1]
                P, G = p.view(-1, h), p.grad.view(-1, h)
                M, V = st["exp_avg"].view(-1, h), st["exp_avg_sq"].view(-1, h)
                for s, e in _chunks(P.shape[0], h):
                    g = G[s:e].float()
                    x = P[s:e].float().mul_(1 - lr * wd)
                    m = M[s:e].lerp_(g, 1 - b1)
                    v = V[s:e].mul_(b2).addcmul_(g, g, value=1 - b2)
                    x.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)
                    P[s:e].copy_(_write_back(p, x))
        return loss


class RowwiseAdam(_StateKeepsItsDtype):
    """Lazy row-wise Adam for memory tables (K, R, h), fp32 or bf16 (stochastic rounding on write).

    Row r = (k, i) of a table is hit in a step when its gradient g_r (h,) is not all zeros; rows not hit are left
    exactly as they are (no decay, no state change). Each row is cut into S = `segments` equal segments
    g_rs (h/S,): S = 3 * n_head for the fused Q/K/V table (one segment per head's q, k and v: their gradients
    differ by 10-50x, so one shared scale would freeze q and k), S = 1 elsewhere. For every hit row:
        n_r  <- n_r + 1                                        per-row step count (bias correction of lazy EMAs)
        v_rs <- b2 v_rs + (1 - b2) mean(g_rs^2)                one second moment per segment
        m_r  <- b1 m_r + (1 - b1) g_r; u_r = m_r / (1 - b1^n_r)   with momentum; without it u_r = g_r
        w_r  <- w_r (1 - lr wd) - lr u_rs / (sqrt(v_rs / (1 - b2^n_r)) + eps)
    Weight decay is decoupled (AdamW-style) and applies to hit rows only.

    State per table: "row_sq" (K, R, S) fp32, "row_step" (K, R) int32, and with momentum "exp_avg" (K, R, h) fp32.
    Memory: 8 bytes per row (S = 1) instead of AdamW's 8 bytes per element; 4 bytes per element more with momentum.

    Gradients may be dense or sparse COO tensors of the touched rows (the layers' `sparse_grad`, set by
    `sparse_table_grads`); both give the same update.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, momentum: bool = False, segments: int = 1):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, segments=segments))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 3 or p.shape[-1] % group["segments"]:
                    raise ValueError(f"RowwiseAdam: expected (K, R, h) tables with h divisible by segments="
                                     f"{group['segments']}, got shape {tuple(p.shape)}")
                K, R, _ = p.shape
                st = self.state[p]
                st["row_sq"] = torch.zeros(K, R, group["segments"], dtype=torch.float32, device=p.device)
                st["row_step"] = torch.zeros(K, R, dtype=torch.int32, device=p.device)
                if group["momentum"]:
                    st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    # -- the update --------------------------------------------------------------------------------------------
    @staticmethod
    def _hit_rows(p: torch.Tensor):
        """(rows (U,) flat ids k*R + i, grads, gathered) from p.grad, dense or sparse: the touched rows and their
        (U, h) values (gathered), or every row with a nonzero gradient and the whole (K*R, h) gradient to index."""
        if p.grad is None:
            return None
        K, R, h = p.shape
        if p.grad.is_sparse:
            rows, vals = sparse_rows(p.grad)
            return rows, vals, True
        G = p.grad.view(K * R, h)
        rows = (torch.linalg.vector_norm(G, dim=1) > 0).nonzero().squeeze(1)
        return rows, G, False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                hit = self._hit_rows(p)
                if hit is not None and hit[0].numel():
                    self._update(p, *hit, group)
        return loss

    def _update(self, p: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor, gathered: bool, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        S = group["segments"]
        K, R, h = p.shape
        st = self.state[p]
        P = p.view(K * R, h)
        V, N = st["row_sq"].view(K * R, S), st["row_step"].view(K * R)
        M = st["exp_avg"].view(K * R, h) if group["momentum"] else None
        for s, e in _chunks(rows.numel(), h):
            r = rows[s:e]
            g = (grads[s:e] if gathered else grads.index_select(0, r)).float()
            sq = g.view(-1, S, h // S).square().mean(-1)  # (rows, S)
            if gathered:  # a touched row whose gradient summed to exactly zero is not hit
                keep = sq.sum(-1) > 0
                if not bool(keep.all()):
                    r, g, sq = r[keep], g[keep], sq[keep]
            n = N.index_select(0, r) + 1
            N.index_copy_(0, r, n)
            nf = n.to(torch.float32)
            v = V.index_select(0, r).mul_(b2).add_(sq, alpha=1 - b2)
            V.index_copy_(0, r, v)
            denom = (v / (1 - torch.pow(b2, nf))[:, None]).sqrt_().add_(eps)  # (rows, S)
            if M is not None:
                m = M.index_select(0, r).lerp_(g, 1 - b1)
                M.index_copy_(0, r, m)
                u = m / (1 - torch.pow(b1, nf))[:, None]
            else:
                u = g
            x = P.index_select(0, r).float().mul_(1 - lr * wd)
            x.view(-1, S, h // S).addcdiv_(u.view(-1, S, h // S), denom[..., None], value=-lr)
            P.index_copy_(0, r, _write_back(p, x))


# ---------------------------------------------------------------------------------------------------------------
# One optimizer for the training loop


class TrainingOptimizer:
    """The optimizers of one model behind the interface the training loop uses.

    `param_groups` (all groups; the loop sets their "lr"), `step()`, `zero_grad()`, `clip_grad_norm_(max_norm)`
    (global L2 norm over all gradients, sparse table rows included, scaled by min(1, max_norm / (norm + 1e-6)) as
    `torch.nn.utils.clip_grad_norm_`). Iterating yields the underlying `torch.optim.Optimizer`s, which is what
    `torch.distributed.checkpoint.state_dict.{get,set}_optimizer_state_dict` accept, so checkpoints stay keyed
    `<parameter name>/<state key>`. `sparse_layers`: the Memory Layers set to `sparse_grad` for the row-wise rule
    (`release()` sets them back to dense gradients).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], params: Iterable[torch.nn.Parameter],
                 sparse_layers: Iterable[torch.nn.Module] = ()):
        self.optimizers = list(optimizers)
        self._params = list(params)
        self._plain = len(self.optimizers) == 1 and type(self.optimizers[0]) is torch.optim.AdamW
        self.sparse_layers = list(sparse_layers)  # Memory Layers set to sparse_grad for these optimizers

    def __iter__(self):
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def sparse(self) -> bool:
        """Do the tables get sparse gradients of their touched rows?"""
        return any(m.sparse_grad for m in self.sparse_layers)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients to a global L2 norm of `max_norm` (inf: only measure); returns the norm before."""
        if self._plain:  # the faithful recipe: torch's own clipping, the same rounding
            return torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        grads = []
        for p in self._params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:  # touched table rows: sum duplicates once, then work on the values
                rows, vals = sparse_rows(p.grad)
                R = p.shape[1]
                p.grad = torch.sparse_coo_tensor(torch.stack((rows // R, rows % R)), vals, p.shape,
                                                 is_coalesced=True, check_invariants=False)
                grads.append(vals)
            else:
                grads.append(p.grad)
        if not grads:
            return torch.zeros(())
        norms = [torch.linalg.vector_norm(g).float() for g in grads]  # bf16 gradients: fp32 sums, bf16 result
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def release(self) -> None:
        """Back to dense table gradients on the layers this optimizer set to sparse ones."""
        sparse_table_grads(self.sparse_layers, enabled=False)


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (U,) sorted unique flat row ids k*R + i, values (U, h)) of a sparse (K, R, h) table gradient.

    Autograd stores the CPU backward's already coalesced gradient without its flag; checking that the rows are
    sorted and unique costs one pass, sorting them again (`coalesce`) much more. Several micro-batches' gradients
    (concatenated by autograd) are coalesced here."""
    R = grad.shape[1]
    idx, vals = grad._indices(), grad._values()
    rows = idx[0] * R + idx[1]
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        grad = grad.coalesce()
        idx, vals = grad.indices(), grad.values()
        rows = idx[0] * R + idx[1]
    return rows, vals


def _qkv_segments(model: torch.nn.Module) -> dict[int, int]:
    """id(fused Q/K/V table) -> 3 * n_head: its rows are laid out per head as [q | k | v] (model.causal_attention)."""
    from memoryformer.model import MemoryAttention

    return {id(m.qkv.tables): 3 * m.n_head for m in model.modules() if isinstance(m, MemoryAttention)}


def build_optimizer(model: torch.nn.Module, cfg, *, lr: float, fused: bool = False,
                    sparse_rows: bool | None = None) -> TrainingOptimizer:
    """The optimizer for training `model` (a bare model, not a DDP wrapper) as `cfg` says.

    Args:
        cfg: a TrainConfig, or any object with its fields weight_decay, exclude_tables_from_wd, beta1, beta2, eps,
            table_optim and table_dtype (the last two default to "adamw" and "float32" when missing).
        lr: the initial LR of every group (the training loop sets it per step).
        fused: fused AdamW for the dense groups (CUDA); else foreach.
        sparse_rows: sparse table gradients of the touched rows (row-wise rules only). None: when every table is
            on the CPU and no process group with several ranks is running.
    Groups: "decay", "no_decay" (AdamW, as `model.param_groups`), then the tables: "tables" in the same AdamW
    (adamw + float32), or "tables" / "tables_qkv" in the table optimizer.
    """
    table_optim = getattr(cfg, "table_optim", "adamw")
    table_dtype = getattr(cfg, "table_dtype", "float32")
    if table_optim not in TABLE_OPTIMS:
        raise ConfigError(f"table_optim: expected one of {TABLE_OPTIMS}, got {table_optim!r}")
    if table_dtype not in TABLE_DTYPES:
        raise ConfigError(f"table_dtype: expected one of {TABLE_DTYPES}, got {table_dtype!r}")
    tables = _tables(model)
    if (table_optim, table_dtype) != ("adamw", "float32") and any(hasattr(p, "to_local") for p in model.parameters()):
        raise ConfigError(f"table_optim/table_dtype: {table_optim!r}/{table_dtype!r} work on whole tables; with "
                          "FSDP use the default adamw/float32 (or train with DDP)")
    wrong = {str(p.dtype) for p in tables if p.dtype != torch_dtype(table_dtype, "table_dtype", TABLE_DTYPES)}
    if wrong:
        raise ConfigError(f"table_dtype: {table_dtype!r}, but the model's tables are {sorted(wrong)[0]}; "
                          "call memoryformer.optim.cast_tables(model, table_dtype) first")
    betas = (cfg.beta1, cfg.beta2)
    groups = model.param_groups(cfg.weight_decay, 0.0 if cfg.exclude_tables_from_wd else None)
    adamw = dict(lr=lr, betas=betas, eps=cfg.eps, fused=fused or None, foreach=None if fused else True)
    params = list(model.parameters())  # clipped in this order (it fixes the rounding of the global norm)
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    sparse_table_grads(layers, enabled=False)  # dense unless the row-wise rule below asks (an earlier one may have)
    if table_optim == "adamw" and table_dtype == "float32":
        return TrainingOptimizer([torch.optim.AdamW(groups, **adamw)], params)

    dense = [g for g in groups if g["name"] != "tables"]
    table_group = next((g for g in groups if g["name"] == "tables"), None)
    opts = [torch.optim.AdamW(dense, **adamw)] if dense else []
    sparse: list[torch.nn.Module] = []
    if table_group is not None:
        twd, tps = table_group["weight_decay"], table_group["params"]
        if table_optim == "adamw":
            opts.append(TableAdamW([dict(params=tps, name="tables")], lr=lr, betas=betas, eps=cfg.eps,
                                   weight_decay=twd))
        else:
            seg = _qkv_segments(model)
            qkv = [p for p in tps if id(p) in seg]
            rest = [p for p in tps if id(p) not in seg]
            tgroups = [dict(params=rest, segments=1, name="tables")] if rest else []
            if qkv:
                if len({seg[id(p)] for p in qkv}) > 1:
                    raise ValueError("build_optimizer: Q/K/V tables with different head counts in one model")
                tgroups.append(dict(params=qkv, segments=seg[id(qkv[0])], name="tables_qkv"))
            if sparse_rows is None:
                sparse_rows = all(p.device.type == "cpu" for p in tps) and not _multi_rank()
            opts.append(RowwiseAdam(tgroups, lr=lr, betas=betas, eps=cfg.eps, weight_decay=twd,
                                    momentum=table_optim == "partial-rowwise-adam"))
            if sparse_rows:
                ids = {id(p) for p in tps}
                sparse = sparse_table_grads([m for m in layers if id(m.tables) in ids])
    return TrainingOptimizer(opts, params, sparse)


def sparse_table_grads(layers: Iterable[torch.nn.Module], enabled: bool = True) -> list[torch.nn.Module]:
    """Set `sparse_grad` on these Memory Layers: their tables then get sparse COO gradients of the touched rows
    (from the CPU backward), which `RowwiseAdam` reads row by row. Returns the layers."""
    layers = list(layers)
    if enabled and any(m.tables.device.type != "cpu" for m in layers):
        raise ValueError("sparse_rows: sparse table gradients come from the CPU backward; the tables are not all "
                         "on the CPU")
    for m in layers:
        m.sparse_grad = enabled
    return layers


def _multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
