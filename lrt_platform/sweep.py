"""`python -m lrt_platform.sweep SPEC`: run a whole study on a Ray cluster (local by default).

Design choices:
- The flow is the architecture's: spec -> plan -> search -> train -> track ->
  compare. Everything that can be wrong with a spec (unknown keys, bad values,
  budgets too small to match, resources the cluster cannot give, a pool or
  accelerator type it has no node of) fails before any trial starts (and
  before --overwrite deletes anything), as ONE line on stderr and exit code 2,
  no traceback.
- Where it runs: no --address and no RAY_ADDRESS -> a fresh local Ray (no
  dashboard: seconds faster to start; listening on 127.0.0.1 only); RAY_ADDRESS set (inside `ray job
  submit`) or --address auto|ray://... -> that cluster. A Ray already
  initialised in this process (tests) is used as is.
- A sweep lives in `<storage>/<experiment>/<spec_hash>/`. Grid sweeps run one
  Tune experiment `grid`; search sweeps run `grid` (the baseline references)
  then `search` (Optuna). Tuned sweeps (`tuning:`) first run one Tune
  experiment per budget and arm, `tune-<budget_id>-<arm>`, one after another
  (the same search for every arm), then `grid` with each arm's best values;
  the grid waits until every arm's tuning finished without failures, and
  on --resume a finished tuning phase gives back its best without training.
  Running a spec whose folder exists needs --resume
  (continue: finished trials are not rerun, interrupted ones continue from
  their checkpoints) or --overwrite (start over).
- Data is prepared once in the driver (corpus build, tokenizer training), so
  concurrent trials find it cached instead of racing to build it.
- At the end: one line per trial (as they finish), the comparison table for
  this sweep's tracking run (verdicts, power, tuning; also logged to that run:
  `verdict.*` tags, comparison.json/.txt), where to look in the MLflow UI, and the
  orchestration overhead: ((sweep wall time - data preparation) x trial slots
  - sum of the trials' own training wall_s) / trials, over the trials that
  ran in this invocation. Ray start-up, tracking set-up, Tune, idle slots and
  the final report all count as overhead; counting slots (not just wall time)
  keeps concurrent trials from hiding it.
- Ctrl-C: Tune stops the trials and saves its state; the sweep run is marked
  KILLED and --resume continues it.
- Exit codes: 0 all trials finished, 1 some trials failed (rerun with
  --resume), 2 the spec or the cluster cannot run the sweep, 130 interrupted.

Example:
    python -m lrt_platform.sweep sweep_specs/quickstart.yaml --dry-run
    python -m lrt_platform.sweep sweep_specs/quickstart.yaml
    python -m lrt_platform.sweep sweep_specs/quickstart.yaml --resume
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m lrt_platform.sweep sweep_specs/scaling.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from lrt_model.config import ConfigError
from lrt_model.data import DataError

from . import storage
from .planner import (PlanError, Trial, apply_tuning, check_pools, check_search_budget, dry_run, format_plan,
                      format_pool_capacity, format_tuning, plan, pool_capacity,
                      regime_warnings, spot_warnings, tuning_templates)
from .spec import Spec, SpecError, load_spec, spec_hash
from .tracking import UI_LAYOUT, Tracker, TrackingError

SWEEP_PENDING = "sweep_tracking.json"  # the sweep run's end, kept while trial records wait for MLflow
# A local Ray serves this machine only: loopback as its node address (what Ray does on macOS and Windows)
# makes its servers listen on 127.0.0.1, not on every interface. Ray reads this when it is imported.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrt_platform.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="a sweep spec (YAML), e.g. sweep_specs/quickstart.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the plan (with estimated wall times) and exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--no-probe", action="store_true", help="with --dry-run: skip the throughput probe")
    p.add_argument("--resume", action="store_true", help="continue the sweep stored for this spec")
    p.add_argument("--overwrite", action="store_true", help="delete the sweep stored for this spec and start over")
    p.add_argument("--address", default=None, help="Ray cluster: auto | ray://host:10001 (default: a local Ray)")
    p.add_argument("--storage", default=None, help="override the spec's storage (local path or s3:// URI)")
    p.add_argument("--tracking-uri", default=None, help="override the spec's MLflow tracking URI")
    p.add_argument("--quiet", action="store_true",
                   help="no per-evaluation lines or progress bar (CI logs): one line per finished trial")
    p.add_argument("--sync-tracking", action="store_true",
                   help="send the tracking records that an MLflow outage left next to the trials' checkpoints, "
                        "then close the sweep run; trains nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SpecError, PlanError, ConfigError, DataError, TrackingError) as e:
        msg = str(e)
        print(f"error: {msg if msg.startswith(args.spec) else f'{args.spec}: {msg}'}", file=sys.stderr)
        return 2


def load(args) -> tuple[Spec, str]:
    spec = load_spec(args.spec)
    if args.storage:
        spec = spec.model_copy(update={"storage": args.storage})
    if args.tracking_uri:
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": args.tracking_uri})})
    with open(args.spec) as f:
        return spec, f.read()


def run(args) -> int:
    t_start = time.time()
    spec, text = load(args)
    h = spec_hash(spec)
    root = storage.sweep_root(spec.storage, spec.experiment, h)
    trials = plan(spec, root)
    if spec.search is not None:
        check_search_budget(spec)  # a budget the searched configs cannot match fails here, not in a trial
    if args.dry_run:
        return _print_dry_run(spec, root, args, trials)
    if args.sync_tracking:
        return sync_tracking(spec, root, args.spec)
    tuning = [name for name, _ in tuning_templates(spec, trials)] if spec.tuning is not None else []
    phases = tuning + ["grid"] + (["search"] if spec.search is not None else [])
    # a dead tracking server is one line now (before --overwrite deletes anything), not minutes of HTTP
    # retries followed by untracked trials
    Tracker(_tracking_uri(spec.tracking.uri), spec.experiment_name).check_reachable()
    _check_existing(spec, root, phases, args)
    local_ray_on_loopback(args.address)
    from .execution import safe  # Ray is imported only once a sweep really runs: dry runs and errors stay fast

    clock = {"start": t_start}
    slots = _start_cluster(spec, args.address, clock)  # a pool or resources the cluster lacks: refused here
    if args.overwrite:
        _remove_sweep(spec, root)
    ctx, tracker = _start_tracking(spec, args.spec, text, h, root, trials, clock, resume=not args.overwrite)
    n_planned = len(trials) + (spec.search.num_trials if spec.search else 0) + \
        (len(tuning) * spec.tuning.trials if spec.tuning else 0)
    print(f"[sweep] {spec.experiment} ({h}): {n_planned} trials, {min(slots, n_planned)} at a time, "
          f"{'resuming, ' if args.resume else ''}storage {root}", flush=True)
    for line in regime_warnings(trials) + spot_warnings(spec, trials):
        print(f"[sweep] {line}", flush=True)
    results, unfinished = _run_phases(ctx, trials, phases, slots, args.resume, args.quiet)
    clock["tune"] = time.time()
    failed = [r for r in results if r.error is not None]
    status = "KILLED" if unfinished else "FAILED" if failed else "FINISHED"
    delivered = _deliver(ctx, tracker, status, args.spec)
    if delivered and ctx.parent_run_id:
        safe("end_sweep", tracker.end_sweep, ctx.parent_run_id, status)
    _report(spec, ctx.tracking_uri, tracker, ctx.parent_run_id, results, clock, slots if not unfinished else 0,
            delivered)
    _print_next(spec, args.spec, ctx.root, delivered)
    again = f"python -m lrt_platform.sweep {args.spec} --resume"
    if unfinished:
        print(f"[sweep] interrupted with {unfinished} trial(s) unfinished; continue with: {again}", file=sys.stderr)
        return 130
    if failed:
        print(f"[sweep] {len(failed)} trial(s) failed; retry them with: {again}", file=sys.stderr)
        return 1
    return 0


def _start_cluster(spec: Spec, address: str | None, clock: dict) -> int:
    """Connect to (or start) Ray, check the spec's resources against it, prepare the data once.
    Returns how many trials run at once."""
    from .execution import check_resources

    _connect(address)
    import ray

    slots = check_resources(spec, ray.cluster_resources(), ray.nodes())
    clock["ray"] = time.time()
    _prepare_data(spec)
    clock["data"] = time.time()
    return slots


def _start_tracking(spec: Spec, spec_path: str, text: str, h: str, root: str, trials: list[Trial], clock: dict,
                    resume: bool = True):
    """The sweep's parent run (reused on --resume) and the context every trial receives."""
    from .execution import SweepContext, make_tracker, safe

    uri = _tracking_uri(spec.tracking.uri)
    tracker = make_tracker(uri, spec.experiment_name)
    parent = safe("start_sweep", tracker.start_sweep, spec_path, text, h, [t.to_dict() for t in trials],
                  sweep_kind="tuned" if spec.tuning is not None else None, resume=resume)
    clock["tracking"] = time.time()
    ctx = SweepContext(spec=spec, spec_hash=h, root=root, trials={t.trial_id: t.to_dict() for t in trials},
                       tracking_uri=uri, experiment=spec.experiment_name, parent_run_id=parent)
    return ctx, tracker


def _deliver(ctx, tracker, status: str, spec_path: str, deadline_s: float = 60.0) -> bool:
    """Send what the trials could not (a tracking outage); True when MLflow has everything. Otherwise the
    sweep run's end is kept for `--sync-tracking` and the user is told how to send the rest."""
    if not ctx.parent_run_id:
        return True
    from .outbox import flush_sweep

    left = flush_sweep(ctx.root, deadline_s, tracker=tracker)
    if not left["pending"]:
        return True
    storage.write_json(storage.join(ctx.root, SWEEP_PENDING), {"parent_run_id": ctx.parent_run_id, "status": status})
    print(f"[sweep] MLflow at {ctx.tracking_uri} is unreachable: {left['pending']} tracking record(s) of "
          f"{len(left['left'])} trial(s) are kept next to their checkpoints (nothing is lost); when it is back, "
          f"send them with: python -m lrt_platform.sweep {spec_path} --sync-tracking", file=sys.stderr, flush=True)
    return False


def sync_tracking(spec: Spec, root: str, spec_path: str) -> int:
    """--sync-tracking: deliver every trial journal of this spec's sweep, then close its sweep run and log
    the comparison there. 0 when MLflow has everything, 1 when records are still left."""
    from .outbox import flush_sweep

    uri = _tracking_uri(spec.tracking.uri)
    tracker = Tracker(uri, spec.experiment_name)
    tracker.check_reachable()
    left = flush_sweep(root, deadline_s=float("inf"), tracker=tracker)
    pending = storage.read_json(storage.join(root, SWEEP_PENDING))
    if left["pending"]:
        print(f"[sweep] {left['pending']} tracking record(s) of {', '.join(left['left'])} could not be sent to {uri}; "
              "run --sync-tracking again", file=sys.stderr)
        return 1
    print(f"[sweep] MLflow at {uri} has every tracking record of the {left['trials']} trial(s) under {root}")
    if pending:
        tracker.end_sweep(pending["parent_run_id"], pending["status"])
        _log_comparison(spec, uri, tracker, pending["parent_run_id"])
        storage.remove_file(storage.join(root, SWEEP_PENDING))
    return 0


def _print_dry_run(spec: Spec, root: str, args, trials: list[Trial] | None = None) -> int:
    data = dry_run(spec, probe=not args.no_probe, root=root, trials=trials)
    data["pools"] = _pool_capacity(spec, args.address)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    note = None
    if data["tuning"]:
        print(format_tuning(data["tuning"]) + "\n")
        if data["summary"]["est_wall_s"] is not None:
            note = f"est. total, tuning + grid, one trial at a time: {data['summary']['est_wall_s']:.0f}s"
    if data["search"]:
        s = data["search"]
        note = (f"search: the last row is the first of {s['num_trials']} Optuna trials (the arm's own settings); "
                f"each is held to the same budget; searched: {', '.join(s['space'])}")
        if data["summary"]["est_wall_s"] is not None:
            note += f"; est. total {data['summary']['est_wall_s']:.0f}s"
    print(format_plan([Trial(**t) for t in data["trials"]], spec, note))
    if any(t.get("pool") for t in data["trials"]) or data["pools"]:
        print(format_pool_capacity(data["pools"]))
    return 0


def _pool_capacity(spec: Spec, address: str | None) -> dict | None:
    """With --address, the cluster's free capacity per pool (a pool it lacks is refused here, as at launch);
    without, None: a dry run starts no Ray of its own."""
    if address is None:
        return None
    _connect(address)
    import ray

    check_pools(spec, ray.nodes())
    return pool_capacity(ray.cluster_resources(), ray.available_resources())


def _check_existing(spec: Spec, root: str, phases: list[str], args) -> None:
    from . import execution

    there = [p for p in phases if execution.tune.Tuner.can_restore(storage.join(root, p))]
    if there and not args.resume and not args.overwrite:
        raise SpecError(f"a sweep for this spec already exists at {root}; pass --resume to continue it "
                        "or --overwrite to start over")


def _remove_sweep(spec: Spec, root: str) -> None:
    """--overwrite: delete the stored sweep, once the cluster has been checked (a refusal deletes nothing)."""
    storage.remove_tree(root)
    if storage.is_uri(root):  # an s3 sweep keeps its Optuna sqlite file locally
        storage.remove_tree(storage.sweep_root("./runs", spec.experiment, spec_hash(spec)))


def local_ray_on_loopback(address: str | None) -> None:
    """Before Ray is imported: a local Ray (no address given) listens on 127.0.0.1 only."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        for k, v in LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address)


def _prepare_data(spec: Spec) -> None:
    from lrt_model.data import resolve_corpus
    from lrt_model.tokenizer import get_tokenizer

    corpus = resolve_corpus(spec.data.corpus if spec.data.corpus == "stdlib" else storage.absolute(spec.data.corpus))
    get_tokenizer(spec.data.tokenizer, corpus)


def _tracking_uri(uri: str | None) -> str:
    from .tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def _run_phases(ctx, trials: list[Trial], phases: list[str], slots: int, resume: bool,
                quiet: bool = False) -> tuple[list, int]:
    """Fit each phase's Tuner (restored on --resume). Returns the results and how many trials were left
    unfinished (Ctrl-C: Tune stops, saves its state and returns)."""
    from . import execution

    templates = dict(tuning_templates(ctx.spec, trials)) if ctx.spec.tuning is not None else {}
    total = sum(len(trials) if p == "grid" else ctx.spec.search.num_trials if p == "search" else ctx.spec.tuning.trials
                for p in phases)
    callback = execution.ProgressLog(total, quiet=quiet)
    try:
        return _fit_phases(ctx, trials, phases, slots, resume, templates, callback)
    finally:
        callback.close()


def _fit_phases(ctx, trials: list[Trial], phases: list[str], slots: int, resume: bool, templates: dict,
                callback) -> tuple[list, int]:
    from . import execution

    if resume:  # resumed search trials that had failed: OptunaSearch warns with each whole result; we reconcile
        logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)
    results, best = [], {}
    for phase in phases:
        if phase == "grid" and templates:
            missing = [p for p in templates if p not in best]
            if missing:  # equal effort: no arm enters the comparison before every arm's tuning is complete
                print(f"[sweep] the grid waits for every arm's tuning: {', '.join(missing)} had failed trials (or "
                      f"none reported {ctx.spec.tuning.metric})", file=sys.stderr)
                return results, 0
            ctx = _tuned_context(ctx, trials, best)
        tuner = execution.restore_tuner(ctx, phase) if resume else None
        if tuner is None:
            tuner = _new_tuner(ctx, phase, trials, templates, slots, callback)
        phase_results = list(tuner.fit())
        if phase == "search" and resume and execution.reconcile_study(ctx, phase_results):
            print("[sweep] resumed search trials that had failed are now recorded as completed in the Optuna study")
        if phase in templates:
            _note_best(ctx.spec, phase, templates[phase], phase_results, best)
        results.extend(phase_results)
        expected = len(trials) if phase == "grid" else \
            ctx.spec.search.num_trials if phase == "search" else ctx.spec.tuning.trials
        unfinished = execution.unfinished_trials(ctx, phase, expected)
        if unfinished:
            return results, unfinished
    return results, 0


def _new_tuner(ctx, phase: str, trials: list[Trial], templates: dict, slots: int, callback):
    from . import execution

    if phase in templates:
        return execution.make_tuning_tuner(ctx, phase, templates[phase].trial_id, slots, callback)
    if phase == "grid":
        return execution.make_grid_tuner(ctx, [t.trial_id for t in trials], slots, callback)
    base = trials[0]
    return execution.make_search_tuner(ctx, slots, callback, budget_flops=base.flops, budget_tokens=float(base.tokens))


def _note_best(spec: Spec, phase: str, template: Trial, results: list, best: dict) -> None:
    """Record an arm's best tuning values, only when all its trials finished (equal effort for every arm)."""
    from .execution import best_tuning

    found = best_tuning(spec, results)
    if found is None or any(r.error is not None for r in results):
        return
    best[phase] = found
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in found[0].items())
    print(f"[sweep] tuned {template.arm} at {template.budget_id}: {values} ({spec.tuning.metric} {found[1]:.4f}, "
          f"best of {len(results)} trials)", flush=True)


def _tuned_context(ctx, trials: list[Trial], best: dict):
    """The grid's context: every grid trial runs its arm's best tuning values (ids and pairs unchanged)."""
    import dataclasses

    tuned = [apply_tuning(ctx.spec, t, *best[f"tune-{t.budget_id}-{t.arm}"]) for t in trials]
    return dataclasses.replace(ctx, trials={t.trial_id: t.to_dict() for t in tuned})


def overhead(results: list, clock: dict, slots: int) -> dict:
    """Orchestration overhead of the trials that ran in this invocation:
    ((wall - data preparation) * trial slots - the trials' own training wall_s) / trials.
    Data preparation (corpus build, tokenizer training) is left out: without it in the driver each trial
    would do it inside train(), where it would count as training time."""
    ran = [r.metrics for r in results
           if r.error is None and r.metrics and r.metrics.get("timestamp", 0) >= int(clock["start"])]
    # a trial stopped early by ASHA never reports train()'s wall_s: count Tune's own time for it
    train_s = sum(m["wall_s"] if m.get("complete") else m.get("time_total_s", 0.0) for m in ran)
    n = len(ran)
    used = max(1, min(slots, n))
    wall = clock["end"] - clock["start"]
    data = clock.get("data", clock["start"]) - clock.get("ray", clock["start"])
    per_trial = ((wall - data) * used - train_s) / n if n else float("nan")
    steps = ["start", "ray", "data", "tracking", "tune", "end"]
    parts = {b: clock[b] - clock[a] for a, b in zip(steps, steps[1:]) if a in clock and b in clock}
    return {"trials": n, "wall_s": wall, "data_s": data, "train_s": train_s, "slots": used,
            "per_trial_s": per_trial, "parts": parts}


def _report(spec: Spec, uri: str, tracker, parent: str | None, results: list, clock: dict, slots: int,
            delivered: bool = True) -> None:
    if delivered:
        _log_comparison(spec, uri, tracker, parent)
        _print_ui_hint(uri, tracker)
    else:  # a comparison read from a store that lacks records would look complete and be wrong
        print("[sweep] comparison unavailable until the tracking records are sent (--sync-tracking logs it)",
              file=sys.stderr)
    clock["end"] = time.time()
    o = overhead(results, clock, max(slots, 1))
    if o["trials"] and slots:  # slots == 0: interrupted, no meaningful figure
        names = {"ray": "ray start", "data": "data prep", "tracking": "tracking", "tune": "trials", "end": "report"}
        parts = ", ".join(f"{names[k]} {v:.1f}" for k, v in o["parts"].items())
        busy = o["train_s"] / max((o["wall_s"] - o["data_s"]) * o["slots"], 1e-9)
        print(f"orchestration overhead: {o['per_trial_s']:.1f} s/trial, the {o['slots']} trial slot(s) trained "
              f"{busy:.0%} of the time ({o['trials']} trials, wall {o['wall_s']:.0f} s: {parts} s)", flush=True)


def _print_next(spec: Spec, spec_path: str, root: str, delivered: bool) -> None:
    """Where to read the results: the comparison with plots, and the Optuna study when there is one."""
    lines = [f"python -m lrt_platform.compare {spec_path} --plots plots/"] if delivered else []
    if spec.search is not None or spec.tuning is not None:
        url = spec.search.storage if spec.search is not None and spec.search.storage else \
            storage.optuna_url(root, spec.experiment, spec_hash(spec))
        lines.append(f"optuna-dashboard {url}   (pip install optuna-dashboard)")
    if lines:
        print("next: " + "\n      ".join(lines), flush=True)


def _log_comparison(spec: Spec, uri: str, tracker, parent: str | None) -> None:
    """Print the comparison and log it, rendered and plotted, to the sweep run; best effort: the sweep's
    results are stored either way."""
    try:
        from .compare import compare, format_report, load_curves, to_json

        report = compare(uri, spec.experiment_name, parent)
        text = format_report(report)
        print(text, flush=True)
        try:  # the verdicts on the sweep's parent run too; best effort, the table above is the answer
            if parent:
                renders = {"comparison.txt": text, "comparison.md": format_report(report, "markdown"),
                           "comparison.html": format_report(report, "html")}
                tracker.log_sweep_summary(parent, to_json(report), renders)
                curves = load_curves(tracker, report)
                _log_plots(report, tracker, parent, curves)
                _log_run_artifacts(report, tracker, curves)
        except Exception as e:  # noqa: BLE001
            print(f"[sweep] warning: comparison not logged to the sweep run: {e}".splitlines()[0], file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the sweep's results are stored; a report problem must not hide that
        print(f"[sweep] comparison unavailable: {e}", file=sys.stderr)


def _log_plots(report: dict, tracker, parent: str, curves: dict) -> None:
    """The comparison's plots as the sweep run's `plots/` artifacts (what `compare --plots` draws)."""
    import tempfile

    from .plots import make_plots

    with tempfile.TemporaryDirectory(prefix="lrt-plots-") as out:
        make_plots(report, out, curves)
        tracker.log_artifacts(parent, out, "plots")


def _log_run_artifacts(report: dict, tracker, curves: dict) -> None:
    """Each usable trial's run gets its loss curve (loss_curve.png) and a link to its final checkpoint
    (checkpoint.json: the storage URI and step; the weights stay in the sweep's storage, not copied)."""
    import tempfile

    from .plots import plot_run_curve

    for t in report["trials"]:
        if t["run_id"] not in curves:
            continue
        with tempfile.TemporaryDirectory(prefix="lrt-run-") as out:
            plot_run_curve(t, curves[t["run_id"]], out)
            if t.get("checkpoint"):
                uri = storage.absolute(t["checkpoint"])
                with open(os.path.join(out, "checkpoint.json"), "w") as f:
                    json.dump({"uri": uri, "step": t["checkpoint_step"],
                               "sample": f"python -m lrt_model.sample {uri.rsplit('/', 1)[0]}"}, f, indent=1)
            tracker.log_artifacts(t["run_id"], out)


def _print_ui_hint(uri: str, tracker) -> None:
    url = getattr(tracker, "ui_url", lambda: None)()
    if url:
        print(f"MLflow: {url}")
        return
    try:
        exp_id = tracker.experiment_id(create=False)
    except Exception:  # noqa: BLE001 - no tracking module or no experiment: no hint
        return
    if exp_id is None:
        return
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  then open "
          f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs{UI_LAYOUT}")


if __name__ == "__main__":
    sys.exit(main())
