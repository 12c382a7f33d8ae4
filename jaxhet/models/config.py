"""Configuration of a Llama-family decoder, as plain frozen data.

The fields mirror Hugging Face's `LlamaConfig` so that a checkpoint's `config.json` maps onto it one to one;
`from_hf_dict` / `to_hf_dict` do that mapping and reject what this model cannot represent, naming the field.
Qwen2, Mistral and Qwen3 are the same decoder configured differently (`ARCHITECTURES`): Qwen2 has biases on the
query, key and value projections (`qkv_bias`), Mistral may attend over a sliding window (`sliding_window`), Qwen3
normalises each head's queries and keys before the rotary embedding (`qk_norm`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

ATTENTION_BACKENDS = ("xla", "cudnn", "flash", "block_sparse", "sage")
TRAINABLE_BACKENDS = ("xla", "cudnn", "flash", "block_sparse")  # `sage` is a quantised inference kernel
DTYPES = ("float32", "bfloat16", "float16")
# Hugging Face class name -> model_type of every architecture this decoder represents.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# transformers' `Qwen3Config` default, used when a qwen3 `config.json` leaves `head_dim` out.
_QWEN3_HEAD_DIM = 128


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type: llama3` in a HF config)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters; `attention_backend` selects the
    implementation behind the model's single attention dispatch point. `tensor_parallel_axis` is set only on the
    per-shard specialisation of a config (see `jaxhet.parallel`): head counts and `intermediate_size` are then the
    shard's own, and the row-parallel projections sum their partial outputs over that `shard_map` axis.
    `context_parallel_axis` likewise marks a specialisation whose sequence is split over that axis: each shard
    holds a contiguous slice of every row, and attention gathers keys and values from the others.
    `architecture` is the Hugging Face model_type the config is saved as; `qkv_bias` puts biases on the query, key
    and value projections only (Qwen2; `attention_bias` puts them on all four, as Llama's config does);
    `sliding_window` lets each query see only the last that many positions, itself included (Mistral); `qk_norm`
    applies an RMSNorm over `head_dim` (one weight shared by all heads) to each head's queries and keys after the
    projections and before the rotary embedding (Qwen3).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_backend: str = "xla"
    tensor_parallel_axis: str | None = None
    context_parallel_axis: str | None = None
    architecture: Literal["llama", "qwen2", "mistral", "qwen3"] = "llama"
    qkv_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False

    def __post_init__(self) -> None:
        model_types = tuple(ARCHITECTURES.values())
        if self.architecture not in model_types:
            raise ConfigError(f"architecture must be one of {', '.join(model_types)}, got {self.architecture!r}")
        if self.qkv_bias != (self.architecture == "qwen2"):
            raise ConfigError("qkv_bias is what makes a qwen2 model: set it exactly when architecture is 'qwen2'")
        if self.qk_norm != (self.architecture == "qwen3"):
            raise ConfigError("qk_norm is what makes a qwen3 model: set it exactly when architecture is 'qwen3'")
        if self.sliding_window is not None and (self.architecture != "mistral" or self.sliding_window < 1):
            raise ConfigError(
                f"sliding_window must be a positive integer on a mistral model, got {self.sliding_window!r} "
                f"on {self.architecture!r}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}) "
                    "when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, vocab_size: int = 264, **overrides: Any) -> LlamaConfig:
        """A model small enough to train in minutes on two CPU cores (about 0.9M parameters)."""
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=344,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
        """Map a Hugging Face `config.json` (transformers 4.x or 5.x layout) onto a `LlamaConfig`."""
        architectures = hf.get("architectures") or ["LlamaForCausalLM"]
        model_types = {ARCHITECTURES.get(a) for a in architectures}
        if len(model_types) != 1 or None in model_types or hf.get("model_type", "llama") not in model_types:
            supported = ", ".join(f"{name} (model_type {kind!r})" for name, kind in ARCHITECTURES.items())
            raise ConfigError(
                f"unsupported architecture {architectures} (model_type {hf.get('model_type')!r}); "
                f"supported: {supported}"
            )
        (architecture,) = model_types
        _refuse_unsupported_fields(hf, architecture)
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {hf['hidden_act']!r}")
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in hf:
                raise ConfigError(f"config.json is missing the field {required!r}")
        rope_theta, rope_scaling = _rope_from_hf(hf)
        fields: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim", _QWEN3_HEAD_DIM if architecture == "qwen3" else None),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            bos_token_id=_first_token_id(hf.get("bos_token_id")),
            eos_token_id=_first_token_id(hf.get("eos_token_id")),
            architecture=architecture,
            qkv_bias=architecture == "qwen2",
            sliding_window=hf.get("sliding_window") if architecture == "mistral" else None,
            qk_norm=architecture == "qwen3",
        )
        torch_dtype = hf.get("dtype") or hf.get("torch_dtype")
        if torch_dtype in DTYPES:
            fields["param_dtype"] = torch_dtype
            fields["dtype"] = torch_dtype
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` Hugging Face's class for `architecture` loads (legacy rope keys, read by 4.x and 5.x)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        by_architecture = {
            "llama": {},
            "qwen2": {"use_sliding_window": False},
            "mistral": {"sliding_window": self.sliding_window},
            "qwen3": {"use_sliding_window": False},
        }
        (name,) = [name for name, kind in ARCHITECTURES.items() if kind == self.architecture]
        return {
            "architectures": [name],
            "model_type": self.architecture,
            **by_architecture[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype,
        }


def _refuse_unsupported_fields(hf: dict[str, Any], architecture: str) -> None:
    """Raise naming the field when `hf` asks for attention this decoder does not do: Qwen's sliding-window layers."""
    if architecture not in ("qwen2", "qwen3"):
        return
    name = "Qwen2" if architecture == "qwen2" else "Qwen3"
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{name}'s use_sliding_window is not supported; set it to false")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ConfigError(
            f"{name}'s layer_types must all be 'full_attention' (sliding-window layers are not supported), "
            f"got {sorted(layer_types)}"
        )


def _first_token_id(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE settings from either `rope_theta` + `rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type must be one of {', '.join(SUPPORTED_ROPE_TYPES)}, got {rope_type!r}")
    if rope_type == "default":
        return rope_theta, None
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ConfigError(f"rope_scaling of type 'llama3' is missing the field {missing.args[0]!r}") from None
    return rope_theta, scaling
