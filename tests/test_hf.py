"""Hugging Face wrapper: Auto* registration, save/from_pretrained round trip, loss, generate, clear refusals."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import memoryformer as mf  # noqa: E402
import memoryformer.hf as mhf  # noqa: E402
from memoryformer.generate import generate  # noqa: E402


@pytest.mark.parametrize("preset", ["micro", "micro-dense"])
def test_round_trip_through_auto_classes(tmp_path, preset):
    torch.manual_seed(0)
    extra = {"tau": 4} if preset == "micro" else {}
    model = mf.build_model(mf.get_config(preset, n_layer=2, d_model=32, n_head=2, max_seq_len=64, **extra)).eval()
    mhf.from_memoryformer(model).save_pretrained(tmp_path)
    mhf.tokenizer().save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, mhf.MemoryFormerForCausalLM) and loaded.model.config == model.config
    ids = tok("Once upon a time there was", return_tensors="pt")
    assert ids["input_ids"].tolist() == [mf.data.encode("Once upon a time there was")]
    with torch.no_grad():
        out = loaded(**ids, labels=ids["input_ids"])
        logits = model(ids["input_ids"])[0]
    assert torch.equal(out.logits, logits)  # rotary buffers rebuilt, every weight loaded
    want = torch.nn.functional.cross_entropy(logits[0, :-1], ids["input_ids"][0, 1:])
    torch.testing.assert_close(out.loss, want)
    greedy = loaded.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, generate(model, ids["input_ids"], 8, temperature=0))


def test_refuses_padding_and_frozen_tables(tmp_path):
    model = mf.build_model(mf.get_config("micro", n_layer=1, d_model=32, n_head=2, tau=4, max_seq_len=32)).eval()
    hf = mhf.from_memoryformer(model)
    ids = torch.randint(0, 100, (2, 5))
    with pytest.raises(ValueError, match="attention_mask: padded batches"):
        hf(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="freeze"):
        mhf.from_memoryformer(mf.freeze(model, "int8"))
    assert transformers.AutoConfig.for_model("memoryformer").model_type == "memoryformer"
