"""Sweep specs: YAML in, typed and validated objects out.

Design choices:
- Specs are data: `yaml.safe_load`, then pydantic v2 models with
  `extra="forbid"`. Nothing in a spec is executed.
- One error, one line: pydantic's ValidationError is turned into a `SpecError`
  that names the field path (`arms[1].passes`), the bad value and what is
  allowed. Unknown keys list the keys that are allowed at that place.
- Arms are flat in YAML: `{name: lrt, strategy: interleaved, passes: 2}` or
  `{name: base, baseline: true}`. Recurrence fields mirror `RecurrenceConfig`;
  unset fields keep its defaults (the paper's settings).
  An arm with `passes_schedule` and no `passes` takes the schedule's last
  value as `passes` (the S or K it ends with and evaluates with).
- Budgets are FLOPs, tokens or tokens-per-parameter values, either one list
  for every depth or a mapping `{depth: [values]}`. Turning budgets into
  tokens and steps is the planner's job, not this module's.
- Every (arm, depth) pair is checked by building the real `ModelConfig`, so a
  spec that validates here is one the trainer accepts.
- `spec_hash()` is sha256 of the canonical JSON of the normalised spec, first
  12 hex characters. Where results are stored (storage, tracking) and how
  they are executed (max_concurrent_trials, max_failures) are left out of the
  hash: changing them must not turn a resumable sweep into a new one.
- `tuning:` gives every arm (baseline included) the same Optuna search at
  every budget, over `optim.*` fields only: they apply to every arm alike
  and leave FLOPs per token unchanged, so the planner's step matching holds
  for every tuning trial. `search:` (one LRT arm's fields) and `tuning:`
  exclude each other.

Example:
    >>> from lrt_platform.spec import load_spec, spec_hash
    >>> spec = load_spec("sweep_specs/quickstart.yaml")
    >>> spec.experiment, spec.depths, spec_hash(spec)   # ('quickstart', [2], '3f1c...')
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from typing import Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lrt_model.config import INJECTIONS, PROJECTIONS, STRATEGIES, VALUE_EMBEDS, ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.optim import OptimConfig

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RECURRENCE_FIELDS = tuple(RecurrenceConfig.__dataclass_fields__)
# search-only pseudo field: loss_weights = [1] * passes + [final_weight], so it stays valid whatever passes is
FINAL_WEIGHT = "recurrence.final_weight"
MODEL_SEARCH_FIELDS = ("width", "head_dim", "n_kv_head", "value_embeds", "softcap", "rope_base")
# fields that say where or how a sweep runs, not what it computes: not part of the hash
UNHASHED = {"tracking": True, "storage": True, "resources": {"max_concurrent_trials"}, "failure": {"max_failures"},
            "optim": {"muon"}}
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

    model_config = ConfigDict(extra="forbid", validate_default=True)

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


class DataSpec(_Strict):
    corpus: str = "stdlib"  # "stdlib", a directory of parquet shards, or an s3:// URI
    tokenizer: str = "byte"  # "byte" or "bpe:N"

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str) -> str:
        if v != "byte" and not re.fullmatch(r"bpe:\d+", v):
            raise ValueError(f"{v!r} is not a tokenizer; use 'byte' or 'bpe:N' (e.g. 'bpe:32768')")
        if v.startswith("bpe:") and int(v[4:]) < 258:
            raise ValueError(f"{v!r} is too small; a bpe vocabulary needs at least 258 tokens")
        return v

    @property
    def vocab_size(self) -> int:
        return 257 if self.tokenizer == "byte" else int(self.tokenizer[4:])


class BackboneSpec(_Strict):
    depth: list[PosInt] = [4]  # one depth or a list; an int is accepted
    head_dim: PosInt = 64
    width: PosInt | None = None  # default depth * 64 rounded up to head_dim
    seq_len: PosInt = 256
    batch_size: PosInt = 8  # rows per micro-batch per worker
    total_batch_tokens: PosInt | None = None  # default batch_size * seq_len * workers (no accumulation)
    value_embeds: Literal[VALUE_EMBEDS] = "none"  # type: ignore[valid-type]
    n_kv_head: PosInt | None = None

    @field_validator("depth", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("depth")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one depth")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} repeats a depth; list each depth once")
        return v


class ArmSpec(_Strict):
    name: str
    baseline: bool = False
    source_layer: int | None = None
    injection: Literal[INJECTIONS] | None = None  # type: ignore[valid-type]
    projection: Literal[PROJECTIONS] | None = None  # type: ignore[valid-type]
    gates: bool | None = None
    gamma_init: float | None = None
    strategy: Literal[STRATEGIES] | None = None  # type: ignore[valid-type]
    passes: PosInt | None = None
    refresh_kv: bool | None = None
    detach: bool | None = None
    loss_weights: list[float] | None = None
    passes_schedule: list[tuple[float, int]] | None = None  # [[fraction, passes], ...]; passes defaults to the last
    recompute_mlp: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid arm name; use letters, digits, '_', '-', '.'")
        return v

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


BudgetValues = dict[int, list[float]]  # depth -> values; key 0 = "every depth"


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
            raise ValueError(f"give a list of values or a mapping depth -> list of values (got {v!r})")
        out = {}
        for depth, values in items.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ValueError("give at least one budget value")
            for i, x in enumerate(values):
                where = f"entry {i}" if depth == 0 else f"depth {depth}, entry {i}"
                try:
                    x = float(x)
                except (TypeError, ValueError):
                    raise ValueError(f"{x!r} ({where}) is not a number") from None
                if not math.isfinite(x) or x <= 0:
                    raise ValueError(f"{x:g} ({where}) is not allowed; budgets must be positive numbers")
            out[int(depth)] = [float(x) for x in values]
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


class OptimSpec(_Strict):
    """Overrides of `OptimConfig` fields; unset fields keep the trainer's defaults."""

    matrix_lr: PosFloat | None = None
    embedding_lr: PosFloat | None = None
    unembedding_lr: PosFloat | None = None
    scalar_lr: PosFloat | None = None
    weight_decay: float | None = Field(None, ge=0)
    adam_betas: tuple[float, float] | None = None
    reference_batch_tokens: PosInt | None = None
    warmup_frac: float | None = Field(None, ge=0, le=1)
    warmdown_frac: float | None = Field(None, ge=0, le=1)
    final_lr_frac: float | None = Field(None, ge=0, le=1)
    lr_scale: PosFloat | None = None  # multiplies every learning rate
    muon: Literal["auto", "batched", "torch"] | None = None  # how Muon runs (same update up to bf16 rounding): not searched, not hashed

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class EvalSpec(_Strict):
    eval_tokens: PosInt = 32768  # validation tokens per evaluation
    eval_every: int = Field(0, ge=0)  # steps; 0 = about 8 evaluations per trial
    icl: dict[str, Any] | None = None  # final in-context-learning evaluation (lrt_model.icl settings); {evals: []} = off

    @field_validator("icl")
    @classmethod
    def _check_icl(cls, v):
        from lrt_model.icl import icl_config

        icl_config(v)  # unknown settings or values: the ConfigError names them
        return v


class Dist(_Strict):
    """One search dimension; `when` samples it only if earlier values (or the arm's own) match."""

    type: Literal["int", "float", "loguniform", "categorical"]
    low: float | None = None
    high: float | None = None
    step: PosFloat | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None

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
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a loguniform distribution needs low > 0 (got {self.low:g})")
        if self.choices is not None:
            raise ValueError(f"a {self.type} distribution takes low/high, not 'choices'")
        return self

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


TRAINING_VIEWS = ("val_bpb_merged", "val_bpb_full")  # LRT bpb that decoding does not deliver


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
    seed: int = 0
    num_trials: PosInt = 8
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
                raise ValueError(f"{key!r} cannot be searched; allowed fields: {', '.join(allowed)}")
            for dep in (dist.when or {}):
                if dep not in allowed:
                    raise ValueError(f"{key}.when names {dep!r}, which is not a searchable field")
        return v

    @model_validator(mode="after")
    def _compatible(self) -> "SearchSpec":
        if self.asha.enabled and self.multi_objective:
            raise ValueError("asha early stopping needs one metric; set multi_objective: false or asha.enabled: false")
        return self


class TuningSpec(_Strict):
    """Equal tuning effort: the same search, for every arm, at every budget; the grid then runs each arm's best."""

    space: dict[str, Dist]  # optim.* fields only
    trials: int = 6  # per arm and budget, the arm's own settings (trial 0) included
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0  # the sampler's seed, the same for every arm
    train_seed: int = 1000  # the training seed of every tuning trial; not one of the spec's seeds
    metric: DecodingMetric = "val_bpb"  # minimised: train()'s headline view (sequential for LRT arms, full for the baseline)

    @field_validator("space")
    @classmethod
    def _optim_only(cls, v: dict[str, Dist]) -> dict[str, Dist]:
        if not v:
            raise ValueError("the tuning space is empty; give at least one optim.* field, e.g. optim.lr_scale")
        allowed = [f for f in search_fields() if f.startswith("optim.")]
        for key, dist in v.items():
            if key not in allowed:
                raise ValueError(f"{key!r} cannot be tuned: only optim.* fields apply to every arm alike and leave "
                                 f"FLOPs per token unchanged (use `search:` for one LRT arm's fields); allowed: "
                                 f"{', '.join(allowed)}")
            if dist.when:
                raise ValueError(f"{key}.when: tuning dimensions are unconditional; remove `when`")
        return v

    @field_validator("trials")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"trials={v}: give at least 1 trial per arm and budget (trial 0 = the arm's own settings)")
        return v


class ResourcesSpec(_Strict):
    workers_per_trial: PosInt = 1  # > 1: a Ray Train TorchTrainer (DDP) per trial
    cpus_per_worker: PosFloat = 1.0
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: PosInt | None = None  # default: as many as the cluster holds


class FailureSpec(_Strict):
    max_failures: int = Field(2, ge=0)  # retries per trial; each resumes from the trial's checkpoint
    checkpoint_every: int = Field(0, ge=0)  # steps; 0 = at every evaluation


class TrackingSpec(_Strict):
    uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default the spec's experiment name


class Spec(_Strict):
    experiment: str
    description: str = ""
    data: DataSpec = DataSpec()
    backbone: BackboneSpec = BackboneSpec()
    arms: list[ArmSpec]
    budgets: BudgetSpec
    matching: Literal["compute", "tokens"] = "compute"
    seeds: list[int] = [0]
    optim: OptimSpec = OptimSpec()
    eval: EvalSpec = EvalSpec()
    search: SearchSpec | None = None
    tuning: TuningSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str = "./runs"  # local path or s3:// URI

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid experiment name; use letters, digits, '_', '-', '.'")
        return v

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
        _check_models(self)
        _check_budgets(self)
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
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    return parse_spec(text, source=path)


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec is a YAML mapping (experiment:, arms:, budgets:, ...), got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {describe(e)}") from None


def describe(error: ValidationError) -> str:
    """pydantic's first error as one line: path, message, bad value."""
    errors = error.errors()
    first = errors[0]
    path = _path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = first.get("input")
    if first["type"] not in ("value_error", "missing") and _scalar(value):
        msg += f" (got {value!r})"
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
