"""Plain-data configs for the model and its recurrence.

Design choices:
- Dataclasses, not a config framework: the trainer, the sweep planner and the
  tests all build these directly, and `asdict`/`from_dict` round-trip them
  through JSON and checkpoints.
- One dial sets size: `depth`. Width defaults to `depth * 64` rounded up to a
  multiple of `head_dim` (nanochat's rule); `head_dim` is configurable so that
  depth 2-4 models have several heads on a CPU.
- `recurrence=None` is the plain baseline transformer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

INJECTIONS = ("kv", "residual", "both")
PROJECTIONS = ("shared", "layerwise")
STRATEGIES = ("interleaved", "multi_refine", "sequential")
VALUE_EMBEDS = ("none", "alternating", "all")


class ConfigError(ValueError):
    """A config value is out of range; the message names the field and the fix."""


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


@dataclass
class RecurrenceConfig:
    """Latent recurrent memory: m_t = norm(h_source[t-1]), m_0 = 0.

    strategy/passes: `interleaved` with S = passes subset passes, `multi_refine`
    with K = passes refinement passes, or `sequential` (exact token-by-token
    recurrence through the KV cache).
    """

    source_layer: int = -1  # block index; negative counts from the end
    injection: str = "both"  # kv | residual | both
    projection: str = "shared"  # shared | layerwise
    gates: bool = True  # learned per-head gates on the KV memory path (init 1)
    gamma_init: float = 0.1  # per-layer residual-injection scale
    strategy: str = "interleaved"
    passes: int = 2  # S (interleaved) or K (multi_refine)
    refresh_kv: bool = False  # interleaved: re-project unvisited K/V with the latest memory
    detach: bool = False  # multi_refine: no gradient through earlier passes' memory
    loss_weights: list[float] | None = None  # per-pass loss weights (passes + 1 of them)
    # Passes after pass 0 keep no MLP activations for backward and recompute them
    # there instead: less activation memory for about 5% more arithmetic per step.
    recompute_mlp: bool = False

    def validate(self, depth: int) -> None:
        _check_choice("injection", self.injection, INJECTIONS)
        _check_choice("projection", self.projection, PROJECTIONS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        if not -depth <= self.source_layer < depth:
            raise ConfigError(
                f"source_layer={self.source_layer} is outside the model's {depth} blocks; "
                f"use an index in [{-depth}, {depth - 1}] (negative counts from the end)"
            )
        if self.passes < 1:
            raise ConfigError(f"passes={self.passes} must be >= 1 (S for interleaved, K for multi_refine)")
        if self.loss_weights is not None:
            if self.strategy == "sequential":
                raise ConfigError("loss_weights only apply to the interleaved and multi_refine strategies")
            if len(self.loss_weights) != self.passes + 1:
                raise ConfigError(
                    f"loss_weights has {len(self.loss_weights)} entries; give passes + 1 = {self.passes + 1} "
                    "(pass 0 first)"
                )
            if any(w < 0 for w in self.loss_weights) or sum(self.loss_weights) <= 0:
                raise ConfigError("loss_weights must be non-negative with a positive sum")
        if self.recompute_mlp and self.strategy == "sequential":
            raise ConfigError("recompute_mlp only applies to the interleaved and multi_refine strategies "
                              "(the passes after pass 0); drop it for sequential")

    def source_index(self, depth: int) -> int:
        return self.source_layer % depth

    @property
    def uses_kv(self) -> bool:
        return self.injection in ("kv", "both")

    @property
    def uses_residual(self) -> bool:
        return self.injection in ("residual", "both")


@dataclass
class ModelConfig:
    depth: int = 4
    vocab_size: int = 257
    seq_len: int = 256
    head_dim: int = 64
    width: int | None = None  # default: depth * 64 rounded up to head_dim
    n_kv_head: int | None = None  # grouped-query attention; default = n_head
    value_embeds: str = "none"  # none | alternating | all
    softcap: float = 15.0
    rope_base: float = 10000.0
    recurrence: RecurrenceConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.recurrence, dict):
            self.recurrence = RecurrenceConfig(**self.recurrence)
        self.validate()

    @property
    def d_model(self) -> int:
        if self.width is not None:
            return self.width
        return max(1, math.ceil(self.depth * 64 / self.head_dim)) * self.head_dim

    @property
    def n_head(self) -> int:
        return self.d_model // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def has_value_embed(self, layer: int) -> bool:
        if self.value_embeds == "all":
            return True
        if self.value_embeds == "alternating":  # nanochat: alternate, last layer included
            return layer % 2 == (self.depth - 1) % 2
        return False

    def validate(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"depth={self.depth} must be >= 1")
        if self.d_model % self.head_dim:
            raise ConfigError(f"width={self.d_model} is not a multiple of head_dim={self.head_dim}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"n_kv_head={self.kv_heads} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (rotary embeddings)")
        _check_choice("value_embeds", self.value_embeds, VALUE_EMBEDS)
        if self.recurrence is not None:
            self.recurrence.validate(self.depth)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
