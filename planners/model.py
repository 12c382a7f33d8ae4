"""`ModelSpec`: the shape of a decoder-only transformer, enough to count its parameters, FLOPs and bytes.

Presets cover common Llama-family models, OPT-30B and the project's tiny Llama; `from_hf_config` reads a Hugging
Face `config.json` (Llama/Mistral/Qwen2-style gated MLPs, or OPT-style two-matrix MLPs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from planners import fields
from planners.errors import SpecError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Decoder shape. `gated_mlp`: three MLP matrices (SwiGLU) instead of two; `tied_embeddings`: one matrix;
    `head_size`: each attention head's width where it is not `hidden_size / num_heads` (Qwen3's `head_dim`)."""

    name: str
    vocab_size: int
    hidden_size: int
    ffn_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    gated_mlp: bool = True
    tied_embeddings: bool = False
    head_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "ffn_size", "num_layers", "num_heads", "num_kv_heads"):
            fields.positive_int(getattr(self, name), f"model.{name}")
        if self.head_size is not None:
            fields.positive_int(self.head_size, "model.head_size")
        elif self.hidden_size % self.num_heads:
            raise SpecError(
                f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )

    def supports_tp(self, tp: int) -> bool:
        """Whether Megatron tensor parallelism of degree `tp` splits heads, kv heads and the FFN width evenly."""
        return self.num_heads % tp == 0 and self.num_kv_heads % tp == 0 and self.ffn_size % tp == 0

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer block (attention, MLP, two norms)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = 2 * h * q + 2 * h * kv
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_size
        return attention + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head plus final norm (the head matrix is counted again when tied: both ends hold a copy)."""
        return self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def num_params(self) -> int:
        head = self.hidden_size if self.tied_embeddings else self.head_params
        return self.num_layers * self.layer_params + self.embedding_params + head

    @classmethod
    def preset(cls, name: str) -> ModelSpec:
        """A named preset; see `PRESETS`."""
        if name not in PRESETS:
            raise SpecError(f"model: unknown preset {name!r}; known: {sorted(PRESETS)} (or a config.json path)")
        return PRESETS[name]

    @classmethod
    def from_hf_config(cls, source: str | Path | dict[str, Any], name: str = "") -> ModelSpec:
        """From a Hugging Face `config.json` (path to the file or its directory, or the parsed dict)."""
        if isinstance(source, dict):
            hf = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"model config not found: {path}")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise SpecError(f"{path}: not valid JSON: {err}") from None
            name = name or path.parent.name
        model_type = hf.get("model_type", "llama")

        def get(*keys: str, default: Any = None) -> Any:
            for key in keys:
                if key in hf:
                    return hf[key]
            if default is None:
                raise SpecError(f"config.json: missing field {keys[0]!r} (model_type {model_type!r})")
            return default

        heads = get("num_attention_heads", "n_head")
        return cls(
            name=name or str(get("_name_or_path", default=model_type)),
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size", "n_embd", "d_model"),
            ffn_size=get("intermediate_size", "ffn_dim", "n_inner"),
            num_layers=get("num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", default=heads),
            gated_mlp=model_type not in ("opt", "gpt2", "gpt_neox", "falcon"),
            tied_embeddings=bool(get("tie_word_embeddings", default=model_type == "opt")),
            head_size=hf.get("head_dim") or (128 if model_type == "qwen3" else None),
        )

    @classmethod
    def resolve(cls, name_or_path: str) -> ModelSpec:
        """A preset name, or a path to a config.json or to a directory holding one."""
        if name_or_path in PRESETS:
            return PRESETS[name_or_path]
        if Path(name_or_path).exists():
            return cls.from_hf_config(name_or_path)
        raise SpecError(
            f"model: {name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor an existing config.json path"
        )


PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("tiny", 264, 128, 344, 4, 4, 2, tied_embeddings=True),
        ModelSpec("llama-2-7b", 32000, 4096, 11008, 32, 32, 32),
        ModelSpec("llama-2-13b", 32000, 5120, 13824, 40, 40, 40),
        ModelSpec("llama-2-70b", 32000, 8192, 28672, 80, 64, 8),
        ModelSpec("llama-3-8b", 128256, 4096, 14336, 32, 32, 8),
        ModelSpec("llama-3-70b", 128256, 8192, 28672, 80, 64, 8),
        ModelSpec("opt-30b", 50272, 7168, 28672, 48, 56, 56, gated_mlp=False, tied_embeddings=True),
    )
}
