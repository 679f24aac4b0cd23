"""The parts of benchmarks/gpu_suite.py (one function per part, a-f) and the helpers they share. Imported by the
suite after it has chosen the Triton interpreter or the GPU; see gpu_suite.py for what each part measures."""

from __future__ import annotations

import gc
import time
import traceback
from typing import TYPE_CHECKING

import torch
from kernel_timing import sync, time_interleaved

from memoryformer import MemoryLayer, build_model, get_config
from memoryformer.generate import generate
from memoryformer.model import MemoryFormerBlock, Rotary, TransformerBlock
from memoryformer.ops import chunk_hash, lookup_embedding_bag, lookup_reference, memory_layer, memory_lookup

if TYPE_CHECKING:
    from gpu_suite import Suite

TILES = dict(fwd=("FWD_BLOCK_N", "FWD_BLOCK_H"), bwd=("BWD_BLOCK_N", "BWD_BLOCK_H"), seg=("SEG_BLOCK_T", "SEG_BLOCK_H"))
TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # max |error| / max |float64 reference|
PAIRS = (("tiny", "pythia-70m"), ("small", "pythia-160m"), ("base", "pythia-410m"))
H100_EBAG_FWDBWD = {512: 5.3, 768: 13.1, 1024: 18.2}  # MF / Pythia block with F.embedding_bag, earlier H100 run

def _error(e: BaseException) -> dict:
    return dict(type=type(e).__name__, message=str(e)[:2000], traceback=traceback.format_exc()[-4000:])


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _try(store: dict, fn) -> None:
    """store.update(fn()); an exception is recorded in store["error"] instead, and the suite goes on."""
    try:
        store.update(fn())
    except Exception as e:
        store["error"] = _error(e)
        _free()


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _grads(fn, a: torch.Tensor, b: torch.Tensor, gy: torch.Tensor):
    """(y, dL/da, dL/db) of L = <gy, fn(a, b)>."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    y = fn(a, b)
    return (y.detach(), *torch.autograd.grad(y, [a, b], gy.to(y.dtype)))


def _use_triton(model: torch.nn.Module) -> list[str]:
    """Every Memory Layer on the Triton backend (what "auto" picks on CUDA; explicit for the interpreter on CPU)."""
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    for m in layers:
        m.backend = "triton"
    return sorted({m.active_backend() for m in layers})


def _step(module, x: torch.Tensor, mode: str, autocast: bool = False):
    """A closure running one forward (no grad) or forward + backward (grads of x and every parameter)."""
    params = [p for p in module.parameters() if p.requires_grad]
    xg, gy = x.detach().requires_grad_(mode != "fwd"), torch.randn_like(x)

    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.set_grad_enabled(mode != "fwd"):
                y = module(xg)
        if mode != "fwd":
            torch.autograd.grad(y, [xg, *params], gy, allow_unused=True)
    return run


# ---------------------------------------------------------------------------------------------------------------
# a. correctness


def _reference(x, T, gy, tau: int, weighting: str, chunk: int) -> dict:
    """Float64 y, dL/dx (layer), dL/dw (lookup), dL/dT for L = <gy, y>, through chunk_hash + lookup_reference,
    in token chunks (the reference holds (tokens, K, h) rows)."""
    T64 = T.double().requires_grad_()
    ys, gxs, gws, gt = [], [], [], torch.zeros_like(T64)
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk].double().requires_grad_()
        codes, w = chunk_hash(xs, tau, weighting=weighting)
        wl = w.detach().requires_grad_()
        y = lookup_reference(codes, wl, T64)
        gw, gtc = torch.autograd.grad(y, [wl, T64], gy[i:i + chunk].double())
        gxs.append(torch.autograd.grad(w, [xs], gw)[0])
        ys.append(y.detach())
        gws.append(gw)
        gt += gtc
    return dict(y=torch.cat(ys), gx=torch.cat(gxs), gw=torch.cat(gws), gt=gt)


def _check_case(s: Suite, dtype: torch.dtype, d: int, weighting: str) -> list[dict]:
    """One (dtype, d, weighting) at N tokens: fused layer and lookup op, sorted and atomic table gradient."""
    from memoryformer.ops import triton_kernels as tk

    tau, n, dev = s.size["tau"], s.size["n"], s.dev
    g = torch.Generator(device=dev).manual_seed(d)
    x = torch.randn(n, d, device=dev, generator=g).to(dtype)
    T = (0.02 * torch.randn(d // tau, 2**tau, d, device=dev, generator=g)).to(dtype)
    gy = torch.randn(n, d, device=dev, generator=g).to(dtype)
    ref = _reference(x, T, gy, tau, weighting, s.size["chunk"])
    codes, w = chunk_hash(x.double(), tau, weighting=weighting)
    w = w.float()
    bag = _grads(lambda w_, T_: lookup_embedding_bag(codes, w_, T_), w, T.float(), gy.float())
    name, out, default = str(dtype).removeprefix("torch."), [], tk.TABLE_GRAD
    for table_grad in ("sorted", "atomic"):
        tk.TABLE_GRAD = table_grad
        try:
            lay = _grads(lambda x_, T_: memory_layer(x_, T_, None, tau=tau, weighting=weighting, backend="triton"),
                         x, T, gy)
            lk = _grads(lambda w_, T_: memory_lookup(codes, w_, T_, backend="triton"), w, T, gy)
        finally:
            tk.TABLE_GRAD = default
        errs = dict(layer_y=_err(lay[0], ref["y"]), layer_grad_x=_err(lay[1], ref["gx"]),
                    layer_grad_tables=_err(lay[2], ref["gt"]), lookup_y=_err(lk[0], ref["y"]),
                    lookup_grad_weights=_err(lk[1], ref["gw"]), lookup_grad_tables=_err(lk[2], ref["gt"]),
                    vs_embedding_bag_y=_err(lk[0], bag[0]), vs_embedding_bag_grad_weights=_err(lk[1], bag[1]),
                    vs_embedding_bag_grad_tables=_err(lk[2], bag[2]))
        worst = max(errs.values())
        out.append(dict(dtype=name, d=d, n=n, tau=tau, weighting=weighting, table_grad=table_grad, errors=errs,
                        max_error=worst, tol=TOL[name], ok=worst <= TOL[name]))
    return out


def _opcheck(s: Suite) -> dict:
    from memoryformer.ops import triton_kernels  # noqa: F401  (registers the ops)

    g, dev, f64 = torch.Generator().manual_seed(2), s.dev, torch.float64
    N, K, R, h, tau = 6, 2, 8, 6, 3
    codes = torch.randint(0, R, (N, K), generator=g).to(dev)
    w = torch.rand(N, K, generator=g, dtype=f64).to(dev).requires_grad_()
    T = torch.randn(K, R, h, generator=g, dtype=f64).to(dev).requires_grad_()
    x = torch.randn(N, K * tau, generator=g, dtype=f64).to(dev).requires_grad_()
    gy = torch.randn(N, h, generator=g, dtype=f64).to(dev)
    # The interpreter cannot launch kernels on the fake tensors AOT dispatch traces with; compiled Triton can.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    utils += ("test_aot_dispatch_dynamic",) if dev.type == "cuda" else ()
    ops = torch.ops.memoryformer
    calls = dict(lookup_triton=(codes, w, T), lookup_triton_backward=(gy, codes, w.detach(), T.detach(), True, True),
                 layer_triton=(x, T, tau, True, 1.0),
                 layer_triton_input_grad=(gy, x.detach(), codes.int(), T.detach(), tau, False, 0.7))
    out = {}
    for name, args in calls.items():
        try:
            torch.library.opcheck(getattr(ops, name).default, args, test_utils=utils)
            out[name] = "ok"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:2000]
    return dict(opcheck=out, opcheck_utils=list(utils))


def _compile_check(s: Suite) -> dict:
    """A MemoryFormer block under torch.compile(fullgraph=True) against eager, fp32, forward + backward. A hash
    code may flip where fused rounding moves an input across 0, so the check counts elements off by > 1e-3."""
    B, T, backend = s.size["compile"]
    torch._dynamo.reset()
    cfg = get_config("tiny", **{**s.size["over"], "max_seq_len": T})
    torch.manual_seed(0)
    blk = _block(cfg, MemoryFormerBlock, s.dev)
    x = torch.randn(B, T, cfg.d_model, device=s.dev)
    gy = torch.randn_like(x)
    tables = [m.tables for m in blk.modules() if isinstance(m, MemoryLayer)]

    def run(f):
        xg = x.clone().requires_grad_()
        y = f(xg)
        return [y.detach(), *torch.autograd.grad(y, [xg, *tables], gy)]

    eager = run(blk)
    t = time.monotonic()
    comp = run(torch.compile(blk, fullgraph=True, backend=backend))
    names = ["y", "grad_x"] + [f"grad_tables_{i}" for i in range(len(tables))]
    errs = {k: _err(c, e) for k, c, e in zip(names, comp, eager)}
    frac = {k: ((c - e).abs() > 1e-3 * e.abs().max()).float().mean().item() for k, c, e in zip(names, comp, eager)}
    return dict(backend=backend, shape=[B, T, cfg.d_model], compile_and_run_s=time.monotonic() - t,
                errors=errs, mismatch_fraction=frac, ok=max(frac.values()) <= 1e-2)


def part_correctness(s: Suite, res: dict) -> None:
    res["cases"] = []
    for dtype in (torch.float32, torch.bfloat16):
        for d in s.size["dims"]:
            for weighting in ("release", "paper"):
                what = f"a {str(dtype)[6:]} d={d} {weighting}"
                if not s.fits(s.size["est"]["case"], what):
                    continue
                case = {}
                _try(case, lambda: dict(results=_check_case(s, dtype, d, weighting)))
                res["cases"] += case.get("results", [dict(case=what, ok=False, **case)])
                s.log(f"{what}: max errors " + ", ".join(f"{c['max_error']:.2e}" for c in case.get("results", [])))
                s.save()
    _try(res, lambda: _opcheck(s))
    s.log(f"opcheck: {res.get('opcheck')}")
    if s.fits(s.size["est"]["compile"], "a torch.compile of a block"):
        res["compile"] = {}
        _try(res["compile"], lambda: _compile_check(s))
    ops_ok = bool(res.get("opcheck")) and all(v == "ok" for v in res["opcheck"].values())
    res["all_ok"] = all(c["ok"] for c in res["cases"]) and ops_ok and res.get("compile", {}).get("ok", False)


# ---------------------------------------------------------------------------------------------------------------
# b. one layer, c. one block


def part_layer(s: Suite, res: dict) -> None:
    d, n = s.size["layer"]
    tau, dt, dev = s.size["tau"], torch.bfloat16, s.dev
    torch.manual_seed(0)
    x = torch.randn(n, d, device=dev, dtype=dt)
    mods = dict(linear=torch.nn.Linear(d, d, device=dev, dtype=dt),
                memory_layer=MemoryLayer(d, d, tau, backend="triton", device=dev, dtype=dt))
    res.update(d=d, n=n, tau=tau, dtype="bfloat16", kernel=mods["memory_layer"].active_backend())
    for mode in ("fwd", "fwdbwd"):
        t = s.time({k: _step(m, x, mode) for k, m in mods.items()})
        res[mode] = dict(linear_s=t["linear"], memory_layer_s=t["memory_layer"], ratio=t["memory_layer"] / t["linear"])
        s.log(f"layer {mode}: {res[mode]}")
    res["row_bytes_per_s"] = n * (d // tau) * d * 2 / res["fwd"]["memory_layer_s"]  # bf16 rows gathered per forward


def _block(cfg, cls, dev, table_dtype=None):
    with dev:  # parameters are created and initialised on the device
        blk = cls(cfg, Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base))
    _use_triton(blk)
    for m in blk.modules():
        if isinstance(m, MemoryLayer) and table_dtype is not None:
            m.tables.data = m.tables.data.to(table_dtype)  # autocast leaves lookups alone: bf16 rows, half the bytes
    return blk


def _block_pair(s: Suite, mf_name: str, dense_name: str, B: int, T: int) -> dict:
    over = {**s.size["over"], "max_seq_len": T}
    mf_cfg, dense_cfg = get_config(mf_name, **over), get_config(dense_name, **over)
    torch.manual_seed(0)
    blocks = dict(pythia=_block(dense_cfg, TransformerBlock, s.dev),
                  memoryformer=_block(mf_cfg, MemoryFormerBlock, s.dev, torch.bfloat16))
    x = torch.randn(B, T, mf_cfg.d_model, device=s.dev)
    out = dict(d=mf_cfg.d_model, mf=mf_name, dense=dense_name, kernel=_use_triton(blocks["memoryformer"]))
    for mode in ("fwd", "fwdbwd"):
        t = s.time({k: _step(b, x, mode, autocast=True) for k, b in blocks.items()})
        out[mode] = dict(pythia_s=t["pythia"], memoryformer_s=t["memoryformer"], ratio=t["memoryformer"] / t["pythia"])
    return out


def part_block(s: Suite, res: dict) -> None:
    B, T = s.size["batch"]
    res.update(batch=B, seq=T, autocast="bfloat16", tables="bfloat16", blocks=[],
               h100_embedding_bag_fwdbwd_ratio=H100_EBAG_FWDBWD)
    for mf_name, dense_name in s.size["blocks"]:
        if not s.fits(s.size["est"]["block"], f"c block {mf_name}"):
            continue
        entry = dict(mf=mf_name, dense=dense_name)
        _try(entry, lambda: _block_pair(s, mf_name, dense_name, B, T))
        res["blocks"].append(entry)
        s.log(f"block {mf_name}: fwd {entry.get('fwd')}, fwd+bwd {entry.get('fwdbwd')}")
        _free()
        s.save()


# ---------------------------------------------------------------------------------------------------------------
# d. training, e. decoding


def _train_rate(s: Suite, name: str, B: int, T: int, warmup: int, steps: int) -> dict:
    dev = s.dev
    cfg = get_config(name, **{**s.size["over"], "max_seq_len": T})
    torch.manual_seed(0)
    with dev:  # MF-small holds 1.9 B parameters: initialise them on the device
        model = build_model(cfg)
    kernel = _use_triton(model)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
    idx, tgt = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            _, loss = model(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(dev)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    return dict(params=sum(p.numel() for p in model.parameters()), kernel=kernel, tokens_per_s=B * T * steps / dt,
                step_s=dt / steps, loss=loss.item(), peak_memory_gb=peak)


def part_training(s: Suite, res: dict) -> None:
    (B, T), (warmup, steps) = s.size["batch"], s.size["steps"]
    res.update(batch=B, seq=T, warmup=warmup, steps=steps, autocast="bfloat16", optimizer="fused AdamW, "
               "param_groups(0.1)", models={}, ratios={})
    for pair in s.size["train"]:
        for name in pair:
            if s.fits(s.size["est"]["train"], f"d training {name}"):
                _try(res["models"].setdefault(name, {}), lambda: _train_rate(s, name, B, T, warmup, steps))
                s.log(f"train {name}: {res['models'][name]}")
                _free()
                s.save()
        rates = [res["models"].get(n, {}).get("tokens_per_s") for n in pair]
        if all(rates):
            res["ratios"]["/".join(pair)] = rates[0] / rates[1]


def _hf_pythia(cfg, dev):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                           num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_mult * cfg.d_model,
                           max_position_embeddings=cfg.max_seq_len, use_parallel_residual=True,
                           tie_word_embeddings=False)
    return GPTNeoXForCausalLM(hf_cfg).to(device=dev, dtype=torch.bfloat16).eval()


def part_decode(s: Suite, res: dict) -> None:
    P, new, warmup, reps = s.size["decode"]
    dev = s.dev
    torch.manual_seed(0)
    with dev:
        mf = build_model(get_config("tiny", **s.size["over"])).to(torch.bfloat16).eval()
    res.update(prompt=P, new_tokens=new, batch=1, dtype="bfloat16", kernel=_use_triton(mf))
    hf = _hf_pythia(get_config("pythia-70m", **s.size["over"]), dev)
    prompt = torch.randint(0, mf.config.vocab_size, (1, P), device=dev)

    def run_mf():
        assert generate(mf, prompt, new, temperature=0).shape[1] == P + new

    def run_hf(compile_ok: bool):  # static cache: transformers compiles the decoding step on CUDA unless told not to
        def run():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, cache_implementation="static",
                              disable_compile=not compile_ok, pad_token_id=0)
            assert out.shape[1] == P + new
        return run

    fns = dict(memoryformer=run_mf, hf_static_eager=run_hf(False))
    if s.fits(s.size["est"]["hf_compile"], "e HF static cache with transformers' compile"):
        fns["hf_static"] = run_hf(True)
    res["first_call_s"] = {}
    for k, fn in fns.items():  # first calls compile (Triton JIT; torch.compile for hf_static on CUDA)
        t = time.perf_counter()
        fn()
        sync(dev)
        res["first_call_s"][k] = time.perf_counter() - t
    t = time_interleaved(fns, dev, warmup=warmup, reps=reps, budget_s=60.0)  # CUDA graphs record on a later call
    res["tokens_per_s"] = {k: new / v for k, v in t.items()}
    rates = res["tokens_per_s"]
    res["ratio_vs_hf"] = {k: rates["memoryformer"] / v for k, v in rates.items() if k != "memoryformer"}
    s.log(f"decode tok/s: {rates}")


# ---------------------------------------------------------------------------------------------------------------
# f. tiles


def _with_tiles(tk, names, values, fn, table_grad="sorted"):
    def run():
        old = [getattr(tk, n) for n in names] + [tk.TABLE_GRAD]
        for n, v in zip((*names, "TABLE_GRAD"), (*values, table_grad)):
            setattr(tk, n, v)
        try:
            fn()
        finally:
            for n, v in zip((*names, "TABLE_GRAD"), old):
                setattr(tk, n, v)
    return run


def part_tiles(s: Suite, res: dict) -> None:
    from memoryformer.ops import triton_kernels as tk

    (d, n), tau, dev = s.size["layer"], s.size["tau"], s.dev
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, generator=g, dtype=torch.bfloat16)
    T = (0.02 * torch.randn(d // tau, 2**tau, d, device=dev, generator=g)).to(torch.bfloat16)
    gy = torch.randn(n, d, device=dev, generator=g, dtype=torch.bfloat16)
    ops = torch.ops.memoryformer
    _, codes, w = ops.layer_triton(x, T, tau, True, 1.0)
    kernels = dict(fwd=lambda: ops.layer_triton(x, T, tau, True, 1.0),  # hash + gather forward
                   bwd=lambda: ops.layer_triton_input_grad(gy, x, codes, T, tau, True, 1.0),  # grad-weights + dx
                   seg=lambda: ops.lookup_triton_backward(gy, codes, w, T, False, True))  # sorted table gradient
    default = {name: getattr(tk, name) for names in TILES.values() for name in names}
    res.update(d=d, n=n, tau=tau, dtype="bfloat16", default_tiles=default, sweep={}, errors={}, best_tiles={})
    for kind, fn in kernels.items():
        names = TILES[kind]
        cands = dict.fromkeys([tuple(default[k] for k in names), *map(tuple, s.size["tiles"][kind])])
        fns = {f"{a}x{b}": _with_tiles(tk, names, (a, b), fn) for a, b in cands}
        if kind == "seg":  # the atomic scatter at the default tiles, for comparison
            fns["atomic"] = _with_tiles(tk, TILES["bwd"], [default[k] for k in TILES["bwd"]], fn, "atomic")
        for key, f in list(fns.items()):  # compiles each variant; one that cannot run is recorded and dropped
            try:
                f()
            except Exception as e:
                res["errors"][f"{kind} {key}"] = f"{type(e).__name__}: {e}"[:500]
                del fns[key]
        t = s.time(fns)
        res["sweep"][kind] = t
        best = min((k for k in t if k != "atomic"), key=t.get)
        res["best_tiles"].update(zip(names, map(int, best.split("x"))))
        s.log(f"tiles {kind}: best {best}; " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in t.items()))
    s.data["best_tiles"] = res["best_tiles"]


# ---------------------------------------------------------------------------------------------------------------
# Targets and the Markdown summary
