"""A trial's tracking outbox: every record is written next to the trial's checkpoint before it goes to
MLflow, so an outage of the tracking server stops nothing and loses nothing.

Design choices:
- The journal is `<sweep>/trials/<trial_id>/tracking.json` (written whole by `storage.write_json`:
  atomic locally, one PUT on S3). It holds what a later process needs to deliver it alone: tracking
  URI, experiment, parent run, the trial's dict (params and tags of its run), the run id once
  known, the ordered records and `sent`, how many of them MLflow has.
- Records: ["start"] (find or create the trial's run), ["metrics", [[key, value, step, ts_ms], ...]],
  ["tags", {...}], ["end", status, reason].
- Each metric point goes to MLflow once. Its timestamp is fixed when it is journaled, and MLflow's SQL
  stores drop a metric equal in key, value, step and timestamp, so re-sending a batch (a crash between
  the send and the save of `sent`) adds nothing. A (key, step) already journaled is not journaled
  again: the final metrics repeat the last evaluation, and a retried attempt re-evaluates the steps
  after its checkpoint (bit-identically: the resume is exact).
- Delivery: after each record, oldest first. A failure leaves the records in the journal and the
  next try waits 5 s, doubling to 60 s, so a dead server costs training one failed call per wait.
  One line when the server goes away, one when it is back.
- What a trial could not deliver is sent by the driver when the sweep ends (`flush_sweep`, with a
  deadline, so the end never hangs) or later by `python -m lrt_platform.sweep SPEC --sync-tracking`.
- Journal writes are best effort too: tracking must never take a training run down.

Example:
    box = TrialOutbox.open(root, trial.to_dict(), tracking_uri, "quickstart", parent_run_id)
    box.start()
    box.log_event({"event": "eval", "step": 10, "tokens": 10240, "val_bpb": 2.5})
    box.end("FINISHED")
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from . import storage

JOURNAL = "tracking.json"
FIRST_WAIT_S, MAX_WAIT_S = 5.0, 60.0


def journal_path(root: str, trial_id: str) -> str:
    return storage.join(storage.trial_dir(root, trial_id), JOURNAL)


def _say(msg: str) -> None:
    print(f"[tracking] {msg}", file=sys.stderr, flush=True)


class TrialOutbox:
    """The journal of one trial and its delivery to MLflow (through `tracking.Tracker`)."""

    def __init__(self, path: str, state: dict, tracker=None, clock: Callable[[], float] = time.time):
        self.path, self.state, self.clock = path, state, clock
        self._tracker = tracker
        self._retry_at = 0.0
        self._wait = FIRST_WAIT_S
        self._down = False
        self._seen = {(m[0], m[2]) for rec in state["records"] if rec[0] == "metrics" for m in rec[1]}

    @classmethod
    def open(cls, root: str, trial: dict, tracking_uri: str, experiment: str, parent_run_id: str, *,
             tracker=None, clock: Callable[[], float] = time.time) -> "TrialOutbox":
        """The trial's journal, continued if an earlier attempt left one (for the same parent run)."""
        path = journal_path(root, trial["trial_id"])
        state = _read(path)
        if state is None or state.get("parent_run_id") != parent_run_id:
            state = {"tracking_uri": tracking_uri, "experiment": experiment, "parent_run_id": parent_run_id,
                     "trial": trial, "run_id": None, "records": [], "sent": 0}
        state["trial"] = trial  # a tuned grid trial's config is only final now
        return cls(path, state, tracker, clock)

    @classmethod
    def load(cls, path: str, *, tracker=None) -> "TrialOutbox | None":
        state = _read(path)
        return None if state is None else cls(path, state, tracker)

    @property
    def tracker(self):
        if self._tracker is None:
            from .tracking import Tracker

            self._tracker = Tracker(self.state["tracking_uri"], self.state["experiment"], attempts=3)
        return self._tracker

    @property
    def run_id(self) -> str | None:
        return self.state["run_id"]

    @property
    def pending(self) -> int:
        return len(self.state["records"]) - self.state["sent"]

    # -- recording ---------------------------------------------------------

    def start(self) -> None:
        self._append(["start"])

    def log_event(self, event: dict) -> None:
        """One trainer event: metrics not journaled before at their step, plus the event's tags."""
        from .tracking import event_records

        metrics, tags = event_records(event)
        now = int(self.clock() * 1000)
        fresh = [[k, v, step, now] for k, v, step in metrics if (k, step) not in self._seen]
        self._seen.update((m[0], m[2]) for m in fresh)
        records = ([["metrics", fresh]] if fresh else []) + ([["tags", tags]] if tags else [])
        if records:
            self._append(*records)

    def set_tags(self, tags: dict) -> None:
        self._append(["tags", {k: str(v) for k, v in tags.items()}])

    def end(self, status: str, reason: str | None = None) -> None:
        self._append(["end", status, reason])

    def _append(self, *records: list) -> None:
        self.state["records"].extend(records)
        self._save()
        self.flush()

    # -- delivery ------------------------------------------------------------

    def flush(self, force: bool = False) -> bool:
        """Send what MLflow does not have yet, oldest first; True when nothing is left.
        Without force, waits out the back-off after a failure (training never waits on a dead server)."""
        if self.pending == 0:
            return True
        if not force and self.clock() < self._retry_at:
            return False
        sent = self.state["sent"]
        try:
            while self.pending:
                self._send(self.state["records"][self.state["sent"]])
                self.state["sent"] += 1
        except Exception as e:  # noqa: BLE001 - kept in the journal; tracking never stops training
            if not self._down:
                _say(f"MLflow at {self.state['tracking_uri']} unreachable ({_first_line(e)}); keeping "
                     f"{self.pending} record(s) of {self.state['trial']['trial_id']} in {self.path}, retrying")
            self._down = True
            self._retry_at = self.clock() + self._wait
            self._wait = min(MAX_WAIT_S, self._wait * 2)
            return False
        finally:  # one write per flush: a record sent again after a crash here is dropped by MLflow
            if self.state["sent"] != sent:
                self._save()
        if self._down:
            _say(f"MLflow is back: {self.state['trial']['trial_id']} is up to date")
        self._down, self._wait, self._retry_at = False, FIRST_WAIT_S, 0.0
        return True

    def _send(self, record: list) -> None:
        kind = record[0]
        if kind == "start":
            self.state["run_id"] = self.tracker.start_trial(self.state["parent_run_id"], self.state["trial"])
            return
        if self.run_id is None:  # a journal always starts with "start"; guard against a hand-edited one
            raise RuntimeError("the journal has no run yet (its first record must be 'start')")
        if kind == "metrics":
            self.tracker.log_metrics(self.run_id, [tuple(m) for m in record[1]])
        elif kind == "tags":
            self.tracker.set_tags(self.run_id, record[1])
        elif kind == "end":
            self.tracker.end_trial(self.run_id, record[1], record[2])
        else:
            raise ValueError(f"unknown journal record {kind!r} in {self.path}")

    def _save(self) -> None:
        try:
            storage.write_json(self.path, self.state)
        except Exception as e:  # noqa: BLE001 - the records stay in memory and go out with the next flush
            _say(f"could not write {self.path}: {_first_line(e)}")


def _read(path: str) -> dict | None:
    try:
        state = storage.read_json(path)
    except Exception as e:  # noqa: BLE001 - a corrupt journal must not stop the trial; start a new one
        _say(f"ignoring unreadable {path}: {_first_line(e)}")
        return None
    return state if isinstance(state, dict) and isinstance(state.get("records"), list) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def flush_sweep(root: str, deadline_s: float = 60.0, tracker=None) -> dict[str, Any]:
    """Deliver every trial journal of a sweep that still holds records, until done or the deadline.
    Returns {"trials": n journals, "pending": records left, "left": [trial ids with records left]}."""
    stop = time.time() + deadline_s
    left, pending, n = [], 0, 0
    for path in storage.list_files(storage.join(root, "trials"), JOURNAL):
        box = TrialOutbox.load(path, tracker=tracker)
        if box is None:
            continue
        n += 1
        if box.pending and (time.time() >= stop or not box.flush(force=True)):
            left.append(box.state["trial"]["trial_id"])
            pending += box.pending
            stop = min(stop, time.time())  # the server is down: do not wait on it once per trial
    return {"trials": n, "pending": pending, "left": left}
