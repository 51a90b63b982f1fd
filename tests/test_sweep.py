"""Sweeps on a real local Ray cluster: grid, retry, resume, Optuna search, TorchTrainer workers,
resource checks, the CLI's one-line errors, and one `ray job submit` against `ray start --head`."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    crashed = [p for p in os.listdir(f"{root}/trials") if p.endswith("lrt-t001")][0]
    attempts = storage.read_json(f"{root}/trials/{crashed}/progress.json")["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from_step"] == 30  # eval_every 30 -> first checkpoint


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
    assert report["comparisons"][0]["n_pairs"] == 1
    assert sweep.main(args + ["--resume"]) == 0  # finished phases: their bests come back, nothing re-trains
    out = capsys.readouterr().out
    assert "[sweep] done" not in out
    assert out.count("[sweep] tuned baseline at") == out.count("[sweep] tuned lrt_s2 at") == 1


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
# Job submission against a `ray start --head` cluster (its own cluster; the only such test)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNTIME_ENV = {"excludes": [".git", "runs", "mlruns", "mlartifacts", "*.db", "venv", ".venv", "**/__pycache__",
                            ".pytest_cache", "*.egg-info"]}


@pytest.mark.ray_job
def test_ray_job_submit_runs_the_quickstart_twin(tmp_path):
    ray_bin = os.path.join(os.path.dirname(PY), "ray")
    gcs, dash = _free_port(), _free_port()
    # every fixed default port gets a free one: another Ray on this machine (the session's in-process
    # cluster, a colleague's) already holds the defaults, e.g. the dashboard agent's 52365
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port", "node-manager-port",
                                                     "object-manager-port")]
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""),
           "RAY_AUTH_MODE": "token"}  # token auth stays on; clients need this to send the token
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port", str(gcs), "--node-ip-address",
                             "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(ray_bin, address, env, head)
        submission = f"lrt-test-{os.getpid()}-{int(time.time())}"
        submit = [ray_bin, "job", "submit", "--address", address, "--submission-id", submission, "--working-dir", ".",
                  "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
                  "python", "-m", "lrt_platform.sweep", "sweep_specs/tiny/quickstart.yaml",
                  "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
        for _ in range(15):  # the dashboard answers before the head's job agent is up: "try again later"
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        status = subprocess.run([ray_bin, "job", "status", "--address", address, submission], env=env,
                                capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower(), job.stdout[-3000:] + job.stderr[-3000:]
        assert "orchestration overhead" in job.stdout
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(ray_bin: str, address: str, env: dict, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        proc = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray dashboard at {address} did not come up in {timeout:.0f}s")


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the cluster this test started, and only it: `ray start --block` tears down its own processes
    on SIGTERM; anything left in its process group (ours, by id) is killed after a grace period."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
