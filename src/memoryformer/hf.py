"""Hugging Face `transformers` integration (optional extra `hf`).

    import memoryformer.hf as mhf
    hf_model = mhf.from_memoryformer("runs/tiny/final")        # or a model object
    hf_model.save_pretrained("tiny-hf"); mhf.tokenizer().save_pretrained("tiny-hf")

    from transformers import AutoModelForCausalLM, AutoTokenizer   # after `import memoryformer.hf`
    model = AutoModelForCausalLM.from_pretrained("tiny-hf")
    tok = AutoTokenizer.from_pretrained("tiny-hf")
    out = model.generate(**tok("Once upon a time", return_tensors="pt"), max_new_tokens=20)

Importing this module registers the model type "memoryformer" with AutoConfig and AutoModelForCausalLM. The wrapper
holds the library's own model (MemoryFormer or the dense control) under `.model`; its weights keep their names
with a `model.` prefix, and `config.memoryformer` is the ModelConfig as a dict. Forward takes `input_ids`,
`labels` (shifted inside, -100 ignored) and an all-ones `attention_mask`; padded batches are refused with a clear
error rather than scored wrongly. `generate` decodes from the library's own static `KVCache` (the same cached forward
as `memoryformer.generate` and the zero-shot scorer), kept on the wrapper: each step feeds only the tokens the cache
does not hold yet, and a new prompt (any change of the tokens already cached) starts a fresh cache.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"memoryformer.hf needs transformers: pip install 'memoryformer[hf]' ({e})") from None

from memoryformer.config import ModelConfig
from memoryformer.model import KVCache, Rotary, build_model

MODEL_TYPE = "memoryformer"


class MemoryFormerHFConfig(PretrainedConfig):
    """`memoryformer`: the library's ModelConfig (as a dict), mirrored into the fields transformers reads."""

    model_type = MODEL_TYPE

    def __init__(self, memoryformer: dict | None = None, **kwargs):
        cfg = ModelConfig.from_dict(memoryformer) if memoryformer is not None else ModelConfig()
        self.memoryformer = cfg.to_dict()
        # the generic names generation and tooling look up
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layer
        self.num_attention_heads = cfg.n_head
        self.max_position_embeddings = cfg.max_seq_len
        for key in ("bos_token_id", "eos_token_id"):
            kwargs.setdefault(key, 0)  # <|endoftext|> of the GPT-NeoX-20B tokenizer
        kwargs.setdefault("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.memoryformer)


class MemoryFormerForCausalLM(PreTrainedModel, GenerationMixin):
    """A MemoryFormer (or its dense control) as a transformers causal LM."""

    config_class = MemoryFormerHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MemoryFormerBlock", "TransformerBlock"]

    def __init__(self, config: MemoryFormerHFConfig, model: torch.nn.Module | None = None):
        super().__init__(config)
        self.model = model if model is not None else build_model(config.model_config)
        self._cache: KVCache | None = None  # generation state: the cache and the token ids it holds
        self._cached_ids: torch.Tensor | None = None
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # the model keeps its own KVCache (see the module docstring)
        return False

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # weights come from the library's own init (or the checkpoint); rotary tables are buffers not saved
        if isinstance(module, Rotary) and module.cos.device.type != "meta":
            module.reset_parameters()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds=None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutput:
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: not supported by memoryformer; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids: required")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padded batches are not supported by memoryformer; pass equal-length "
                             "rows (or one row at a time)")
        cache = kwargs.get("memoryformer_cache")
        max_len = self.model.config.max_seq_len
        if cache is None and input_ids.shape[1] > max_len:
            input_ids = input_ids[:, -max_len:]  # as memoryformer.generate: the model sees its window
            labels = None if labels is None else labels[:, -max_len:]
        logits, _ = self.model(input_ids, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Feed only the tokens the KV cache does not hold yet (all of them for a new prompt)."""
        B, T = input_ids.shape
        if not self.model.supports_kv_cache() or T > self.model.config.max_seq_len:
            self._cache = self._cached_ids = None  # past the window every step re-reads it, as memoryformer.generate
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        c, ids = self._cache, self._cached_ids
        fresh = (c is None or c.batch != B or ids is None or T <= c.length or ids.device != input_ids.device
                 or not torch.equal(input_ids[:, : c.length], ids))
        if fresh:
            self._cache = c = KVCache.for_model(self.model, B)
        new = input_ids[:, c.length :]
        self._cached_ids = input_ids
        return {"input_ids": new, "attention_mask": None, "memoryformer_cache": c}


def register() -> None:
    """Register "memoryformer" with AutoConfig / AutoModelForCausalLM (done on import; safe to call again)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, MemoryFormerHFConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MemoryFormerHFConfig, MemoryFormerForCausalLM)
    except ValueError:
        pass


def from_memoryformer(model_or_path: torch.nn.Module | str | os.PathLike) -> MemoryFormerForCausalLM:
    """Wrap a library model (or load a checkpoint folder) as a transformers model; weights are shared, not copied."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from memoryformer.checkpoint import load_model

        model = load_model(model_or_path)
    else:
        model = model_or_path
    if any(getattr(m, "activation_dtype", None) is not None for m in model.modules()):
        raise ValueError("model: tables frozen by memoryformer.freeze cannot be wrapped for transformers; wrap the trained "
                         "model and convert afterwards")
    hf = MemoryFormerForCausalLM(MemoryFormerHFConfig(memoryformer=model.config.to_dict()), model=model)
    return hf.eval() if not model.training else hf


def tokenizer():
    """The bundled GPT-NeoX-20B tokenizer as a transformers PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    from memoryformer.data import TOKENIZER_FILE

    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


register()
