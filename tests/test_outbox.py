"""The trial outbox: records survive a tracking outage and reach MLflow once each, in order."""

from __future__ import annotations

import socket
import time

import pytest

from lrt_platform import storage
from lrt_platform.outbox import TrialOutbox, flush_sweep, journal_path

pytest.importorskip("mlflow")
from lrt_platform.tracking import Tracker, TrackingError  # noqa: E402

TRIAL = {"trial_id": "b0-s0-baseline", "arm": "baseline", "budget_id": "b0", "pair_id": "b0-s0", "seed": 0,
         "matching": "compute", "strategy": "baseline", "config": {"model": {"depth": 1}}}


class FakeTracker:
    """Records what reaches 'MLflow'; `down` makes every call fail like a dead server."""

    def __init__(self):
        self.down, self.attempts, self.calls = False, 0, []

    def _call(self, *what):
        self.attempts += 1
        if self.down:
            raise TrackingError("MLflow log metrics failed: ConnectionError: connection refused")
        self.calls.append(what)

    def start_trial(self, parent, trial):
        self._call("start", trial["trial_id"])
        return f"run-{trial['trial_id']}"

    def log_metrics(self, run_id, metrics):
        self._call("metrics", run_id, [(k, v, step) for k, v, step, _ in metrics])

    def set_tags(self, run_id, tags):
        self._call("tags", run_id, tags)

    def end_trial(self, run_id, status, reason=None):
        self._call("end", run_id, status)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _eval(tokens, bpb):
    return {"event": "eval", "step": tokens // 10, "tokens": tokens, "flops": 1e6, "val_bpb": bpb, "train_loss": 1.5}


def _points(tracker, key):
    return [(s, v) for call in tracker.calls if call[0] == "metrics" for k, v, s in call[2] if k == key]


def test_an_outage_loses_nothing_and_waits_before_trying_again(tmp_path):
    fake, clock = FakeTracker(), Clock()
    box = TrialOutbox.open(str(tmp_path), TRIAL, "http://127.0.0.1:1", "exp", "parent", tracker=fake, clock=clock)
    fake.down = True
    box.start()
    box.log_event(_eval(100, 3.0))
    assert fake.attempts == 1 and box.pending == 2  # one failed try, then the back-off
    on_disk = storage.read_json(journal_path(str(tmp_path), TRIAL["trial_id"]))
    assert [r[0] for r in on_disk["records"]] == ["start", "metrics"] and on_disk["sent"] == 0
    clock.t += 4
    box.log_event(_eval(200, 2.5))
    assert fake.attempts == 1  # still waiting: training does not pay for a dead server on every event
    clock.t += 2
    box.log_event(_eval(300, 2.2))
    assert fake.attempts == 2 and box.pending == 4
    fake.down = False
    clock.t += 10
    box.log_event({"event": "checkpoint", "step": 30, "path": "/c/latest.pt", "checkpoint_dir": "/c"})
    box.end("FINISHED")
    assert box.pending == 0
    assert [c[0] for c in fake.calls] == ["start", "metrics", "metrics", "metrics", "metrics", "tags", "end"]
    assert _points(fake, "val_bpb") == [(10, 3.0), (20, 2.5), (30, 2.2)]  # optimiser steps
    assert storage.read_json(journal_path(str(tmp_path), TRIAL["trial_id"]))["sent"] == 7


def test_each_key_and_step_is_journaled_once(tmp_path):
    fake = FakeTracker()
    box = TrialOutbox.open(str(tmp_path), TRIAL, "u", "exp", "parent", tracker=fake)
    box.start()
    box.log_event(_eval(100, 3.0))
    box.log_event({"event": "done", "steps": 10, "tokens": 100, "val_bpb": 3.0, "train_loss": 1.5, "wall_s": 9.0})
    assert _points(fake, "val_bpb") == [(10, 3.0)]  # the final metrics repeat the last evaluation
    assert _points(fake, "wall_s") == [(10, 9.0)]
    # a retried attempt (a new process) continues the journal and re-evaluates a step after its checkpoint
    again = TrialOutbox.open(str(tmp_path), TRIAL, "u", "exp", "parent", tracker=fake)
    again.start()
    again.log_event(_eval(100, 3.0))
    again.log_event(_eval(200, 2.0))
    assert _points(fake, "val_bpb") == [(10, 3.0), (20, 2.0)]
    # another sweep run (e.g. after --overwrite) starts a new journal
    other = TrialOutbox.open(str(tmp_path), TRIAL, "u", "exp", "other-parent", tracker=fake)
    assert other.state["records"] == [] and other.run_id is None


def test_unreadable_journal_starts_afresh(tmp_path, capsys):
    path = journal_path(str(tmp_path), TRIAL["trial_id"])
    storage.write_json(path, {})
    with open(path, "wb") as f:
        f.write(b"\x00{not json")
    box = TrialOutbox.open(str(tmp_path), TRIAL, "u", "exp", "parent", tracker=FakeTracker())
    box.start()
    assert box.pending == 0 and "ignoring unreadable" in capsys.readouterr().err


def test_flush_sweep_stops_at_the_first_failure_and_delivers_later(tmp_path):
    fake = FakeTracker()
    fake.down = True
    for i in range(3):
        box = TrialOutbox.open(str(tmp_path), {**TRIAL, "trial_id": f"t{i}"}, "u", "exp", "parent", tracker=fake)
        box.start()
        box.log_event(_eval(100, 3.0))
        box.end("FINISHED")
    fake.attempts = 0
    left = flush_sweep(str(tmp_path), deadline_s=30, tracker=fake)
    assert left == {"trials": 3, "pending": 9, "left": ["t0", "t1", "t2"]} and fake.attempts == 1
    fake.down = False
    assert flush_sweep(str(tmp_path), tracker=fake) == {"trials": 3, "pending": 0, "left": []}
    assert [c[0] for c in fake.calls].count("end") == 3


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_unreachable_server_is_one_line_within_seconds():
    t0 = time.time()
    with pytest.raises(TrackingError) as e:
        Tracker(_dead_url(), "exp").check_reachable()
    assert time.time() - t0 < 15
    assert "unreachable (connection refused)" in str(e.value) and "\n" not in str(e.value)


def test_real_server_gets_every_point_once_after_an_outage(mlflow_server, tmp_path):
    """The outbox first writes to a dead address, then the server is back (the journal is pointed at a
    live one). Re-sending everything after a crash between send and save duplicates nothing."""
    exp = "outbox-outage"
    live = Tracker(mlflow_server, exp)
    parent = live.start_sweep("s.yaml", "experiment: x\n", "h" * 12, plan=[])
    dead = Tracker(_dead_url(), exp, attempts=2)
    box = TrialOutbox.open(str(tmp_path), TRIAL, dead.tracking_uri, exp, parent, tracker=dead)
    t0 = time.time()
    box.start()
    box.log_event(_eval(100, 3.0))
    assert box.pending == 2 and time.time() - t0 < 15  # a dead server costs seconds, not minutes
    box = TrialOutbox.load(journal_path(str(tmp_path), TRIAL["trial_id"]), tracker=live)
    box.log_event(_eval(200, 2.5))
    box.log_event({"event": "done", "steps": 20, "tokens": 200, "val_bpb": 2.5, "wall_s": 4.0})
    box.end("FINISHED")
    assert box.pending == 0
    run = box.run_id
    want = [(10, 3.0), (20, 2.5)]  # the optimiser step, not tokens
    assert live.metric_history(run, "val_bpb") == want
    box.state["sent"] = 0  # as if every send had been lost on the way back
    assert box.flush(force=True)
    assert live.metric_history(run, "val_bpb") == want and live.metric_history(run, "wall_s") == [(20, 4.0)]
    assert live.client.get_run(run).info.status == "FINISHED"
