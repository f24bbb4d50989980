"""Model configs: size presets for the dense anchor and the FlexOlmo config derived from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from transformers import FlexOlmoConfig, Olmo2Config

from flexmoe.errors import FlexMoEError

ROPE_THETA = 500_000.0  # FlexOlmo's default; Olmo2Config's own default (1e4) differs
RMS_NORM_EPS = 1e-6  # FlexOlmo's default; Olmo2Config's own default (1e-5) differs


class Preset(StrEnum):
    TINY = "tiny"
    SMALL = "small"


@dataclass(frozen=True)
class ModelDims:
    """The shape of a dense decoder; vocabulary size comes from the tokenizer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise FlexMoEError(f"--{name.replace('_', '-')}", f"must be positive, got {value}")
        if self.hidden_size % self.num_heads:
            raise FlexMoEError(
                "--hidden-size",
                f"{self.hidden_size} is not divisible by the number of heads ({self.num_heads})",
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise FlexMoEError("--num-heads", "head dimension must be even for rotary embeddings")

    def with_overrides(self, **overrides: int | None) -> ModelDims:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[Preset, ModelDims] = {
    # ~5.5M parameters with a 4096-token vocabulary.
    Preset.TINY: ModelDims(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768),
    # ~36M parameters with an 8192-token vocabulary.
    Preset.SMALL: ModelDims(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536),
}


def olmo2_config(
    dims: ModelDims, *, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int
) -> Olmo2Config:
    """An OLMo-2 config with FlexOlmo's rope theta and norm epsilon and explicit special ids."""
    return Olmo2Config(
        vocab_size=vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_heads,
        max_position_embeddings=dims.max_seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        architectures=["Olmo2ForCausalLM"],
    )


_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
)


def flex_config(
    dense: Olmo2Config | FlexOlmoConfig, *, num_experts: int, top_k: int
) -> FlexOlmoConfig:
    """A FlexOlmo config with ``num_experts`` experts, every other field taken from ``dense``."""
    if not 1 <= top_k <= num_experts:
        raise FlexMoEError("--top-k", f"must be between 1 and {num_experts}, got {top_k}")
    shared: dict[str, Any] = {name: getattr(dense, name) for name in _SHARED_FIELDS}
    return FlexOlmoConfig(
        **shared,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
        architectures=["FlexOlmoForCausalLM"],
    )


def dense_config(flex: FlexOlmoConfig) -> Olmo2Config:
    """The OLMo-2 config of a one-expert FlexOlmo model (the same network)."""
    shared: dict[str, Any] = {name: getattr(flex, name) for name in _SHARED_FIELDS}
    return Olmo2Config(**shared, architectures=["Olmo2ForCausalLM"])


def count_parameters(dims: ModelDims, vocab_size: int) -> int:
    """Parameters of a dense decoder of this shape (untied embeddings)."""
    h, f, n = dims.hidden_size, dims.intermediate_size, dims.num_layers
    per_layer = 4 * h * h + 3 * h * f + 4 * h  # attention, MLP, q/k norms and two layer norms
    return 2 * vocab_size * h + n * per_layer + h
