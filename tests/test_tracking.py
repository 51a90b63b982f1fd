"""Tracking: nesting, tags, params, metric histories, idempotency, failure, concurrency.

Runs against the session's real `mlflow server` (tests/fixtures_mlflow.py),
except the concurrency test, which hammers one sqlite file from several
processes (the case that produces "database is locked").
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import sqlite3
import threading
import time
import uuid

import pytest
from mlflow import MlflowClient

from lrt_platform.tracking import (
    Tracker,
    TrackingError,
    event_metrics,
    resolve_tracking_uri,
    retry,
)

CONFIG = {"model": {"depth": 2, "seq_len": 64, "recurrence": None},
          "optim": {"matrix_lr": 0.02, "warmdown_frac": 0.5}, "batch_size": 4, "seed": 0}
LRT_CONFIG = {**CONFIG, "model": {**CONFIG["model"], "recurrence": {"strategy": "interleaved", "passes": 2,
                                                                    "loss_weights": None}}}


def _experiment(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _trial(arm: str, seed: int, budget: str = "b0") -> dict:
    lrt = arm != "baseline"
    return {"trial_id": f"{budget}-{arm}-s{seed}", "arm": arm, "budget_id": budget, "pair_id": f"{budget}-s{seed}",
            "seed": seed, "matching": "compute", "strategy": "interleaved" if lrt else "baseline",
            "config": LRT_CONFIG if lrt else CONFIG, "tokens": 2048, "flops": 1e9}


def _eval(step: int, tokens: int, bpb: float, lrt: bool) -> dict:
    ev = {"event": "eval", "step": step, "tokens": tokens, "flops": tokens * 1e6, "val_bpb": bpb,
          "val_bpb_full": bpb + (0.05 if lrt else 0.0), "train_loss": float("nan") if step == 0 else bpb * 0.7,
          "tokens_per_s": 1000.0, "val_bpb_by_position": {"0-15": bpb + 0.1, "16-31": bpb}}
    if lrt:
        ev.update(val_bpb_merged=bpb + 0.01, val_bpb_sequential=bpb, interleave_gap=0.01)
    return ev


def _run_trial(tr: Tracker, parent: str, trial: dict, evals=((0, 0, 3.0), (1, 1024, 2.5), (2, 2048, 2.2))) -> str:
    run = tr.start_trial(parent, trial)
    lrt = trial["strategy"] != "baseline"
    for step, tokens, bpb in evals:
        tr.log_event(run, _eval(step, tokens, bpb, lrt))
    tr.log_event(run, {"event": "checkpoint", "step": evals[-1][0], "path": "/ck/step2.pt", "checkpoint_dir": "/ck"})
    last = _eval(*evals[-1], lrt)
    done = {**last, "event": "done", "params": 1000, "param_overhead": 0.003 if lrt else 0.0, "flops_per_token": 1e6,
            "steps": evals[-1][0], "finished": True, "wall_s": 1.0, "icl_score": 0.25, "evals": [last]}
    tr.log_event(run, done)
    tr.end_trial(run)
    return run


# ---------------------------------------------------------------------------
# (b) nesting, tags, params, histories


def test_sweep_nesting_tags_and_histories(mlflow_server):
    exp = _experiment("nesting")
    tr = Tracker(mlflow_server, exp)
    trials = [_trial(arm, seed) for arm in ("baseline", "lrt") for seed in (0, 1)]
    parent = tr.start_sweep("sweep_specs/quick.yaml", "experiment: x\n", "hash-nesting", trials)
    children = [_run_trial(tr, parent, t) for t in trials]
    tr.end_sweep(parent)

    import mlflow

    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        df = mlflow.search_runs(experiment_names=[exp])
    finally:
        mlflow.set_tracking_uri(old)
    assert len(df) == 5
    assert (df["tags.mlflow.parentRunId"] == parent).sum() == 4
    assert df.loc[df["run_id"] == parent, "tags.mlflow.parentRunId"].isna().all()

    client = MlflowClient(mlflow_server)
    p = client.get_run(parent)
    assert p.info.status == "FINISHED"
    for key in ("spec_hash", "git_commit", "version.torch", "version.ray", "version.mlflow", "version.python",
                "accelerators"):
        assert p.data.tags.get(key), key
    assert p.data.tags["accelerators"] == "cpu" and p.data.tags["n_FINISHED"] == "4"
    assert {a.path for a in client.list_artifacts(parent)} >= {"plan.json", "spec"}
    assert [a.path for a in client.list_artifacts(parent, "spec")] == ["spec/quick.yaml"]

    for trial, run_id in zip(trials, children):
        r = client.get_run(run_id)
        assert r.info.status == "FINISHED"
        for key in ("arm", "budget_id", "pair_id", "seed", "matching", "strategy", "trial_id"):
            assert r.data.tags[key] == str(trial[key]), key
        assert r.data.tags["depth"] == "2" and r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.tags["last_checkpoint_path"] == "/ck/step2.pt"
        assert r.data.params["model.depth"] == "2" and r.data.params["optim.matrix_lr"] == "0.02"
        assert r.data.params["trial.tokens"] == "2048"
        hist = client.get_metric_history(run_id, "val_bpb")
        assert sorted({m.step for m in hist}) == [0, 1, 2]  # optimiser steps; tokens is its own metric
        assert sorted({m.value for m in client.get_metric_history(run_id, "tokens")}) == [0, 1024, 2048]
        assert r.data.metrics["val_bpb"] == 2.2 and r.data.metrics["icl_score"] == 0.25
        assert r.data.metrics["val_bpb_pos_0-15"] == pytest.approx(2.3)
        loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
        assert loss_steps == [1, 2, 2]  # the NaN before step 1 is skipped; done repeats the last point
        if trial["arm"] == "lrt":
            assert r.data.params["model.recurrence.passes"] == "2"
            assert len(client.get_metric_history(run_id, "val_bpb_sequential")) >= 3
            assert r.data.metrics["interleave_gap"] == 0.01
    assert tr.ui_url() == f"{mlflow_server}/#/experiments/{tr.experiment_id()}/runs?workflowType=machine_learning"


# ---------------------------------------------------------------------------
# (c) idempotency and resume, (d) failure


def test_start_trial_and_sweep_are_idempotent(mlflow_server):
    tr = Tracker(mlflow_server, _experiment("idem"))
    parent = tr.start_sweep("s.yaml", "a: 1\n", "hash-idem", [])
    assert tr.start_sweep("s.yaml", "a: 1\n", "hash-idem", []) == parent  # unfinished sweep: resumed
    trial = _trial("lrt", 0)
    first = tr.start_trial(parent, trial)
    assert tr.start_trial(parent, trial) == first
    assert tr.start_trial(parent, {**trial, "trial_id": "other"}) != first
    client = MlflowClient(mlflow_server)
    assert len(client.search_runs([tr.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent}'")) == 2
    assert client.get_run(first).data.tags["attempts"] == "2"
    assert client.get_run(parent).data.tags["resumed"] == "1"
    tr.end_sweep(parent)
    assert tr.start_sweep("s.yaml", "a: 1\n", "hash-idem", []) != parent  # a finished sweep is not reopened


def test_failed_trial_has_reason_and_retry_reuses_run(mlflow_server):
    tr = Tracker(mlflow_server, _experiment("failed"))
    parent = tr.start_sweep("s.yaml", "a: 1\n", "hash-failed", [])
    run = tr.start_trial(parent, _trial("baseline", 0))
    tr.end_trial(run, "FAILED", reason="CUDA out of memory at step 3")
    client = MlflowClient(mlflow_server)
    r = client.get_run(run)
    assert r.info.status == "FAILED" and r.data.tags["failure_reason"] == "CUDA out of memory at step 3"
    assert tr.start_trial(parent, _trial("baseline", 0)) == run  # the retry continues the same run
    r = client.get_run(run)
    assert r.info.status == "RUNNING" and "failure_reason" not in r.data.tags
    assert r.data.tags["previous_failure_reason"] == "CUDA out of memory at step 3"
    with pytest.raises(ValueError, match="status"):
        tr.end_trial(run, "DONE")


def test_many_and_long_params_are_batched_and_truncated(mlflow_server):
    tr = Tracker(mlflow_server, _experiment("params"))
    parent = tr.start_sweep("s.yaml", "a: 1\n", "hash-params", [])
    config = {"model": {f"k{i}": i for i in range(250)}, "corpus": "x" * 10000, "tags": [1, 2]}
    run = tr.start_trial(parent, {**_trial("baseline", 0), "config": config})
    params = MlflowClient(mlflow_server).get_run(run).data.params
    assert sum(k.startswith("model.k") for k in params) == 250
    assert len(params["corpus"]) == 6000 and params["corpus"].endswith("[truncated]")
    assert params["tags"] == "[1, 2]"


# ---------------------------------------------------------------------------
# Pure helpers


def test_event_metrics_flattens_and_skips_non_finite():
    m = event_metrics({"event": "eval", "step": 3, "tokens": 10, "train_loss": float("nan"), "val_bpb": 1.5,
                       "val_bpb_by_position": {"0-63": 1.6}, "icl_recall_acc_k4": 0.5, "finished": True,
                       "note": "text", "evals": [{"val_bpb": 9}]})
    assert m == {"train_step": 3.0, "tokens": 10.0, "val_bpb": 1.5, "val_bpb_pos_0-63": 1.6,
                 "icl_recall_acc_k4": 0.5, "finished": 1.0}


def test_tracking_uri_resolution_and_pickling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None) == "http://example:5000"
    tr = pickle.loads(pickle.dumps(Tracker("sqlite:///x.db", "e")))
    assert tr.tracking_uri == f"sqlite:///{tmp_path}/x.db" and tr._client is None


def test_retry_backs_off_on_locks_and_fails_clearly():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    slept = []
    assert retry("log_batch", flaky, sleep=slept.append) == "ok"
    assert len(calls) == 3 and len(slept) == 2 and slept[1] > slept[0] * 0.6  # growing, jittered

    def broken():
        raise ValueError("INVALID_PARAMETER_VALUE: bad key")

    with pytest.raises(TrackingError, match="log_batch failed .*bad key"):
        retry("log_batch", broken, where="uri x", sleep=lambda s: None)

    def locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(TrackingError, match="still failed after 4 attempts"):
        retry("log_batch", locked, attempts=4, sleep=lambda s: None)


# ---------------------------------------------------------------------------
# (g) concurrency on one sqlite file


def _open_experiment(uri: str, exp: str) -> str:
    return Tracker(uri, exp).experiment_id()


def _worker(uri: str, exp: str, parent: str, worker: int, n_events: int) -> int:
    tr = Tracker(uri, exp)
    for t in range(2):
        run = tr.start_trial(parent, {**_trial("lrt", t, budget=f"w{worker}"), "trial_id": f"w{worker}-t{t}"})
        for i in range(n_events):
            tr.log_event(run, _eval(i, (i + 1) * 100, 2.0 - 0.01 * i, True))
        tr.end_trial(run)
    return worker


def _hold_exclusive_lock(db: str, stop: threading.Event) -> None:
    """Another writer that grabs the whole database now and then, as a busy sweep driver would."""
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    while not stop.is_set():
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(0.3)
        con.execute("COMMIT")
        time.sleep(0.3)
    con.close()


def test_concurrent_sqlite_logging_never_fails(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    exp = "concurrent"
    n_workers, n_events = 4, 15
    with mp.get_context("spawn").Pool(n_workers) as pool:
        # A brand-new database opened by several processes at once (schema creation races).
        assert len(set(pool.starmap(_open_experiment, [(uri, exp)] * n_workers))) == 1
        tr = Tracker(uri, exp)
        parent = tr.start_sweep("s.yaml", "a: 1\n", "hash-conc", [])
        stop = threading.Event()
        locker = threading.Thread(target=_hold_exclusive_lock, args=(str(db), stop))
        locker.start()
        try:
            done = pool.starmap(_worker, [(uri, exp, parent, w, n_events) for w in range(n_workers)])
        finally:
            stop.set()
            locker.join()
    assert sorted(done) == list(range(n_workers))
    tr.end_sweep(parent)
    data = tr.load_sweep()
    assert len(data["trials"]) == 2 * n_workers
    assert all(t["status"] == "FINISHED" for t in data["trials"])
    run = data["trials"][0]["run_id"]
    assert len(tr.metric_history(run, "val_bpb")) == n_events
    assert (tmp_path / "mlartifacts" / exp).exists()  # artifacts next to the database, not in the cwd


# ---------------------------------------------------------------------------
# The real trainer's events end to end


def test_real_trainer_events_reach_mlflow_and_compare(mlflow_server):
    from lrt_model.config import ModelConfig, RecurrenceConfig
    from lrt_model.train import TrainConfig, train
    from lrt_platform.compare import compare

    tr = Tracker(mlflow_server, _experiment("trainer"))
    parent = tr.start_sweep("tiny.yaml", "x\n", "hash-trainer", [])
    events = {}
    for arm in ("baseline", "lrt"):
        rec = RecurrenceConfig(strategy="interleaved", passes=2) if arm == "lrt" else None
        cfg = TrainConfig(model=ModelConfig(depth=1, seq_len=32, head_dim=32, recurrence=rec), batch_size=4,
                          tokens=1024, eval_tokens=256, progress=False)
        trial = {"trial_id": arm, "arm": arm, "budget_id": "b0", "pair_id": "b0-s0", "seed": 0, "matching": "tokens",
                 "strategy": "interleaved" if rec else "baseline", "config": cfg.to_dict(), "tokens": 1024}
        run = tr.start_trial(parent, trial)
        events[arm] = []
        train(cfg, callback=lambda e, run=run, seen=events[arm]: (seen.append(e), tr.log_event(run, e)))
        tr.end_trial(run)
        evals = [e for e in events[arm] if e["event"] == "eval"]
        steps = sorted({s for s, _ in tr.metric_history(run, "val_bpb")})
        assert steps == [e["step"] for e in evals]
        metrics = MlflowClient(mlflow_server).get_run(run).data.metrics
        done = events[arm][-1]
        assert metrics["val_bpb"] == done["val_bpb"] and metrics["params"] == done["params"]
        assert any(k.startswith("val_bpb_pos_") for k in metrics)
        if rec:
            assert metrics["interleave_gap"] == done["interleave_gap"] and "val_bpb_sequential" in metrics
    tr.end_sweep(parent)
    report = compare(mlflow_server, tr.experiment)
    [c] = report["comparisons"]
    assert c["n_pairs"] == 1 and c["delta"]["mean"] == pytest.approx(
        events["lrt"][-1]["val_bpb_sequential"] - events["baseline"][-1]["val_bpb_full"], rel=1e-12)


def test_batch_limits_match_mlflow():
    from mlflow.utils import validation

    from lrt_platform import tracking

    assert tracking.MAX_METRICS_PER_BATCH == validation.MAX_METRICS_PER_BATCH
    assert tracking.MAX_PARAMS_TAGS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH
    assert tracking.MAX_PARAM_VALUE == validation.MAX_PARAM_VAL_LENGTH
    assert tracking.MAX_TAG_VALUE == validation.MAX_TAG_VAL_LENGTH


def test_log_sweep_summary_tags_metrics_and_artifacts(mlflow_server, tmp_path):
    tr = Tracker(mlflow_server, _experiment("summary"))
    parent = tr.start_sweep("s.yaml", "experiment: x\n", "hash-summary", [])
    report = {"comparisons": [  # budget ids and arms with characters MLflow keys reject or read as paths
        {"budget_id": "d2-flops1.5e12", "arm": "lrt/s2", "verdict": "lrt_better",
         "delta": {"mean": -0.02, "ci95": [-0.03, -0.01]}, "relative": {"mean": -0.011}, "mde": 0.01,
         "seeds_needed": 5, "compute_multiplier": {"value": 1.4}},
        {"budget_id": "d2-flops1.5e12", "arm": "lrt k", "verdict": "no_conclusion", "delta": {"mean": None},
         "mde": None, "seeds_needed": None}]}
    tr.log_sweep_summary(parent, report, {"comparison.txt": "the table", "comparison.html": "<p>page</p>"})
    client = MlflowClient(mlflow_server)
    run = client.get_run(parent)
    for kind in (run.data.tags, run.data.params):  # a param too: the runs table can show it as a column
        assert kind["verdict.d2-flops1_5e12.lrt_s2"] == "lrt_better"
        assert kind["verdict.d2-flops1_5e12.lrt_k"] == "no_conclusion"
    w = "d2-flops1_5e12.lrt_s2"
    assert {k: v for k, v in run.data.metrics.items() if k.endswith("lrt_s2")} == {
        f"delta.{w}": -0.02, f"delta_ci_low.{w}": -0.03, f"delta_ci_high.{w}": -0.01, f"relative.{w}": -0.011,
        f"mde.{w}": 0.01, f"seeds_needed.{w}": 5, f"compute_multiplier.{w}": 1.4}
    assert not any(k.endswith("lrt_k") for k in run.data.metrics)  # None is not a metric
    with open(client.download_artifacts(parent, "comparison.json", str(tmp_path))) as f:
        assert json.load(f) == report
    with open(client.download_artifacts(parent, "comparison.txt", str(tmp_path))) as f:
        assert f.read() == "the table"
    with open(client.download_artifacts(parent, "comparison.html", str(tmp_path))) as f:
        assert f.read() == "<p>page</p>"
    # a re-run whose verdict changed: the param stays (MLflow params are immutable), the tag moves and says so
    report["comparisons"][0]["verdict"] = "no_conclusion"
    tr.log_sweep_summary(parent, report)
    run = client.get_run(parent)
    assert run.data.tags[f"verdict.{w}"] == "no_conclusion" and run.data.params[f"verdict.{w}"] == "lrt_better"
    assert run.data.tags["verdict_param_conflicts"] == f"verdict.{w}"


def test_experiments_are_created_as_model_training_experiments(tmp_path):
    from lrt_platform.tracking import EXPERIMENT_TAGS, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "kind")
    tags = tracker.client.get_experiment(tracker.experiment_id()).tags
    assert tags["mlflow.experimentKind"] == EXPERIMENT_TAGS["mlflow.experimentKind"] == "custom_model_development"
