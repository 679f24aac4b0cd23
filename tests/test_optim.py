"""Table optimizers and bf16 tables: each rule against a float64 reference, sparse rows against dense gradients,
clipping, the default staying plain AdamW, checkpoint round trips, training with bf16 tables, bad options."""

import json
import lzma
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import memoryformer as mf
from memoryformer import checkpoint as ckpt_io
from memoryformer import data as data_mod
from memoryformer.model import build_model
from memoryformer.ops import cpu, memory_lookup
from memoryformer.optim import (
    RowwiseAdam,
    TableAdamW,
    TrainingOptimizer,
    build_optimizer,
    cast_tables,
    sparse_table_grads,
    stochastic_round,
)
from memoryformer.train import TrainConfig, resume_config, train

OPTIONS = [("adamw", "float32"), ("adamw", "bfloat16"), ("rowwise", "float32"), ("rowwise", "bfloat16"),
           ("partial-rowwise-adam", "float32")]


def small_cfg(**kw):
    return mf.get_config("micro", **{**dict(n_layer=1, d_model=32, n_head=2, max_seq_len=32), **kw})


# ---------------------------------------------------------------------------------------------------------------
# Stochastic rounding


def test_stochastic_round_is_unbiased_and_picks_a_neighbour():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(64), -torch.rand(32) * 1e-3, torch.tensor([1.0, -2.5, 0.0])])  # exact values too
    draws = stochastic_round(x.expand(20000, -1).contiguous()).float()  # (draws, values)
    lo = x.bfloat16().float()
    lo = torch.where(lo.abs() > x.abs(), lo - torch.sign(x) * _ulp(lo), lo)  # bf16 neighbour towards zero
    hi = lo + torch.sign(x) * _ulp(lo)
    assert bool(((draws == lo) | (draws == hi)).all())
    # mean of 20000 Bernoulli roundings: within 5 standard errors of x (an ulp / (2 sqrt(n)) at most)
    err = (draws.double().mean(0) - x.double()).abs()
    assert bool((err <= 5 * _ulp(lo).double() / (2 * 20000**0.5) + 1e-12).all())
    assert torch.equal(draws[:, -3:], x[-3:].expand(20000, -1))  # representable values never move
    assert (draws[:, 0] != draws[0, 0]).any()  # it is random


def _ulp(v: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at |v| (v exactly representable, nonzero)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(1e-30)))
    return torch.pow(2.0, e - 7)


def test_bf16_sr_keeps_small_updates_round_to_nearest_loses():
    w = torch.full((100_000,), 1.0)
    step = 1e-4  # far below bf16's spacing at 1.0 (2^-7)
    sr, rn = w.bfloat16(), w.bfloat16()
    for _ in range(50):
        sr = stochastic_round(sr.float() - step)
        rn = (rn.float() - step).bfloat16()
    assert rn.float().mean().item() == 1.0  # every update lost
    assert sr.float().mean().item() == pytest.approx(1.0 - 50 * step, abs=2e-4)


# ---------------------------------------------------------------------------------------------------------------
# Each rule against a hand-written float64 reference


def _grads(shape, steps, hit_frac=0.5, seed=0):
    """Random gradients with whole rows zero (not hit)."""
    gen = torch.Generator().manual_seed(seed)
    K, R, h = shape
    out = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** torch.empty(K, R, 1).uniform_(-3, 0, generator=gen).double()
        g[torch.rand(K, R, generator=gen) > hit_frac] = 0.0
        if hit_frac < 1:
            g[0, 0] = 0.0  # one row never hit
        out.append(g)
    return out


def adamw_reference(w, grads, lr, b1, b2, eps, wd):
    w, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, 1):
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w


def rowwise_reference(w, grads, lr, b1, b2, eps, wd, momentum, segments):
    """The rule of RowwiseAdam, one row at a time."""
    K, R, h = w.shape
    w, m = w.clone(), torch.zeros_like(w)
    v, n = torch.zeros(K, R, segments, dtype=torch.float64), torch.zeros(K, R, dtype=torch.int64)
    sw = h // segments
    for g in grads:
        for k in range(K):
            for r in range(R):
                gr = g[k, r]
                if not bool((gr != 0).any()):
                    continue
                n[k, r] += 1
                m[k, r] = b1 * m[k, r] + (1 - b1) * gr
                u = m[k, r] / (1 - b1 ** n[k, r].item()) if momentum else gr
                new = w[k, r] * (1 - lr * wd)
                for s in range(segments):
                    seg = slice(s * sw, (s + 1) * sw)
                    v[k, r, s] = b2 * v[k, r, s] + (1 - b2) * (gr[seg] ** 2).mean()
                    vhat = v[k, r, s] / (1 - b2 ** n[k, r].item())
                    new[seg] = new[seg] - lr * u[seg] / (vhat.sqrt() + eps)
                w[k, r] = new
    return w


def _run(opt_cls, w0, grads, dtype=torch.float32, **kw):
    p = torch.nn.Parameter(w0.to(dtype, copy=True))
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach(), opt


def test_table_adamw_matches_reference_and_torch_adamw():
    w0 = torch.randn(3, 4, 6, dtype=torch.float64) * 0.02
    grads = _grads(w0.shape, 6, hit_frac=1.0)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = adamw_reference(w0, grads, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    ours, _ = _run(TableAdamW, w0, grads, **hp)
    torch_w, _ = _run(torch.optim.AdamW, w0, grads, **hp)
    assert torch.allclose(ours.double(), ref, rtol=0, atol=1e-6)
    assert torch.allclose(ours, torch_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("segments", [1, 3])
def test_rowwise_adam_matches_reference(momentum, segments):
    w0 = torch.randn(2, 5, 6, dtype=torch.float64) * 0.02
    grads = _grads(w0.shape, 5, hit_frac=0.6, seed=1)
    ref = rowwise_reference(w0, grads, 1e-2, 0.9, 0.95, 1e-8, 0.1, momentum, segments)
    ours, opt = _run(RowwiseAdam, w0, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                     momentum=momentum, segments=segments)
    assert torch.allclose(ours.double(), ref, rtol=0, atol=1e-6)
    never = torch.stack(grads).abs().sum((0, 3)) == 0  # (K, R) rows no step hit
    assert bool(never.any()) and torch.equal(ours[never], w0.float()[never])  # untouched: no decay either
    assert torch.equal(opt.state[next(iter(opt.state))]["row_step"], (torch.stack(grads).abs().sum(3) > 0).sum(0).int())


def test_bf16_rules_match_reference_on_average():
    """bf16 tables: the fp32 step written back by stochastic rounding stays on the reference in expectation."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 4, 8, dtype=torch.float64) * 0.02
    grads = _grads(w0.shape, 4, hit_frac=1.0, seed=2)
    bf_grads = [g.bfloat16().double() for g in grads]  # bf16 tables get bf16 gradients
    ref = adamw_reference(w0.bfloat16().double(), bf_grads, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    runs = torch.stack([_run(TableAdamW, w0, grads, torch.bfloat16, lr=1e-3, weight_decay=0.1)[0].double()
                        for _ in range(400)])
    assert runs.dtype == torch.float64 and (runs.std(0) > 0).any()
    sem = runs.std(0) / len(runs) ** 0.5  # standard error of the mean of the draws
    assert bool(((runs.mean(0) - ref).abs() <= 5 * sem + 1e-7).all())
    assert ((runs - ref).abs().amax(0) > 10 * sem).any()  # single draws are off by far more than their mean


# ---------------------------------------------------------------------------------------------------------------
# Sparse rows and clipping


def _layer_problem(seed=0, N=64, K=4, R=16, h=12):
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, R, (N, K), generator=gen), torch.rand(N, K, generator=gen) * 2,
                torch.randn(N, h, generator=gen)) for _ in range(6)]
    return torch.randn(K, R, h, generator=gen) * 0.02, batches


def test_touched_rows_backward_matches_float64_dense_gradient():
    w0, batches = _layer_problem(N=200)
    codes, weights, g = batches[0]
    t64 = w0.double().requires_grad_()
    memory_lookup(codes, weights.double(), t64, backend="reference").backward(g.double())
    rows, vals = cpu.touched_rows_backward(g, codes, weights, w0)
    dense = t64.grad.view(-1, w0.shape[-1])
    assert torch.equal(rows, torch.unique(cpu._flat_index(codes, w0.shape[1])))
    assert vals.dtype == torch.float32 and torch.allclose(vals.double(), dense[rows], rtol=1e-5, atol=1e-7)
    untouched = torch.ones(dense.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert bool((dense[untouched] == 0).all())
    rows_bf, vals_bf = cpu.touched_rows_backward(g, codes, weights, w0.bfloat16())  # fp32 sums for bf16 tables
    assert vals_bf.dtype == torch.float32 and torch.equal(rows_bf, rows)
    t = w0.clone().requires_grad_()
    memory_lookup(codes, weights, t, backend="cpu", sparse_grad=True).backward(g)  # the rows through the op
    assert t.grad.is_sparse and torch.allclose(t.grad.to_dense().double(), t64.grad, atol=1e-7)


def test_bf16_table_backward_sums_in_fp32():
    w0, batches = _layer_problem(N=2000, R=16, h=64)
    codes, weights, g = batches[0]
    tb = w0.bfloat16()
    gw64, gt64 = cpu._chunked_backward(g.double(), codes, weights.double(), tb.double(), True, True)
    gw, gt = cpu.backward(g, codes, weights, tb, True, True)
    assert gw.dtype == torch.float32 and gt.dtype == torch.bfloat16
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(gw, gw64) < 1e-5  # fp32 dot products with the bf16 rows
    assert rel(gt, gt64) <= 1.05 * rel(gt64.float().bfloat16(), gt64)  # a single rounding of the fp32 sum


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_rows_equal_dense_gradients(momentum, dtype):
    """Same rule fed by touched rows or by the dense gradient: the same tables."""
    w0, batches = _layer_problem()
    results = []
    for sparse in (False, True):
        torch.manual_seed(1)
        t = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = RowwiseAdam([t], lr=1e-2, weight_decay=0.1, momentum=momentum, segments=2)
        for i in range(0, len(batches), 2):  # two micro-batches per step: sparse gradients add up across them
            for codes, weights, g in batches[i : i + 2]:
                memory_lookup(codes, weights.requires_grad_(), t, backend="cpu", sparse_grad=sparse).backward(g)
            assert t.grad.is_sparse == sparse
            opt.step()
            opt.zero_grad()
        results.append(t.detach().clone())
    a, b = results[0].float(), results[1].float()
    if dtype == torch.float32:
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    else:  # dense bf16 gradients are rounded, the rows stay fp32: a few roundings apart (an update is ~lr = 1e-2)
        assert torch.allclose(a, b, rtol=0, atol=5e-4) and (a == b).float().mean() > 0.5
    assert not torch.equal(results[0].float(), w0.to(dtype).float())


def _model_and_batch(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(small_cfg(**kw))
    x = torch.randint(0, 200, (4, 17), generator=torch.Generator().manual_seed(seed))
    return model, x


def _tcfg(table_optim="adamw", table_dtype="float32", **kw):
    return TrainConfig(out="unused", table_optim=table_optim, table_dtype=table_dtype, **kw)


def test_clipping_sees_the_row_gradients():
    norms, tables = [], []
    for sparse in (False, True):
        model, x = _model_and_batch()
        opt = build_optimizer(model, _tcfg("rowwise"), lr=1e-2, sparse_rows=sparse)
        assert opt.sparse == sparse
        model(x[:, :-1], x[:, 1:])[1].backward()
        norms.append(opt.clip_grad_norm_(0.05))  # well below the norm: every gradient is scaled
        opt.step()
        tables.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("tables")]))
        opt.release()
    assert norms[0] > 0.05 and norms[1].item() == pytest.approx(norms[0].item(), rel=1e-5)
    assert torch.allclose(tables[0], tables[1], rtol=0, atol=1e-6)


def test_default_is_the_plain_adamw_recipe():
    model, x = _model_and_batch()
    ref_model, _ = _model_and_batch()
    opt = build_optimizer(model, _tcfg(), lr=3e-3)
    (inner,) = list(opt)
    assert type(inner) is torch.optim.AdamW and [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "tables"]
    ref = torch.optim.AdamW(ref_model.param_groups(0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, None)):
            m(x[:, :-1], x[:, 1:])[1].backward()
        opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


def test_groups_and_state_of_the_row_wise_options():
    model, _ = _model_and_batch()
    opt = build_optimizer(model, _tcfg("partial-rowwise-adam"), lr=1e-3)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay", "tables", "tables_qkv"]
    qkv = model.blocks[0].attn.qkv.tables
    rw = opt.optimizers[1]
    assert rw.param_groups[1]["segments"] == 3 * 2 and rw.param_groups[0]["segments"] == 1
    st = rw.state[qkv]
    assert st["row_sq"].shape == (*qkv.shape[:2], 6) and st["exp_avg"].shape == qkv.shape
    opt.release()
    with pytest.raises(mf.ConfigError, match="table_dtype: 'bfloat16', but the model's tables are torch.float32"):
        build_optimizer(model, _tcfg("rowwise", "bfloat16"), lr=1e-3)
    cast_tables(model, "bfloat16")
    assert qkv.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.float32
    build_optimizer(model, _tcfg("rowwise", "bfloat16"), lr=1e-3).release()


def test_sparse_grad_is_a_layer_setting_released_with_the_optimizer():
    model, x = _model_and_batch()
    layers = [m for m in model.modules() if isinstance(m, mf.MemoryLayer)]
    opt = build_optimizer(model, _tcfg("rowwise"), lr=1e-3)
    assert opt.sparse and layers and all(m.sparse_grad for m in layers) and opt.sparse_layers == layers
    model(x[:, :-1], x[:, 1:])[1].backward()
    assert all(m.tables.grad.is_sparse for m in layers)
    opt.release()
    assert not opt.sparse and not any(m.sparse_grad for m in layers)
    assert build_optimizer(model, _tcfg("rowwise"), lr=1e-3).sparse and build_optimizer(model, _tcfg(), lr=1e-3)
    assert not any(m.sparse_grad for m in layers)  # a later optimizer without the row-wise rule: dense again
    with pytest.raises(ValueError, match="sparse_rows"):
        sparse_table_grads([mf.MemoryLayer(8, 4, tau=4, device="meta")])


def test_other_backends_give_dense_table_gradients_that_still_train():
    model, x = _model_and_batch()
    opt = build_optimizer(model, _tcfg("rowwise"), lr=1e-3)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"  # autograd through indexing: a dense table gradient
    model(x[:, :-1], x[:, 1:])[1].backward()
    qkv = model.blocks[0].attn.qkv.tables
    assert not qkv.grad.is_sparse
    before = qkv.detach().clone()
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert not torch.equal(before, qkv)
    opt.release()


def test_bad_options_name_the_field():
    with pytest.raises(mf.ConfigError, match="table_optim"):
        TrainConfig(table_optim="sgd")
    with pytest.raises(mf.ConfigError, match="table_dtype"):
        TrainConfig(table_dtype="fp16")
    with pytest.raises(mf.ConfigError, match="table_dtype"):
        cast_tables(build_model(small_cfg()), "int8")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: the optimizer state survives the checkpoint format bit for bit


@pytest.mark.parametrize("table_optim,table_dtype", OPTIONS)
def test_state_dict_round_trip_resumes_bit_identically(tmp_path, table_optim, table_dtype):
    def fresh():
        model, x = _model_and_batch()
        cast_tables(model, table_dtype)
        return model, build_optimizer(model, _tcfg(table_optim, table_dtype), lr=1e-2), x

    def steps(model, opt, x, n):
        for _ in range(n):
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()

    model, opt, x = fresh()
    steps(model, opt, x, 2)
    tensors, rest = ckpt_io._flatten_optimizer(get_optimizer_state_dict(model, opt))
    assert any(k.endswith("tables/" + ("exp_avg" if table_optim != "rowwise" else "row_sq")) for k in tensors)
    save_file(tensors, tmp_path / "opt.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    json.dumps(rest)  # the rest goes to trainer.json
    rng = torch.get_rng_state()
    steps(model, opt, x, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    opt.release()

    model2, opt2, _ = fresh()
    model2.load_state_dict(load_file(tmp_path / "model.safetensors"))
    osd = ckpt_io._unflatten_optimizer(load_file(tmp_path / "opt.safetensors"), json.loads(json.dumps(rest)))
    set_optimizer_state_dict(model2, opt2, osd)
    torch.set_rng_state(rng)
    steps(model2, opt2, x, 2)
    got = model2.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    opt2.release()


# ---------------------------------------------------------------------------------------------------------------
# Through the trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ocorpus")
    with lzma.open(data_mod.SAMPLE_FILES["val"], "rt", encoding="utf-8") as f:
        books = [json.loads(line)["text"] for line in f]
    (d / "toy.train.jsonl").write_text(json.dumps({"text": books[0][:25_000]}) + "\n")
    (d / "toy.val.jsonl").write_text(json.dumps({"text": books[2][:12_000]}) + "\n")
    return d


def _train_cfg(corpus, out, **kw):
    base = dict(data=str(corpus), out=str(out), batch_size=4, seq_len=32, max_steps=6, eval_every=0,
                eval_tokens=256, log_every=1, ckpt_every=3, deterministic=True, progress=False, verbose=False,
                cache_dir=str(corpus / "cache"), micro_batch_size=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def test_bf16_rowwise_training_learns_and_resumes_bit_identically(corpus, tmp_path):
    a = tmp_path / "a"
    train(small_cfg(), _train_cfg(corpus, a, table_optim="rowwise", table_dtype="bfloat16", max_steps=12, ckpt_every=6))
    recs = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    weights = load_file(a / "final" / "model.safetensors")
    assert weights["blocks.0.mlp.l1.tables"].dtype == torch.bfloat16 and weights["embed.weight"].dtype == torch.float32
    opt_state = load_file(a / "final" / "optimizer.safetensors")
    assert {"blocks.0.attn.qkv.tables/row_sq", "blocks.0.attn.qkv.tables/row_step"} <= set(opt_state)
    assert mf.load(a).blocks[0].mlp.l1.tables.dtype == torch.float32  # loads as an ordinary model

    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(a / "ckpt-6", b / "ckpt-6")
    cfg, t, _ = resume_config(b)
    assert (t.table_optim, t.table_dtype) == ("rowwise", "bfloat16")
    train(cfg, t, resume=b)
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(a / "final" / name), load_file(b / "final" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ckpt_io.CheckpointError, match="table_optim"):
        resume_config(b, table_optim="adamw")


def test_cli_flags_reach_the_config():
    import argparse

    from memoryformer.cli.train import add_train

    p = argparse.ArgumentParser()
    add_train(p)
    args = p.parse_args(["--table-optim", "partial-rowwise-adam", "--table-dtype", "bfloat16"])
    assert (args.table_optim, args.table_dtype) == ("partial-rowwise-adam", "bfloat16")
    with pytest.raises(SystemExit):
        p.parse_args(["--table-optim", "lion"])


def test_training_optimizer_is_what_dcp_expects():
    model, _ = _model_and_batch()
    opt = build_optimizer(model, _tcfg("rowwise", "float32"), lr=1e-3)
    assert isinstance(opt, TrainingOptimizer) and len(list(opt)) == 2
    osd = get_optimizer_state_dict(model, opt)
    assert "blocks.0.mlp.l2.tables" in osd["state"] and "embed.weight" in osd["state"]
    assert {g["name"] for g in osd["param_groups"]} == {"decay", "no_decay", "tables", "tables_qkv"}
    opt.release()
