"""Ray Tune / Ray Train glue: one Tune trial per planned trial, the same train() everywhere.

Design choices:
- One Tune function trainable, `trial_fn`. Two execution paths, one loop
  (`lrt_model.train.train`), one checkpoint layout, one way of reporting:
  * workers_per_trial == 1 (fast path): train() runs inside the Tune trial
    process. A one-worker TorchTrainer costs ~25 s of actor start-up per trial
    on 2 cores (measured) for nothing a single process needs.
  * workers_per_trial > 1: the Tune function launches a Ray Train V2
    `TorchTrainer` (the documented V2 pattern); its workers call the same
    train(), which wraps the model in DDP under torch.distributed. Workers
    report with `ray.train.report` (all ranks: it is a barrier), rank 0's
    reports reach Tune through `TuneReportCallback`.
- Checkpoints: train() writes its own atomic checkpoint to a stable per-trial
  directory `<storage>/<experiment>/<hash>/trials/<trial_id>/ckpt` (local or
  s3://) and resumes from it by itself. We report the checkpoint to Tune as
  metadata (`checkpoint_step`, `checkpoint_path`), not as a `tune.Checkpoint`:
  a Tune checkpoint would copy the file into Tune's trial folder on every
  report (double I/O, double storage) while giving nothing train() needs,
  since a retried or restored trial finds its directory from its trial_id.
- Every report carries the last evaluation's metrics (val_bpb, tokens, flops,
  ...), so schedulers and searchers always see the metric they compare on;
  ASHA's time axis is `flops` (or `tokens`), i.e. early stopping at equal
  compute. Our ids go in `lrt_trial_id` and the end marker in `complete`:
  Tune reserves `trial_id` and stops a trial that reports `done`.
- Failures: Tune's `FailureConfig(max_failures)` retries a crashed trial; the
  retry's train() resumes from the trial's checkpoint. In the TorchTrainer
  path Ray Train's own FailureConfig restarts the worker group first.
- Resources: the fast-path trial holds its worker's CPUs/GPUs; in the
  TorchTrainer path the Tune function holds 0.01 CPU (0 is refused) and the
  workers their own. `check_resources` refuses, before anything starts, a
  request that cannot fit (a worker larger than any node, a trial larger than
  the cluster, or max_concurrent_trials trials that do not fit together), so
  nothing can wait forever for resources on a 2-CPU machine.
- Pools: a worker of a trial pinned to a pool (`resources.pool`, or an arm's
  own `resources`) also asks for `pool-<pool>` and `accelerator_type:<type>`
  (`planner.worker_request`), in Tune's request (fast path) or the
  TorchTrainer's `resources_per_worker`. `check_resources` first refuses a
  pool or type the cluster has no node of (`planner.check_pools`), then
  fits each placement on the nodes that carry it. When arms run on
  different pools, Tune asks per trial (`TrialResources`).
- `progress.json` next to each checkpoint records each attempt (the step it
  resumed from, the first step it evaluated), cheap to read on s3 too.
- Grid sweeps: `param_space={"trial_id": tune.grid_search(ids)}`, every
  trial planned up front. `reuse_actors=True`: a finished trial's process
  takes the next one, saving a Python start and a torch import per trial.
- Search sweeps: `OptunaSearch` with a define-by-run space (`SearchSpace`, a
  class so Tune can pickle it for --resume; `when` makes a field conditional),
  a seeded TPE or random sampler, the arm's own settings (the paper's
  defaults) enqueued as trial 0, a `ConcurrencyLimiter`, optional ASHA, the
  study in an RDB (sqlite next to the sweep) that optuna-dashboard can open.
  Each trial is planned by the planner when Optuna has chosen its values.
  OptunaSearch tells Optuna "FAIL" when a trial errors and ignores it after a
  resume; `reconcile_study` records such trials once they finish.
- Tuning (`tuning:`): one Tune experiment and one Optuna study per (budget,
  arm), `tune-<budget_id>-<arm>`, all alike: the same space (`TuningSpace`),
  trial count, sampler and seed, the spec's own optim settings enqueued as
  trial 0, each trial planned from its arm's grid template (`TUNE_BASE` in
  its config) at that arm's grid steps. `best_tuning` reads an arm's best
  values back from the phase's results (so a finished phase, restored on
  --resume, gives the same best without training again).
- Tracking inside trials goes through the trial's outbox (`outbox.py`): each
  record is journaled next to the checkpoint, then sent; a tracking outage is
  printed, never allowed to kill hours of training or lose a metric. The
  journal is opened afresh by whichever process writes (the Tune function,
  then the multi-worker path's rank 0, then the Tune function again to end the
  run). `LRT_FAULT_INJECT="<trial_id part>:<marker
  file>"` (read by the driver) makes a matching trial crash once right after
  its first checkpoint: the resume and retry tests use it.

Example (what `python -m lrt_platform.sweep` does, in short):
    trials = plan(spec, root)
    ctx = SweepContext(spec, spec_hash(spec), root, {t.trial_id: t.to_dict() for t in trials})
    tuner = make_grid_tuner(ctx, [t.trial_id for t in trials], max_concurrent=2, callback=ProgressLog())
    results = tuner.fit()
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from lrt_model.train import Diverged

from . import storage
from .planner import (Trial, alive_nodes, check_pools, eligible, placement, placements, plan_search_trial,
                      plan_tuning_trial, worker_request)
from .render import si
from .spec import Spec, SpecError, default_point, tuning_default_point, when_holds

DRIVER_CPU = 0.01  # the Tune function of a TorchTrainer trial only waits; Ray refuses 0
FAULT_ENV = "LRT_FAULT_INJECT"
OPTUNA_NUMBER = "optuna_trial"  # the Optuna trial number, passed to search trials (0 = the enqueued defaults)
TUNE_BASE = "tune_base"  # a tuning trial's template: its arm's grid trial id at the first seed
# Ray Train V2 control-loop knobs: poll workers often and skip the preemption watcher, which cuts the
# controller's idle waits on small runs (measured on 2 cores: 28.6 s -> 23.1 s per one-worker trial).
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _keep_credentials_out_of_ray_logs() -> None:
    """Ray Tune copies the driver's AWS_* credentials into every trial's runtime_env, and Ray's runtime-env
    agent writes runtime_envs in plain text to its log in the session folder. Trials take credentials from
    their own environment instead: a local Ray inherits the driver's, a cluster's nodes have their own
    (instance profile, IRSA, a secret in the pod spec)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE if not v.startswith("AWS_")}


_keep_credentials_out_of_ray_logs()


class ResourceError(SpecError):
    """The spec asks for resources the cluster cannot give; raised before anything starts."""


@dataclass
class SweepContext:
    """Everything a trial process needs: plain, picklable data shipped once through the object store."""

    spec: Spec
    spec_hash: str
    root: str  # absolute sweep folder (local or s3://)
    trials: dict[str, dict]  # the planned grid trials by trial_id
    tracking_uri: str | None = None
    experiment: str = ""
    parent_run_id: str | None = None
    fault: str | None = field(default_factory=lambda: os.environ.get(FAULT_ENV))


# ---------------------------------------------------------------------------
# Resources


def trial_request(spec: Spec, where: tuple[str | None, str | None] | None = None) -> dict:
    """What the Tune trial itself holds (the TorchTrainer path's workers hold their own); `where` is the
    trial's (pool, accelerator_type), default the spec's own."""
    if spec.resources.workers_per_trial == 1:
        return worker_request(spec, *(where or placement(spec)))
    return {"CPU": DRIVER_CPU}


def trial_footprint(spec: Spec) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds in total while it runs."""
    r = spec.resources
    cpus = r.cpus_per_worker * r.workers_per_trial + (DRIVER_CPU if r.workers_per_trial > 1 else 0.0)
    return cpus, r.gpus_per_worker * r.workers_per_trial


def check_resources(spec: Spec, total: dict, nodes: list[dict]) -> int:
    """The number of trials to run at once; PlanError for a pool or accelerator type no live node has,
    ResourceError if a trial cannot fit the nodes it may run on. `nodes` is `ray.nodes()`, `total`
    `ray.cluster_resources()` (used alone when `nodes` is empty)."""
    nodes = [n for n in nodes if n.get("Alive", True)] or [{"Resources": total}]
    check_pools(spec, nodes)
    cpus, gpus = trial_footprint(spec)
    eps = 1e-9
    fits = 0
    for pool, accelerator in placements(spec):
        fits += _fits(spec, worker_request(spec, pool, accelerator), total, nodes)
    # overlapping placements (a pool and the whole cluster, say) cannot hold more than the cluster does
    fits = min(fits, math.floor(total.get("CPU", 0.0) / cpus + eps))
    if gpus:
        fits = min(fits, math.floor(total.get("GPU", 0.0) / gpus + eps))
    r = spec.resources
    if r.max_concurrent_trials is not None and r.max_concurrent_trials > fits:
        have = f"the cluster has {total.get('CPU', 0.0):g} CPU, {total.get('GPU', 0.0):g} GPU" \
            if list(placements(spec)) == [(None, None)] else f"only {fits} fit on the nodes of their pools"
        raise ResourceError(
            f"resources: max_concurrent_trials={r.max_concurrent_trials} needs {r.max_concurrent_trials} x "
            f"({cpus:g} CPU, {gpus:g} GPU) but {have}; set it to {fits} or less (or leave it out)")
    return r.max_concurrent_trials or max(1, fits)


def _fits(spec: Spec, request: dict, total: dict, nodes: list[dict]) -> int:
    """How many trials whose workers ask for `request` fit on the nodes that carry its custom resources
    (the pool, the accelerator type); ResourceError when not even one does."""
    r = spec.resources
    eps = 1e-9
    custom = [k for k in request if k not in ("CPU", "GPU")]
    on = eligible(request, nodes) if custom else alive_nodes(nodes)
    have = {k: sum(n.get(k, 0.0) for n in on) for k in request} if custom else dict(total)
    big_cpu = max(n.get("CPU", 0.0) for n in on)
    big_gpu = max(n.get("GPU", 0.0) for n in on)
    have_cpu, have_gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
    node, cluster = ("the largest node", "the cluster has") if not custom else \
        (f"the largest node with {' and '.join(custom)}", f"the nodes with {' and '.join(custom)} have")
    worker = f"{r.cpus_per_worker:g} CPU" + (f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else "")
    if r.cpus_per_worker > big_cpu + eps or r.gpus_per_worker > big_gpu + eps:
        raise ResourceError(
            f"resources: one worker needs {worker} but {node} has {big_cpu:g} CPU and {big_gpu:g} GPU; "
            "lower resources.cpus_per_worker / gpus_per_worker or add larger nodes")
    cpus, gpus = trial_footprint(spec)
    what = f"{r.workers_per_trial} worker(s) x {worker}" + \
        (f" + {DRIVER_CPU} CPU for the trial driver" if r.workers_per_trial > 1 else "")
    if cpus > have_cpu + eps or gpus > have_gpu + eps:
        hint = " (on a 2-CPU machine, e.g. cpus_per_worker: 0.99 for 2 workers)" if r.workers_per_trial > 1 else ""
        raise ResourceError(
            f"resources: one trial needs {what} = {cpus:g} CPU, {gpus:g} GPU but {cluster} {have_cpu:g} CPU, "
            f"{have_gpu:g} GPU; lower workers_per_trial or the per-worker resources{hint}")
    fits = math.floor(have_cpu / cpus + eps)
    if gpus:
        fits = min(fits, math.floor(have_gpu / gpus + eps))
    for k in custom:  # pool-<pool>: one unit per GPU on its nodes
        fits = min(fits, math.floor(have[k] / (request[k] * r.workers_per_trial) + eps))
    if fits < 1:
        raise ResourceError(
            f"resources: one trial needs {r.workers_per_trial} x {request[custom[0]]:g} {custom[0]} but {cluster} "
            f"{have[custom[0]]:g}; lower workers_per_trial or add nodes to that pool")
    return fits


class TrialResources:
    """Tune's resource request per trial, when arms run on different pools: a grid trial's by its id,
    a tuning trial's by its template's, a search trial's by the searched arm. A class (not a closure)
    so Tune can pickle it for --resume."""

    def __init__(self, spec: Spec, trials: dict[str, dict]):
        self.by_trial = {tid: trial_request(spec, (t.get("pool"), t.get("accelerator_type")))
                         for tid, t in trials.items()}
        self.search = trial_request(spec, placement(spec, spec.search_arm.name)) if spec.search is not None else None

    def __call__(self, config: dict):
        tid = config.get("trial_id") or config.get(TUNE_BASE)
        return tune.PlacementGroupFactory([self.by_trial[tid] if tid is not None else self.search])


# ---------------------------------------------------------------------------
# Tracking inside trials (best effort)


def make_tracker(uri: str | None, experiment: str):
    """The sweep's Tracker (imported here: MLflow loads only in processes that track)."""
    from .tracking import Tracker

    return Tracker(uri, experiment)


def open_outbox(ctx: SweepContext, trial: Trial):
    """The trial's tracking outbox (journal next to its checkpoint), or None when the sweep is untracked.
    Opened afresh by each process that writes to it: they take turns, never overlap."""
    if not ctx.parent_run_id:
        return None
    from .outbox import TrialOutbox

    return TrialOutbox.open(ctx.root, trial.to_dict(), ctx.tracking_uri, ctx.experiment, ctx.parent_run_id)


def safe(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - tracking must never take a training run down
        print(f"[tracking] {what} failed: {e}", file=sys.stderr, flush=True)
        return None


# ---------------------------------------------------------------------------
# Reporting


def scalars(event: dict) -> dict:
    """The flat numeric/string part of a train() event: what Tune can report and compare."""
    return {k: v for k, v in event.items() if k != "event" and isinstance(v, (int, float, str, bool))}


def _progress_path(ctx: SweepContext, trial_id: str) -> str:
    return storage.join(storage.trial_dir(ctx.root, trial_id), "progress.json")


def _start_attempt(ctx: SweepContext, trial_id: str) -> dict:
    """Record a new attempt; returns the progress record (with `resumed_from_step`)."""
    path = _progress_path(ctx, trial_id)
    prog = storage.read_json(path) or {"attempts": [], "checkpoint_step": None}
    prog["attempts"].append({"started": time.time(), "resumed_from_step": prog["checkpoint_step"],
                             "first_eval_step": None})
    storage.write_json(path, prog)
    return prog


class Reporter:
    """train()'s callback on both execution paths: the trial's outbox, reports to Tune, the progress file
    and fault injection. `report` is `tune.report` in-process, `ray.train.report` on a TorchTrainer worker
    (every rank reports each evaluation: it is a barrier). Only rank 0 tracks, writes progress and sees
    checkpoint events (train() saves on rank 0); a worker cannot report alone, so rank 0 carries the
    checkpoint's step in its next report instead."""

    def __init__(self, ctx: SweepContext, trial: Trial, outbox, prog: dict, report, rank: int = 0,
                 world_size: int = 1):
        self.ctx, self.trial, self.outbox, self.prog, self.report = ctx, trial, outbox, prog, report
        self.rank, self.world_size = rank, world_size
        self.ident = {"lrt_trial_id": trial.trial_id, "arm": trial.arm, "pair_id": trial.pair_id,
                      "seed": trial.seed, "total_steps": trial.steps, "attempt": len(prog["attempts"])}
        self.last: dict = {}
        self.checkpoint: dict = {}

    def __call__(self, event: dict) -> None:
        if self.outbox and self.rank == 0:
            self.outbox.log_event(event)
        kind = event["event"]
        if kind == "eval":
            self.last = {**scalars(event), **self.ident}
            if self.rank == 0:
                self._note_first_eval(event["step"])
            self.report({**self.last, **self.checkpoint})
        elif kind == "checkpoint":
            self.prog["checkpoint_step"] = event["step"]
            self._save_progress()
            self.checkpoint = {"checkpoint_step": event["step"], "checkpoint_path": event["path"]}
            if self.world_size == 1:
                self.report({**self.last, **self.checkpoint})
            self._maybe_fault()
        elif kind == "diverged" and self.rank == 0:  # the Tune function reads it: no retry, a FAILED run
            self.prog["diverged"] = {"step": event["step"], "reason": event["reason"]}
            self._save_progress()
        elif kind == "done":
            resumed = self.prog["attempts"][-1]["resumed_from_step"] or 0
            self.report({**scalars(event), **self.ident, **self.checkpoint, "complete": True,
                         "resumed_from_step": resumed})

    def _note_first_eval(self, step: int) -> None:
        attempt = self.prog["attempts"][-1]
        if attempt["first_eval_step"] is None:
            attempt["first_eval_step"] = step
            self._save_progress()

    def _save_progress(self) -> None:
        storage.write_json(_progress_path(self.ctx, self.trial.trial_id), self.prog)

    def _maybe_fault(self) -> None:
        """LRT_FAULT_INJECT="<part of a trial id>:<marker file>[:kill]": the matching trial fails once, right
        after its first checkpoint: an exception, or with `kill` a SIGKILL of its process (a lost worker)."""
        if not self.ctx.fault:
            return
        target, marker, *mode = self.ctx.fault.split(":", 2)
        if target in self.trial.trial_id and not os.path.exists(marker):
            open(marker, "w").close()
            if mode == ["kill"]:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault ({FAULT_ENV}) after the first checkpoint of {self.trial.trial_id}")


# ---------------------------------------------------------------------------
# The Tune trainable


def _resolve_trial(config: dict, ctx: SweepContext) -> Trial:
    if "trial_id" in config:
        return Trial(**ctx.trials[config["trial_id"]])
    params = {k: decode_choice(v) for k, v in config.items() if k not in (OPTUNA_NUMBER, TUNE_BASE)}
    if TUNE_BASE in config:
        template = Trial(**ctx.trials[config[TUNE_BASE]])
        return plan_tuning_trial(ctx.spec, template, params, int(config[OPTUNA_NUMBER]), ctx.root)
    return plan_search_trial(ctx.spec, params, int(config[OPTUNA_NUMBER]), ctx.root)


def trial_fn(config: dict, ctx: SweepContext) -> None:
    """One Tune trial: plan (search trials), track, train (in-process or through a TorchTrainer), report.
    Returns nothing: Tune would report a returned dict once more."""
    trial = _resolve_trial(config, ctx)
    outbox = open_outbox(ctx, trial)
    if outbox:
        outbox.start()
    try:
        if ctx.spec.resources.workers_per_trial == 1:
            _run_in_process(trial, ctx, outbox)
        else:
            _run_train_workers(trial, ctx)
    except Diverged as e:  # deterministic: a retry would diverge again, so the trial ends here, not as an error
        _end(ctx, trial, "FAILED", str(e))
        tune.report({"lrt_trial_id": trial.trial_id, "arm": trial.arm, "pair_id": trial.pair_id, "diverged": True,
                     "diverged_reason": str(e), "step": e.step, "flops": trial.flops,
                     _objective(ctx.spec): float("inf")})  # the worst value for searchers and schedulers
        return
    except SystemExit:  # Tune stops a trial by raising SystemExit(0) in tune.report (e.g. ASHA)
        _end(ctx, trial, "KILLED", "stopped by Tune (a scheduler decision or Ctrl-C)")
        raise
    except BaseException as e:
        _end(ctx, trial, "FAILED", f"{type(e).__name__}: {e}"[:500])
        raise
    _end(ctx, trial, "FINISHED")


def _objective(spec: Spec) -> str:
    """The metric searchers and schedulers compare trials on."""
    return spec.search.metric if spec.search is not None else spec.tuning.metric if spec.tuning is not None \
        else "val_bpb"


def _end(ctx: SweepContext, trial: Trial, status: str, reason: str | None = None) -> None:
    outbox = open_outbox(ctx, trial)  # re-read: the multi-worker path's rank 0 wrote to the journal meanwhile
    if outbox:
        outbox.end(status, reason)


def _run_in_process(trial: Trial, ctx: SweepContext, outbox) -> None:
    import torch

    from lrt_model.train import TrainConfig, train

    torch.set_num_threads(max(1, int(ctx.spec.resources.cpus_per_worker)))
    prog = _start_attempt(ctx, trial.trial_id)
    train(TrainConfig.from_dict(trial.config), Reporter(ctx, trial, outbox, prog, tune.report))


def _run_train_workers(trial: Trial, ctx: SweepContext) -> None:
    """A TorchTrainer whose workers run `worker_loop`; their reports reach Tune via TuneReportCallback."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    for k, v in TRAIN_ENV.items():  # set in the Tune function: Train V2 propagates them to controller and workers
        os.environ.setdefault(k, v)
    r = ctx.spec.resources
    attempt = len((storage.read_json(_progress_path(ctx, trial.trial_id)) or {"attempts": []})["attempts"]) + 1
    per_worker = worker_request(ctx.spec, trial.pool, trial.accelerator_type)  # CPU, GPU, pool, accelerator
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"trial": trial.to_dict(), "ctx": ctx},
        scaling_config=ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=r.gpus_per_worker > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"{trial.trial_id}-a{attempt}", storage_path=storage.join(ctx.root, "train"),
            failure_config=ray.train.FailureConfig(max_failures=ctx.spec.failure.max_failures),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
    diverged = (storage.read_json(_progress_path(ctx, trial.trial_id)) or {}).get("diverged")
    if diverged:  # the workers returned quietly (a raise would make Ray Train restart them)
        raise Diverged(diverged["step"], diverged["reason"])


def worker_loop(config: dict) -> None:
    """One Ray Train worker: the same train(); every rank reports (a barrier), rank 0 also tracks."""
    import ray.train
    import torch

    from lrt_model.train import TrainConfig, train

    ctx: SweepContext = config["ctx"]
    trial = Trial(**config["trial"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, int(ctx.spec.resources.cpus_per_worker)))
    outbox = open_outbox(ctx, trial) if rank == 0 else None
    # rank 0 records each start of the worker group (a Tune retry or a Ray Train restart) as an attempt;
    # only rank 0's reports reach Tune, so the other ranks need no record
    prog = _start_attempt(ctx, trial.trial_id) if rank == 0 else \
        {"attempts": [{"resumed_from_step": None, "first_eval_step": None}], "checkpoint_step": None}
    reporter = Reporter(ctx, trial, outbox, prog, ray.train.report, rank, context.get_world_size())
    try:
        train(TrainConfig.from_dict(trial.config), reporter)
    except Diverged:  # every rank stops at the same step; rank 0 recorded why for the Tune function
        return


def trainable(ctx: SweepContext):
    """trial_fn with its context bound (shipped once) and its resources declared: one request for every
    trial, or one per trial (`TrialResources`) when arms run on different pools."""
    where = list(placements(ctx.spec))
    resources = trial_request(ctx.spec, where[0]) if len(where) == 1 else TrialResources(ctx.spec, ctx.trials)
    return tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), resources)


# ---------------------------------------------------------------------------
# Optuna search space (define-by-run)


def encode_choice(value):
    """Optuna categorical choices must be scalars; lists (e.g. loss weights) travel as JSON strings."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else "json:" + json.dumps(value)


def decode_choice(value):
    return json.loads(value[5:]) if isinstance(value, str) and value.startswith("json:") else value


def suggest(trial, key: str, d):
    """One dimension of a define-by-run space: Optuna's value for `key` drawn from the Dist `d`."""
    if d.type == "int":
        return trial.suggest_int(key, int(d.low), int(d.high), step=int(d.step or 1))
    if d.type == "float":
        return trial.suggest_float(key, d.low, d.high, step=d.step)
    if d.type == "loguniform":
        return trial.suggest_float(key, d.low, d.high, log=True)
    return trial.suggest_categorical(key, [encode_choice(c) for c in d.choices])


class SearchSpace:
    """Define-by-run space for OptunaSearch: fields in spec order, `when` conditions on earlier values.
    A class (not a closure) so Tune can pickle it into the experiment state for --resume."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def __call__(self, trial) -> dict:
        sampled: dict = {}
        for key, d in self.spec.search.space.items():
            if when_holds(d.when, {k: decode_choice(v) for k, v in sampled.items()}, self.spec):
                sampled[key] = suggest(trial, key, d)
        return {OPTUNA_NUMBER: trial.number}  # constants returned here join the trial's config


class TuningSpace:
    """Define-by-run space of one arm's tuning search: the spec's `tuning.space`, the same for every arm;
    the template's id joins each trial's config so the trial knows its arm and budget."""

    def __init__(self, spec: Spec, template_id: str):
        self.spec, self.template_id = spec, template_id

    def __call__(self, trial) -> dict:
        for key, d in self.spec.tuning.space.items():
            suggest(trial, key, d)
        return {OPTUNA_NUMBER: trial.number, TUNE_BASE: self.template_id}


def make_sampler(kind: str, seed: int):
    """The seeded Optuna sampler a search or a tuning phase names: "tpe" or "random"."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed) if kind == "tpe" else optuna.samplers.RandomSampler(seed=seed)


class StudySearch(OptunaSearch):
    """OptunaSearch that records a trial a scheduler stopped early (ASHA) as PRUNED, with its last reported
    value (Optuna's rule for pruned trials), as optuna-dashboard and `compare` should see it; OptunaSearch
    itself tells Optuna COMPLETE for any trial that ends without an error. A diverged trial stays COMPLETE
    with +inf (the worst value, so the sampler learns to avoid its region)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        stopped = bool(result) and not error and not result.get("complete") and not result.get("diverged")
        if not stopped or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        import optuna

        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except Exception as e:  # noqa: BLE001 - as OptunaSearch does: a bookkeeping error must not stop the sweep
            print(f"[sweep] warning: Optuna did not record trial {trial_id} as pruned: {e}", file=sys.stderr)
        self._completed_trials.add(trial_id)


def make_searcher(ctx: SweepContext, max_concurrent: int):
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    s = ctx.spec.search
    sampler = make_sampler(s.sampler, s.seed)
    url = study_url(ctx)
    metric, mode = ([s.metric, "flops"], [s.mode, "min"]) if s.multi_objective else (s.metric, s.mode)
    points = [{k: encode_choice(v) for k, v in default_point(ctx.spec).items()}] if s.enqueue_defaults else None
    _name_objectives(url, study_name(ctx), metric, mode)
    searcher = StudySearch(space=SearchSpace(ctx.spec), metric=metric, mode=mode, points_to_evaluate=points,
                            sampler=sampler, study_name=study_name(ctx), storage=optuna.storages.RDBStorage(url))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def _name_objectives(url: str, name: str, metric, mode) -> None:
    """Create the study first, with its objectives named (optuna-dashboard shows "Objective 0" otherwise);
    OptunaSearch then loads it (it creates studies with load_if_exists)."""
    import optuna

    metrics, modes = ([metric], [mode]) if isinstance(metric, str) else (list(metric), list(mode))
    directions = ["minimize" if m == "min" else "maximize" for m in modes]
    study = optuna.create_study(storage=url, study_name=name, directions=directions, load_if_exists=True)
    study.set_metric_names(metrics)


def make_tuning_searcher(ctx: SweepContext, phase: str, template_id: str, max_concurrent: int):
    """The same seeded search for every arm: its own study (`<experiment>-<hash>-<phase>`) in the sweep's
    Optuna database, the spec's own optim settings enqueued first."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    t = ctx.spec.tuning
    sampler = make_sampler(t.sampler, t.seed)
    url = storage.optuna_url(ctx.root, ctx.spec.experiment, ctx.spec_hash)
    first = {k: encode_choice(v) for k, v in tuning_default_point(ctx.spec).items()}
    _name_objectives(url, f"{study_name(ctx)}-{phase}", t.metric, "min")
    searcher = StudySearch(space=TuningSpace(ctx.spec, template_id), metric=t.metric, mode="min",
                            points_to_evaluate=[first], sampler=sampler, study_name=f"{study_name(ctx)}-{phase}",
                            storage=optuna.storages.RDBStorage(url))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def best_tuning(spec: Spec, results) -> tuple[dict, float] | None:
    """(best values, best metric) over a tuning phase's finished trials; None when none finished."""
    done = [r for r in results if r.error is None and (r.metrics or {}).get("complete")
            and isinstance(r.metrics.get(spec.tuning.metric), (int, float))]
    if not done:
        return None
    best = min(done, key=lambda r: (r.metrics[spec.tuning.metric], r.config[OPTUNA_NUMBER]))  # ties: earliest
    return {k: decode_choice(best.config[k]) for k in spec.tuning.space}, float(best.metrics[spec.tuning.metric])


def study_name(ctx: SweepContext) -> str:
    return f"{ctx.spec.experiment}-{ctx.spec_hash}"


def study_url(ctx: SweepContext) -> str:
    s = ctx.spec.search
    return s.storage or storage.optuna_url(ctx.root, ctx.spec.experiment, ctx.spec_hash)


def reconcile_study(ctx: SweepContext, results) -> int:
    """A search trial that failed and then finished on --resume was already told to Optuna as FAIL, and
    OptunaSearch ignores its later results; add its final values as a completed trial (once) so the
    study, and optuna-dashboard, see it. Returns how many were added."""
    import optuna

    s = ctx.spec.search
    study = optuna.load_study(study_name=study_name(ctx), storage=study_url(ctx))
    failed = {t.number: t for t in study.trials if t.state == optuna.trial.TrialState.FAIL}
    done = {t.user_attrs.get("resumed_from_trial") for t in study.trials}
    keys = [s.metric, "flops"] if s.multi_objective else [s.metric]
    added = 0
    for r in results:
        m, number = r.metrics or {}, (r.config or {}).get(OPTUNA_NUMBER)
        if r.error is None and m.get("complete") and number in failed and number not in done \
                and all(k in m for k in keys):
            ft = failed[number]
            study.add_trial(optuna.trial.create_trial(params=ft.params, distributions=ft.distributions,
                                                      values=[m[k] for k in keys],
                                                      user_attrs={"resumed_from_trial": number}))
            added += 1
    return added


def make_scheduler(ctx: SweepContext, budget_flops: float, budget_tokens: float):
    s = ctx.spec.search
    if s is None or not s.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    horizon = budget_flops if s.asha.time_attr == "flops" else budget_tokens
    return ASHAScheduler(time_attr=s.asha.time_attr, metric=s.metric, mode=s.mode, max_t=horizon * 1.02,
                         grace_period=horizon * s.asha.grace_fraction, reduction_factor=s.asha.reduction_factor)


# ---------------------------------------------------------------------------
# Tuners


class ProgressLog(tune.Callback):
    """The sweep's live progress (Tune's own output is switched off: verbose=0).

    - One line per trial per evaluation: arm, seed, step/total, tokens, val bpb in the headline view (what
      decoding delivers for LRT), the trial's elapsed time and ETA (from its own steps/s).
    - One line per finished, stopped, diverged or failed trial.
    - Overall: a tqdm bar (trials done / total, Tune's running and queued counts, tqdm's ETA) on a terminal;
      where stderr is not a terminal (CI logs, a pipe) a plain line after each finished trial instead.
    - `quiet` keeps only the per-trial end lines.
    - Notes of the trials' final evaluations (ICL evaluations the settings skip, say) are printed once
      for the whole sweep when it ends, not once per trial.
    `total` is the number of trials the sweep expects over all its phases; on --resume, trials finished
    before are not counted again, so the bar counts this run's trials."""

    def __init__(self, total: int = 0, quiet: bool = False):
        self.total, self.quiet = total, quiet
        self.done, self.started, self.printed, self.t0 = 0, {}, {}, time.time()
        self.notes: dict[str, None] = {}  # every distinct note, in the order first seen
        self.bar = None
        if not quiet and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="[sweep] trials", unit="trial", file=sys.stderr, disable=None,
                            dynamic_ncols=True, bar_format="{desc}: {n}/{total} {bar} {postfix} [{elapsed}<{remaining}]")
            if self.bar.disable:  # not a terminal: plain lines (tqdm would print one per refresh)
                self.bar = None

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks into the experiment state (--resume restores them): the bar holds the
        terminal's file and does not pickle, so a restored ProgressLog prints plain lines."""
        return {**self.__dict__, "bar": None}

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())
        self._refresh(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.quiet or "step" not in result or result.get("complete") or result.get("diverged"):
            return
        step, total = result["step"], result.get("total_steps")
        if self.printed.get(trial.trial_id) == step:  # a checkpoint's report repeats the last evaluation
            return
        self.printed[trial.trial_id] = step
        elapsed = time.time() - self.started.setdefault(trial.trial_id, time.time())
        eta = f", ETA {_duration(elapsed * (total - step) / step)}" if total and step else ""
        bpb = f"val_bpb {result['val_bpb']:.4f}" if isinstance(result.get("val_bpb"), float) else "no eval"
        view = " (sequential)" if "val_bpb_sequential" in result else ""
        self._print(f"[sweep] eval    {result.get('lrt_trial_id', trial.trial_id)} ({result.get('arm')}, seed "
                    f"{result.get('seed')}): step {step}/{total or '?'}, {si(result.get('tokens', 0))} tokens, "
                    f"{bpb}{view}, {_duration(elapsed)}{eta}")
        self._refresh(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        tid = r.get("lrt_trial_id", trial.trial_id)
        bpb = f"val_bpb {r['val_bpb']:.4f}" if isinstance(r.get("val_bpb"), float) else "no eval"
        for line in str(r.get("notes") or "").splitlines():  # e.g. ICL evaluations the settings skip
            self.notes.setdefault(line)
        if r.get("diverged"):
            print(f"[sweep] DIVERGED {tid} (not retried: it would diverge again): {r.get('diverged_reason')}",
                  flush=True)
        elif r.get("complete"):
            self._print(f"[sweep] done    {tid}: {bpb}, {r.get('steps')} steps, {r.get('wall_s', 0):.1f}s training")
        else:
            self._print(f"[sweep] stopped {tid} at step {r.get('step', '?')} by the scheduler: {bpb}")
        self._finished(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        tid = (trial.last_result or {}).get("lrt_trial_id", trial.trial_id)
        err = _first_line(trial.error_file)
        print(f"[sweep] FAILED  {tid}: {err}", flush=True)
        self._finished(trials)

    def _finished(self, trials) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self._refresh(trials)
        elif not self.quiet and self.total:
            elapsed = time.time() - self.t0
            left = max(self.total - self.done, 0)
            eta = f"; ETA ~{_duration(elapsed / self.done * left)}" if left else ""
            print(f"[sweep] {self.done}/{self.total} trials done, {_counts(trials)}{eta}", flush=True)

    def _refresh(self, trials) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(_counts(trials), refresh=True)

    def close(self) -> None:
        """Close the bar; then the trials' notes, each once for the whole sweep (not once per trial)."""
        if self.bar is not None:
            self.bar.close()
        if self.notes:
            print(f"[sweep] notes from the trials' final evaluations ({len(self.notes)}, each once):", flush=True)
            for line in self.notes:
                print(f"  {line}", flush=True)


def _counts(trials) -> str:
    """Tune's running and queued trials of the current phase."""
    status = [t.status for t in trials]
    return f"{status.count('RUNNING')} running, {status.count('PENDING')} queued"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"



def _first_line(error_file: str | None) -> str:
    """The last line of Ray's error file (the exception message), for a one-line report."""
    try:
        fs, path = storage.resolve(error_file)
        with fs.open_input_stream(path) as f:
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip()[:300] if lines else "unknown error"
    except Exception:  # noqa: BLE001 - a missing error file must not hide the failure itself
        return "see the trial's error.txt"


def _run_config(ctx: SweepContext, name: str, callback: ProgressLog, verbose: int) -> tune.RunConfig:
    return tune.RunConfig(name=name, storage_path=ctx.root,
                          failure_config=tune.FailureConfig(max_failures=ctx.spec.failure.max_failures),
                          callbacks=[callback], verbose=verbose)


def _dirname(trial) -> str:
    return str(trial.config.get("trial_id") or f"search_{trial.trial_id}")


def make_grid_tuner(ctx: SweepContext, trial_ids: list[str], max_concurrent: int, callback: ProgressLog,
                    verbose: int = 0, name: str = "grid") -> tune.Tuner:
    return tune.Tuner(
        trainable(ctx),
        param_space={"trial_id": tune.grid_search(trial_ids)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_dirname_creator=_dirname,
                                    reuse_actors=True),
        run_config=_run_config(ctx, name, callback, verbose),
    )


def make_search_tuner(ctx: SweepContext, max_concurrent: int, callback: ProgressLog, budget_flops: float,
                      budget_tokens: float, verbose: int = 0) -> tune.Tuner:
    return tune.Tuner(
        trainable(ctx),
        tune_config=tune.TuneConfig(search_alg=make_searcher(ctx, max_concurrent),
                                    scheduler=make_scheduler(ctx, budget_flops, budget_tokens),
                                    num_samples=ctx.spec.search.num_trials, max_concurrent_trials=max_concurrent,
                                    trial_dirname_creator=_dirname, reuse_actors=True),
        run_config=_run_config(ctx, "search", callback, verbose),
    )


def make_tuning_tuner(ctx: SweepContext, phase: str, template_id: str, max_concurrent: int, callback: ProgressLog,
                      verbose: int = 0) -> tune.Tuner:
    return tune.Tuner(
        trainable(ctx),
        tune_config=tune.TuneConfig(search_alg=make_tuning_searcher(ctx, phase, template_id, max_concurrent),
                                    num_samples=ctx.spec.tuning.trials, max_concurrent_trials=max_concurrent,
                                    trial_dirname_creator=_dirname, reuse_actors=True),
        run_config=_run_config(ctx, phase, callback, verbose),
    )


def restore_tuner(ctx: SweepContext, name: str) -> tune.Tuner | None:
    """The Tuner of an interrupted phase, or None if it never started. Finished trials stay finished;
    errored and unfinished ones run again and resume from their checkpoints. (The RunConfig, its
    ProgressLog callback included, comes back from the experiment state.)"""
    path = storage.join(ctx.root, name)
    if not tune.Tuner.can_restore(path):
        return None
    return tune.Tuner.restore(path, trainable(ctx), resume_unfinished=True, resume_errored=True,
                              restart_errored=False)


def unfinished_trials(ctx: SweepContext, name: str, expected: int) -> int:
    """Trials of a phase that neither finished nor failed, read from the state Tune saved (after Ctrl-C the
    interrupted ones are PENDING again, and grid variants not yet generated are missing)."""
    trials = tune.ExperimentAnalysis(storage.join(ctx.root, name)).trials
    open_ = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return len(open_) + max(0, expected - len(trials))
