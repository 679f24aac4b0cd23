"""The whole GPU check in one command: Triton kernels at real sizes, one layer, one block, training, decoding, tiles.

    PYTHONPATH=src python benchmarks/gpu_suite.py --out "$OUT/gpu"          # one H200: ~5-6 min, at most ~7.5
    PYTHONPATH=src python benchmarks/gpu_suite.py --out /tmp/gpu --parts a,f --time-budget 200
    PYTHONPATH=src python benchmarks/gpu_suite.py --out /tmp/gpu --dry-run  # CPU, Triton interpreter: ~1 min

Parts (letters for --parts):
  a  correctness: fused Triton layer (output, input and table gradients) and lookup op (output, weight and table
     gradients) against the float64 reference and F.embedding_bag; fp32/bf16 tables, d = 512/1024, N = 16384, both
     weightings, sorted and atomic table gradient; torch.library.opcheck of the ops; torch.compile(fullgraph=True)
     of a MemoryFormer block, forward + backward, against eager.
  b  one layer (d = 1024, tau = 8, N = 16384, bf16) against F.linear; row bytes/s of the forward.
  c  one block (B = 8, T = 2048, bf16 autocast, bf16 tables) against the Pythia block, d = 512 / 768 / 1024.
  d  training tokens/s and peak memory, 30 fused-AdamW steps: MF-tiny vs pythia-70m, MF-small vs pythia-160m.
  e  batch-1 greedy decode tokens/s: MF-tiny vs Hugging Face GPTNeoX at the Pythia-70M shape with a static cache.
  f  tile sweep of the forward, grad-weights and table-gradient kernels; the fastest go to `best_tiles`.

Writes DIR/suite.json (every figure, rewritten after each step, so a killed run keeps what it measured) and
DIR/summary.md (device, versions, date, targets met / not met). A part that raises is recorded (type, message,
traceback tail) and the rest still runs; a global time guard (--time-budget, default 450 s) skips what would not fit.
`--dry-run` runs the same code at tiny shapes on CPU under TRITON_INTERPRET=1 (tests/test_gpu_suite.py).
Weights are random and token ids are random: speed does not depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

START = time.monotonic()  # the time budget counts from here, imports included
if "--dry-run" in sys.argv[1:]:  # the interpreter is chosen when triton is imported, so before anything imports it
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_timing import device_name, load, sync, time_interleaved  # noqa: E402

from memoryformer import MemoryLayer, build_model, get_config  # noqa: E402
from memoryformer.generate import generate  # noqa: E402
from memoryformer.model import MemoryFormerBlock, Rotary, TransformerBlock  # noqa: E402
from memoryformer.ops import (  # noqa: E402
    chunk_hash, lookup_embedding_bag, lookup_reference, memory_layer, memory_lookup,
)

PARTS = {"a": "correctness", "b": "layer", "c": "block", "d": "training", "e": "decode", "f": "tiles"}
TILES = dict(fwd=("FWD_BLOCK_N", "FWD_BLOCK_H"), bwd=("BWD_BLOCK_N", "BWD_BLOCK_H"), seg=("SEG_BLOCK_T", "SEG_BLOCK_H"))
TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # max |error| / max |float64 reference|
PAIRS = (("tiny", "pythia-70m"), ("small", "pythia-160m"), ("base", "pythia-410m"))
H100_EBAG_FWDBWD = {512: 5.3, 768: 13.1, 1024: 18.2}  # MF / Pythia block with F.embedding_bag, earlier H100 run
GPU = dict(
    tau=8, dims=(512, 1024), n=16384, chunk=2048, compile=(2, 512, "inductor"), layer=(1024, 16384), blocks=PAIRS,
    batch=(8, 2048), train=PAIRS[:2], steps=(3, 30), decode=(32, 128, 2, 3), over={}, timing=(3, 20, 10.0),
    tiles=dict(fwd=[(16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (32, 32)],
               bwd=[(16, 128), (32, 128), (32, 64), (64, 64), (16, 256)],
               seg=[(8, 128), (16, 128), (32, 128), (16, 64), (16, 256), (32, 64)]),
    est=dict(a=150, b=15, c=50, d=60, e=20, f=45, case=8, compile=60, block=15, train=12, hf_compile=90),
)
DRY = dict(  # the interpreter runs every Triton program in Python: few programs, i.e. small K * 2**tau and N
    tau=2, dims=(8,), n=32, chunk=16, compile=(1, 16, "eager"), layer=(8, 32), blocks=PAIRS[:1],
    batch=(1, 32), train=PAIRS[:1], steps=(1, 1), decode=(4, 2, 0, 1), timing=(1, 1, 1.0),
    over=dict(n_layer=1, d_model=8, n_head=1, max_seq_len=64, tau=2, vocab_size=256),
    tiles=dict(fwd=[(16, 64), (32, 64)], bwd=[(32, 128), (16, 64)], seg=[(16, 128), (8, 64)]),
    est={k: 1 for k in GPU["est"]},
)


class Suite:
    """Run state: sizes, clock and time guard, progress log, and the results written after every step."""

    def __init__(self, args, size: dict, device: torch.device):
        self.args, self.size, self.dev = args, size, device
        self.t0 = START
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = dict(meta=_meta(args, device), parts={}, skipped=[], targets=[], best_tiles={})

    def log(self, msg: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        print(f"[{now} +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def fits(self, seconds: float, what: str) -> bool:
        """Whether `what` (estimated `seconds`) still fits the time budget; if not, record and say so."""
        left = self.args.time_budget - (time.monotonic() - self.t0)
        if seconds <= left:
            return True
        self.data["skipped"].append(f"{what}: needs ~{seconds:.0f} s, {max(left, 0):.0f} s left")
        self.log(f"skip {self.data['skipped'][-1]}")
        return False

    def time(self, fns: dict) -> dict[str, float]:
        warmup, reps, budget = self.size["timing"]
        return time_interleaved(fns, self.dev, warmup=warmup, reps=reps, budget_s=budget)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.data["targets"] = _targets(self.data)
        (self.out / "suite.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        try:
            text = _summary(self.data)
        except Exception as e:  # the JSON holds every figure; a summary bug must not stop the suite
            text = f"# summary failed\n\n```\n{_error(e)['traceback']}\n```\n"
        (self.out / "summary.md").write_text(text)


def _meta(args, device) -> dict:
    import transformers
    import triton

    meta = dict(device=device_name(device), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0], cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(sys.argv), dry_run=args.dry_run, time_budget_s=args.time_budget,
                load_start=load(), triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    if device.type == "cuda":
        meta["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return meta


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
    return sorted({m.kernel() for m in layers})


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
            for weighting in ("code", "paper"):
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
    res.update(d=d, n=n, tau=tau, dtype="bfloat16", kernel=mods["memory_layer"].kernel())
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


def _get(data: dict, *keys):
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data


def _targets(data: dict) -> list[dict]:
    def row(name, value, goal, met, stretch=None):
        shown = "n/a" if value is None else value if isinstance(value, str) else f"{value:.2f}x"
        return dict(target=name, value=value, measured=shown, goal=goal, met=met,
                    **({} if stretch is None else dict(stretch=stretch)))

    res = {k: _get(data, "parts", k, "results") or {} for k in PARTS}
    cases, ops = res["a"].get("cases", []), res["a"].get("opcheck", {})
    seen = (f"{sum(c['ok'] for c in cases)}/{len(cases)} cases, {sum(v == 'ok' for v in ops.values())}/{len(ops)} "
            f"opcheck, compile {_get(res['a'], 'compile', 'ok')}") if cases else None
    out = [row("correctness (a): every case, opcheck and compile check pass", seen, "all pass",
               res["a"].get("all_ok"))]
    blocks = [b for b in res["c"].get("blocks", []) if "fwdbwd" in b]
    big = max(blocks, key=lambda b: b["d"], default=None)
    r = big and big["fwdbwd"]["ratio"]
    out.append(row(f"block fwd+bwd MF / Pythia at d = {big['d'] if big else 1024} (c)", r, "<= 2x (stretch <= 1x)",
                   None if r is None else r <= 2.0, None if r is None else r <= 1.0))
    r = res["d"].get("ratios", {}).get("tiny/pythia-70m")
    out.append(row("MF-tiny training tokens/s / pythia-70m (d)", r, ">= 0.8x", None if r is None else r >= 0.8))
    ratios = res["e"].get("ratio_vs_hf", {})
    r = min(ratios.values()) if ratios else None
    out.append(row("MF-tiny batch-1 decode / fastest HF Pythia-70M static cache (e)", r, ">= 2x",
                   None if r is None else r >= 2.0))
    return out


def _figures(res: dict) -> list[str]:
    """One line per measured figure (or error) of each part."""
    def err(entry):
        return f"{entry.get('error', {}).get('type')}: {entry.get('error', {}).get('message', '')[:200]}"

    out, a, b = [], res["a"], res["b"]
    for c in a.get("cases", []):
        out.append(f"- a {c.get('dtype')} d={c.get('d')} {c.get('weighting')} {c.get('table_grad')}: " + (
            f"max error {c['max_error']:.2e} (tol {c['tol']}) {'ok' if c['ok'] else 'FAIL'}" if "errors" in c
            else err(c)))
    out += [f"- a {k}: {a[k]}"[:600] for k in ("opcheck", "compile") if k in a]
    if "fwd" in b:
        out.append(f"- b layer d={b['d']} N={b['n']}: fwd {b['fwd']['memory_layer_s'] * 1e6:.0f} us = "
                   f"{b['fwd']['ratio']:.2f}x F.linear, {b['row_bytes_per_s'] / 1e12:.2f} TB/s of rows; fwd+bwd "
                   f"{b['fwdbwd']['memory_layer_s'] * 1e6:.0f} us = {b['fwdbwd']['ratio']:.2f}x")
    for blk in res["c"].get("blocks", []):
        fb, h100 = blk.get("fwdbwd"), H100_EBAG_FWDBWD.get(blk.get("d"))
        out.append(f"- c block {blk['mf']}: " + (
            f"d={blk['d']}, MF / Pythia fwd {blk['fwd']['ratio']:.2f}x, fwd+bwd {fb['ratio']:.2f}x "
            f"({fb['memoryformer_s'] * 1e3:.2f} / {fb['pythia_s'] * 1e3:.2f} ms)"
            + (f"; with embedding_bag on an H100: {h100}x" if h100 else "") if fb else err(blk)))
    for name, v in res["d"].get("models", {}).items():
        out.append(f"- d training {name}: " + (f"{v['tokens_per_s']:,.0f} tokens/s, {v['step_s'] * 1e3:.1f} ms/step, "
                   f"peak {v['peak_memory_gb']} GB" if "tokens_per_s" in v else err(v)))
    out += [f"- e decode {k}: {v:,.1f} tokens/s" + (" (HF on an H100 earlier: 255)" if k.startswith("hf") else "")
            for k, v in res["e"].get("tokens_per_s", {}).items()]
    if res["f"].get("sweep"):
        out.append(f"- f best tiles {res['f']['best_tiles']} (default {res['f']['default_tiles']})")
        out += [f"- f {k}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in v.items())
                for k, v in res["f"]["sweep"].items()]
    return out


def _summary(data: dict) -> str:
    m, word = data["meta"], {True: "met", False: "not met", None: "not measured"}
    out = [f"# MemoryFormer GPU suite{' (dry run: CPU, Triton interpreter, tiny shapes)' * m['dry_run']}", "",
           f"- device: **{m['device']}**" + (f" ({m['gpu_memory_gb']} GB)" if "gpu_memory_gb" in m else "")
           + f"; torch {m['torch']} (CUDA {m['cuda']}), "
           f"triton {m['triton']}, transformers {m['transformers']}, python {m['python']}",
           f"- {m['date']}; `{m['command']}`", f"- {m['load_start']} at start, {m.get('load_end', 'n/a')} at end; "
           f"{data.get('elapsed_s')} s of a {m['time_budget_s']:.0f} s budget", "",
           "| target | measured | goal | status |", "|---|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {t['goal']} | {word[t['met']]}"
            + (f" (stretch {word[t['stretch']]})" if "stretch" in t else "") + " |" for t in data["targets"]]
    out += ["", "| part | status | seconds | error |", "|---|---|---|---|"]
    for k, p in data["parts"].items():
        e = p.get("error", {})
        out.append(f"| {k} {p['name']} | {p['status']} | {p.get('seconds', 0):.1f} | "
                   f"{e.get('type', '')} {e.get('message', '')[:150]} |")
    out += ["", "## Figures", ""] + _figures({k: _get(data, "parts", k, "results") or {} for k in PARTS})
    out += ["", "## Skipped by the time guard", ""] + [f"- {x}" for x in data["skipped"]] if data["skipped"] else []
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def run_part(s: Suite, key: str, fn) -> None:
    rec = s.data["parts"][key] = dict(name=PARTS[key], status="running", results={})
    if not s.fits(s.size["est"][key], f"part {key} ({PARTS[key]})"):
        rec["status"] = "skipped"
        s.save()
        return
    s.log(f"part {key} ({PARTS[key]}) ...")
    t = time.monotonic()
    try:
        fn(s, rec["results"])
        rec["status"] = "ok"
    except Exception as e:
        rec.update(status="error", error=_error(e))
        s.log(f"part {key} failed: {type(e).__name__}: {str(e)[:300]}")
    rec["seconds"] = time.monotonic() - t
    _free()
    s.save()
    s.log(f"part {key} {rec['status']} in {rec['seconds']:.1f} s")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for suite.json and summary.md")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--time-budget", type=float, default=450.0, help="seconds; parts that would not fit are skipped")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated letters (default a,b,c,d,e,f)")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.parts.split(",") if k.strip()]
    bad = [k for k in keys if k not in PARTS]
    if bad:
        p.error(f"--parts: unknown part {bad[0]!r} (valid: {', '.join(PARTS)})")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            p.error("--dry-run: triton was imported before TRITON_INTERPRET=1 could be set; run the script directly")
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = Suite(args, DRY if args.dry_run else GPU, device)
    s.log(f"{s.data['meta']['device']}; torch {torch.__version__}, triton {s.data['meta']['triton']}; {load()}")
    fns = dict(a=part_correctness, b=part_layer, c=part_block, d=part_training, e=part_decode, f=part_tiles)
    for k in keys:
        run_part(s, k, fns[k])
    s.data["meta"]["load_end"] = load()
    s.save()
    s.log(f"done; wrote {s.out / 'suite.json'} and {s.out / 'summary.md'}")
    return s.data


if __name__ == "__main__":
    main()
