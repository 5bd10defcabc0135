"""The shape of a Llama-family decoder-only model, read from its Hugging Face config (no weights loaded).

:class:`ModelShape` holds what the memory planner needs: hidden size, layers, attention heads (query and key/value:
grouped-query attention when ``kv_heads < heads``), head dimension, MLP size, vocabulary, tied embeddings, biases
(Qwen2's q/k/v biases, Llama's ``attention_bias`` / ``mlp_bias``) and Qwen3's per-head q/k RMSNorms. Its
:meth:`~ModelShape.parameters` lists every parameter tensor with its HF name and shape, in the order of
``model.named_parameters()``.

Supported ``model_type``: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` (pre-norm decoder layers of q/k/v/o
projections, RoPE, SDPA attention and a SwiGLU MLP). Other types raise ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelShape", "ParamSpec"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its HF name, shape, and whether it belongs to a decoder layer (``layer`` = its index,
    None for the embedding, the final norm and the LM head)."""

    name: str
    shape: tuple[int, ...]
    layer: "int | None" = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _get(config, key: str, default=None):
    if isinstance(config, dict):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-family decoder (all ints are counts, not bytes).

    ``q_out`` = heads·head_dim (q projection outputs, o projection inputs), ``kv_out`` = kv_heads·head_dim.
    """

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported by the memory planner; expected one "
                             f"of {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoder-only models)")
        for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"num_attention_heads ({self.heads}) must be a multiple of num_key_value_heads "
                             f"({self.kv_heads})")

    @classmethod
    def from_config(cls, config, vocab_size: "int | None" = None) -> ModelShape:
        """From an HF config object (``transformers.PretrainedConfig``) or its dict (``config.json``);
        ``vocab_size`` overrides the config's."""
        model_type = _get(config, "model_type")
        if model_type is None:
            raise ValueError("the model config names no model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the memory planner; expected one of "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoder-only models)")
        hidden = _get(config, "hidden_size")
        heads = _get(config, "num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("the model config lacks hidden_size or num_attention_heads")
        attention_bias = bool(_get(config, "attention_bias", False))
        return cls(
            model_type=str(model_type),
            hidden=hidden,
            layers=_get(config, "num_hidden_layers"),
            heads=heads,
            kv_heads=_get(config, "num_key_value_heads", heads),
            head_dim=_get(config, "head_dim", hidden // heads if isinstance(hidden, int) else None),
            intermediate=_get(config, "intermediate_size"),
            vocab=vocab_size if vocab_size is not None else _get(config, "vocab_size"),
            tied_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(_get(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_parameters(self, index: int = 0) -> "list[ParamSpec]":
        """The parameters of decoder layer ``index``, in ``named_parameters()`` order."""
        h, d, i = self.hidden, self.head_dim, self.intermediate
        p = f"model.layers.{index}."
        out = []

        def add(name, *shape):
            out.append(ParamSpec(p + name, tuple(shape), index))

        for proj, n in (("q_proj", self.q_out), ("k_proj", self.kv_out), ("v_proj", self.kv_out)):
            add(f"self_attn.{proj}.weight", n, h)
            if self.qkv_bias:
                add(f"self_attn.{proj}.bias", n)
        add("self_attn.o_proj.weight", h, self.q_out)
        if self.o_bias:
            add("self_attn.o_proj.bias", h)
        if self.qk_norm:
            add("self_attn.q_norm.weight", d)
            add("self_attn.k_norm.weight", d)
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            add(f"mlp.{proj}.weight", *shape)
            if self.mlp_bias:
                add(f"mlp.{proj}.bias", shape[0])
        add("input_layernorm.weight", h)
        add("post_attention_layernorm.weight", h)
        return out

    def parameters(self) -> "list[ParamSpec]":
        """Every parameter tensor of the causal LM (``model.named_parameters()`` order; a tied LM head is the
        embedding and is not listed twice)."""
        out = [ParamSpec("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for index in range(self.layers):
            out += self.layer_parameters(index)
        out.append(ParamSpec("model.norm.weight", (self.hidden,)))
        if not self.tied_embeddings:
            out.append(ParamSpec("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def linear_weights(self) -> "list[ParamSpec]":
        """The weights of one decoder layer's linear layers (those ``fp8coat.convert`` runs as FP8 GEMMs)."""
        return [p for p in self.layer_parameters() if p.name.endswith("_proj.weight")]

    @property
    def n_params(self) -> int:
        return sum(p.numel for p in self.parameters())
