"""Sweeps on a real local Ray cluster: grid, retry, resume, Optuna search, TorchTrainer workers,
resource checks, the CLI's one-line errors. (`ray job submit` against a `ray start --head` cluster:
tests/test_infra_services.py, through infra/local/up.)"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from lrt_platform import execution, storage, sweep
from lrt_platform.execution import ResourceError, check_resources
from lrt_platform.planner import plan
from lrt_platform.spec import load_spec, parse_spec, spec_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{ROOT}/sweep_specs/tiny"
PY = sys.executable


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Storage and an MLflow sqlite store under tmp_path; no fault injection unless a test sets it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(execution.FAULT_ENV, raising=False)
    return tmp_path


def _variant(tmp_path, name: str, base: str, **replace) -> str:
    """A copy of a tiny spec with some text replaced."""
    with open(f"{TINY}/{base}") as f:
        text = f.read()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(spec_path: str, tmp_path, *extra) -> int:
    return sweep.main([spec_path, "--storage", str(tmp_path / "runs"),
                       "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *extra])


def _progress(spec_path: str, tmp_path) -> dict:
    spec = load_spec(spec_path)
    root = storage.sweep_root(str(tmp_path / "runs"), spec.experiment, spec_hash(spec))
    return {t.trial_id: storage.read_json(f"{storage.trial_dir(root, t.trial_id)}/progress.json")
            for t in plan(spec, root)}


def _overhead(out: str) -> float:
    return float(re.search(r"orchestration overhead: ([\d.]+) s/trial", out).group(1))


# ---------------------------------------------------------------------------
# Grid sweep


def test_quickstart_twin_runs_all_trials(ray_cluster, workdir, capsys):
    spec_path = f"{TINY}/quickstart.yaml"
    assert _run(spec_path, workdir) == 0
    out = capsys.readouterr().out
    assert out.count("[sweep] done") == 4
    evals = re.findall(r"\[sweep\] eval +(\S+) \((\w+), seed (\d+)\): step (\d+)/(\d+), .* tokens, val_bpb [\d.]+", out)
    assert {e[0] for e in evals} == {t.trial_id for t in plan(load_spec(spec_path))}  # live, every trial
    assert "[sweep] 4/4 trials done" in out  # the overall line (no terminal here, so no bar)
    # reported, not asserted: timings belong to benchmarks, and a loaded CI box would make this flaky
    assert _overhead(out) >= 0
    spec = load_spec(spec_path)
    for tid, prog in _progress(spec_path, workdir).items():
        steps = next(t.steps for t in plan(spec) if t.trial_id == tid)
        assert len(prog["attempts"]) == 1 and prog["checkpoint_step"] == steps  # final checkpoint reported
    tracking = pytest.importorskip("lrt_platform.tracking")
    sweep_data = tracking.Tracker(f"sqlite:///{workdir}/mlflow.db", spec.experiment).load_sweep()
    assert sweep_data["sweep"]["status"] == "FINISHED" and len(sweep_data["trials"]) == 4
    assert "compute x" in out  # the comparison table was printed
    assert f"next: python -m lrt_platform.compare {spec_path} --plots plots/" in out


def test_existing_sweep_needs_resume_or_overwrite(ray_cluster, workdir, capsys):
    spec_path = _variant(workdir, "s.yaml", "quickstart.yaml", **{"seeds: [0, 1]": "seeds: [0]"})
    spec = load_spec(spec_path)
    os.makedirs(storage.join(storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec)), "grid"))
    open(storage.join(storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec)),
                      "grid", "tuner.pkl"), "w").close()
    assert _run(spec_path, workdir) == 2
    assert "--resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Failures: retry within a sweep, and --resume after an interrupted one


def test_crashed_trial_retries_from_its_checkpoint(ray_cluster, workdir, monkeypatch):
    spec_path = _variant(workdir, "retry.yaml", "quickstart.yaml",
                         **{"seeds: [0, 1]": "seeds: [0]", "max_failures: 1": "max_failures: 1"})
    monkeypatch.setenv(execution.FAULT_ENV, f"lrt_s2:{workdir}/fault-marker")
    assert _run(spec_path, workdir) == 0
    prog = _progress(spec_path, workdir)
    lrt = prog["d1-flops8e9-s0-lrt_s2"]
    assert [a["resumed_from_step"] for a in lrt["attempts"]] == [None, 20]  # retried from the step-20 checkpoint
    assert lrt["attempts"][1]["first_eval_step"] == 40  # the retry trained on; it did not start over
    assert len(prog["d1-flops8e9-s0-baseline"]["attempts"]) == 1


def test_resume_continues_an_interrupted_sweep(ray_cluster, workdir, monkeypatch, capsys):
    spec_path = _variant(workdir, "resume.yaml", "quickstart.yaml",
                         **{"seeds: [0, 1]": "seeds: [0]", "max_failures: 1": "max_failures: 0"})
    monkeypatch.setenv(execution.FAULT_ENV, f"lrt_s2:{workdir}/fault-marker")
    assert _run(spec_path, workdir) == 1  # the LRT trial crashed after its first checkpoint
    assert "--resume" in capsys.readouterr().err
    first = _progress(spec_path, workdir)
    assert first["d1-flops8e9-s0-lrt_s2"]["checkpoint_step"] == 20
    monkeypatch.delenv(execution.FAULT_ENV)
    assert _run(spec_path, workdir, "--resume") == 0
    out = capsys.readouterr().out
    second = _progress(spec_path, workdir)
    assert len(second["d1-flops8e9-s0-baseline"]["attempts"]) == 1  # finished trial not rerun
    lrt = second["d1-flops8e9-s0-lrt_s2"]["attempts"]
    assert len(lrt) == 2 and lrt[1]["resumed_from_step"] == 20 and lrt[1]["first_eval_step"] == 40
    assert out.count("[sweep] done") == 1


# ---------------------------------------------------------------------------
# Optuna search


def test_schedule_search_twin_with_a_crash_and_resume(ray_cluster, workdir, monkeypatch, capsys):
    import optuna

    spec_path = f"{TINY}/schedule_search.yaml"  # max_failures: 0, so the crashed trial errors out
    monkeypatch.setenv(execution.FAULT_ENV, f"lrt-t001:{workdir}/fault-marker")
    assert _run(spec_path, workdir) == 1
    monkeypatch.delenv(execution.FAULT_ENV)
    assert _run(spec_path, workdir, "--resume") == 0
    out = capsys.readouterr().out
    spec = load_spec(spec_path)
    root = storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec))
    study = optuna.load_study(study_name=f"{spec.experiment}-{spec_hash(spec)}",
                              storage=f"sqlite:///{root}/optuna.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == spec.search.num_trials + 1  # + the crashed trial's completed record after --resume
    assert trials[0].params == {"recurrence.strategy": "interleaved", "recurrence.passes": 2,
                                "recurrence.refresh_kv": False, "recurrence.final_weight": 1.0}  # paper defaults first
    assert trials[1].state.name == "FAIL" and trials[-1].user_attrs["resumed_from_trial"] == 1
    assert trials[-1].params == trials[1].params and trials[-1].state.name == "COMPLETE"
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials if t.number != 1)
    assert all("recurrence.detach" not in t.params for t in trials if t.params["recurrence.strategy"] == "interleaved")
    assert out.count("[sweep] done") + out.count("[sweep] stopped") == spec.search.num_trials + 1  # 4 + baseline
    # what ASHA stopped is PRUNED in the study, with its last value, not COMPLETE
    assert out.count("[sweep] stopped") == sum(t.state.name == "PRUNED" and t.value is not None for t in trials)
    crashed = [p for p in os.listdir(f"{root}/trials") if p.endswith("lrt-t001")][0]
    attempts = storage.read_json(f"{root}/trials/{crashed}/progress.json")["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] == 30  # eval_every 30 -> first checkpoint


def test_progress_lines_per_evaluation_and_overall(capsys):
    """No Ray: ProgressLog as Tune calls it, on a non-terminal stderr (plain lines, no bar)."""
    from types import SimpleNamespace

    def trial(tid, status="RUNNING", last=None):
        return SimpleNamespace(trial_id=tid, status=status, last_result=last, error_file=None)

    log = execution.ProgressLog(total=2)
    a, b = trial("a"), trial("b", "PENDING")
    log.on_trial_start(0, [a, b], a)
    ev = {"lrt_trial_id": "b0-s0-lrt", "arm": "lrt", "seed": 0, "step": 10, "total_steps": 40, "tokens": 10240,
          "val_bpb": 2.5, "val_bpb_sequential": 2.5}
    log.on_trial_result(0, [a, b], a, ev)
    log.on_trial_result(0, [a, b], a, {**ev, "checkpoint_step": 10})  # a checkpoint repeats the last eval
    a.last_result = {**ev, "complete": True, "steps": 40, "wall_s": 3.0, "notes": "icl: copy skipped\nicl: k=8 skipped"}
    a.status = "TERMINATED"
    log.on_trial_complete(0, [a, b], a)
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[sweep\] eval +b0-s0-lrt \(lrt, seed 0\): step 10/40, 10\.2k tokens, val_bpb 2\.5000 "
                        r"\(sequential\), \d+s, ETA \d+s", out[0]), out
    assert len(out) == 3 and out[1].startswith("[sweep] done    b0-s0-lrt")
    assert re.fullmatch(r"\[sweep\] 1/2 trials done, 0 running, 1 queued; ETA ~\d+s", out[2]), out
    quiet = execution.ProgressLog(total=2, quiet=True)
    quiet.on_trial_result(0, [a], a, {**ev, "step": 20})
    quiet.on_trial_complete(0, [a], a)
    assert [l.split()[1] for l in capsys.readouterr().out.splitlines()] == ["done"]
    b.last_result = {**a.last_result, "lrt_trial_id": "b0-s1-lrt", "notes": "icl: copy skipped"}
    log.on_trial_complete(0, [a, b], b)
    capsys.readouterr()
    log.close()  # every distinct note once for the sweep, however many trials gave it
    assert capsys.readouterr().out.splitlines()[1:] == ["  icl: copy skipped", "  icl: k=8 skipped"]


def test_a_trial_stopped_by_the_scheduler_is_pruned_in_the_study(tmp_path):
    """No Ray: the searcher's callbacks as Tune calls them for a finished, a stopped and a diverged trial."""
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    search = execution.StudySearch(space=lambda t: {"x": t.suggest_float("x", 0.0, 1.0)}, metric="val_bpb",
                                   mode="min", sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
                                   storage=optuna.storages.RDBStorage(url))
    for tid in ("done", "stopped", "diverged"):
        assert search.suggest(tid) is not None
        search.on_trial_result(tid, {"val_bpb": 2.5, "training_iteration": 1})
    search.on_trial_result("stopped", {"val_bpb": 2.4, "training_iteration": 2})
    search.on_trial_complete("done", {"val_bpb": 2.0, "complete": True})
    search.on_trial_complete("stopped", {"val_bpb": 2.4})  # ASHA's stop: the last report, no `complete`
    search.on_trial_complete("diverged", {"val_bpb": float("inf"), "diverged": True})
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [(t.state.name, t.value) for t in trials] == [("COMPLETE", 2.0), ("PRUNED", 2.4), ("COMPLETE", float("inf"))]


def test_multi_objective_searcher(ray_cluster, workdir):
    spec = load_spec(f"{TINY}/injection_search.yaml")
    root = str(workdir / "runs")
    ctx = execution.SweepContext(spec=spec, spec_hash=spec_hash(spec), root=root, trials={})
    limiter = execution.make_searcher(ctx, max_concurrent=2)
    searcher = limiter.searcher
    assert searcher.metric == ["val_bpb", "flops"] and searcher.mode == ["min", "min"]
    config = searcher.suggest("t0")  # the enqueued paper defaults
    assert config["recurrence.injection"] == "both" and config["recurrence.projection"] == "shared"
    assert config[execution.OPTUNA_NUMBER] == 0


# ---------------------------------------------------------------------------
# Equal tuning effort: the same search for every arm, then the grid with each arm's best


def test_tuned_twin_tunes_every_arm_alike(ray_cluster, mlflow_server, workdir, capsys):
    from lrt_platform.compare import build_report
    from lrt_platform.tracking import Tracker

    experiment = f"tuned_tiny_{os.getpid()}_{int(time.time())}"  # the mlflow server is shared by the session
    spec_path = _variant(workdir, "tuned.yaml", "tuned.yaml", **{"seeds: [0, 1]": "seeds: [0]",
                         "storage: ./runs": f"tracking: {{experiment: {experiment}}}\nstorage: ./runs"})
    spec = load_spec(spec_path)
    args = [spec_path, "--storage", str(workdir / "runs"), "--tracking-uri", mlflow_server]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("[sweep] done") == 2 * spec.tuning.trials + 2
    assert "optuna-dashboard sqlite:///" in out
    data = Tracker(mlflow_server, experiment).load_sweep()
    tuning = [r for r in data["trials"] if r["tags"].get("tuning_trial") == "true"]
    grid = [r for r in data["trials"] if r["tags"].get("tuning_trial") != "true"]
    assert sorted(r["tags"]["arm"] for r in tuning) == ["baseline"] * 2 + ["lrt_s2"] * 2  # equal effort
    assert all("pair_id" not in r["tags"] and r["tags"]["seed"] == "1000" for r in tuning)  # unpaired, own seed
    assert {r["tags"]["trial_id"] for r in tuning} == {f"d1-flops8e9-tune-{a}-t00{n}" for a in ("baseline", "lrt_s2")
                                                       for n in (0, 1)}
    by_id = {r["tags"]["trial_id"]: r["params"] for r in tuning}
    for arm in ("baseline", "lrt_s2"):  # trial 0: the spec's own settings; trial 1: the same draw for both arms
        assert float(by_id[f"d1-flops8e9-tune-{arm}-t000"]["optim.lr_scale"]) == 1.0
    assert by_id["d1-flops8e9-tune-baseline-t001"]["optim.lr_scale"] == \
        by_id["d1-flops8e9-tune-lrt_s2-t001"]["optim.lr_scale"]
    assert len(grid) == 2
    for r in grid:
        info = json.loads(r["tags"]["tuning"])
        assert set(info) == {"sampler", "trials", "space", "seed", "train_seed", "best", "best_value"}
        assert (info["sampler"], info["trials"], info["train_seed"]) == ("random", 2, 1000)
        mine = [t for t in tuning if t["tags"]["arm"] == r["tags"]["arm"]]
        winner = min(mine, key=lambda t: t["metrics"]["val_bpb"])
        assert info["best_value"] == pytest.approx(winner["metrics"]["val_bpb"])
        for key, value in info["best"].items():  # the best reached the grid trial's config
            assert float(r["params"][key]) == pytest.approx(value) == pytest.approx(float(winner["params"][key]))
    report = build_report(data)
    assert report["counts"]["trials"] == 2 and not report["unmatched"]  # tuning runs never paired
    import optuna

    root = storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec))
    study = optuna.load_study(study_name=f"{spec.experiment}-{spec_hash(spec)}-tune-d1-flops8e9-lrt_s2",
                              storage=storage.optuna_url(root, spec.experiment, spec_hash(spec)))
    assert study.metric_names == ["val_bpb"] and len(study.trials) == 2  # the dashboard names the objective
    assert report["comparisons"][0]["n_pairs"] == 1
    assert sweep.main(args + ["--resume"]) == 0  # finished phases: their bests come back, nothing re-trains
    out = capsys.readouterr().out
    assert "[sweep] done" not in out
    assert out.count("[sweep] tuned baseline at") == out.count("[sweep] tuned lrt_s2 at") == 1


# ---------------------------------------------------------------------------
# A tracking outage: the server stops mid-sweep, training goes on, nothing is lost

def _timing(key: str) -> bool:
    """Timings differ between any two runs; every other value must not."""
    return key == "mfu" or key.endswith(("_s", "_seconds"))


def _histories(url: str, experiment: str) -> dict:
    """{trial_id: {metric: [(step, value), ...]}} of the experiment's latest sweep."""
    from lrt_platform.tracking import Tracker

    tracker = Tracker(url, experiment)
    data = tracker.load_sweep()
    assert data["sweep"]["status"] == "FINISHED"
    return {r["tags"]["trial_id"]: {k: tracker.metric_history(r["run_id"], k) for k in r["metrics"]}
            for r in data["trials"]}


def test_dead_tracking_server_stops_the_sweep_in_one_line_before_anything_starts(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    t0 = time.time()
    assert sweep.main([f"{TINY}/quickstart.yaml", "--storage", str(tmp_path / "runs"), "--tracking-uri", dead]) == 2
    err = capsys.readouterr().err.strip()
    assert time.time() - t0 < 15 and len(err.splitlines()) == 1 and "unreachable (connection refused)" in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_tracking_outage_mid_sweep_loses_no_metric(ray_cluster, workdir, tmp_path_factory, capsys):
    import threading

    from lrt_platform.outbox import JOURNAL
    from tests.fixtures_mlflow import start_server, stop_server

    server_root = tmp_path_factory.mktemp("outage_server")
    proc, url = start_server(server_root)
    try:
        specs = {name: _variant(workdir, f"{name}.yaml", "quickstart.yaml", **{
            "seeds: [0, 1]": "seeds: [0]", "experiment: quickstart_tiny": f"experiment: {name}"})
            for name in ("steady", "outage")}
        args = ["--storage", str(workdir / "runs"), "--tracking-uri", url]
        assert sweep.main([specs["steady"], *args]) == 0  # the reference: the server up all along
        spec = load_spec(specs["outage"])
        trials_dir = storage.join(storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec)), "trials")
        stopped = threading.Event()

        def stop_once_a_trial_is_tracked():  # the trial's run exists and holds its first evaluation
            deadline = time.time() + 300
            while time.time() < deadline and not stopped.is_set():
                for path in storage.list_files(trials_dir, JOURNAL):
                    if (storage.read_json(path) or {}).get("sent", 0) >= 2:
                        stop_server(proc)
                        stopped.set()
                time.sleep(0.05)

        watcher = threading.Thread(target=stop_once_a_trial_is_tracked, daemon=True)
        watcher.start()
        t0 = time.time()
        assert sweep.main([specs["outage"], *args]) == 0  # training never stops for tracking
        watcher.join()
        assert stopped.is_set()
        err = capsys.readouterr().err
        assert "--sync-tracking" in err and "nothing is lost" in err and time.time() - t0 < 240  # no hang
        journals = [storage.read_json(p) for p in storage.list_files(trials_dir, JOURNAL)]
        assert len(journals) == 2 and all(len(j["records"]) > j["sent"] for j in journals)
        proc, _ = start_server(server_root, int(url.rsplit(":", 1)[1]))  # the server is back
        assert sweep.main([specs["outage"], *args, "--sync-tracking"]) == 0
        assert "every tracking record" in capsys.readouterr().out
        got, want = _histories(url, "outage"), _histories(url, "steady")
        assert got.keys() == want.keys() and len(want) == 2
        for trial_id, metrics in want.items():
            assert got[trial_id].keys() == metrics.keys(), trial_id
            for key, points in metrics.items():
                steps = [s for s, _ in got[trial_id][key]]
                assert steps == [s for s, _ in points] and len(set(steps)) == len(steps), (trial_id, key)
                if not _timing(key):
                    assert got[trial_id][key] == points, (trial_id, key)
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------
# Security: no credential value where a sweep writes; a local Ray listens on loopback only


def _files(folder) -> list:
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.append(path)
    return out


def test_no_credential_value_in_ray_logs_storage_or_tracking(ray_cluster, workdir, s3_bucket, monkeypatch, capsys):
    import uuid

    import boto3
    import ray

    secrets = {"AWS_ACCESS_KEY_ID": f"AKIALRT{uuid.uuid4().hex[:13].upper()}",
               "AWS_SECRET_ACCESS_KEY": f"lrt-secret-{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"lrt-token-{uuid.uuid4().hex}"}
    for k, v in secrets.items():  # fake but accepted: the moto endpoint takes any credentials
        monkeypatch.setenv(k, v)
    spec_path = _variant(workdir, "creds.yaml", "quickstart.yaml", **{
        "seeds: [0, 1]": "seeds: [0]", "experiment: quickstart_tiny": "experiment: creds"})
    assert sweep.main([spec_path, "--storage", f"s3://{s3_bucket}/sweeps",
                       "--tracking-uri", f"sqlite:///{workdir}/mlflow.db"]) == 0
    assert capsys.readouterr().out.count("[sweep] done") == 2
    values = [v.encode() for v in secrets.values()]
    session = ray._private.worker._global_node.get_session_dir_path()
    local = _files(session) + _files(workdir)  # Ray's logs; the MLflow database and artifacts; local runs
    assert any("runtime_env" in p for p in local), "the Ray session folder holds no runtime_env logs to check"
    leaks = []
    for path in local:
        with open(path, "rb") as f:
            data = f.read()
        leaks += [path for v in values if v in data]
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])]
    assert keys, "the sweep wrote nothing to S3"
    for key in keys:
        data = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        leaks += [f"s3://{s3_bucket}/{key}" for v in values if v in data]
    assert not leaks, f"credential values found in: {sorted(set(leaks))}"


LISTENERS = """
import json, os, socket
from lrt_platform import sweep
sweep.local_ray_on_loopback(None)
sweep._connect(None)

def descendants(root):
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    found, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in found]
        found.update(kids)
        todo += kids
    return found

inodes = set()
for pid in descendants(os.getpid()):
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
addrs = []
for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
    with open(f"/proc/net/{name}") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN sockets of this Ray
                raw = bytes.fromhex(fields[1].split(":")[0])
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addrs.append(socket.inet_ntop(family, raw))
print(json.dumps(addrs))
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run([PY, "-c", LISTENERS], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    addrs = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(addrs) >= 3, addrs  # GCS, raylet, object manager at least: the check saw Ray's servers
    import ipaddress

    ips = [ipaddress.ip_address(a) for a in addrs]  # ::ffff:127.0.0.1 is IPv4 loopback seen by an IPv6 socket
    assert all((getattr(ip, "ipv4_mapped", None) or ip).is_loopback for ip in ips), addrs


# ---------------------------------------------------------------------------
# Multi-worker trials: a Ray Train V2 TorchTrainer inside the Tune trial


def test_multi_worker_trial_runs_torch_trainer(ray_cluster, workdir):
    spec_path = _variant(workdir, "ddp.yaml", "quickstart.yaml", **{
        "seeds: [0, 1]": "seeds: [0]",
        "resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}":
            "resources: {workers_per_trial: 2, cpus_per_worker: 0.5}"})
    spec = load_spec(spec_path)
    assert check_resources(spec, {"CPU": 2.0}, [{"Resources": {"CPU": 2.0}}]) == 1
    root = storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec))
    trials = plan(spec, root)
    lrt = next(t for t in trials if t.arm == "lrt_s2")
    ctx = execution.SweepContext(spec=spec, spec_hash=spec_hash(spec), root=root,
                                 trials={t.trial_id: t.to_dict() for t in trials})
    assert execution.trial_request(spec) == {"CPU": execution.DRIVER_CPU}
    tuner = execution.make_grid_tuner(ctx, [lrt.trial_id], 1, execution.ProgressLog())
    result = tuner.fit()[0]
    assert result.error is None
    m = result.metrics
    assert m["complete"] and m["steps"] == lrt.steps and m["tokens"] == lrt.tokens
    assert m["lrt_trial_id"] == lrt.trial_id and m["val_bpb"] > 0
    prog = storage.read_json(f"{storage.trial_dir(root, lrt.trial_id)}/progress.json")
    assert prog["checkpoint_step"] == lrt.steps


def _tracked_trial(workdir, name: str, workers: int, fault: str | None = None):
    """Run the tiny quickstart's LRT trial alone, tracked in workdir's MLflow, on the in-process path
    (workers == 1) or a TorchTrainer (2 workers); returns (its result, its metric histories)."""
    from lrt_platform.tracking import Tracker

    resources = ("resources: {workers_per_trial: 2, cpus_per_worker: 0.5}" if workers == 2 else
                 "resources: {workers_per_trial: 1, cpus_per_worker: 1}")
    spec_path = _variant(workdir, f"{name}.yaml", "quickstart.yaml", **{
        "seeds: [0, 1]": "seeds: [0]", "experiment: quickstart_tiny": f"experiment: {name}",
        "resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}": resources})
    spec = load_spec(spec_path)
    root = storage.sweep_root(str(workdir / "runs"), spec.experiment, spec_hash(spec))
    lrt = next(t for t in plan(spec, root) if t.arm == "lrt_s2")
    uri = f"sqlite:///{workdir}/mlflow.db"
    tracker = Tracker(uri, spec.experiment)
    parent = tracker.start_sweep(spec_path, open(spec_path).read(), spec_hash(spec), [lrt.to_dict()])
    ctx = execution.SweepContext(spec=spec, spec_hash=spec_hash(spec), root=root, trials={lrt.trial_id: lrt.to_dict()},
                                 tracking_uri=uri, experiment=spec.experiment, parent_run_id=parent, fault=fault)
    result = execution.make_grid_tuner(ctx, [lrt.trial_id], 1, execution.ProgressLog()).fit()[0]
    assert result.error is None
    run = tracker.load_sweep(parent)["trials"][0]
    assert run["status"] == "FINISHED"
    prog = storage.read_json(f"{storage.trial_dir(root, lrt.trial_id)}/progress.json")
    return result.metrics, {k: tracker.metric_history(run["run_id"], k) for k in run["metrics"]}, prog


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "torch-trainer"])
def test_a_killed_worker_resumes_exactly(ray_cluster, workdir, workers):
    """SIGKILL right after the first checkpoint: the trial resumes from it and ends where an uninterrupted
    run ends, with every metric step once in MLflow."""
    steady, steady_hist, _ = _tracked_trial(workdir, f"steady{workers}", workers)
    killed, killed_hist, prog = _tracked_trial(workdir, f"killed{workers}", workers,
                                               fault=f"lrt_s2:{workdir}/kill-marker-{workers}:kill")
    assert os.path.exists(f"{workdir}/kill-marker-{workers}")  # the worker was killed
    assert [a["resumed_from_step"] for a in prog["attempts"]] == [None, 20]
    assert killed["val_bpb"] == pytest.approx(steady["val_bpb"], abs=1e-6)
    assert killed_hist.keys() == steady_hist.keys()
    for key, points in steady_hist.items():
        steps = [s for s, _ in killed_hist[key]]
        assert steps == [s for s, _ in points] and len(set(steps)) == len(steps), key
        if not _timing(key):
            assert [v for _, v in killed_hist[key]] == pytest.approx([v for _, v in points], abs=1e-6), key


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "torch-trainer"])
def test_a_diverged_trial_fails_once_with_its_reason_and_the_sweep_goes_on(ray_cluster, workdir, capsys, workers):
    from lrt_platform.compare import compare, to_json
    from lrt_platform.tracking import Tracker

    resources = ("resources: {workers_per_trial: 2, cpus_per_worker: 0.5}" if workers == 2 else
                 "resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}")
    name = f"diverge{workers}"
    spec_path = _variant(workdir, f"{name}.yaml", "quickstart.yaml", **{
        "seeds: [0, 1]": "seeds: [0]", "experiment: quickstart_tiny": f"experiment: {name}",
        "resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}": resources,
        "storage: ./runs": "optim: {lr_scale: 1.0e+20}\nstorage: ./runs"})  # every learning rate absurd
    assert _run(spec_path, workdir) == 0  # nothing to retry, the sweep finishes
    out = capsys.readouterr().out
    assert out.count("[sweep] DIVERGED") == 2 and "likely cause: the learning rates" in out
    for prog in _progress(spec_path, workdir).values():
        assert len(prog["attempts"]) == 1 and prog["diverged"]["reason"].startswith("diverged at step")
    uri = f"sqlite:///{workdir}/mlflow.db"
    runs = Tracker(uri, name).load_sweep()["trials"]
    assert len(runs) == 2
    for r in runs:
        assert r["status"] == "FAILED" and r["tags"]["diverged"] == "true"
        assert r["tags"]["failure_reason"].startswith("diverged at step") and "\n" not in r["tags"]["failure_reason"]
    report = to_json(compare(uri, name))
    assert report["counts"]["diverged"] == 2 and len(report["diverged"]) == 2


# ---------------------------------------------------------------------------
# Resources and errors: fail before anything starts


def _res_spec(**resources) -> object:
    body = ", ".join(f"{k}: {v}" for k, v in resources.items())
    return parse_spec(f"""
experiment: r
backbone: {{depth: 1, head_dim: 16, seq_len: 32, batch_size: 4}}
arms: [{{name: b, baseline: true}}, {{name: l, strategy: interleaved}}]
budgets: {{flops: [1.0e+10]}}
resources: {{{body}}}
""")


def test_check_resources():
    two = ({"CPU": 2.0}, [{"Alive": True, "Resources": {"CPU": 2.0}}])
    assert check_resources(_res_spec(cpus_per_worker=1), *two) == 2
    assert check_resources(_res_spec(cpus_per_worker=2), *two) == 1
    assert check_resources(_res_spec(workers_per_trial=2, cpus_per_worker=0.99), *two) == 1
    with pytest.raises(ResourceError, match="largest node has 2 CPU"):
        check_resources(_res_spec(cpus_per_worker=4), *two)
    with pytest.raises(ResourceError, match="2.01 CPU"):  # 2 workers x 1 CPU + the trial driver's 0.01
        check_resources(_res_spec(workers_per_trial=2, cpus_per_worker=1), *two)
    with pytest.raises(ResourceError, match="max_concurrent_trials=3"):
        check_resources(_res_spec(cpus_per_worker=1, max_concurrent_trials=3), *two)
    with pytest.raises(ResourceError, match="GPU"):
        check_resources(_res_spec(gpus_per_worker=1), *two)
    gpus = ({"CPU": 16.0, "GPU": 2.0}, [{"Resources": {"CPU": 8.0, "GPU": 1.0}}, {"Resources": {"CPU": 8.0, "GPU": 1.0}}])
    assert check_resources(_res_spec(workers_per_trial=2, cpus_per_worker=4, gpus_per_worker=1), *gpus) == 1


def test_impossible_resources_fail_before_anything_starts(ray_cluster, workdir, capsys):
    spec_path = _variant(workdir, "big.yaml", "quickstart.yaml", **{"cpus_per_worker: 1": "cpus_per_worker: 3"})
    assert _run(spec_path, workdir) == 2
    # the shared in-process cluster may forward an earlier test's actor logs ("(Actor pid=...)"): not ours
    err = "\n".join(l for l in capsys.readouterr().err.strip().splitlines() if "pid=" not in l)
    assert err.startswith("error: ") and "\n" not in err and "cpus_per_worker" in err
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()


def test_cli_bad_spec_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(f"{TINY}/quickstart.yaml").read().replace("flops: [8.0e+9]", "flops: [-8.0e+9]"))
    proc = subprocess.run([PY, "-m", "lrt_platform.sweep", str(bad)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "budgets.flops" in lines[0] and "Traceback" not in proc.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(open(f"{TINY}/quickstart.yaml").read() + "budget_typo: 1\n")
    proc = subprocess.run([PY, "-m", "lrt_platform.sweep", str(unknown), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "budget_typo" in proc.stderr


# ---------------------------------------------------------------------------
# Storage on S3 (moto server on 127.0.0.1)


def test_sweep_stored_on_s3_runs_and_resumes(ray_cluster, workdir, s3_bucket, capsys):
    """Tune state, trial checkpoints and progress files all on s3://; --resume finds them there."""
    spec_path = _variant(workdir, "s3.yaml", "quickstart.yaml", **{"seeds: [0, 1]": "seeds: [0]"})
    uri = f"s3://{s3_bucket}/sweeps"
    args = [spec_path, "--storage", uri, "--tracking-uri", f"sqlite:///{workdir}/mlflow.db"]
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count("[sweep] done") == 2
    spec = load_spec(spec_path)
    root = storage.sweep_root(uri, spec.experiment, spec_hash(spec))
    for trial in plan(spec, root):
        prog = storage.read_json(f"{storage.trial_dir(root, trial.trial_id)}/progress.json")
        assert prog["checkpoint_step"] == trial.steps
        assert storage.exists(storage.join(storage.checkpoint_dir(root, trial.trial_id), "latest.pt"))
    assert sweep.main(args + ["--resume"]) == 0  # everything already finished: nothing re-trains
    assert "[sweep] done" not in capsys.readouterr().out


def test_progress_log_with_a_terminal_bar_pickles_for_the_experiment_state(monkeypatch, capsys):
    """Tune saves its callbacks with the experiment state; a bar on a terminal must not break that."""
    import io
    import pickle

    class Terminal(io.TextIOWrapper):  # like sys.stderr on a terminal: a text file, which does not pickle
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal(io.BytesIO()))
    log = execution.ProgressLog(total=3)
    assert log.bar is not None  # a terminal: the tqdm bar is on
    restored = pickle.loads(pickle.dumps(log))
    assert restored.bar is None and restored.total == 3  # plain lines after --resume
    log.close()
