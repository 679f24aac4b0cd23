import json

import pytest

import memoryformer as mf
from memoryformer.config import ModelConfig


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("arch", "rnn", "arch"),
        ("n_layer", 0, "n_layer"),
        ("n_layer", 2.5, "n_layer"),
        ("d_model", "512", "d_model"),
        ("n_head", 7, "n_head.*d_model=512"),
        ("tau", 7, "tau.*d_model=512"),
        ("tau", 0, "tau"),
        ("expand_bits", 5, "expand_bits"),
        ("weighting", "softmax", "weighting"),
        ("temperature", 0.0, "temperature"),
        ("block_activation", "relu", "block_activation"),
        ("rotary_pct", 1.5, "rotary_pct"),
        ("memory_bias", "yes", "memory_bias"),
        ("vocab_size", True, "vocab_size"),
    ],
)
def test_invalid_fields_name_the_field(field, value, match):
    with pytest.raises(mf.ConfigError, match=match):
        mf.get_config("tiny", **{field: value})


def test_unknown_key_and_preset():
    with pytest.raises(mf.ConfigError, match="unknown config key 'n_layers'"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(mf.ConfigError, match="unknown preset 'huge'.*tiny"):
        mf.get_config("huge")


def test_presets_match_the_paper():
    for name, (layers, d, heads, K) in {"tiny": (6, 512, 8, 64), "small": (12, 768, 12, 96), "base": (24, 1024, 16, 128)}.items():
        cfg = mf.get_config(name)
        assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_tables, cfg.tau) == (layers, d, heads, K, 8)
        assert cfg.block_hidden == 10 * K and cfg.vocab_size == 50304 and cfg.max_seq_len == 2048
    micro = mf.get_config("micro")
    assert micro.arch == "memoryformer" and mf.get_config("micro-dense").arch == "transformer"
    assert (micro.n_layer, micro.d_model, micro.n_head, micro.tau) == (4, 128, 4, 8)


def test_json_roundtrip(tmp_path):
    cfg = mf.get_config("small", weighting="paper", block_activation="gelu")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["weighting"] == "paper"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(mf.MemoryFormerError, match="bad.json: not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")
    assert cfg.replace(tau=4).n_tables == 192
