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
- Validation checks types first (a config can come from JSON or YAML), then
  ranges, with upper bounds (`MAX_*`) that keep planning instant and
  memory small; every error is one line that names the field.
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

# Upper bounds, far beyond anything trained here; they keep a typo (depth 1e9) from hanging the planner,
# which builds every model on the meta device (milliseconds per block)
MAX_DEPTH = 128
MAX_WIDTH = 1 << 16
MAX_HEAD_DIM = 1024
MAX_SEQ_LEN = 1 << 20
MAX_VOCAB = 1 << 21
MAX_PASSES = 1024
MAX_BATCH = 1 << 40  # tokens (or rows) per step
MAX_SEED = 2**63 - 1  # torch.manual_seed's range; numpy's generators need >= 0
# budgets: FLOPs, tokens and tokens per parameter; 1e30 FLOPs is ~10^5 times the largest training runs
MAX_BUDGET = {"flops": 1e30, "tokens": 1e18, "tokens_per_param": 1e6}


# The views a model is scored in (lrt_model.evaluation.views builds them). Here, torch-free, so the
# platform's readers (compare) share the one rule for which view is the headline.
VIEWS = ("full", "merged", "sequential")


def headline_view(lrt: bool) -> str:
    """What decoding delivers: the true recurrence for LRT, the only pass the baseline has."""
    return "sequential" if lrt else "full"


class ConfigError(ValueError):
    """A config value is out of range; the message names the field and the fix."""


def config_field(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying what its command-line flag and its spec schema are derived from: `help`,
    and optionally `choices`, bounds (`ge`, `gt`, `le`, `lt`), `items` (bounds of a list's numbers),
    `max_length` and `json` (the flag takes a JSON value). `validate()` still checks every value."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_value(text: str):
    import argparse
    import json

    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise argparse.ArgumentTypeError(f"{short_repr(text)} is not JSON") from None


def config_types(cls) -> dict[str, Any]:
    """Each field of a config dataclass -> its type, `X | None` read as X (None = unset)."""
    import types
    import typing

    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        out[name] = tp
    return out


def add_config_arguments(group, cls, defaults: dict | None = None) -> None:
    """One flag per field of the dataclass `cls` (`--source-layer`; a bool that defaults to True gets
    `--no-<name>`), typed, with its choices, default and help. `defaults` overrides a field's default."""
    import typing

    hints = config_types(cls)
    for f in dataclasses.fields(cls):
        default = (defaults or {}).get(f.name, f.default)
        tp = hints[f.name]
        help_ = (f.metadata.get("help") or "").replace("%", "%%") or None  # argparse formats help with %
        if tp is bool:
            if f.default:
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                   help=f"turn off: {help_} (default: {f.name}=%(default)s)")
            else:
                group.add_argument(_flag(f.name), dest=f.name, action="store_true", help=help_)
        elif f.metadata.get("json"):
            group.add_argument(_flag(f.name), dest=f.name, type=_json_value, default=default, help=help_)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            group.add_argument(_flag(f.name), dest=f.name, type=item, nargs="+", default=default, help=help_)
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=tp, default=default, help=help_,
                               choices=f.metadata.get("choices"))


def config_arguments(args, cls) -> dict:
    """The values of `cls`'s fields in parsed arguments (see `add_config_arguments`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name}={short_repr(value)} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _is_number(x: Any) -> bool:
    """A finite int or float (not a bool); an int too large for a float is not one."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(name: str, value: Any, low: int, high: int, hint: str = "") -> None:
    """An integer (not a bool) in [low, high], or a ConfigError naming the field."""
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"{name}={short_repr(value)} must be an integer in [{low}, {high}]{hint}")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite number (not a bool) within the bounds, or a ConfigError naming the field."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ConfigError(f"{name}={short_repr(value)} must be a finite number{' ' + bounds if bounds else ''}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={short_repr(value)} must be true or false")


def short_repr(value: Any, limit: int = 60) -> str:
    """repr for messages: one line, at most `limit` characters (huge ints have no repr)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def from_mapping(cls, d: Any, where: str):
    """cls(**d) for a dataclass, with unknown keys and a non-mapping as ConfigErrors (JSON configs)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of {cls.__name__} fields, got {type(d).__name__}")
    fields = cls.__dataclass_fields__
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])}; allowed keys: {', '.join(fields)}")
    return cls(**d)


# Optimiser settings (lrt_model.optim.OptimConfig): checked here, next to the other configs' rules
LR_FIELDS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "lr_scale")
FRACTION_FIELDS = ("warmup_frac", "warmdown_frac", "final_lr_frac")
MUON_CHOICES = ("auto", "batched", "torch")


def check_optim(optim: Any, prefix: str = "optim.") -> None:
    """Learning rates finite and > 0, weight decay finite and >= 0, Adam betas in [0, 1), fractions in [0, 1]."""
    for name in LR_FIELDS:
        check_number(prefix + name, getattr(optim, name), low=0, low_open=True)
    check_number(prefix + "weight_decay", optim.weight_decay, low=0)
    betas = optim.adam_betas
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{prefix}adam_betas={short_repr(betas)} must be two numbers in [0, 1), e.g. [0.8, 0.95]")
    if optim.reference_batch_tokens is not None:
        check_int(prefix + "reference_batch_tokens", optim.reference_batch_tokens, 1, MAX_BATCH)
    for name in FRACTION_FIELDS:
        check_number(prefix + name, getattr(optim, name), low=0, high=1)
    _check_choice(prefix + "muon", optim.muon, MUON_CHOICES)


# ICL settings (lrt_model.evaluation.DEFAULTS): type and range per key, checked before icl_config compares values
_COUNT = 1 << 20
ICL_RULES = {
    "evals": ("names", None), "ks": ("ints", (1, MAX_SEQ_LEN)), "items": ("int", (1, _COUNT)),
    "choices": ("int", (2, 1024)), "seed": ("int", (0, MAX_SEED)), "score_rows": ("int", (1, _COUNT)),
    "early": ("window", None), "late": ("window", None), "score_views": ("names?", None),
    "task_views": ("names?", None), "core_views": ("names?", None), "recall_queries": ("int", (1, _COUNT)),
    "induction_len": ("int", (1, MAX_SEQ_LEN)), "copy_len": ("int", (1, MAX_SEQ_LEN)), "core_dir": ("str?", None),
    "core_max_per_task": ("int", (-1, _COUNT)), "batch_rows": ("int", (1, _COUNT)),
    "batch_tokens": ("int?", (1, MAX_BATCH)), "cpu_threads": ("int?", (1, 4096)),
}


def check_icl(cfg: Any) -> dict:
    """`lrt_model.evaluation.icl_config(cfg)` after checking each setting's type and range (YAML and JSON give
    any type), so a bad setting is one ConfigError naming it."""
    from .evaluation import icl_config  # the evaluation package imports this module

    if cfg is not None and not isinstance(cfg, dict):
        raise ConfigError(f"icl={short_repr(cfg)} must be a mapping of ICL settings (or null for the defaults)")
    for key, value in (cfg or {}).items():
        if key not in ICL_RULES:
            continue  # icl_config names unknown keys with the allowed ones
        kind, bounds = ICL_RULES[key]
        name = f"icl.{key}"
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if kind == "int":
            check_int(name, value, *bounds)
        elif kind == "ints":
            if not isinstance(value, list) or not value or len(value) > 64:
                raise ConfigError(f"{name}={short_repr(value)} must be a non-empty list of at most 64 integers")
            for v in value:
                check_int(name, v, *bounds)
        elif kind == "names":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}={short_repr(value)} must be a list of names")
        elif kind == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{name}={short_repr(value)} must be a path (a string) or null")
        elif kind == "window" and value is not None:
            if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise ConfigError(f"{name}={short_repr(value)} must be a [start, end) pair of positions or null")
    return icl_config(cfg)


def _reached(step: int, total_steps: int, fraction: float) -> bool:
    """The schedule rule: an entry applies from the first step with step / total_steps >= fraction.
    (Float division, not fraction * total_steps: 6 / 10 == 0.6 exactly, 0.6 * 10 > 6.)"""
    return step / total_steps >= fraction


def _first_step(fraction: float, total_steps: int) -> int:
    """The first step at which `fraction` is reached (total_steps when never). A binary search on `_reached`
    (monotonic in the step): O(log total_steps), where counting up from fraction * total_steps took about
    total_steps * 1e-16 steps (a planner hang past ~1e22 steps)."""
    lo, hi = 0, total_steps
    while lo < hi:
        mid = (lo + hi) // 2
        if _reached(mid, total_steps, fraction):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class RecurrenceConfig:
    """Latent recurrent memory: m_t = norm(h_source[t-1]), m_0 = 0.

    strategy/passes: `interleaved` with S = passes subset passes, `multi_refine`
    with K = passes refinement passes, or `sequential` (exact token-by-token
    recurrence through the KV cache). `passes_schedule` makes S or K a function of the
    training step (`passes_at`); `passes` is then its last value.
    """

    # The one definition of the recurrence settings: the trainer's flags (`add_config_arguments`) and the
    # sweep spec's arm fields (lrt_platform.spec) are derived from these fields, their help and bounds.
    source_layer: int = config_field(-1, "block whose output is the memory; negative counts from the end",
                                     ge=-MAX_DEPTH, lt=MAX_DEPTH)
    injection: str = config_field("both", "where the memory enters", choices=INJECTIONS)
    projection: str = config_field("shared", "one memory projection for all layers, or one per layer",
                                   choices=PROJECTIONS)
    gates: bool = config_field(True, "learned per-head gates on the KV memory path (init 1)")
    gamma_init: float = config_field(0.1, "per-layer residual-injection scale")
    strategy: str = config_field("interleaved", "how training approximates the recurrence", choices=STRATEGIES)
    passes: int = config_field(2, "S for interleaved, K for multi_refine", gt=0, le=MAX_PASSES)
    refresh_kv: bool = config_field(False, "interleaved: re-project unvisited K/V with the latest memory")
    detach: bool = config_field(False, "multi_refine: no gradient through earlier passes' memory")
    loss_weights: list[float] | None = config_field(None, "per-pass loss weights, passes + 1 of them, pass 0 first",
                                                    items={"ge": 0}, max_length=MAX_PASSES + 1)
    # S (or K) from each fraction of the optimiser steps on; the first fraction is 0.0 and `passes` equals
    # the last value (evaluation's merged view uses it)
    passes_schedule: list[tuple[float, int]] | None = config_field(
        None, 'JSON [[fraction, passes], ...], e.g. "[[0.0, 2], [0.6, 4], [0.9, 8]]"; passes = the last value',
        items={"gt": 0, "le": MAX_PASSES}, max_length=MAX_PASSES, json=True)
    # Passes after pass 0 keep no MLP activations for backward and recompute them
    # there instead: less activation memory for about 5% more arithmetic per step.
    recompute_mlp: bool = config_field(False, "passes after pass 0 recompute their MLP activations in backward "
                                              "(less memory, ~5% more compute)")

    def __post_init__(self) -> None:
        # tuples (YAML, pydantic) and lists (JSON) compare equal after this
        if isinstance(self.passes_schedule, (list, tuple)):
            self.passes_schedule = [list(e) if isinstance(e, (list, tuple)) else e for e in self.passes_schedule]

    def validate(self, depth: int) -> None:
        _check_choice("injection", self.injection, INJECTIONS)
        _check_choice("projection", self.projection, PROJECTIONS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        if not _is_int(self.source_layer) or not -depth <= self.source_layer < depth:
            raise ConfigError(
                f"source_layer={short_repr(self.source_layer)} is outside the model's {depth} blocks; "
                f"use an index in [{-depth}, {depth - 1}] (negative counts from the end)"
            )
        check_int("passes", self.passes, 1, MAX_PASSES, " (S for interleaved, K for multi_refine)")
        for name in ("gates", "refresh_kv", "detach", "recompute_mlp"):
            check_bool(name, getattr(self, name))
        check_number("gamma_init", self.gamma_init)
        if self.passes_schedule is not None:
            self._validate_schedule()
        if self.loss_weights is not None:
            if self.strategy == "sequential":
                raise ConfigError("loss_weights only apply to the interleaved and multi_refine strategies")
            if not isinstance(self.loss_weights, list) or not all(_is_number(w) for w in self.loss_weights):
                raise ConfigError(f"loss_weights={short_repr(self.loss_weights)} must be a list of finite numbers "
                                  "(passes + 1 of them, pass 0 first)")
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
            if not ok or not 1 <= entry[1] <= MAX_PASSES or not 0 <= entry[0] < 1:
                raise ConfigError(f"passes_schedule[{i}]={short_repr(entry)} must be a [fraction, passes] pair with "
                                  f"0 <= fraction < 1 and an integer passes >= 1 (at most {MAX_PASSES})")
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
            self.recurrence = from_mapping(RecurrenceConfig, self.recurrence, "recurrence")
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
        check_int("depth", self.depth, 1, MAX_DEPTH)
        check_int("head_dim", self.head_dim, 1, MAX_HEAD_DIM)
        if self.width is not None:
            check_int("width", self.width, 1, MAX_WIDTH)
        if self.n_kv_head is not None:
            check_int("n_kv_head", self.n_kv_head, 1, MAX_WIDTH)
        check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_int("vocab_size", self.vocab_size, 2, MAX_VOCAB)
        check_number("softcap", self.softcap, low=0, low_open=True)
        check_number("rope_base", self.rope_base, low=0, low_open=True)
        if self.recurrence is not None and not isinstance(self.recurrence, RecurrenceConfig):
            raise ConfigError(f"recurrence={short_repr(self.recurrence)} must be a mapping of recurrence settings "
                              "or null (the baseline)")
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
        return from_mapping(cls, d, "model")
