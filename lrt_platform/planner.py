"""The planner: the only place where budgets become tokens, steps and FLOPs.

Design choices:
- A spec expands to trials: arm x depth x budget x seed. The baseline and the
  LRT arms of one budget and seed share `pair_id = f"{budget_id}-s{seed}"`;
  `trial_id = f"{pair_id}-{arm}"` is stable across runs, so checkpoints and
  tracking runs can be keyed by it.
- Every budget is first turned into the BASELINE's token count at that depth
  (flops / baseline FLOPs per token, or tokens_per_param * baseline
  parameters), then matched: `compute` gives every arm the baseline's
  training FLOPs (LRT's ~2x FLOPs per token -> about half the tokens),
  `tokens` gives every arm the baseline's tokens.
- Tokens are whole optimiser steps (steps * batch tokens). The baseline's step
  count is chosen among the roundings next to the budget, each LRT arm takes
  the step count nearest the baseline's FLOPs, and the combination with the
  smallest worst-case FLOPs mismatch wins. A compute-matched pair that cannot
  get under 1% is an error that says to raise the budget or lower the batch.
- FLOPs per token come from `lrt_model.flops`; parameters are counted on a
  model built on the meta device (exact, no memory, no time). An arm's FLOPs
  are `flops.training_flops` over its steps, so an arm with a
  `passes_schedule` is matched on its exact whole-run FLOPs (each step at its
  scheduled S or K) and reports its run-average FLOPs per token.
- Search trials (Optuna) are planned one at a time, when Optuna has picked
  their values, against the same baseline anchor: every search trial is held
  to the spec's fixed budget.
- Tuning (`tuning:`): every arm's grid trial at the first seed is the
  template of its tuning trials, `f"{budget_id}-tune-{arm}-t{n:03d}"`: same
  model and planned steps (optim fields leave FLOPs per token unchanged, so
  the grid's matching holds), the tuning seed, Optuna's optim values, no
  pair. `apply_tuning` gives a grid trial its arm's best values once tuning
  is done; ids, pairs and steps stay those of an untuned sweep.
- Pools: a trial's `pool` and `accelerator_type` are its arm's own
  (`arms[i].resources`) or the spec's (`resources`). A worker asks Ray for
  `pool-<pool>` (one unit per GPU, 1 for a CPU worker) and
  `accelerator_type:<type>` (0.001, as Ray's own requests); `check_pools`
  refuses, before anything starts, a pool or type no node of the connected
  cluster carries, and `spot_warnings` says when a spot pool (`*-spot`) runs
  without `failure.checkpoint_every` (a preemption then loses up to an
  evaluation interval). Dry runs show the pool column, and with `--address`
  each pool's free capacity (`pool_capacity`).
- Estimated wall time comes from a short measured probe: a few training steps
  and one evaluation of each distinct model config (shrunk when large) on this
  machine's CPU, scaled by FLOPs. A rough guide for CPU specs; GPU specs get
  no estimate rather than a wrong one.

Example:
    >>> from lrt_platform.spec import load_spec
    >>> from lrt_platform.planner import plan, plan_summary
    >>> trials = plan(load_spec("sweep_specs/quickstart.yaml"))
    >>> [(t.arm, t.steps, t.flops) for t in trials][:2]  # compute-matched: half the steps at ~2x per step
    [('baseline', 333, 1005888208896), ('lrt_s2', 161, 1005074251776)]
    >>> plan_summary(trials)["max_pair_mismatch"] < 0.01
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.data import verify_corpus
from lrt_model.evaluation import check_inputs as check_icl_inputs
from lrt_model.flops import (baseline_flops_per_token, mean_flops_per_token, run_flops_per_token, training_flops,
                             training_flops_per_token)
from lrt_model.model import GPT
from lrt_model.optim import OptimConfig
from lrt_model.train import TrainConfig

from . import storage
from .compare import PAPER_TOKENS_PER_PARAM
from .render import aligned as _aligned, si as _si
from .spec import ACCELERATOR_PREFIX, FINAL_WEIGHT, POOL_PREFIX, ArmSpec, Spec, spec_hash

MAX_MISMATCH = 0.01  # compute-matched arms of a pair may differ by less than this fraction of FLOPs


class PlanError(ValueError):
    """A budget cannot be planned as asked; the message says what to change."""


@dataclass
class Trial:
    trial_id: str
    arm: str
    strategy: str  # "baseline", "interleaved", "multi_refine" or "sequential"
    depth: int
    budget_id: str
    budget_kind: str  # flops | tokens | tokens_per_param
    budget_value: float
    seed: int
    pair_id: str
    matching: str
    params: int
    tokens: int
    steps: int
    batch_tokens: int
    flops: float
    flops_per_token: float
    config: dict  # a TrainConfig as a dict: what the trainer runs
    search: dict | None = None  # the values Optuna chose (search trials only)
    trial_number: int | None = None  # search trials: Tune's trial counter (0 = the enqueued defaults)
    tuning: dict | None = None  # grid trials of a tuned spec: how their arm was tuned and its best values
    tuning_trial: bool = False  # a tuning trial (never paired: pair_id None)
    est_wall_s: float | None = None
    tokens_per_param: float | None = None  # the regime: the paper's claims hold at >= PAPER_TOKENS_PER_PARAM
    pool: str | None = None  # the pool its workers run on (Ray resource pool-<pool>); None: any node
    accelerator_type: str | None = None  # the accelerator type its workers ask Ray for; None: any

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Building blocks


@lru_cache(maxsize=256)
def _params(model_json: str) -> int:
    with torch.device("meta"):
        return GPT(ModelConfig.from_dict(json.loads(model_json))).num_params()


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count, from a model built on the meta device."""
    return _params(json.dumps(cfg.to_dict(), sort_keys=True))


def batch_tokens(spec: Spec) -> int:
    b = spec.backbone
    return b.total_batch_tokens or b.batch_size * b.seq_len * spec.resources.workers_per_trial


def _compact(value: float) -> str:
    if float(value).is_integer() and value < 1e6:
        return str(int(value))
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e")


def budget_id(depth: int, kind: str, value: float) -> str:
    prefix = {"flops": "flops", "tokens": "tok", "tokens_per_param": "tpp"}[kind]
    return f"d{depth}-{prefix}{_compact(value)}"


def anchor_tokens(spec: Spec, depth: int, value: float) -> float:
    """The baseline's (unrounded) token count for one budget at one depth."""
    base = spec.model_config_for(depth, None)
    kind = spec.budgets.kind
    if kind == "flops":
        return value / baseline_flops_per_token(base)
    if kind == "tokens":
        return value
    return value * count_params(base)


def _mismatch(flops: float, reference: float) -> float:
    return abs(flops - reference) / reference


def _matched_steps(spec: Spec, cfg: ModelConfig, base_steps: int, base_flops: float, bt: int) -> int:
    if spec.matching == "tokens":
        return base_steps
    guess = max(1, round(base_flops / (mean_flops_per_token(cfg) * bt)))
    if cfg.recurrence is None or cfg.recurrence.passes_schedule is None:
        return guess
    # a schedule's boundaries move with the step count: take the exact best of the counts around the guess
    return min(range(max(1, guess - 3), guess + 4), key=lambda n: abs(training_flops(cfg, n, bt) - base_flops))


def match_steps(spec: Spec, depth: int, value: float, configs: dict[str, ModelConfig],
                base_steps: int | None = None) -> dict[str, int]:
    """Steps per arm for one budget; `configs` maps arm name -> ModelConfig, the baseline first.
    `base_steps` fixes the baseline's steps (search trials match an already planned baseline)."""
    bt = batch_tokens(spec)
    names = list(configs)
    ideal = anchor_tokens(spec, depth, value) / bt
    near = range(math.floor(ideal) - 2, math.ceil(ideal) + 3)  # a step or two off the budget may match far better
    candidates = [base_steps] if base_steps else sorted({max(1, n) for n in near})
    best = None
    for nb in candidates:
        base_flops = training_flops(configs[names[0]], nb, bt)
        steps = {names[0]: nb}
        for name in names[1:]:
            steps[name] = _matched_steps(spec, configs[name], nb, base_flops, bt)
        gaps = {n: _mismatch(training_flops(configs[n], steps[n], bt), base_flops) for n in names[1:]}
        worst = max(gaps.values(), default=0.0)
        key = (round(worst, 12) if spec.matching == "compute" else 0.0, abs(nb - ideal))
        if best is None or key < best[0]:
            best = (key, steps, worst, max(gaps, key=gaps.get, default=""))
    _, steps, worst, arm = best
    if spec.matching == "compute" and worst >= MAX_MISMATCH:
        raise PlanError(
            f"budget {budget_id(depth, spec.budgets.kind, value)}: {arm} and the baseline differ by {worst:.2%} in "
            f"training FLOPs (under {MAX_MISMATCH:.0%} required) because the budget is only {steps[names[0]]} "
            f"baseline steps of {bt} tokens; raise the budget or lower the batch (backbone.batch_size / "
            "total_batch_tokens)")
    return steps


def _arm_configs(spec: Spec, depth: int) -> dict[str, ModelConfig]:
    """The arms whose FLOPs are matched at one depth, baseline first. A search spec's searched arm is
    represented by its default point and the corners of its space that change FLOPs per token, so the
    baseline's rounding suits every search trial."""
    if spec.search is None:
        return {a.name: spec.model_config_for(depth, a.recurrence()) for a in spec.arms}
    configs = {spec.baseline_arm.name: spec.model_config_for(depth, None)}
    for params, where in _search_corners(spec):
        try:
            configs[f"the searched arm at {where}"] = apply_search_params(spec, params)[0]
        except ConfigError:
            continue  # an invalid combination fails in its own trial with the trainer's message
    return configs


def train_config(spec: Spec, root: str, trial_id: str, model: ModelConfig, optim: OptimConfig, seed: int,
                 steps: int) -> dict:
    """The TrainConfig a trial runs, as a dict. Budget = exact tokens (whole steps), so train() needs no planning."""
    bt = batch_tokens(spec)
    eval_every = spec.eval.eval_every or max(1, math.ceil(steps / 8))
    corpus = spec.data.corpus if spec.data.corpus == "stdlib" else storage.absolute(spec.data.corpus)
    icl = spec.eval.icl
    if icl and icl.get("core_dir"):  # absolute, like the corpus: a trial does not run in the driver's directory
        icl = {**icl, "core_dir": storage.absolute(icl["core_dir"])}
    cfg = TrainConfig(
        model=model, optim=optim, corpus=corpus, tokenizer=spec.data.tokenizer, batch_size=spec.backbone.batch_size,
        total_batch_tokens=bt, tokens=steps * bt, eval_every=eval_every, eval_tokens=spec.eval.eval_tokens,
        icl=icl,
        seed=seed, device="cuda" if spec.resources.gpus_per_worker > 0 else "cpu",
        checkpoint_dir=storage.checkpoint_dir(root, trial_id),
        checkpoint_every=spec.failure.checkpoint_every or eval_every, progress=False,
        flex_attention=spec.resources.flex_attention, eval_decode=spec.resources.eval_decode,
    )
    return cfg.to_dict()


def _trial(spec: Spec, root: str, arm: str, model: ModelConfig, depth: int, value: float, seed: int, steps: int,
           optim: OptimConfig, trial_id: str | None = None, search: dict | None = None,
           trial_number: int | None = None, spec_arm: str | None = None) -> Trial:
    """`spec_arm`: the spec's arm the trial belongs to when `arm` is not its name (search trials)."""
    bid = budget_id(depth, spec.budgets.kind, value)
    pool, accelerator = placement(spec, spec_arm or arm)
    pair = f"{bid}-s{seed}"
    trial_id = trial_id or f"{pair}-{arm}"
    bt = batch_tokens(spec)
    flops = training_flops(model, steps, bt)  # exact: each step at its scheduled passes
    return Trial(
        trial_id=trial_id, arm=arm, strategy=model.recurrence.strategy if model.recurrence else "baseline",
        depth=depth, budget_id=bid, budget_kind=spec.budgets.kind, budget_value=value, seed=seed, pair_id=pair,
        matching=spec.matching, params=count_params(model), tokens=steps * bt, steps=steps, batch_tokens=bt,
        flops=flops, flops_per_token=run_flops_per_token(model, steps),
        config=train_config(spec, root, trial_id, model, optim, seed, steps), search=search,
        trial_number=trial_number, tokens_per_param=steps * bt / count_params(model), pool=pool,
        accelerator_type=accelerator,
    )


def _root(spec: Spec, root: str | None) -> str:
    return root or storage.sweep_root(spec.storage, spec.experiment, spec_hash(spec))


# ---------------------------------------------------------------------------
# Pools: where trials run


ACCELERATOR_UNITS = 0.001  # what one worker asks of accelerator_type:<type>, as Ray's own requests do


def placement(spec: Spec, arm: str | None = None) -> tuple[str | None, str | None]:
    """(pool, accelerator_type) of an arm's trials: the arm's own `resources`, else the spec's."""
    own = next((a.resources for a in spec.arms if a.name == arm), None)
    r = spec.resources
    pool = own.pool if own is not None and own.pool is not None else r.pool
    accelerator = own.accelerator_type if own is not None and own.accelerator_type is not None else r.accelerator_type
    return pool, accelerator


def worker_request(spec: Spec, pool: str | None = None, accelerator_type: str | None = None) -> dict:
    """The Ray resources one worker of a trial on `pool` / `accelerator_type` asks for."""
    r = spec.resources
    req = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        req["GPU"] = r.gpus_per_worker
    if pool is not None:  # one unit per GPU (the nodes carry one per GPU), 1 for a CPU worker
        req[POOL_PREFIX + pool] = r.gpus_per_worker or 1.0
    if accelerator_type is not None:
        req[ACCELERATOR_PREFIX + accelerator_type] = ACCELERATOR_UNITS
    return req


def placements(spec: Spec) -> dict[tuple[str | None, str | None], tuple[str, str]]:
    """Every distinct (pool, accelerator_type) the spec's arms run on -> the spec fields that set them."""
    out = {}
    for i, arm in enumerate(spec.arms):
        key = placement(spec, arm.name)
        own = arm.resources
        pool_at = f"arms[{i}].resources.pool" if own is not None and own.pool is not None else "resources.pool"
        acc_at = f"arms[{i}].resources.accelerator_type" \
            if own is not None and own.accelerator_type is not None else "resources.accelerator_type"
        out.setdefault(key, (pool_at, acc_at))
    return out


def alive_nodes(nodes: list[dict]) -> list[dict]:
    """The resources of each live node of a `ray.nodes()`-style list."""
    return [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]


def pools_of(nodes: list[dict]) -> dict[str, float]:
    """Pool name -> its units (GPUs) over the live nodes of a `ray.nodes()`-style list."""
    out: dict[str, float] = {}
    for res in alive_nodes(nodes):
        for k, v in res.items():
            if k.startswith(POOL_PREFIX) and v > 0:
                out[k[len(POOL_PREFIX):]] = out.get(k[len(POOL_PREFIX):], 0.0) + v
    return dict(sorted(out.items()))


def pool_capacity(total: dict, available: dict) -> dict[str, dict]:
    """Pool name -> {"free", "total"} units (GPUs; 1 per CPU worker) from `ray.cluster_resources()` and
    `ray.available_resources()`: what a dry run against a cluster shows before anything is launched."""
    return {k[len(POOL_PREFIX):]: {"free": float(available.get(k, 0.0)), "total": float(v)}
            for k, v in sorted(total.items()) if k.startswith(POOL_PREFIX)}


def format_pool_capacity(capacity: dict[str, dict] | None) -> str:
    if capacity is None:
        return "pools: give --address to see the connected cluster's free capacity per pool"
    if not capacity:
        return "pools: the connected cluster has none (no node with a pool-<name> resource)"
    return "pools (free / total units): " + ", ".join(f"{p} {c['free']:g} / {c['total']:g}"
                                                      for p, c in capacity.items())


def eligible(request: dict, nodes: list[dict]) -> list[dict]:
    """The live nodes (their resources) that carry every custom resource of a worker request."""
    custom = [k for k in request if k not in ("CPU", "GPU")]
    return [res for res in alive_nodes(nodes) if all(res.get(k, 0) > 0 for k in custom)]


def check_pools(spec: Spec, nodes: list[dict]) -> None:
    """Refuse, before anything starts, a pool or accelerator type that no live node of the cluster
    (`ray.nodes()`) carries. A cluster scaled to zero has no such node either: bring the pool up first."""
    for (pool, accelerator), (pool_at, acc_at) in placements(spec).items():
        req = worker_request(spec, pool, accelerator)
        if not (pool or accelerator) or eligible(req, nodes):
            continue
        bundle = ", ".join(f"{k!r}: {v:g}" for k, v in req.items())
        up = (f"an autoscaling cluster scaled to zero: bring it up first with ray.autoscaler.sdk.request_resources("
              f"bundles=[{{{bundle}}}] * {spec.resources.workers_per_trial})")
        have = ", ".join(pools_of(nodes)) or "none"
        if pool and not eligible({POOL_PREFIX + pool: 1}, nodes):
            raise PlanError(f"{pool_at}={pool}: the connected Ray cluster has no node with resource "
                            f"{POOL_PREFIX}{pool} (pools it has: {have}); fix the name or start that pool ({up})")
        if not pool:
            raise PlanError(f"{acc_at}={accelerator}: the connected Ray cluster has no node with resource "
                            f"{ACCELERATOR_PREFIX}{accelerator} (accelerator types it has: "
                            f"{', '.join(_accelerators(alive_nodes(nodes))) or 'none'}); fix the type or start nodes "
                            f"that have it ({up})")
        in_pool = _accelerators(eligible({POOL_PREFIX + pool: 1}, nodes))
        raise PlanError(f"{acc_at}={accelerator}: no node of pool {pool} has resource "
                        f"{ACCELERATOR_PREFIX}{accelerator} (its nodes have: "
                        f"{', '.join(in_pool) or 'no accelerator type'}); fix the type or the pool")


def _accelerators(resources: list[dict]) -> list[str]:
    """The accelerator types (Ray's accelerator_type:<type>) among nodes' resources."""
    return sorted({k[len(ACCELERATOR_PREFIX):] for res in resources for k in res if k.startswith(ACCELERATOR_PREFIX)})


def spot_warnings(spec: Spec, trials: list[Trial]) -> list[str]:
    """One line when trials run on a spot pool (`*-spot`) without `failure.checkpoint_every`: they then
    checkpoint only at each evaluation, and a preemption loses up to an evaluation interval of training."""
    spot = {pool: at for (pool, _), (at, _) in placements(spec).items() if pool and pool.endswith("-spot")}
    if not spot or spec.failure.checkpoint_every:
        return []
    on_spot = [t for t in trials if t.pool in spot] or trials
    every = max((t.config["checkpoint_every"] for t in on_spot), default=0)
    where = ", ".join(f"{at}={pool}" for pool, at in spot.items())
    return [f"warning: {where}: a spot pool, and failure.checkpoint_every is unset, so its trials checkpoint only "
            f"at each evaluation (every {every} steps here) and a preemption loses up to that much training; set "
            "failure.checkpoint_every to the steps you can afford to lose"]


def _pool_cell(t: Trial) -> str:
    return (t.pool or "any") + (f" ({t.accelerator_type})" if t.accelerator_type else "")


# ---------------------------------------------------------------------------
# Plans


def check_corpus(spec: Spec) -> None:
    """A corpus with a manifest (`python -m lrt_model.data upload`) must match it before anything starts:
    every listed shard present and none extra, sizes, and row counts and schema from the parquet footers.
    No full read, so a byte flipped inside a page passes here; `python -m lrt_model.data verify` checks
    every byte's SHA-256. A corpus without a manifest (stdlib, the builders' folders) passes as before."""
    if spec.data.corpus != "stdlib":
        verify_corpus(storage.absolute(spec.data.corpus), checksums=False, require_manifest=False)


def plan(spec: Spec, root: str | None = None, corpus_check: bool = True) -> list[Trial]:
    """The fixed trials of a spec: every arm x depth x budget x seed (for a search spec: the baseline only;
    its searched arm is planned per Optuna trial by `plan_search_trial`). `corpus_check=False` skips
    `check_corpus` (which reads the corpus's listing and footers, on S3 too)."""
    # what a trial reads only at its end (the CORE bundle) is checked now: a wrong eval.icl.core_dir is one
    # ConfigError naming it, not a failure after every trial's training and every retry's
    check_icl_inputs(spec.eval.icl, "eval.icl")
    if corpus_check:
        check_corpus(spec)  # a truncated or missing shard of an uploaded corpus: one DataError now
    root = _root(spec, root)
    arms = [spec.baseline_arm] + ([a for a in spec.lrt_arms] if spec.search is None else [])
    optim = OptimConfig(**spec.optim.overrides())
    trials = []
    for depth in spec.depths:
        configs = _arm_configs(spec, depth)
        for value in spec.budgets.values(depth):
            steps = match_steps(spec, depth, value, configs)
            for seed in spec.seeds:
                for a in arms:
                    trials.append(_trial(spec, root, a.name, configs[a.name], depth, value, seed, steps[a.name], optim))
    return trials


def apply_search_params(spec: Spec, params: dict) -> tuple[ModelConfig, OptimConfig]:
    """The search arm's ModelConfig and OptimConfig with Optuna's values applied (dotted names)."""
    arm: ArmSpec = spec.search_arm
    rec = dataclasses.asdict(arm.recurrence())
    optim = dataclasses.asdict(OptimConfig(**spec.optim.overrides()))
    model = {}
    final_weight = params.get(FINAL_WEIGHT)
    for key, value in params.items():
        group, name = key.split(".", 1)
        if key != FINAL_WEIGHT:
            {"recurrence": rec, "optim": optim, "model": model}[group][name] = value
    if params.get("recurrence.passes_schedule") is not None:  # a searched schedule sets passes: its last value
        rec["passes"] = rec["passes_schedule"][-1][1]
    if final_weight is not None and rec["strategy"] != "sequential":
        rec["loss_weights"] = [1.0] * rec["passes"] + [float(final_weight)]
    if rec["strategy"] == "sequential":
        rec["loss_weights"] = None  # only the parallel strategies have per-pass losses
        rec["recompute_mlp"] = False  # ... and passes after pass 0 to recompute
    base = spec.model_config_for(spec.depths[0], RecurrenceConfig(**rec))
    return dataclasses.replace(base, **model), OptimConfig(**optim)


def plan_search_trial(spec: Spec, params: dict, index: int, root: str | None = None) -> Trial:
    """One Optuna trial, held to the spec's single budget and matched to the baseline's FLOPs (or tokens)."""
    root = _root(spec, root)
    depth, value, seed = spec.depths[0], spec.budgets.values(spec.depths[0])[0], spec.seeds[0]
    model, optim = apply_search_params(spec, params)
    arm = f"{spec.search_arm.name}-t{index:03d}"
    base = spec.baseline_arm.name
    base_steps = match_steps(spec, depth, value, _arm_configs(spec, depth))[base]
    steps = match_steps(spec, depth, value, {base: spec.model_config_for(depth, None), arm: model}, base_steps)
    trial_id = f"{budget_id(depth, spec.budgets.kind, value)}-s{seed}-{arm}"
    return _trial(spec, root, arm, model, depth, value, seed, steps[arm], optim, trial_id, dict(params), index,
                  spec_arm=spec.search_arm.name)


def tuning_templates(spec: Spec, trials: list[Trial]) -> list[tuple[str, Trial]]:
    """(phase name, template) per budget and arm in run order: each arm's grid trial at the first seed."""
    return [(f"tune-{t.budget_id}-{t.arm}", t) for t in trials if t.seed == spec.seeds[0]]


def tuned_optim(spec: Spec, params: dict) -> OptimConfig:
    """The spec's OptimConfig with tuned values (dotted `optim.*` names) applied."""
    return dataclasses.replace(OptimConfig(**spec.optim.overrides()),
                               **{k.split(".", 1)[1]: v for k, v in params.items()})


def plan_tuning_trial(spec: Spec, template: Trial, params: dict, index: int, root: str | None = None) -> Trial:
    """One tuning trial of the template's arm and budget: its model and planned steps, the tuning seed,
    Optuna's optim values; unpaired, so comparisons never see it."""
    model = ModelConfig.from_dict(template.config["model"])
    trial_id = f"{template.budget_id}-tune-{template.arm}-t{index:03d}"
    t = _trial(spec, _root(spec, root), template.arm, model, template.depth, template.budget_value,
               spec.tuning.train_seed, template.steps, tuned_optim(spec, params), trial_id, dict(params), index)
    return dataclasses.replace(t, pair_id=None, tuning_trial=True)


def apply_tuning(spec: Spec, trial: Trial, best: dict, best_value: float) -> Trial:
    """A grid trial running its arm's best tuning values; trial id, pair and steps unchanged."""
    t = spec.tuning
    optim = dataclasses.asdict(tuned_optim(spec, best))  # the grid trial's optim is the spec's, as here
    info = {"sampler": t.sampler, "trials": t.trials, "space": list(t.space), "seed": t.seed,
            "train_seed": t.train_seed, "best": dict(best), "best_value": best_value}
    return dataclasses.replace(trial, config={**trial.config, "optim": optim}, tuning=info)


FLOPS_FIELDS = ("recurrence.strategy", "recurrence.passes", "recurrence.refresh_kv", "recurrence.injection",
                "recurrence.projection", "recurrence.passes_schedule", "model.width", "model.head_dim",
                "model.n_kv_head", "model.value_embeds")


def _search_corners(spec: Spec, limit: int = 256) -> list[tuple[dict, str]]:
    """(params, description) for the default point and every combination of the discrete search values
    that change FLOPs per token (long int ranges: their ends), at most `limit` of them."""
    from .spec import default_point

    dims = []
    for key, d in spec.search.space.items():
        if key not in FLOPS_FIELDS or d.type in ("float", "loguniform"):
            continue
        if d.type == "categorical":
            values = d.choices if len(d.choices) <= 16 else [d.choices[0], d.choices[-1]]
        else:  # counted, never materialised: an int range may be long
            low, step = int(d.low), int(d.step or 1)
            n = (int(d.high) - low) // step + 1
            values = [low + i * step for i in range(n)] if n <= 16 else [low, low + (n - 1) * step]
        dims.append((key, values))
    base = default_point(spec)
    corners = [(base, "the default point")]
    for combo in itertools.islice(itertools.product(*(v for _, v in dims)), limit):
        corners.append(({**base, **{k: v for (k, _), v in zip(dims, combo)}},
                        ", ".join(f"{k}={v}" for (k, _), v in zip(dims, combo))))
    return corners


def check_search_budget(spec: Spec) -> None:
    """Plan the default point and every FLOPs-changing corner of the space, so a budget too small to
    match some searched config fails at launch, naming it, not later as a failed Optuna trial. The
    baseline's steps are planned once and each corner is matched to them as `plan_search_trial` matches
    it: linear in the (up to 257) corners, where a full trial plan per corner was quadratic."""
    depth, value = spec.depths[0], spec.budgets.values(spec.depths[0])[0]
    base = spec.baseline_arm.name
    base_steps = match_steps(spec, depth, value, _arm_configs(spec, depth))[base]
    base_cfg = spec.model_config_for(depth, None)
    for params, where in _search_corners(spec):
        try:
            model = apply_search_params(spec, params)[0]
        except ConfigError:
            continue  # an invalid combination fails in its own trial with the trainer's message
        match_steps(spec, depth, value, {base: base_cfg, f"the searched arm at {where}": model}, base_steps)


def default_search_trial(spec: Spec, root: str | None = None) -> Trial:
    """The enqueued first search trial (the arm's own settings), for dry runs."""
    from .spec import default_point

    return plan_search_trial(spec, default_point(spec), 0, root)


def plan_summary(trials: list[Trial]) -> dict:
    """Totals and the worst FLOPs mismatch between the baseline and any other arm of a pair."""
    base = {t.pair_id: t.flops for t in trials if t.strategy == "baseline"}
    worst = max((_mismatch(t.flops, base[t.pair_id]) for t in trials
                 if t.strategy != "baseline" and t.pair_id in base), default=0.0)
    walls = [t.est_wall_s for t in trials if t.est_wall_s is not None]
    return {
        "trials": len(trials),
        "tokens": sum(t.tokens for t in trials),
        "flops": sum(t.flops for t in trials),
        "est_wall_s": sum(walls) if walls else None,
        "max_pair_mismatch": worst,
        "regime_warnings": regime_warnings(trials),
    }


# ---------------------------------------------------------------------------
# Throughput probe (dry runs)


def _probe_config(cfg: ModelConfig) -> ModelConfig:
    """The config itself when small; otherwise a shrunk twin with the same recurrence."""
    if count_params(cfg) <= 5_000_000 and cfg.seq_len <= 256:
        return cfg
    rec = cfg.recurrence
    depth = min(cfg.depth, 2)
    if rec is not None:
        rec = dataclasses.replace(rec, source_layer=-1, passes=min(rec.passes, 4),
                                  loss_weights=None, passes_schedule=None)  # probed at the final passes
    head = min(cfg.head_dim, 64)
    return ModelConfig(depth=depth, vocab_size=min(cfg.vocab_size, 4096), seq_len=min(cfg.seq_len, 256),
                       head_dim=head, width=None, recurrence=rec)


@lru_cache(maxsize=64)
def _probe(model_json: str, threads: int) -> tuple[float, float]:
    """(training FLOPs/s, evaluation seconds per token per baseline-FLOP) measured on a tiny instance."""
    from lrt_model.evaluation import evaluate_bpb
    from lrt_model.recurrence import training_loss

    cfg = ModelConfig.from_dict(json.loads(model_json))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = GPT(cfg)
        rows, T = 2, cfg.seq_len
        x = torch.randint(0, cfg.vocab_size, (rows, T + 1))
        t0 = None
        for step in range(3):  # one warm-up step, two timed
            if step == 1:
                t0 = time.perf_counter()
            loss = training_loss(model, x[:, :-1], x[:, 1:])[0]
            loss.backward()
        train_s = (time.perf_counter() - t0) / 2
        t1 = time.perf_counter()
        evaluate_bpb(model, x, torch.ones(cfg.vocab_size, dtype=torch.int64), rows, torch.device("cpu"))
        eval_s = time.perf_counter() - t1
    finally:
        torch.set_num_threads(old_threads)
    flops_per_s = training_flops_per_token(cfg) * rows * T / train_s
    eval_s_per_token_flop = eval_s / (rows * T) / baseline_flops_per_token(cfg)
    return flops_per_s, eval_s_per_token_flop


def estimate_wall(trials: list[Trial], spec: Spec) -> None:
    """Fill `est_wall_s`: training FLOPs / probed FLOPs/s + evaluations scaled by model size.
    GPU specs are left unestimated: a CPU probe says nothing about a GPU's speed."""
    if spec.resources.gpus_per_worker > 0:
        return
    threads = max(1, int(spec.resources.cpus_per_worker))
    for t in trials:
        cfg = ModelConfig.from_dict(t.config["model"])
        probe_cfg = _probe_config(cfg)
        fps, eval_cost = _probe(json.dumps(probe_cfg.to_dict(), sort_keys=True), threads)
        fps *= spec.resources.workers_per_trial
        eval_every = t.config["eval_every"]
        n_evals = 1 + math.ceil(t.steps / eval_every)
        eval_tokens = max(1, spec.eval.eval_tokens // cfg.seq_len) * cfg.seq_len
        t.est_wall_s = t.flops / fps + n_evals * eval_tokens * eval_cost * baseline_flops_per_token(cfg)


# ---------------------------------------------------------------------------
# Dry-run output


def regime_warnings(trials: list[Trial]) -> list[str]:
    """One line per budget whose baseline trains below the paper's tokens-per-parameter regime."""
    below = {}
    for t in trials:
        if t.strategy == "baseline" and t.tokens_per_param is not None and t.tokens_per_param < PAPER_TOKENS_PER_PARAM:
            below.setdefault(t.budget_id, t.tokens_per_param)
    return [f"warning: budget {b}: the baseline trains on {tpp:.2g} tokens per parameter, below the paper's regime "
            f"(>= {PAPER_TOKENS_PER_PARAM:g}), where paying for LRT's ~2x compute with half the tokens decides the "
            "outcome; raise the budget to test the paper's claim" for b, tpp in below.items()]


def format_plan(trials: list[Trial], spec: Spec, search_note: str | None = None) -> str:
    cols = ["trial", "arm", "depth", "budget", "seed", "pair", "params", "tokens", "tok/param", "steps", "FLOPs",
            "est. wall"]
    rows = [[t.trial_id, t.arm, str(t.depth), t.budget_id, str(t.seed), t.pair_id or "-", _si(t.params),
             _si(t.tokens), f"{t.tokens_per_param:.3g}" if t.tokens_per_param is not None else "-", str(t.steps),
             _si(t.flops), f"{t.est_wall_s:.0f}s" if t.est_wall_s is not None else "-"] for t in trials]
    s = plan_summary(trials)
    wall = f"{s['est_wall_s']:.0f}s" if s["est_wall_s"] is not None else "-"
    rows.append(["total", "", "", "", "", "", "", _si(s["tokens"]), "", str(sum(t.steps for t in trials)),
                 _si(s["flops"]), wall])
    if any(t.pool or t.accelerator_type for t in trials):  # where each trial runs, when the spec pins some
        cols.insert(6, "pool")
        for row, cell in zip(rows, [_pool_cell(t) for t in trials] + [""]):
            row.insert(6, cell)
    line, rule = _aligned(cols, rows)
    out = [f"plan for {spec.experiment} ({spec_hash(spec)}): {len(trials)} trials, {spec.matching}-matched",
           line(cols), rule, *map(line, rows[:-1]), rule, line(rows[-1])]
    out.append(f"max FLOPs mismatch within a pair: {s['max_pair_mismatch']:.3%}"
               + (" (tokens-matched: FLOPs differ by design)" if spec.matching == "tokens" else ""))
    if search_note:
        out.append(search_note)
    out += s["regime_warnings"] + spot_warnings(spec, trials)
    if spec.resources.gpus_per_worker > 0:
        out.append("note: no wall-time estimate for GPU trials (the throughput probe runs on this machine's CPU)")
    return "\n".join(out)


def tuning_plan(spec: Spec, trials: list[Trial], root: str | None = None) -> dict | None:
    """The tuning phases of a dry run: per budget and arm, how many trials of which size (estimated)."""
    from .spec import tuning_default_point

    if spec.tuning is None:
        return None
    t = spec.tuning
    phases = []
    for name, template in tuning_templates(spec, trials):
        first = plan_tuning_trial(spec, template, tuning_default_point(spec), 0, root)
        wall = template.est_wall_s * t.trials if template.est_wall_s is not None else None
        phases.append({"phase": name, "arm": template.arm, "budget_id": template.budget_id, "trials": t.trials,
                       "first_trial": first.trial_id, "steps": first.steps, "flops_per_trial": first.flops,
                       "est_wall_s": wall})
    walls = [p["est_wall_s"] for p in phases]
    return {"trials_per_arm": t.trials, "sampler": t.sampler, "seed": t.seed, "train_seed": t.train_seed,
            "metric": t.metric, "space": {k: d.model_dump(exclude_none=True) for k, d in t.space.items()},
            "phases": phases, "trials": t.trials * len(phases),
            "est_wall_s": sum(walls) if None not in walls else None}


def format_tuning(tuning: dict) -> str:
    """The tuning phases as a table, run before the grid plan."""
    dims = "; ".join(f"{k} {d['type']} [{d['low']:g}, {d['high']:g}]" if "low" in d else f"{k} {d['choices']}"
                     for k, d in tuning["space"].items())
    cols = ["phase", "arm", "budget", "trials", "steps/trial", "FLOPs/trial", "est. wall"]
    rows = [[p["phase"], p["arm"], p["budget_id"], str(p["trials"]), str(p["steps"]), _si(p["flops_per_trial"]),
             f"{p['est_wall_s']:.0f}s" if p["est_wall_s"] is not None else "-"] for p in tuning["phases"]]
    line, rule = _aligned(cols, rows)
    return "\n".join([
        f"tuning: {tuning['trials_per_arm']} trials per arm and budget ({tuning['trials']} in all; trial 0 = the "
        f"spec's own settings), {tuning['sampler']} sampler seed {tuning['seed']}, training seed "
        f"{tuning['train_seed']}, minimising {tuning['metric']}; space: {dims}",
        line(cols), rule, *map(line, rows),
        "then the grid below runs every arm with its best setting and the spec's seeds"])


def dry_run(spec: Spec, probe: bool = True, root: str | None = None, trials: list[Trial] | None = None) -> dict:
    """The plan as JSON-ready data (what `--dry-run --json` prints); `trials`: `plan(spec, root)` when the
    caller has it already (planning checks the corpus and the CORE bundle: once is enough)."""
    trials = plan(spec, root) if trials is None else list(trials)
    search = None
    if spec.search is not None:
        default = default_search_trial(spec, root)
        trials.append(default)
        search = {"num_trials": spec.search.num_trials, "space": list(spec.search.space),
                  "first_trial": default.trial_id}
    if probe:
        estimate_wall(trials, spec)
    summary = plan_summary(trials)
    summary["spot_warnings"] = spot_warnings(spec, trials)
    if search is not None and summary["est_wall_s"] is not None:
        summary["est_wall_s"] += (spec.search.num_trials - 1) * trials[-1].est_wall_s
    tuning = tuning_plan(spec, trials, root)
    if tuning is not None:
        summary["est_wall_s"] = None if tuning["est_wall_s"] is None else summary["est_wall_s"] + tuning["est_wall_s"]
    return {"experiment": spec.experiment, "spec_hash": spec_hash(spec), "matching": spec.matching,
            "budget_kind": spec.budgets.kind, "trials": [t.to_dict() for t in trials], "summary": summary,
            "search": search, "tuning": tuning}
