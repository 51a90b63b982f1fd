"""MLflow tracking for sweeps: one parent run per sweep, one nested child run per trial.

This is the only module that calls MLflow (a design rule); `compare` reads runs
through `Tracker.load_sweep` and gets plain dicts back.

Design choices:
- `mlflow.MlflowClient` with explicit run ids everywhere, never the fluent
  `mlflow.start_run` API: trials run concurrently in Ray worker processes and a
  process-global "active run" would mix them up.
- Nesting is the `mlflow.parentRunId` tag on each child; the UI folds the
  children under the sweep's run. Runs carry `run_kind` = sweep | trial so
  readers never have to guess which run is the parent.
- Idempotent by construction: a sweep run is found again by its spec hash
  (while unfinished), a trial run by its `trial_id` under the parent, so a
  resumed sweep or a retried trial keeps writing into the same runs. Params are
  immutable in MLflow, so on reuse only params not logged before are sent.
- Metrics go out in `log_batch` calls (1000 metrics / 100 params+tags per
  call, MLflow's limits); the step of every training metric is the optimiser
  step, one axis for all of a run's metrics; `tokens` and `flops` are metrics
  of their own, which the MLflow chart view can put on the x axis to line up
  arms with different batch sizes or costs per token.
- Every client call runs inside `retry`: "database is locked"/"busy" errors
  (concurrent trials writing one sqlite file) and dropped connections are
  retried with jittered exponential backoff. MLflow's sqlite sessions already
  wait up to 20 s on a busy database; the retry covers what that does not
  (a lock held longer, a read that cannot be upgraded to a write). Anything
  else, or a transient error that outlasts the retries, becomes a
  `TrackingError` naming the operation and the store. Retried units are
  idempotent (one log_batch chunk, or a whole find-or-create), so a retry
  never duplicates a run.
- Events: eval -> every finite number in it (NaN train loss before the first
  step is skipped), position buckets as `val_bpb_pos_<bucket>`, any `icl_*`
  key as is; done -> the final metrics at the last step (so `search_runs`
  shows them; trials send events through their outbox, which drops the ones
  that repeat the last evaluation's step); checkpoint -> tags with the last
  checkpoint's step and path (`event_records`).
- A tracking server's HTTP calls fail within seconds (`HTTP_DEFAULTS`), not
  after MLflow's 4 minutes of retries: the trials' outbox keeps what a call
  could not send, and `check_reachable` stops a sweep at start.
- Trial dicts may carry `search` ({name: sampled value}: logged as params
  `search.<name>`, tag search=true) and `trial_number` (tag; the order of a
  search's history). Other scalar trial keys become `trial.<key>` params.
  Tuning trials (`tuning_trial`) are tagged tuning_trial=true and carry no
  pair_id; a tuned arm's grid trials carry tag `tuning` (JSON: sampler,
  trials, space, seed, train_seed, best, best_value).
- Creating a new sqlite database runs MLflow's schema migrations; processes
  doing that at once corrupt it, so opening a sqlite store holds a file lock
  (`<db>.init-lock`) until the schema is in place.
  (SQLite's own rule also applies: a process forked while holding an open
  connection must not use it; Ray workers are fresh processes.)
- A relative `sqlite:///mlflow.db` is made absolute at construction: Ray
  workers run in other directories and would otherwise each open their own
  database. Experiments created on a sqlite store keep their artifacts next to
  the database (`<db dir>/mlartifacts/<experiment>`), not in each worker's cwd.
- MLflow's per-run "View run ..." stdout lines are switched off (unless the
  user set MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT): with hundreds of trials they
  drown the sweep's output; `ui_url()` gives the runs table once.
- The sweep run records what is needed to reproduce it: spec file and hash,
  resolved plan, git commit (+ dirty flag), versions of python/torch/ray/
  mlflow/optuna and the accelerators this process sees.

Example:
    from lrt_platform.tracking import Tracker
    tr = Tracker("sqlite:////tmp/demo.db", "demo")
    sweep = tr.start_sweep("spec.yaml", "experiment: demo\\n", "abc123", plan=[])
    run = tr.start_trial(sweep, {"trial_id": "t0", "arm": "baseline", "budget_id": "b0", "pair_id": "b0-s0",
                                 "seed": 0, "matching": "compute", "strategy": "baseline",
                                 "config": {"model": {"depth": 2}}, "tokens": 1000, "flops": 1e9})
    tr.log_event(run, {"event": "eval", "step": 1, "tokens": 512, "flops": 5e8, "val_bpb": 2.5, "train_loss": 1.9})
    tr.end_trial(run)
    tr.end_sweep(sweep)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "run_kind"  # "sweep" or "trial"
TRIAL_TAGS = ("trial_id", "arm", "budget_id", "pair_id", "seed", "matching", "strategy", "depth", "trial_number")
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# A training experiment, not a GenAI one. MLflow 3.17's UI picks its layout from a browser setting that
# defaults to GenAI, whatever this tag says: the links we print add UI_LAYOUT, which selects model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
UI_LAYOUT = "?workflowType=machine_learning"

# MLflow's limits (mlflow.utils.validation); hard-coded so a limit change shows up as a test failure.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000

# Substrings of errors worth retrying: sqlite lock contention and dropped connections.
_TRANSIENT = ("database is locked", "database table is locked", "database is busy", "sqlite_busy",
              "connection refused", "connection reset", "connection aborted", "remote end closed",
              "temporarily unavailable")


# MLflow's HTTP client retries a dead server for about 4 minutes per call by default. The trials' outbox
# keeps whatever a call could not send, so calls fail within seconds instead (the user's settings win).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(RuntimeError):
    """An MLflow operation failed for good; the message names the operation and the store."""


class ExperimentNotFound(TrackingError):
    """`compare` was pointed at an experiment that does not exist."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """None -> $MLFLOW_TRACKING_URI -> sqlite:///mlflow.db; relative sqlite paths become absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    path = _sqlite_path(uri)
    if path is not None and not os.path.isabs(path):
        uri = "sqlite:///" + os.path.abspath(path)
    return uri


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else path


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    if "max retries exceeded" in text:  # MLflow's HTTP layer already retried for minutes; do not multiply that
        return False
    return any(s in text for s in _TRANSIENT)


def retry(what: str, fn: Callable, *, where: str = "", attempts: int = 8, base_delay: float = 0.05,
          max_delay: float = 4.0, sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call fn(); retry transient errors with jittered exponential backoff, wrap the rest in TrackingError."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as e:  # MLflow raises MlflowException, sqlalchemy/sqlite OperationalError, requests errors
            if not _is_transient(e):
                raise TrackingError(f"MLflow {what} failed ({where}): {type(e).__name__}: {e}") from e
            if attempt == attempts:
                raise TrackingError(
                    f"MLflow {what} still failed after {attempts} attempts ({where}): {e}. The store is "
                    "overloaded; for many concurrent trials point tracking at an `mlflow server` with a "
                    "server-grade database"
                ) from e
            # Full jitter keeps concurrent writers from retrying in lock-step.
            sleep(delay * random.uniform(0.5, 1.5))
            delay = min(max_delay, delay * 2)


# ---------------------------------------------------------------------------
# Small pure helpers


def flatten(d: dict, prefix: str = "") -> dict:
    """{"model": {"depth": 4}} -> {"model.depth": 4}; empty dicts stay as leaves."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _text(v: Any, limit: int) -> str:
    s = json.dumps(v, default=str) if isinstance(v, (list, tuple, dict)) else str(v)
    return s if len(s) <= limit else s[: limit - 14] + "...[truncated]"


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . / space and colon."""
    return re.sub(r"[^\w\-./ :]", "_", str(name))[:250]


def _summary_part(name: Any) -> str:
    """A budget id or arm inside a summary key: anything but letters, digits, _ and - becomes _, so the
    key's dots stay separators and MLflow never sees `..` or `/` path segments."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", str(name))[:100]


def _unlogged(params: dict, logged: dict) -> tuple[dict, list[str]]:
    """MLflow params are immutable: (the params not logged yet, the names already logged with another value)."""
    new = {k: v for k, v in params.items() if k not in logged}
    conflicts = sorted(k for k, v in params.items() if k in logged and logged[k] != _text(v, MAX_PARAM_VALUE))
    return new, conflicts


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None  # strings, None, NaN (the pre-training eval has no train loss), inf


def event_metrics(event: dict) -> dict[str, float]:
    """Every finite number in a trainer event, position buckets flattened to val_bpb_pos_<bucket>."""
    out = {}
    for k, v in event.items():
        if k in ("event", "evals"):
            continue
        if k == "val_bpb_by_position" and isinstance(v, dict):
            out.update({_key(f"val_bpb_pos_{b}"): x for b, x in v.items() if _number(x) is not None})
        elif isinstance(v, dict):  # future nested metrics (e.g. per-task ICL scores)
            out.update({_key(f"{k}.{s}"): _number(x) for s, x in flatten(v).items() if _number(x) is not None})
        elif _number(v) is not None:
            out[_key("train_step" if k == "step" else k)] = _number(v)
    return out


def event_records(event: dict) -> tuple[list[tuple[str, float, int]], dict[str, str]]:
    """A trainer event as MLflow points (key, value, step) and tags. eval/done: every finite number at
    step = the optimiser step (done also tags `finished`), so every metric of a run shares one step axis;
    tokens and FLOPs are metrics of their own; checkpoint: `checkpoint_step` and tags naming it."""
    kind = event.get("event")
    if kind == "diverged":  # the reason goes in failure_reason when the run ends
        return [], {"diverged": "true", "diverged_step": str(event.get("step", ""))}
    if kind == "checkpoint":
        step = int(event.get("step", 0))
        return [("checkpoint_step", float(step), step)], {
            "last_checkpoint_step": str(step), "last_checkpoint_path": str(event.get("path", "")),
            "checkpoint_dir": str(event.get("checkpoint_dir", ""))}
    step = int(event.get("step", event.get("steps", 0)) or 0)  # done carries `steps`, the run's last step
    tags = {"finished": str(bool(event.get("finished", True))).lower()} if kind == "done" else {}
    return [(k, v, step) for k, v in event_metrics(event).items()], tags


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive advisory lock across processes on this machine (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: one process at a time is the user's job there
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _quote(value: str) -> str | None:
    """A search-filter string literal; MLflow has no escapes, so values with both quote kinds return None."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


# ---------------------------------------------------------------------------
# Environment facts for the sweep run


def _git_info() -> dict[str, str]:
    """Commit of the code that runs (this package's checkout), if it is a git checkout."""
    here = str(Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "git_commit": commit.stdout.strip(),
            "git_dirty": str(bool(dirty.stdout.strip())).lower()}


def _versions() -> dict[str, str]:
    out = {"version.python": sys.version.split()[0]}
    for pkg in ("torch", "ray", "mlflow", "optuna"):
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def _accelerators() -> dict[str, str]:
    """What this process sees; on a Ray cluster the driver may see fewer GPUs than the workers,
    so the cluster's totals are added when Ray is already initialised."""
    tags = {"cpu_count": str(os.cpu_count())}
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = Counter(torch.cuda.get_device_name(i) for i in range(n))
        tags["accelerators"] = ", ".join(f"{c}x {name}" for name, c in names.items()) if n else "cpu"
    except Exception as e:  # a broken CUDA install must not stop the sweep
        tags["accelerators"] = f"unknown ({type(e).__name__})"
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            res = ray.cluster_resources()
            tags["ray.cluster_cpus"] = str(res.get("CPU", 0))
            tags["ray.cluster_gpus"] = str(res.get("GPU", 0))
        except Exception:
            pass
    return tags


# ---------------------------------------------------------------------------
# The tracker


class Tracker:
    """MLflow writer and reader for one experiment. Cheap to create; picklable (the client is
    rebuilt lazily in each process), so a Ray trial can receive it."""

    def __init__(self, tracking_uri: str | None, experiment: str, *, attempts: int = 8, base_delay: float = 0.05):
        # MLflow prints two "View run" lines per finished run against a server; a sweep prints the
        # runs-table URL once instead. Set the variable to false to get them back.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.attempts = attempts
        self.base_delay = base_delay
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = self._open_client()
        return self._client

    def _open_client(self):
        from mlflow import MlflowClient

        path = _sqlite_path(self.tracking_uri)
        if path is None:
            return MlflowClient(tracking_uri=self.tracking_uri)
        # Constructing the client creates and migrates a sqlite schema; processes doing that at once
        # on a new file collide ("table ... already exists", half-applied migrations). One at a time.
        with _file_lock(path + ".init-lock"):
            return self._retry("open the sqlite store", lambda: MlflowClient(tracking_uri=self.tracking_uri))

    def _retry(self, what: str, fn: Callable) -> Any:
        where = f"tracking URI {self.tracking_uri}, experiment {self.experiment!r}"
        return retry(what, fn, where=where, attempts=self.attempts, base_delay=self.base_delay)

    def check_reachable(self, timeout_s: float = 10.0) -> None:
        """A tracking server (http/https URI) must answer /health within timeout_s: TrackingError otherwise,
        in one line, so a sweep stops before anything starts instead of training untracked."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        import requests

        try:
            r = requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
            reason = None if r.status_code == 200 else f"/health answered HTTP {r.status_code}"
        except requests.RequestException as e:
            text = str(e).lower()
            reason = next((s for s in ("connection refused", "name or service not known", "timed out")
                           if s in text), type(e).__name__)
        if reason:
            raise TrackingError(f"tracking server {self.tracking_uri} is unreachable ({reason}); start it, or point "
                                "tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI at a running one")

    def ui_url(self) -> str | None:
        """The runs table of this experiment (the UI opens experiments on another page)."""
        if not self.tracking_uri.startswith("http") or self._experiment_id is None:
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs{UI_LAYOUT}"

    # -- experiment ---------------------------------------------------------

    def experiment_id(self, create: bool = True) -> str:
        path = _sqlite_path(self.tracking_uri)
        if not create and path is not None and not os.path.exists(path):  # reading must not create a database
            raise ExperimentNotFound(f"experiment {self.experiment!r} not found: no MLflow database at {path}")
        if self._experiment_id is None:
            self._experiment_id = self._retry("get or create experiment", lambda: self._get_experiment(create))
        return self._experiment_id

    def _get_experiment(self, create: bool) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None and not create:
            names = sorted(e.name for e in self.client.search_experiments(max_results=50))
            raise ExperimentNotFound(
                f"experiment {self.experiment!r} not found at {self.tracking_uri}"
                + (f" (experiments there: {', '.join(names)})" if names else " (it has no experiments)")
            )
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self._artifact_location(),
                                                     tags=EXPERIMENT_TAGS)
            except MlflowException as e:  # another process created it first
                if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment {self.experiment!r} at {self.tracking_uri} is deleted; restore it with "
                f"`mlflow experiments restore --experiment-id {exp.experiment_id}` or pick another name"
            )
        return exp.experiment_id

    def _artifact_location(self) -> str | None:
        path = _sqlite_path(self.tracking_uri)
        if path is None:
            return None  # a server or other store decides (an `mlflow server` proxies artifacts)
        slug = re.sub(r"[^\w.-]", "_", self.experiment)
        return (Path(path).resolve().parent / "mlartifacts" / slug).as_uri()

    # -- low-level writes (callers wrap them in _retry) -----------------------

    def _send(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        ts = _now_ms()
        ms = [Metric(m[0], m[1], m[3] if len(m) > 3 else ts, m[2]) for m in metrics]
        ps = [Param(k, _text(v, MAX_PARAM_VALUE)) for k, v in params]
        tg = [RunTag(k, _text(v, MAX_TAG_VALUE)) for k, v in tags]
        for chunk in _chunks(ms, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)
        for chunk in _chunks(ps + tg, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=[x for x in chunk if isinstance(x, Param)],
                                  tags=[x for x in chunk if isinstance(x, RunTag)])

    def _log(self, what: str, run_id: str, metrics=(), params=(), tags=()) -> None:
        """One retried unit per MLflow batch, so a retry never re-sends an accepted batch."""
        metrics, items = list(metrics), [("p", kv) for kv in params] + [("t", kv) for kv in tags]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self._retry(what, lambda c=chunk: self._send(run_id, metrics=c))
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            ps = [kv for kind, kv in chunk if kind == "p"]
            tg = [kv for kind, kv in chunk if kind == "t"]
            self._retry(what, lambda p=ps, t=tg: self._send(run_id, params=p, tags=t))

    def set_tags(self, run_id: str, tags: dict) -> None:
        self._log("set_tags", run_id, tags=tags.items())

    # -- sweep --------------------------------------------------------------

    def start_sweep(self, spec_path: str, spec_text: str, spec_hash: str, plan: list[dict],
                    sweep_kind: str | None = None, resume: bool = True) -> str:
        """The sweep's parent run id; with resume, an unfinished sweep run with the same spec hash is
        reused (without: always a new run, e.g. for --overwrite).
        sweep_kind (tag): given, or "search" when the plan has search values or the spec a `search:` block."""
        exp_id = self.experiment_id()
        kind = sweep_kind or ("search" if any(t.get("search") for t in plan) or _spec_searches(spec_text) else "grid")
        run_id, resumed = self._retry("start_sweep",
                                      lambda: self._find_or_create_sweep(exp_id, spec_hash, spec_path, resume))
        tags = {"spec_hash": spec_hash, "spec_path": spec_path, "sweep_kind": kind, "n_trials": len(plan),
                "experiment": self.experiment, "resumed": resumed,
                **_git_info(), **_versions(), **_accelerators()}
        self.set_tags(run_id, tags)
        name = os.path.basename(spec_path) or "spec.yaml"
        self._retry("log spec", lambda: self.client.log_text(run_id, spec_text, f"spec/{name}"))
        plan_json = json.dumps(plan, indent=1, default=str)
        self._retry("log plan", lambda: self.client.log_text(run_id, plan_json, "plan.json"))
        return run_id

    def _find_or_create_sweep(self, exp_id: str, spec_hash: str, spec_path: str, resume: bool) -> tuple[str, int]:
        quoted = _quote(spec_hash)
        flt = f"tags.{KIND_TAG} = 'sweep'" + (f" and tags.spec_hash = {quoted}" if quoted else "")
        runs = self.client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                                       max_results=1000) if resume else []
        for run in runs:
            if run.info.status != "FINISHED" and run.data.tags.get("spec_hash") == spec_hash:
                self.client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, int(run.data.tags.get("resumed", "0")) + 1
        stem = Path(spec_path).stem or "sweep"
        run = self.client.create_run(exp_id, run_name=f"{stem}-{spec_hash[:8]}",
                                     tags={KIND_TAG: "sweep", "spec_hash": spec_hash})
        return run.info.run_id, 0

    def end_sweep(self, parent_run_id: str, status: str = "FINISHED") -> None:
        """Close the sweep run, with the children's status counts as tags (n_FINISHED, n_FAILED, ...)."""
        _check_status(status)
        counts = Counter(r.info.status for r in self._children(parent_run_id))
        self.set_tags(parent_run_id, {f"n_{s}": c for s, c in counts.items()})
        self._retry("end_sweep", lambda: self.client.set_terminated(parent_run_id, status=status))

    # -- trials -------------------------------------------------------------

    def start_trial(self, parent_run_id: str, trial: dict) -> str:
        """The trial's child run id; the same trial_id under the same parent always gets the same run."""
        if "trial_id" not in trial:
            raise TrackingError("start_trial needs trial['trial_id'] (it makes retried trials reuse their run)")
        exp_id = self.experiment_id()
        return self._retry("start_trial", lambda: self._find_or_create_trial(exp_id, parent_run_id, trial))

    def _find_or_create_trial(self, exp_id: str, parent_run_id: str, trial: dict) -> str:
        tags, params = trial_tags(trial), trial_params(trial)
        run = self._find_trial(exp_id, parent_run_id, tags["trial_id"])
        if run is None:
            run = self.client.create_run(exp_id, run_name=trial.get("name") or _trial_name(trial),
                                         tags={**tags, PARENT_TAG: parent_run_id, KIND_TAG: "trial"})
            self._send(run.info.run_id, params=params.items())  # tags went in with create_run
            return run.info.run_id
        run_id, old = run.info.run_id, run.data
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        tags["attempts"] = int(old.tags.get("attempts", "1")) + 1
        if "failure_reason" in old.tags:  # keep the history, but the run is no longer failed
            tags["previous_failure_reason"] = old.tags["failure_reason"]
            self.client.delete_tag(run_id, "failure_reason")
        new, conflicts = _unlogged(params, old.params)
        if conflicts:  # params are immutable in MLflow; say so instead of failing the trial
            tags["param_conflicts"] = ",".join(conflicts)
        self._send(run_id, params=new.items(), tags=tags.items())
        return run_id

    def _find_trial(self, exp_id: str, parent_run_id: str, trial_id: str):
        quoted = _quote(trial_id)
        flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and tags.trial_id = {quoted}" if quoted else "")
        runs = self.client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time ASC"],
                                       max_results=1000)
        runs = [r for r in runs if r.data.tags.get("trial_id") == trial_id]
        return runs[0] if runs else None  # the oldest wins if a race ever made two

    def log_event(self, run_id: str, event: dict) -> None:
        """One trainer callback event -> one batch (see `event_records`)."""
        metrics, tags = event_records(event)
        self._log(f"log {event.get('event')} event", run_id, metrics=metrics, tags=tags.items())

    def log_metrics(self, run_id: str, metrics: list[tuple]) -> None:
        """(key, value, step) or (key, value, step, timestamp_ms) points; a point sent again with its
        timestamp is dropped by MLflow's SQL stores, so the outbox can re-send safely."""
        self._log("log metrics", run_id, metrics=metrics)

    def end_trial(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        _check_status(status)
        if reason:
            self._log("set failure_reason", run_id, tags=[("failure_reason", reason)])
        self._retry("end_trial", lambda: self.client.set_terminated(run_id, status=status))

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._retry("log_artifacts", lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._retry("log_text", lambda: self.client.log_text(run_id, text, artifact_file))

    def log_sweep_summary(self, parent_run_id: str, report: dict, renders: dict[str, str] | None = None) -> None:
        """The comparison on the sweep's parent run, so MLflow shows the answer. Per (budget, LRT arm),
        `<where>` = `<budget>.<arm>`: metrics `delta`, `delta_ci_low`, `delta_ci_high`, `relative`, `mde`,
        `seeds_needed` and `compute_multiplier` (`.<where>`, where the report has them); param and tag
        `verdict.<where>` (a param too, so the runs table can show it as a column; params are immutable,
        so a verdict that changed on a re-run is in the tag, and the tag `verdict_param_conflicts` names
        it); artifacts comparison.json (the report, JSON-safe as `compare --format json` writes it) and
        `renders` ({file name: text}, e.g. comparison.txt / .md / .html)."""
        verdicts, metrics = {}, []
        for c in report.get("comparisons", []):
            where = f"{_summary_part(c['budget_id'])}.{_summary_part(c['arm'])}"
            if c.get("verdict"):
                verdicts[f"verdict.{where}"] = c["verdict"]
            delta, rel = c.get("delta") or {}, c.get("relative") or {}
            ci = delta.get("ci95") or (None, None)
            for name, value in (("delta", delta.get("mean")), ("delta_ci_low", ci[0]), ("delta_ci_high", ci[1]),
                                ("relative", rel.get("mean")), ("mde", c.get("mde")),
                                ("seeds_needed", c.get("seeds_needed")),
                                ("compute_multiplier", (c.get("compute_multiplier") or {}).get("value"))):
                if _number(value) is not None:
                    metrics.append((f"{name}.{where}", _number(value), 0))
        old = self._retry("read sweep run", lambda: self.client.get_run(parent_run_id)).data.params
        params, conflicts = _unlogged(verdicts, old)
        tags = dict(verdicts)
        if conflicts:
            tags["verdict_param_conflicts"] = ",".join(conflicts)
        self._log("log sweep summary", parent_run_id, metrics=metrics, params=params.items(), tags=tags.items())
        self.log_text(parent_run_id, json.dumps(report, indent=2, default=str), "comparison.json")
        for name, text in (renders or {}).items():
            self.log_text(parent_run_id, text, name)

    # -- reading (for compare) ------------------------------------------------

    def _search_all(self, exp_id: str, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([exp_id], filter_string=filter_string, max_results=1000,
                                           order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _children(self, parent_run_id: str) -> list:
        exp_id = self.experiment_id()
        return self._retry("list trial runs",
                           lambda: self._search_all(exp_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'"))

    def load_sweep(self, sweep_run_id: str | None = None) -> dict:
        """The sweep run (latest if None) and its trial runs, as plain dicts for `compare`."""
        exp_id = self.experiment_id(create=False)
        if sweep_run_id is None:
            sweeps = self._retry("find sweeps", lambda: self._search_all(exp_id, f"tags.{KIND_TAG} = 'sweep'"))
            if not sweeps:
                raise TrackingError(f"experiment {self.experiment!r} at {self.tracking_uri} has no sweep runs "
                                    f"(runs tagged {KIND_TAG}=sweep); run a sweep first")
            parent = max(sweeps, key=lambda r: r.info.start_time)
        else:
            parent = self._retry("get sweep run", lambda: self.client.get_run(sweep_run_id))
            if parent.info.experiment_id != exp_id:
                raise TrackingError(f"run {sweep_run_id} belongs to experiment id {parent.info.experiment_id}, "
                                    f"not to {self.experiment!r} (id {exp_id})")
        children = self._children(parent.info.run_id)
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "experiment_id": exp_id,
                "ui_url": self.ui_url(), "sweep": _run_dict(parent), "trials": [_run_dict(r) for r in children]}

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        hist = self._retry("get_metric_history", lambda: self.client.get_metric_history(run_id, key))
        return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def _spec_searches(spec_text: str) -> bool:
    """Whether the spec has a search block (search trials are only planned once Optuna samples them)."""
    try:
        import yaml

        spec = yaml.safe_load(spec_text)
    except Exception:
        return False
    return isinstance(spec, dict) and bool(spec.get("search"))


def _check_status(status: str) -> None:
    if status not in FINAL_STATUSES:
        raise ValueError(f"status={status!r}; use one of {', '.join(FINAL_STATUSES)}")


def _trial_name(trial: dict) -> str:
    return f"{trial.get('arm', 'trial')}-{trial.get('budget_id', '')}-seed{trial.get('seed', '')}".strip("-")


def trial_tags(trial: dict) -> dict[str, str]:
    tags = {k: str(trial[k]) for k in TRIAL_TAGS if trial.get(k) is not None}
    depth = ((trial.get("config") or {}).get("model") or {}).get("depth")
    if "depth" not in tags and depth is not None:
        tags["depth"] = str(depth)
    if trial.get("search"):
        tags["search"] = "true"
    if trial.get("tuning_trial"):  # equal-effort tuning: never paired (no pair_id), compare leaves it out
        tags["tuning_trial"] = "true"
    if trial.get("tuning"):  # a tuned arm's grid trial: how the arm was tuned and its best values
        tags["tuning"] = json.dumps(trial["tuning"], sort_keys=True)
    return tags


def trial_params(trial: dict) -> dict[str, Any]:
    """Flattened resolved config + the trial's other scalars (planned tokens/flops, ...) + search values."""
    params = {_key(k): v for k, v in flatten(trial.get("config") or {}).items()}
    for k, v in trial.items():
        if k not in TRIAL_TAGS and k not in ("config", "search", "name") and not isinstance(v, (dict, list)):
            params[_key(f"trial.{k}")] = v
    for k, v in (trial.get("search") or {}).items():
        params[_key(f"search.{k}")] = v
    return params


def _run_dict(run) -> dict:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": dict(run.data.metrics)}
