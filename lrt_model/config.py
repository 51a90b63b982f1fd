"""Plain-data configs for the model and its recurrence.

Design choices:
- Dataclasses, not a config framework: the trainer, the sweep planner and the
  tests all build these directly, and `asdict`/`from_dict` round-trip them
  through JSON and checkpoints.
- One dial sets size: `depth`. Width defaults to `depth * 64` rounded up to a
  multiple of `head_dim` (nanochat's rule); `head_dim` is configurable so that
  depth 2-4 models have several heads on a CPU.
- `recurrence=None` is the plain baseline transformer.
- `passes_schedule` ([[fraction, passes], ...]) changes S (or K) with training
  progress. `passes` must equal its last value, written out rather than
  derived: the config says in one field what evaluation and the trained model
  use, and a schedule never silently overrides it. The step -> passes rule
  lives only in `RecurrenceConfig.passes_at` / `passes_segments`.
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


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _reached(step: int, total_steps: int, fraction: float) -> bool:
    """The schedule rule: an entry applies from the first step with step / total_steps >= fraction.
    (Float division, not fraction * total_steps: 6 / 10 == 0.6 exactly, 0.6 * 10 > 6.)"""
    return step / total_steps >= fraction


def _first_step(fraction: float, total_steps: int) -> int:
    """The first step at which `fraction` is reached (total_steps when never)."""
    step = max(0, math.floor(fraction * total_steps) - 1)
    while step < total_steps and not _reached(step, total_steps, fraction):
        step += 1
    return step


@dataclass
class RecurrenceConfig:
    """Latent recurrent memory: m_t = norm(h_source[t-1]), m_0 = 0.

    strategy/passes: `interleaved` with S = passes subset passes, `multi_refine`
    with K = passes refinement passes, or `sequential` (exact token-by-token
    recurrence through the KV cache). `passes_schedule` makes S or K a function of the
    training step (`passes_at`); `passes` is then its last value.
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
    # [[progress_fraction, passes], ...]: S (or K) from that fraction of the optimiser steps on;
    # the first fraction is 0.0 and `passes` equals the last value (evaluation's merged view uses it)
    passes_schedule: list[list] | None = None
    # Passes after pass 0 keep no MLP activations for backward and recompute them
    # there instead: less activation memory for about 5% more arithmetic per step.
    recompute_mlp: bool = False

    def __post_init__(self) -> None:
        if self.passes_schedule is not None:  # tuples (YAML, pydantic) and lists (JSON) compare equal after this
            self.passes_schedule = [list(e) if isinstance(e, (list, tuple)) else e for e in self.passes_schedule]

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
        if self.passes_schedule is not None:
            self._validate_schedule()
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

    def _validate_schedule(self) -> None:
        sched = self.passes_schedule
        if self.strategy == "sequential":
            raise ConfigError("passes_schedule only applies to the interleaved and multi_refine strategies; "
                              "drop it for sequential")
        if not isinstance(sched, list) or not sched:
            raise ConfigError("passes_schedule must be a non-empty list of [fraction, passes] pairs, "
                              "e.g. [[0.0, 2], [0.6, 4]]")
        for i, entry in enumerate(sched):
            ok = isinstance(entry, list) and len(entry) == 2 and _is_number(entry[0]) and _is_int(entry[1])
            if not ok or entry[1] < 1 or not 0 <= entry[0] < 1:
                raise ConfigError(f"passes_schedule[{i}]={entry!r} must be a [fraction, passes] pair with "
                                  "0 <= fraction < 1 and an integer passes >= 1")
        fractions = [e[0] for e in sched]
        if fractions[0] != 0:
            raise ConfigError(f"passes_schedule starts at fraction {fractions[0]}; make the first entry [0.0, passes]")
        if any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ConfigError(f"passes_schedule fractions {fractions} must be strictly increasing; sort them "
                              "and drop repeats")
        if self.loss_weights is not None:
            raise ConfigError("loss_weights cannot be combined with passes_schedule (their length is passes + 1, "
                              "which the schedule changes); drop one of them")
        if self.passes != sched[-1][1]:
            raise ConfigError(f"passes={self.passes} must equal passes_schedule's last value {sched[-1][1]} "
                              f"(the S or K the run ends with and evaluates with); set passes={sched[-1][1]}")

    def passes_at(self, step: int, total_steps: int) -> int:
        """S (or K) at optimiser step `step` (0-based) of `total_steps`: the last schedule entry whose
        fraction <= step / total_steps; `passes` without a schedule. Depends on the step alone, so a
        resumed run follows the same schedule."""
        if self.passes_schedule is None:
            return self.passes
        return [p for f, p in self.passes_schedule if _reached(step, total_steps, f)][-1]

    def passes_segments(self, total_steps: int) -> list[tuple[int, int, int]]:
        """(first_step, end_step, passes) runs of equal passes covering steps 0..total_steps-1, as
        `passes_at` assigns them (empty runs left out): what `flops.training_flops` sums over."""
        if self.passes_schedule is None:
            return [(0, total_steps, self.passes)]
        starts = [_first_step(f, total_steps) for f, _ in self.passes_schedule] + [total_steps]
        out = []
        for i, (_, passes) in enumerate(self.passes_schedule):
            start, end = starts[i], starts[i + 1]  # starts never decrease: fractions increase
            if end > start:  # empty when the next entry starts at the same step (it takes over)
                out.append((start, end, passes))
        return out

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
