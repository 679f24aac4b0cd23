"""Training-memory accounting: the activation model against what autograd really saves, the parameter and state
counts against the model and its optimizers, and the MF-base conclusions the docs rely on."""

import pytest
import torch

import memoryformer as mf
from memoryformer.footprint import (
    block_activation_bytes,
    footprint,
    head_activation_bytes,
    max_batch,
    parse_bytes,
    report,
)
from memoryformer.model import build_model
from memoryformer.optim import build_optimizer, cast_tables
from memoryformer.train import TrainConfig


def saved_bytes(model, fn):
    """Bytes of the distinct non-parameter storages autograd saves while running fn()."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


CASES = [
    ("micro", {}),
    ("micro-dense", {}),
    ("micro", dict(d_model=64, n_head=2, tau=4)),
    ("micro", dict(weighting="paper")),
    ("micro-dense", dict(d_model=64, n_head=2, ffn_mult=2)),
]


@pytest.mark.parametrize("preset,over", CASES)
def test_activation_model_is_what_autograd_saves(preset, over):
    cfg = mf.get_config(preset, n_layer=2, **over)
    torch.manual_seed(0)
    model = build_model(cfg)
    B, T = 3, 16
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))
    h = model.embed(x[:, :-1]).detach().requires_grad_()
    block = saved_bytes(model, lambda: model.blocks[0](h))
    whole = saved_bytes(model, lambda: model(x[:, :-1], x[:, 1:]))
    assert block == block_activation_bytes(cfg) * B * T
    per_token = (cfg.n_layer * block_activation_bytes(cfg) + head_activation_bytes(cfg)) * B * T
    assert 0 <= whole - per_token <= 64  # + a few scalars of the loss


@pytest.mark.parametrize("preset", ["micro", "tiny", "base", "pythia-70m"])
def test_parameter_counts_match_the_model(preset):
    cfg = mf.get_config(preset)
    with torch.device("meta"):
        n = build_model(cfg).num_params()
    f = footprint(preset, 1, 128)
    assert (f["dense_params"], f["table_params"]) == (n["dense"], n["table"])
    assert f["params"] == 4 * n["total"]


@pytest.mark.parametrize("table_optim,table_dtype", [("adamw", "float32"), ("adamw", "bfloat16"), ("rowwise", "float32"),
                                                     ("partial-rowwise-adam", "bfloat16")])
def test_optimizer_state_matches_the_optimizers(table_optim, table_dtype):
    cfg = mf.get_config("micro", n_layer=1, d_model=32, n_head=2, max_seq_len=32)
    model = build_model(cfg)
    cast_tables(model, table_dtype)
    opt = build_optimizer(model, TrainConfig(out="x", table_optim=table_optim, table_dtype=table_dtype), lr=1e-3,
                          sparse_rows=False)
    x = torch.randint(0, 100, (2, 9))
    model(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    state = sum(v.numel() * v.element_size() for o in opt for st in o.state.values() for k, v in st.items()
                if isinstance(v, torch.Tensor) and k != "step")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    f = footprint(cfg, 2, 8, table_optim=table_optim, table_dtype=table_dtype, device="cpu")
    assert (f["optimizer"], f["grads"], f["params"]) == (state, grads, params)
    opt.release()


def test_sparse_rows_count_touched_rows_only():
    dense = footprint("tiny", 4, 512, table_optim="rowwise", device="cpu")
    sparse = footprint("tiny", 4, 512, table_optim="rowwise", device="cpu", sparse_rows=True)
    trained = footprint("tiny", 4, 512, table_optim="rowwise", device="cpu", sparse_rows=True, hit_fraction=0.1)
    assert trained["table_grads"] < sparse["table_grads"] <= dense["table_grads"] * 1.01
    assert trained["table_grads"] == pytest.approx(0.1 * dense["table_grads"] * (1 + 16 / (4 * 512)), rel=0.2)
    with pytest.raises(ValueError, match="sparse_rows"):
        footprint("tiny", 1, 512, table_optim="adamw", device="cpu", sparse_rows=True)
    with pytest.raises(ValueError, match="sparse_rows"):
        footprint("tiny", 1, 512, table_optim="rowwise", device="cuda", sparse_rows=True)


def test_mf_base_needs_the_light_options_to_fit_80gb():
    faithful = footprint("base", 1, 2048, gpu_mem="80GB")
    light = footprint("base", 4, 2048, table_optim="rowwise", table_dtype="bfloat16", gpu_mem="80GB")
    assert faithful["state"] > 100e9 and not faithful["fits"]  # AdamW + dense gradient: > 100 GB
    assert light["state"] <= 60e9 and light["fits"]
    assert footprint("base", 1, 2048, table_optim="rowwise", gpu_mem="80GB")["state"] <= 60e9
    assert max_batch("base", 2048, table_optim="rowwise", table_dtype="bfloat16") >= 4
    assert max_batch("base", 2048) == 0


def test_accumulation_and_batch_scale_the_right_terms():
    one = footprint("tiny", 2, 512, device="cpu")
    two = footprint("tiny", 4, 512, device="cpu")
    acc = footprint("tiny", 2, 512, accum=2, device="cpu")
    assert two["state"] == one["state"] and two["activations"] == pytest.approx(2 * one["activations"])
    assert acc["state"] == one["state"] and acc["peak"] >= one["peak"]


def test_report_and_bad_input():
    text = report("base", 4, 2048, "rowwise", "bfloat16", gpu_mem="80GB")
    assert "training state" in text and "fits 80 GB: yes" in text
    assert parse_bytes("80GB") == 80e9 and parse_bytes("141 GiB") == 141 * 1024**3 and parse_bytes(8e10) == 8e10
    with pytest.raises(ValueError, match="gpu_mem"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="table_optim"):
        footprint("tiny", table_optim="sgd")
    with pytest.raises(ValueError, match="table_dtype"):
        footprint("tiny", table_dtype="int4")
