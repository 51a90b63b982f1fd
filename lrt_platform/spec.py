"""Sweep specs: YAML in, typed and validated objects out.

Design choices:
- Specs are data: `yaml.safe_load`, then pydantic v2 models with
  `extra="forbid"`. Nothing in a spec is executed.
- One error, one line: pydantic's ValidationError is turned into a `SpecError`
  that names the field path (`arms[1].passes`), the bad value and what is
  allowed. Unknown keys list the keys that are allowed at that place.
- Arms are flat in YAML: `{name: lrt, strategy: interleaved, passes: 2}` or
  `{name: base, baseline: true}`. The recurrence fields are derived from
  `RecurrenceConfig` (`config_schema`: types, choices, bounds), the definition
  the trainer's flags also come from; unset fields keep its defaults (the
  paper's settings).
  An arm with `passes_schedule` and no `passes` takes the schedule's last
  value as `passes` (the S or K it ends with and evaluates with).
- Budgets are FLOPs, tokens or tokens-per-parameter values, either one list
  for every depth or a mapping `{depth: [values]}`. Turning budgets into
  tokens and steps is the planner's job, not this module's.
- Every (arm, depth) pair is checked by building the real `ModelConfig`, so a
  spec that validates here is one the trainer accepts.
- Bad input is refused, never crashes or hangs: inf/nan are refused in every
  float field (`allow_inf_nan=False`), and sizes have upper bounds
  (lrt_model.config's `MAX_*`, `MAX_TRIALS`, `MAX_NODES`) so a typo cannot
  make planning build a billion-layer model or a trillion-value range.
- `spec_hash()` is sha256 of the canonical JSON of the normalised spec, first
  12 hex characters. Where results are stored (storage, tracking), where
  trials run (resources.pool, resources.accelerator_type, an arm's
  `resources`) and how they are executed (max_concurrent_trials,
  max_failures) are left out of the hash: changing them must not turn a
  resumable sweep into a new one.
- Pools: `resources: {pool: P, accelerator_type: A}` pins every trial (and an
  arm's own `resources: {pool: ..., accelerator_type: ...}` that arm's) to the
  Ray nodes carrying the custom resource `pool-P` and Ray's
  `accelerator_type:A` (infra/README.md). Only names are checked here; the
  planner checks them against the connected cluster.
- `storage` left out of the spec: `$LRT_STORAGE` when set (the way tracking
  falls back to `$MLFLOW_TRACKING_URI`), else `./runs`.
- `tuning:` gives every arm (baseline included) the same Optuna search at
  every budget, over `optim.*` fields only: they apply to every arm alike
  and leave FLOPs per token unchanged, so the planner's step matching holds
  for every tuning trial. `search:` (one LRT arm's fields) and `tuning:`
  exclude each other.

Example:
    >>> from lrt_platform.spec import load_spec, spec_hash
    >>> spec = load_spec("sweep_specs/quickstart.yaml")
    >>> spec.experiment, spec.depths, spec_hash(spec)
    ('quickstart', [2], 'c5495d8dca5e')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from typing import Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)

from lrt_model.config import (INJECTIONS, MAX_BATCH, MAX_BUDGET, MAX_DEPTH, MAX_HEAD_DIM, MAX_PASSES, MAX_SEED,
                               MAX_SEQ_LEN, MAX_VOCAB, MAX_WIDTH, PROJECTIONS, STRATEGIES, VALUE_EMBEDS, VIEWS,
                               ConfigError, ModelConfig, RecurrenceConfig, check_icl, check_number, config_types,
                               headline_view, short_repr)
from lrt_model.decode import DECODE_MODES
from lrt_model.optim import OptimConfig

# experiment and arm names become folder names and trial ids: no separators, no whitespace, no leading dot
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TRIALS = 10_000  # grid trials of one spec (arms x depths x budgets x seeds)
MAX_SEARCH_TRIALS = 100_000  # Optuna trials of a search, tuning trials per arm and budget
MAX_SPEC_BYTES = 1 << 20  # a spec is a small YAML file
MAX_NODES = 100_000  # values in a spec, YAML aliases expanded (a "billion laughs" file is refused, not walked)
OPTUNA_SEED = 2**32 - 1  # numpy's RandomState, which Optuna's samplers seed
RECURRENCE_FIELDS = tuple(RecurrenceConfig.__dataclass_fields__)
# search-only pseudo field: loss_weights = [1] * passes + [final_weight], so it stays valid whatever passes is
FINAL_WEIGHT = "recurrence.final_weight"
MODEL_SEARCH_FIELDS = ("width", "head_dim", "n_kv_head", "value_embeds", "softcap", "rope_base")
# fields that say where or how a sweep runs, not what it computes: not part of the hash
UNHASHED = {"tracking": True, "storage": True,
            "resources": {"max_concurrent_trials", "pool", "accelerator_type", "flex_attention", "eval_decode"},
            "failure": {"max_failures"}, "optim": {"muon"}, "arms": {"__all__": {"resources"}}}
STORAGE_ENV = "LRT_STORAGE"  # the sweep storage of a spec that names none (a cluster's nodes set it)
DEFAULT_STORAGE = "./runs"
POOL_PREFIX = "pool-"  # pool P = the Ray custom resource pool-P on its nodes (infra/aws/cluster.yaml)
ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's own per-node resource, e.g. accelerator_type:H100
ACCELERATOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # an accelerator type, or any plain name
# fields added after sweeps were already running: left out of the hash while unset (None), so a running
# sweep keeps its hash (and its storage) and only a spec that sets them gets a new one; "*" = every list item
# Bump when a trainer default or rule changes what an unchanged spec computes, so a sweep started under the
# old defaults gets a new folder instead of being resumed (and mixed) with runs under the new ones.
# 2: the scalars' AdamW learning rate, 0.5 * (width / 768)^-0.5 -> 0.1 without width scaling.
DEFAULTS_VERSION = 2
HASHED_ONLY_WHEN_SET = (("optim", "lr_scale"), ("tuning",), ("arms", "*", "passes_schedule"))


class SpecError(ValueError):
    """A spec is invalid; the one-line message names the field, the bad value and what is allowed."""


class _Strict(BaseModel):
    """Unknown keys are errors that list the allowed keys (pydantic's own message does not)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(cls.model_fields)}")
        return data


PosInt = typing.Annotated[int, Field(gt=0)]
PosFloat = typing.Annotated[float, Field(gt=0)]
Count = typing.Annotated[int, Field(ge=0, le=MAX_BATCH)]  # steps, tokens
Seed = typing.Annotated[int, Field(ge=0, le=MAX_SEED)]
SamplerSeed = typing.Annotated[int, Field(ge=0, le=OPTUNA_SEED)]
Fraction = typing.Annotated[float, Field(ge=0, le=1)]


class DataSpec(_Strict):
    corpus: str = "stdlib"  # "stdlib", a directory of parquet shards, or an s3:// URI
    tokenizer: str = "byte"  # "byte" or "bpe:N"

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str) -> str:
        if v != "byte" and not re.fullmatch(r"bpe:[0-9]{1,9}", v):
            raise ValueError(f"{short_repr(v)} is not a tokenizer; use 'byte' or 'bpe:N' (e.g. 'bpe:32768')")
        if v.startswith("bpe:") and not 258 <= int(v[4:]) <= MAX_VOCAB:
            raise ValueError(f"{v!r} is out of range; a bpe vocabulary has 258 to {MAX_VOCAB} tokens")
        return v

    @property
    def vocab_size(self) -> int:
        return 257 if self.tokenizer == "byte" else int(self.tokenizer[4:])


class BackboneSpec(_Strict):
    depth: list[typing.Annotated[int, Field(gt=0, le=MAX_DEPTH)]] = Field([4], max_length=16)  # an int is accepted
    head_dim: typing.Annotated[int, Field(gt=0, le=MAX_HEAD_DIM)] = 64
    width: typing.Annotated[int, Field(gt=0, le=MAX_WIDTH)] | None = None  # default depth * 64 rounded up to head_dim
    seq_len: typing.Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)] = 256
    batch_size: typing.Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)] = 8  # rows per micro-batch per worker
    # default batch_size * seq_len * workers (no accumulation)
    total_batch_tokens: typing.Annotated[int, Field(gt=0, le=MAX_BATCH)] | None = None
    value_embeds: Literal[VALUE_EMBEDS] = "none"  # type: ignore[valid-type]
    n_kv_head: typing.Annotated[int, Field(gt=0, le=MAX_WIDTH)] | None = None

    @field_validator("depth", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("depth")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one depth")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} repeats a depth; list each depth once")
        return v


def check_pool(v: str) -> str:
    """A pool's name, as its nodes' Ray resource `pool-<name>` spells it."""
    if v.startswith(POOL_PREFIX):
        raise ValueError(f"{short_repr(v)} is the pool's Ray resource; give the pool's name without "
                         f"'{POOL_PREFIX}' (pool: {_bare(v[len(POOL_PREFIX):])})")
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"{short_repr(v)} is not a pool name; use 1 to 64 letters, digits, '_', '-', '.' (the nodes' "
                         f"Ray resource is {POOL_PREFIX}<name>, e.g. pool: h100-spot)")
    return v


def check_accelerator(v: str) -> str:
    """An accelerator type as Ray names it (its resource `accelerator_type:<type>`)."""
    if v.startswith(ACCELERATOR_PREFIX):
        raise ValueError(f"{short_repr(v)} is Ray's resource name; give the type alone "
                         f"(accelerator_type: {_bare(v[len(ACCELERATOR_PREFIX):])})")
    if not ACCELERATOR_RE.fullmatch(v):
        raise ValueError(f"{short_repr(v)} is not an accelerator type; use Ray's name for it, e.g. H100, A100, L4")
    return v


def default_storage() -> str:
    """A spec's storage when it names none: $LRT_STORAGE, else ./runs."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def _bare(v: str) -> str:
    """A name as YAML would take it unquoted, when it is a plain one."""
    return v if ACCELERATOR_RE.fullmatch(v) else short_repr(v)


PoolName = typing.Annotated[str, AfterValidator(check_pool)]
AcceleratorType = typing.Annotated[str, AfterValidator(check_accelerator)]


class PlacementSpec(_Strict):
    """An arm's own pool and accelerator type; unset fields keep the spec's `resources` values."""

    pool: PoolName | None = None
    accelerator_type: AcceleratorType | None = None


def config_schema(cls) -> dict[str, tuple]:
    """pydantic field definitions for the fields of a config dataclass, each optional (None keeps the
    dataclass default): its type, its `choices` as a Literal and the bounds its `config_field` metadata
    gives, so a spec's fields are derived from the one definition the trainer's flags also come from."""
    hints = config_types(cls)
    out = {}
    for f in dataclasses.fields(cls):
        m, tp = f.metadata, hints[f.name]
        if "choices" in m:
            tp = Literal[tuple(m["choices"])]
        bounds = {k: m[k] for k in ("ge", "gt", "le", "lt") if k in m}
        if bounds:
            tp = typing.Annotated[tp, Field(**bounds)]
        if "items" in m:
            tp = _bounded_items(tp, m["items"])
        out[f.name] = (typing.Optional[tp], Field(None, **({"max_length": m["max_length"]} if "max_length" in m
                                                         else {})))
    return out


def _bounded_items(tp, bounds: dict):
    """list[float] -> each float bounded; list[tuple[float, int]] -> each tuple's int bounded."""
    (item,) = typing.get_args(tp)
    if typing.get_origin(item) is tuple:
        members = tuple(typing.Annotated[a, Field(**bounds)] if a is int else a for a in typing.get_args(item))
        return list[tuple[members]]
    return list[typing.Annotated[item, Field(**bounds)]]


class _Arm(_Strict):
    """An arm's name, whether it is the baseline, and its validators; `ArmSpec` adds the recurrence
    fields, derived from `RecurrenceConfig`, and the arm's own `resources`."""

    @field_validator("name", check_fields=False)
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "arm")

    @model_validator(mode="after")
    def _baseline_has_no_recurrence(self) -> "ArmSpec":
        set_fields = [f for f in RECURRENCE_FIELDS if getattr(self, f) is not None]
        if self.baseline and set_fields:
            raise ValueError(f"arm {self.name!r} is a baseline and takes no recurrence settings (got {set_fields[0]})")
        return self

    def recurrence(self) -> RecurrenceConfig | None:
        """The arm's RecurrenceConfig (unset fields keep the paper's defaults); None for the baseline."""
        if self.baseline:
            return None
        fields = {f: getattr(self, f) for f in RECURRENCE_FIELDS if getattr(self, f) is not None}
        if self.passes_schedule and self.passes is None:  # written once: the schedule's last value is `passes`
            fields["passes"] = self.passes_schedule[-1][1]
        return RecurrenceConfig(**fields)


ArmSpec = create_model(
    "ArmSpec", __base__=_Arm, name=(str, ...), baseline=(bool, False), **config_schema(RecurrenceConfig),
    resources=(typing.Optional[PlacementSpec], None),  # where this arm's trials run: {pool: ..., accelerator_type: ...}
)


BudgetValues = dict[int, list[float]]  # depth -> values; key 0 = "every depth"
MAX_BUDGET_VALUES = 64  # per depth


class BudgetSpec(_Strict):
    flops: BudgetValues | None = None  # training FLOPs of the baseline (and of every arm when compute-matched)
    tokens: BudgetValues | None = None  # baseline training tokens
    tokens_per_param: BudgetValues | None = None  # baseline tokens / baseline parameters

    @field_validator("flops", "tokens", "tokens_per_param", mode="before")
    @classmethod
    def _normalise(cls, v: Any, info) -> Any:
        if v is None:
            return None
        if isinstance(v, (int, float, str)):
            v = [v]
        items = {0: v} if isinstance(v, list) else v
        if not isinstance(items, dict):
            raise ValueError(f"give a list of values or a mapping depth -> list of values (got {short_repr(v)})")
        cap = MAX_BUDGET[info.field_name]
        out = {}
        for depth, values in items.items():
            if isinstance(depth, str) and depth.isascii() and depth.isdigit() and len(depth) < 4:
                depth = int(depth)  # a quoted key: '2'
            if type(depth) is not int or not 0 <= depth <= MAX_DEPTH:  # 0: every depth
                raise ValueError(f"key {short_repr(depth)} is not a depth; give a list of values or a mapping "
                                 f"depth (1 to {MAX_DEPTH}) -> list of values, e.g. {{2: [1.0e+12]}}")
            values = values if isinstance(values, list) else [values]
            if not values or len(values) > MAX_BUDGET_VALUES:
                raise ValueError(f"give 1 to {MAX_BUDGET_VALUES} budget values per depth (got {len(values)})")
            for i, x in enumerate(values):
                where = f"entry {i}" if depth == 0 else f"depth {depth}, entry {i}"
                try:
                    if isinstance(x, bool):
                        raise TypeError
                    x = float(x)  # a string too: YAML reads 1e12 (no dot) as one
                except (TypeError, ValueError, OverflowError):
                    raise ValueError(f"{short_repr(x)} ({where}) is not a number") from None
                if not math.isfinite(x) or x <= 0:
                    raise ValueError(f"{short_repr(x)} ({where}) is not allowed; budgets must be positive numbers")
                if x > cap:
                    raise ValueError(f"{x:g} ({where}) is too large; at most {cap:g}")
            out[depth] = [float(x) for x in values]
        return out

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetSpec":
        given = [k for k in ("flops", "tokens", "tokens_per_param") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of flops, tokens, tokens_per_param (got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("flops", "tokens", "tokens_per_param") if getattr(self, k) is not None)

    def values(self, depth: int) -> list[float]:
        table = getattr(self, self.kind)
        return table.get(depth, table.get(0, []))


Beta = typing.Annotated[float, Field(ge=0, lt=1)]  # an Adam beta


class OptimSpec(_Strict):
    """Overrides of `OptimConfig` fields; unset fields keep the trainer's defaults."""

    matrix_lr: PosFloat | None = None
    embedding_lr: PosFloat | None = None
    unembedding_lr: PosFloat | None = None
    scalar_lr: PosFloat | None = None
    weight_decay: float | None = Field(None, ge=0)
    adam_betas: tuple[Beta, Beta] | None = None
    reference_batch_tokens: typing.Annotated[int, Field(gt=0, le=MAX_BATCH)] | None = None
    warmup_frac: Fraction | None = None
    warmdown_frac: Fraction | None = None
    final_lr_frac: Fraction | None = None
    lr_scale: PosFloat | None = None  # multiplies every learning rate
    muon: Literal["auto", "batched", "torch"] | None = None  # how Muon runs (same update up to bf16 rounding): not searched, not hashed

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class EvalSpec(_Strict):
    eval_tokens: typing.Annotated[int, Field(gt=0, le=MAX_BATCH)] = 32768  # validation tokens per evaluation
    eval_every: Count = 0  # steps; 0 = about 8 evaluations per trial
    icl: dict[str, Any] | None = None  # final in-context-learning evaluation (lrt_model.evaluation settings); {evals: []} = off

    @field_validator("icl")
    @classmethod
    def _check_icl(cls, v):
        check_icl(v)  # unknown settings, wrong types or values: the ConfigError names them
        return v


Scalar = None | bool | int | float | str  # a value a `when` condition compares with


class Dist(_Strict):
    """One search dimension; `when` samples it only if earlier values (or the arm's own) match."""

    type: Literal["int", "float", "loguniform", "categorical"]
    low: float | None = None
    high: float | None = None
    step: PosFloat | None = None
    choices: list[Any] | None = Field(None, max_length=1024)  # each checked against its field (_check_dimension)
    when: dict[str, Scalar | list[Scalar]] | None = None

    @model_validator(mode="after")
    def _shape(self) -> "Dist":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical distribution needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical distribution takes 'choices', not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} distribution needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low={self.low:g} must be below high={self.high:g}")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"an int distribution needs integer bounds (got {self.low:g}, {self.high:g})")
        if self.type == "int" and self.step is not None and not float(self.step).is_integer():
            raise ValueError(f"step={self.step:g}: an int distribution needs an integer step (e.g. 1 or 2)")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform distribution needs low > 0 (got {self.low:g})")
        if self.type == "loguniform" and self.step is not None:
            raise ValueError("a loguniform distribution takes no step; use type: float for a stepped range")
        if self.choices is not None:
            raise ValueError(f"a {self.type} distribution takes low/high, not 'choices'")
        return self

    def values_to_check(self) -> list[tuple[str, Any]]:
        """(where, value) for the values that bound the dimension: its ends, or every choice."""
        if self.type == "categorical":
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices)]
        cast = int if self.type == "int" else float
        return [("low", cast(self.low)), ("high", cast(self.high))]

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high


class AshaSpec(_Strict):
    enabled: bool = False
    grace_fraction: float = Field(0.25, gt=0, lt=1)  # first rung at this fraction of the trial's budget
    reduction_factor: float = Field(2, gt=1)
    time_attr: Literal["flops", "tokens"] = "flops"  # stop at equal compute (or equal data)


# LRT bpb that decoding does not deliver: every view but the headline one
TRAINING_VIEWS = tuple(f"val_bpb_{v}" for v in VIEWS if v != headline_view(lrt=True))


def decoding_view_metric(metric: str) -> str:
    """A search optimises what decoding delivers: an LRT arm's merged (training) or full (zero-memory) view
    would reward a schedule whose gain vanishes under true recurrence."""
    if metric in TRAINING_VIEWS:
        raise ValueError(f"metric {metric!r} is a training view that decoding does not deliver; use val_bpb "
                         "(the sequential view for LRT arms, the full pass for the baseline)")
    return metric


DecodingMetric = typing.Annotated[str, AfterValidator(decoding_view_metric)]


class SearchSpec(_Strict):
    arm: str | None = None  # the LRT arm whose fields are searched; default the only LRT arm
    space: dict[str, Dist]
    sampler: Literal["tpe", "random"] = "tpe"
    seed: SamplerSeed = 0
    num_trials: typing.Annotated[int, Field(gt=0, le=MAX_SEARCH_TRIALS)] = 8
    metric: DecodingMetric = "val_bpb"
    mode: Literal["min", "max"] = "min"
    asha: AshaSpec = AshaSpec()
    multi_objective: bool = False  # optimise (metric, flops) jointly
    enqueue_defaults: bool = True  # the arm's own settings (the paper's defaults) are trial 0
    storage: str | None = None  # Optuna RDB URL; default a sqlite file next to the sweep

    @field_validator("space")
    @classmethod
    def _known_fields(cls, v: dict[str, Dist]) -> dict[str, Dist]:
        if not v:
            raise ValueError("the search space is empty; give at least one field, e.g. recurrence.passes")
        allowed = search_fields()
        for key, dist in v.items():
            if key not in allowed:
                raise ValueError(f"{short_repr(key)} cannot be searched; allowed fields: {', '.join(allowed)}")
            for dep in (dist.when or {}):
                if dep not in allowed:
                    raise ValueError(f"{key}.when names {short_repr(dep)}, which is not a searchable field")
            _check_dimension(key, dist)
        return v

    @model_validator(mode="after")
    def _compatible(self) -> "SearchSpec":
        if self.asha.enabled and self.multi_objective:
            raise ValueError("asha early stopping needs one metric; set multi_objective: false or asha.enabled: false")
        return self


class TuningSpec(_Strict):
    """Equal tuning effort: the same search, for every arm, at every budget; the grid then runs each arm's best."""

    space: dict[str, Dist]  # optim.* fields only
    trials: int = Field(6, le=MAX_SEARCH_TRIALS)  # per arm and budget, the arm's own settings (trial 0) included
    sampler: Literal["tpe", "random"] = "tpe"
    seed: SamplerSeed = 0  # the sampler's seed, the same for every arm
    train_seed: Seed = 1000  # the training seed of every tuning trial; not one of the spec's seeds
    metric: DecodingMetric = "val_bpb"  # minimised: train()'s headline view (sequential for LRT arms, full for the baseline)

    @field_validator("space")
    @classmethod
    def _optim_only(cls, v: dict[str, Dist]) -> dict[str, Dist]:
        if not v:
            raise ValueError("the tuning space is empty; give at least one optim.* field, e.g. optim.lr_scale")
        allowed = [f for f in search_fields() if f.startswith("optim.")]
        for key, dist in v.items():
            if key not in allowed:
                raise ValueError(f"{short_repr(key)} cannot be tuned: only optim.* fields apply to every arm alike and "
                                 f"leave FLOPs per token unchanged (use `search:` for one LRT arm's fields); allowed: "
                                 f"{', '.join(allowed)}")
            if dist.when:
                raise ValueError(f"{key}.when: tuning dimensions are unconditional; remove `when`")
            _check_dimension(key, dist)
        return v

    @field_validator("trials")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"trials={v}: give at least 1 trial per arm and budget (trial 0 = the arm's own settings)")
        return v


class ResourcesSpec(_Strict):
    workers_per_trial: typing.Annotated[int, Field(gt=0, le=4096)] = 1  # > 1: a Ray Train TorchTrainer (DDP) per trial
    cpus_per_worker: float = Field(1.0, gt=0, le=4096)
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    max_concurrent_trials: typing.Annotated[int, Field(gt=0, le=MAX_TRIALS)] | None = None  # default: as many as fit
    pool: PoolName | None = None  # run every trial on the nodes with Ray resource pool-<pool>; default any node
    accelerator_type: AcceleratorType | None = None  # ... with Ray's accelerator_type:<type> (e.g. H100)
    # how trials run, not what they compute (the trainer's flex_attention / eval_decode; unset: the
    # environment's LRT_FLEX / LRT_EVAL_DECODE, else FlexAttention on and the "auto" decode step)
    flex_attention: bool | None = None
    eval_decode: Literal[DECODE_MODES] | None = None  # type: ignore[valid-type]


class FailureSpec(_Strict):
    max_failures: int = Field(2, ge=0, le=1000)  # retries per trial; each resumes from the trial's checkpoint
    checkpoint_every: Count = 0  # steps; 0 = at every evaluation


class TrackingSpec(_Strict):
    uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default the spec's experiment name


class Spec(_Strict):
    experiment: str
    description: str = ""
    data: DataSpec = DataSpec()
    backbone: BackboneSpec = BackboneSpec()
    arms: list[ArmSpec] = Field(max_length=64)
    budgets: BudgetSpec
    matching: Literal["compute", "tokens"] = "compute"
    seeds: list[Seed] = Field([0], max_length=MAX_TRIALS)
    optim: OptimSpec = OptimSpec()
    eval: EvalSpec = EvalSpec()
    search: SearchSpec | None = None
    tuning: TuningSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str = Field(default_factory=default_storage)  # local path or s3:// URI

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        return check_name(v, "experiment")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} repeats a seed")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Spec":
        _check_arms(self)
        _check_budgets(self)
        _check_size(self)
        _check_models(self)
        _check_batch(self)
        if self.search is not None:
            _check_search(self)
        if self.tuning is not None:
            _check_tuning(self)
        return self

    # -- convenience views used by the planner and the sweep

    @property
    def depths(self) -> list[int]:
        return list(self.backbone.depth)

    @property
    def baseline_arm(self) -> ArmSpec:
        return next(a for a in self.arms if a.baseline)

    @property
    def lrt_arms(self) -> list[ArmSpec]:
        return [a for a in self.arms if not a.baseline]

    @property
    def search_arm(self) -> ArmSpec | None:
        if self.search is None:
            return None
        name = self.search.arm or self.lrt_arms[0].name
        return next(a for a in self.arms if a.name == name)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.experiment

    def model_config_for(self, depth: int, recurrence: RecurrenceConfig | None) -> ModelConfig:
        b = self.backbone
        return ModelConfig(depth=depth, vocab_size=self.data.vocab_size, seq_len=b.seq_len, head_dim=b.head_dim,
                           width=b.width, n_kv_head=b.n_kv_head, value_embeds=b.value_embeds, recurrence=recurrence)


def search_fields() -> list[str]:
    optim = [f"optim.{f}" for f in OptimConfig.__dataclass_fields__ if f not in ("adam_betas", "muon")]
    return [f"recurrence.{f}" for f in RECURRENCE_FIELDS] + [FINAL_WEIGHT] + \
        [f"model.{f}" for f in MODEL_SEARCH_FIELDS] + optim


def check_name(v: str, what: str) -> str:
    """Experiment and arm names are folder names and parts of trial ids."""
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"{short_repr(v)} is not a valid {what} name; use 1 to 64 letters, digits, '_', '-', '.', "
                         "starting with a letter or digit")
    return v


# what a searched field holds when its default is None
_NONE_DEFAULT_KINDS = {"loss_weights": list, "passes_schedule": list}


def _field_default(key: str) -> Any:
    group, name = key.split(".", 1)
    if key == FINAL_WEIGHT:
        return 1.0
    cls = {"recurrence": RecurrenceConfig, "model": ModelConfig, "optim": OptimConfig}[group]
    return cls.__dataclass_fields__[name].default


def _value_error(key: str, value: Any) -> str | None:
    """Why `value` cannot be the searched field `key`, whatever the other fields are (None: it can)."""
    name = key.split(".", 1)[1]
    kind = _field_kind(key)
    if value is None:
        return None if _field_default(key) is None else "cannot be null"
    if kind is float:
        typed = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        typed = isinstance(value, int) and not isinstance(value, bool)
    else:
        typed = isinstance(value, kind)
    if not typed:
        return f"not {'an' if kind is int else 'a'} {kind.__name__} (the field's type)"
    try:
        if key == FINAL_WEIGHT:
            check_number(key, value, low=0)
        elif key.startswith("optim."):
            OptimSpec.model_validate({name: value})
        elif key.startswith("recurrence."):
            ArmSpec.model_validate({"name": "searched", name: value})
        elif name in BackboneSpec.model_fields:
            BackboneSpec.model_validate({name: value})
        else:  # softcap, rope_base
            check_number(key, value, low=0, low_open=True)
    except ValidationError as e:
        first = e.errors()[0]
        return first["msg"].removeprefix("Value error, ")
    except ConfigError as e:
        msg = str(e)
        return msg[msg.find(" must ") + 1:]  # "name=value must be ..." -> "must be ..."
    return None


def _field_kind(key: str) -> type:
    default = _field_default(key)
    return type(default) if default is not None else _NONE_DEFAULT_KINDS.get(key.split(".", 1)[1], int)


def _check_dimension(key: str, dist: "Dist") -> None:
    """Every value a dimension can take has the field's type, and its ends (or choices) are in range."""
    kind = _field_kind(key)
    if dist.type in ("float", "loguniform") and kind is not float:
        raise ValueError(f"{key}: a {dist.type} distribution draws fractional numbers, but the field takes "
                         f"{kind.__name__} values; use type: {'int' if kind is int else 'categorical'}")
    if dist.type == "int" and kind not in (int, float):
        raise ValueError(f"{key}: the field takes {kind.__name__} values; use type: categorical")
    for where, value in dist.values_to_check():
        error = _value_error(key, value)
        if error:
            raise ValueError(f"{key}.{where}={short_repr(value)}: {error}")


def _check_size(spec: Spec) -> None:
    """Counted, not built: a spec that would plan more than MAX_TRIALS trials is refused before planning."""
    per_depth = sum(len(spec.budgets.values(d)) for d in spec.depths)
    n = len(spec.arms) * per_depth * len(spec.seeds)
    if n > MAX_TRIALS:
        raise ValueError(f"the spec plans {len(spec.arms)} arms x {per_depth} budgets x {len(spec.seeds)} seeds = "
                         f"{n} trials; at most {MAX_TRIALS}: split it into several specs")


def _check_arms(spec: Spec) -> None:
    names = [a.name for a in spec.arms]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"arms: the name {dup!r} is used twice; arm names must be unique")
    baselines = [a.name for a in spec.arms if a.baseline]
    if len(baselines) != 1:
        raise ValueError(f"arms: give exactly one arm with 'baseline: true' to compare against (got {len(baselines)})")
    if not spec.lrt_arms:
        raise ValueError("arms: give at least one LRT arm (an arm with recurrence settings) besides the baseline")


def _check_models(spec: Spec) -> None:
    """Build every (arm, depth) ModelConfig now, so bad combinations fail before anything runs."""
    for i, arm in enumerate(spec.arms):
        for depth in spec.depths:
            try:
                spec.model_config_for(depth, arm.recurrence())
            except ConfigError as e:
                where = f"arms[{i}] ({arm.name}), depth {depth}"
                raise ValueError(f"{where}: {e}") from None


def _check_budgets(spec: Spec) -> None:
    table = getattr(spec.budgets, spec.budgets.kind)
    extra = [d for d in table if d != 0 and d not in spec.depths]
    if extra:
        raise ValueError(f"budgets.{spec.budgets.kind}: depth {extra[0]} is not in backbone.depth {spec.depths}")
    missing = [d for d in spec.depths if not spec.budgets.values(d)]
    if missing:
        raise ValueError(f"budgets.{spec.budgets.kind}: no budget for depth {missing[0]}; add one or a list for all depths")


def _check_batch(spec: Spec) -> None:
    b, workers = spec.backbone, spec.resources.workers_per_trial
    micro = b.batch_size * b.seq_len * workers
    if b.total_batch_tokens is not None and b.total_batch_tokens % micro:
        raise ValueError(f"backbone.total_batch_tokens={b.total_batch_tokens} must be a multiple of "
                         f"batch_size * seq_len * workers_per_trial = {micro}")


def _check_search(spec: Spec) -> None:
    s = spec.search
    lrt = [a.name for a in spec.lrt_arms]
    if s.arm is not None and s.arm not in lrt:
        raise ValueError(f"search.arm={s.arm!r} is not an LRT arm; choose one of {', '.join(lrt)}")
    if s.arm is None and len(lrt) != 1:
        raise ValueError(f"search.arm: the spec has {len(lrt)} LRT arms ({', '.join(lrt)}); name the one to search")
    if len(spec.depths) != 1:
        raise ValueError(f"search: a search runs at one depth; backbone.depth has {spec.depths}")
    if len(spec.budgets.values(spec.depths[0])) != 1:
        raise ValueError("search: a search runs at one fixed budget; give exactly one budget value")
    if s.enqueue_defaults:
        point = default_point(spec)
        for key, dist in s.space.items():
            if key in point and not dist.contains(point[key]):
                raise ValueError(f"search.space.{key}: the arm's value {point[key]!r} (the enqueued default trial) lies "
                                 "outside the space; widen the space or set search.enqueue_defaults: false")


def _check_tuning(spec: Spec) -> None:
    t = spec.tuning
    if spec.search is not None:
        raise ValueError("tuning: a spec takes `tuning` or `search`, not both (a search tunes only one LRT arm, "
                         "tuning gives every arm the same search); remove one")
    if t.train_seed in spec.seeds:
        raise ValueError(f"tuning.train_seed={t.train_seed} is one of seeds {spec.seeds}; tuning trials need a seed "
                         "the comparison does not re-run (its seeds must be fresh), e.g. 1000")
    for key, value in tuning_default_point(spec).items():
        if not t.space[key].contains(value):
            raise ValueError(f"tuning.space.{key}: the spec's value {value!r} (trial 0, the untuned setting every "
                             "arm tries first) lies outside the space; widen the space")


def tuning_default_point(spec: Spec) -> dict[str, Any]:
    """Every tuned field's value in the spec's own OptimConfig: trial 0 of every arm's tuning search."""
    optim = OptimConfig(**spec.optim.overrides())
    return {key: getattr(optim, key.split(".", 1)[1]) for key in spec.tuning.space}


def default_point(spec: Spec) -> dict[str, Any]:
    """The search arm's own values of every searched field: the paper's defaults, tried first."""
    arm = spec.search_arm
    rec = arm.recurrence()
    optim = OptimConfig(**spec.optim.overrides())
    model = spec.model_config_for(spec.depths[0], rec)
    point = {}
    for key, dist in spec.search.space.items():
        group, name = key.split(".", 1)
        if key == FINAL_WEIGHT:
            value = (rec.loss_weights or [1.0] * (rec.passes + 1))[-1]
        else:
            value = getattr({"recurrence": rec, "optim": optim, "model": model}[group], name)
        if when_holds(dist.when, point, spec):
            point[key] = value
    return point


def when_holds(when: dict | None, sampled: dict, spec: Spec) -> bool:
    """True when every `when` condition matches the sampled value (or, if not sampled, the arm's own value)."""
    if not when:
        return True
    arm = spec.search_arm.recurrence()
    for key, wanted in when.items():
        group, name = key.split(".", 1)
        value = sampled[key] if key in sampled else getattr(arm, name, None) if group == "recurrence" else None
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if value not in allowed:
            return False
    return True


# ---------------------------------------------------------------------------
# Loading, errors and the hash


def load_spec(path: str) -> Spec:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: more than {MAX_SPEC_BYTES} bytes; a spec is a small YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}); a spec is a YAML file saved as UTF-8") from None
    return parse_spec(text, source=path)


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: more than {MAX_SPEC_BYTES} characters; a spec is a small YAML file")
    _check_flow_nesting(text, source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{where}: {_one_line(getattr(e, 'problem', None) or e)}") from None
    except Exception as e:  # PyYAML's constructors raise anything on bad text (!!int, !!timestamp, ...)
        raise SpecError(f"{source}: not valid YAML: {_one_line(e) or type(e).__name__}") from None
    return spec_from_data(data, source)


def spec_from_data(data: Any, source: str = "<spec>") -> Spec:
    """A validated Spec from YAML-loaded data (what `parse_spec` does after parsing the text)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping (experiment:, arms:, budgets:, ...), got {type(data).__name__}")
    _check_small(data, source)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {describe(e)}") from None


def _check_flow_nesting(text: str, source: str, limit: int = 64) -> None:
    """PyYAML's scanner is quadratic in the nesting of [ ] and { } (a few thousand levels take seconds):
    refuse deep nesting before parsing. Brackets inside quoted strings count too; no spec nests 64 deep."""
    if text.count("[") + text.count("{") <= limit:
        return
    depth = 0
    for match in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        if depth > limit:
            line = text.count("\n", 0, match.start()) + 1
            raise SpecError(f"{source}: [ ] and {{ }} nested more than {limit} levels deep at line {line}; "
                            "a spec is a small file")


def _one_line(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_small(data: Any, source: str, max_depth: int = 32) -> None:
    """Count the values (aliases expanded) without recursion, so a hostile file is refused, not walked."""
    stack, n = [(data, 0)], 0
    while stack:
        x, depth = stack.pop()
        n += 1
        if n > MAX_NODES:
            raise SpecError(f"{source}: more than {MAX_NODES} values (YAML aliases expanded); a spec is a small file")
        if depth > max_depth:
            raise SpecError(f"{source}: values nested more than {max_depth} levels deep; a spec is a small file")
        if isinstance(x, dict):
            stack.extend((item, depth + 1) for pair in x.items() for item in pair)
        elif isinstance(x, (list, tuple, set)):
            stack.extend((item, depth + 1) for item in x)


def describe(error: ValidationError) -> str:
    """pydantic's first error as one line: path, message, bad value."""
    errors = error.errors()
    first = errors[0]
    path = _path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = first.get("input")
    if first["type"] not in ("value_error", "missing") and _scalar(value):
        msg += f" (got {short_repr(value)})"
    if first["type"] == "missing":
        msg = "this field is required"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{path}: {msg}{more}" if path else f"{msg}{more}"


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in ("int", "float", "str", "bool", "none"):
            continue  # pydantic's union-member tags say nothing to a user
        elif not str(part).isprintable() or not str(part).strip() or " " in str(part) or len(str(part)) > 60:
            out += f"[{short_repr(part)}]"  # a key a user may not see as written: newlines, spaces, ...
        else:
            out += ("." if out else "") + str(part)
    return out


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _drop_unset(data: Any, path: tuple) -> None:
    if not path or not isinstance(data, (dict, list)):
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for item in data if isinstance(data, list) else []:
            _drop_unset(item, rest)
    elif isinstance(data, dict) and head in data:
        if not rest and data[head] is None:
            del data[head]
        else:
            _drop_unset(data[head], rest)


def spec_hash(spec: Spec) -> str:
    data = spec.model_dump(mode="json", exclude=UNHASHED)
    for path in HASHED_ONLY_WHEN_SET:
        _drop_unset(data, path)
    data["defaults_version"] = DEFAULTS_VERSION
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
