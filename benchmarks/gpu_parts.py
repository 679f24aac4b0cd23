"""Parts b-f of benchmarks/gpu_suite.py (part a is in gpu_correctness.py); see gpu_suite.py for what each
measures. Every candidate inside a part runs through `Suite.attempt` (an error is recorded and the next candidate
runs) and the results are saved after each one."""

from __future__ import annotations

import time

import torch
from gpu_common import Suite, block, free, step, use_triton
from gpu_report import H100_EBAG_FWDBWD
from kernel_timing import sync, time_interleaved

from memoryformer import MemoryLayer, build_model, get_config
from memoryformer.generate import generate
from memoryformer.model import MemoryFormerBlock, TransformerBlock

PAIRS = (("tiny", "pythia-70m"), ("small", "pythia-160m"), ("base", "pythia-410m"))


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
        if not s.fits(s.size["est"]["layer"], f"b layer {mode}", "b"):
            continue
        res[mode] = {}

        def measure():
            t = s.time({k: step(m, x, mode) for k, m in mods.items()})
            return dict(linear_s=t["linear"], memory_layer_s=t["memory_layer"], ratio=t["memory_layer"] / t["linear"])
        if s.attempt(res[mode], measure) and mode == "fwd":  # bf16 rows gathered per forward
            res["row_bytes_per_s"] = n * (d // tau) * d * 2 / res["fwd"]["memory_layer_s"]
        s.log(f"layer {mode}: {res[mode]}")
        s.save()
        if s.poisoned():
            return


def _block_pair(s: Suite, mf_name: str, dense_name: str, B: int, T: int) -> dict:
    over = {**s.size["over"], "max_seq_len": T}
    mf_cfg, dense_cfg = get_config(mf_name, **over), get_config(dense_name, **over)
    torch.manual_seed(0)
    blocks = dict(pythia=block(dense_cfg, TransformerBlock, s.dev),
                  memoryformer=block(mf_cfg, MemoryFormerBlock, s.dev, torch.bfloat16))
    x = torch.randn(B, T, mf_cfg.d_model, device=s.dev)
    out = dict(d=mf_cfg.d_model, mf=mf_name, dense=dense_name, kernel=use_triton(blocks["memoryformer"]))
    for mode in ("fwd", "fwdbwd"):
        t = s.time({k: step(b, x, mode, autocast=True) for k, b in blocks.items()})
        out[mode] = dict(pythia_s=t["pythia"], memoryformer_s=t["memoryformer"], ratio=t["memoryformer"] / t["pythia"])
    return out


def part_block(s: Suite, res: dict) -> None:
    B, T = s.size["batch"]
    res.update(batch=B, seq=T, autocast="bfloat16", tables="bfloat16", blocks=[],
               h100_embedding_bag_fwdbwd_ratio=H100_EBAG_FWDBWD)
    for mf_name, dense_name in s.size["blocks"]:
        if not s.fits(s.size["est"]["block"], f"c block {mf_name}", "c"):
            continue
        entry = dict(mf=mf_name, dense=dense_name)
        res["blocks"].append(entry)
        s.attempt(entry, lambda: _block_pair(s, mf_name, dense_name, B, T))
        s.log(f"block {mf_name}: fwd {entry.get('fwd')}, fwd+bwd {entry.get('fwdbwd')}")
        free()
        s.save()
        if s.poisoned():
            return


# ---------------------------------------------------------------------------------------------------------------
# d. training


def _train_rate(s: Suite, name: str, B: int, T: int, warmup: int, steps: int) -> dict:
    dev = s.dev
    cfg = get_config(name, **{**s.size["over"], "max_seq_len": T})
    torch.manual_seed(0)
    with dev:  # MF-small holds 1.9 B parameters: initialise them on the device
        model = build_model(cfg)
    kernel = use_triton(model)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
    idx, tgt = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def one_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            _, loss = model(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        one_step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
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
            if s.fits(s.size["est"]["train"], f"d training {name}", "d"):
                s.attempt(res["models"].setdefault(name, {}), lambda: _train_rate(s, name, B, T, warmup, steps))
                s.log(f"train {name}: {res['models'][name]}")
                free()
                s.save()
                if s.poisoned():
                    return
        rates = [res["models"].get(n, {}).get("tokens_per_s") for n in pair]
        if all(rates):
            res["ratios"]["/".join(pair)] = rates[0] / rates[1]


# ---------------------------------------------------------------------------------------------------------------
# e. tiles


def part_tiles(s: Suite, res: dict) -> None:
    from memoryformer.ops import triton_kernels as tk

    (d, n), tau, dev = s.size["layer"], s.size["tau"], s.dev
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, generator=g, dtype=torch.bfloat16)
    T = (0.02 * torch.randn(d // tau, 2**tau, d, device=dev, generator=g)).to(torch.bfloat16)
    gy = torch.randn(n, d, device=dev, generator=g, dtype=torch.bfloat16)
    _, codes, w = tk.layer_fused(x, T, tau, True, 1.0)
    kernels = dict(fwd=lambda c: tk.layer_fused(x, T, tau, True, 1.0, c),  # hash + gather forward
                   bwd=lambda c: tk.layer_input_grad(gy, x, codes, T, tau, True, 1.0, c),  # grad-weights + dx
                   seg=lambda c: tk.backward(gy, codes, w, T, False, True, c))  # sorted table gradient
    default = tk.DEFAULT
    res.update(d=d, n=n, tau=tau, dtype="bfloat16", default_tiles={k: list(getattr(default, k)) for k in kernels},
               sweep={}, errors={}, best_tiles={})
    for kind, fn in kernels.items():
        configs = {f"{a}x{b}": default._replace(**{kind: (a, b)})
                   for a, b in dict.fromkeys([getattr(default, kind), *map(tuple, s.size["tiles"][kind])])}
        if kind == "seg":  # the atomic scatter at the default tiles, for comparison
            configs["atomic"] = default._replace(table_grad="atomic")
        times = res["sweep"][kind] = {}
        for key, cfg in configs.items():  # each variant compiles on its first call; one that fails is recorded
            if not s.fits(s.size["est"]["tile"], f"e tiles {kind} {key}", "e"):
                break
            entry = {}
            if s.attempt(entry, lambda: s.time({key: lambda: fn(cfg)}, s.size["timing"][2] / len(configs))):
                times[key] = entry[key]
            else:
                res["errors"][f"{kind} {key}"] = f"{entry['error']['type']}: {entry['error']['message']}"[:500]
            s.save()
            if s.poisoned():
                return
        best = min((k for k in times if k != "atomic"), key=times.get, default=None)
        if best:
            res["best_tiles"][kind] = [int(v) for v in best.split("x")]
        s.log(f"tiles {kind}: best {best}; " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in times.items()))
    s.data["best_tiles"] = res["best_tiles"]


# ---------------------------------------------------------------------------------------------------------------
# f. decoding


def _hf_pythia(cfg, dev):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                           num_attention_heads=cfg.n_head, intermediate_size=cfg.ffn_mult * cfg.d_model,
                           max_position_embeddings=cfg.max_seq_len, use_parallel_residual=True,
                           tie_word_embeddings=False)
    return GPTNeoXForCausalLM(hf_cfg).to(device=dev, dtype=torch.bfloat16).eval()


def _decoder(s: Suite, name: str, prompt: torch.Tensor, new: int):
    """A closure decoding `new` tokens greedily from `prompt` (batch 1, bf16) with the candidate `name`."""
    P, dev = prompt.shape[1], s.dev
    if name in ("memoryformer", "dense_pythia"):  # the repo's models through the same generate(): like with like
        torch.manual_seed(0)
        with dev:
            model = build_model(get_config("tiny" if name == "memoryformer" else "pythia-70m", **s.size["over"]))
        model = model.to(torch.bfloat16).eval()
        use_triton(model)

        def run():
            assert generate(model, prompt, new, temperature=0).shape[1] == P + new
        return run
    hf = _hf_pythia(get_config("pythia-70m", **s.size["over"]), dev)
    compiled = name == "hf_static_compiled"  # static cache: transformers compiles the step and uses CUDA graphs

    def run_hf():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, cache_implementation="static", disable_compile=not compiled, pad_token_id=0)
        assert out.shape[1] == P + new
    return run_hf


def _decode_one(s: Suite, name: str, prompt, new: int, warmup: int, reps: int) -> dict:
    fn = _decoder(s, name, prompt, new)
    t = time.perf_counter()
    fn()  # the first call compiles (Triton JIT; torch.compile and CUDA graph capture for hf_static_compiled)
    sync(s.dev)
    first = time.perf_counter() - t
    sec = time_interleaved({name: fn}, s.dev, warmup=warmup, reps=reps, budget_s=30.0)[name]
    return dict(tokens_per_s=new / sec, first_call_s=first)


def part_decode(s: Suite, res: dict) -> None:
    """Batch-1 greedy decode: MF-tiny and the repo's dense Pythia-70M through the same generate() (the figure the
    target uses), then Hugging Face GPTNeoX at that shape with a static cache, eager and compiled, shown apart.
    MF's figure is saved before any baseline runs."""
    P, new, warmup, reps = s.size["decode"]
    res.update(prompt=P, new_tokens=new, batch=1, dtype="bfloat16", candidates={})
    prompt = torch.randint(0, get_config("tiny", **s.size["over"]).vocab_size, (1, P), device=s.dev)
    for name in ("memoryformer", "dense_pythia", "hf_static_eager", "hf_static_compiled"):
        if not s.fits(s.size["est"][name], f"f decode {name}", "f"):
            continue
        entry = res["candidates"][name] = {}
        s.attempt(entry, lambda: _decode_one(s, name, prompt, new, warmup, reps))
        s.log(f"decode {name}: {entry.get('tokens_per_s', entry.get('error', {}).get('type'))}")
        rates = {k: v["tokens_per_s"] for k, v in res["candidates"].items() if "tokens_per_s" in v}
        if "memoryformer" in rates and "dense_pythia" in rates:
            res["ratio_vs_dense"] = rates["memoryformer"] / rates["dense_pythia"]
        if "memoryformer" in rates:
            res["ratio_vs_hf"] = {k: rates["memoryformer"] / v for k, v in rates.items() if k.startswith("hf")}
        free()
        s.save()
        if s.poisoned():
            return
