"""Shared tracking and the local stack, for real on 127.0.0.1.

- infra/mlflow/serve.py: `mlflow server` on a throwaway PostgreSQL (initdb + postgres in a temp dir, as an
  unprivileged account when run as root) with its artifacts in a moto S3 bucket; a search sweep on the
  session's Ray cluster tracks there and keeps its Optuna study in the same PostgreSQL.
- infra/local/up and infra/local/down: the whole stack (Ray head with token auth, MLflow, S3, PostgreSQL when
  installed), a `ray job submit` of the quickstart twin to it, its results read back, then everything gone.

PostgreSQL's absence skips the tests that need it; `up` then falls back to sqlite and its test still runs.
"""

import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from lrt_platform import execution, sweep
from lrt_platform.spec import load_spec, spec_hash
from tests.fixtures_mlflow import _free_port
from tests.test_sweep import _variant

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "infra" / "mlflow" / "serve.py"
PY = sys.executable


def _load(name: str, path: Path):
    """A script of infra/ as a module, without leaving __pycache__ in infra/."""
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.dont_write_bytecode = saved


stack = _load("lrt_infra_stack", ROOT / "infra" / "local" / "stack.py")
serve = _load("lrt_infra_serve", SERVE)


# ---------------------------------------------------------------------------
# Fixtures: a throwaway PostgreSQL, and `mlflow server` on it with artifacts in moto


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of its own on a free port, databases `mlflow` and `optuna`; PGPASSFILE set."""
    bindir = stack.postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/postgres under /usr/lib/postgresql/*/bin, "
                    "pg_config --bindir or PATH; LRT_PG_BIN names another folder)")
    run_as = stack.postgres_os_user()
    home = Path(tempfile.mkdtemp(prefix="lrt-pg-test-", dir="/tmp"))  # reachable by run_as, unlike tmp_path
    pg = stack.Postgres(bindir, home, tmp_path_factory.mktemp("pg") / "pgpass", stack.free_port(), run_as)
    saved = os.environ.get("PGPASSFILE")
    try:
        pg.init()
        pg.start()
        pg.wait()
        pg.create_databases()
        os.environ.update(pg.env)
        yield pg
    finally:
        if pg.proc is not None:
            stack.stop_postgres(pg.proc.pid, stack.start_time(pg.proc.pid))
            pg.proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)
        if saved is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = saved


@pytest.fixture(scope="module")
def shared_tracking(postgres, s3_endpoint, tmp_path_factory):
    """`mlflow server` through infra/mlflow/serve.py: runs in PostgreSQL, artifacts proxied to a moto bucket."""
    import boto3

    from tests.fixtures_mlflow import stop_server

    bucket = f"lrt-tracking-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    port = stack.free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, **postgres.env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    proc = stack.spawn([PY, str(SERVE), "--backend-store-uri", postgres.url("mlflow"),
                        "--artifacts-destination", f"s3://{bucket}/mlflow", "--port", str(port), "--workers", "1"],
                       log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{url}/health", proc, "mlflow server", log)
        yield SimpleNamespace(url=url, bucket=bucket, port=port, log=log)
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------
# infra/mlflow/serve.py


def test_serve_builds_the_server_command_and_refuses_bad_settings(capsys):
    assert serve.main(["--backend-store-uri", "postgresql://mlflow@db.internal:5432/mlflow", "--artifacts-destination",
                       "s3://lrt-mlflow/artifacts", "--host", "10.0.0.5", "--port", "5001", "--print-command"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--backend-store-uri") + 1] == "postgresql+psycopg://mlflow@db.internal:5432/mlflow"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://lrt-mlflow/artifacts"
    assert cmd[cmd.index("--allowed-hosts") + 1] == "10.0.0.5:5001,localhost:5001,127.0.0.1:5001"
    assert cmd[cmd.index("--host") + 1] == "10.0.0.5"
    for bad, why in [(["--backend-store-uri", "postgresql://mlflow:hunter2@db/mlflow"], "process list"),
                     (["--backend-store-uri", "sqlite:///relative.db"], "absolute path"),
                     (["--backend-store-uri", "mysql://db/mlflow"], "scheme"),
                     (["--backend-store-uri", "postgresql://mlflow@db.internal"], "a host and a database"),
                     (["--artifacts-destination", "gs://bucket"], "not s3")]:
        argv = ["--backend-store-uri", "sqlite:////tmp/x.db", "--artifacts-destination", "s3://b/p", *bad,
                "--print-command"]
        assert serve.main(argv) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and why in err, err
        assert "hunter2" not in err


def test_serve_names_an_unreachable_database_in_one_line(capsys):
    port = _free_port()  # closed again: nothing listens there
    assert serve.main(["--backend-store-uri", f"postgresql://mlflow@127.0.0.1:{port}/mlflow",
                       "--artifacts-destination", "s3://b/p"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot reach the backend store postgresql://mlflow@127.0.0.1:{port}/mlflow")
    assert "\n" not in err


def test_shared_server_answers_its_own_host_names_only(shared_tracking):
    def status(host: str) -> int:
        req = urllib.request.Request(f"{shared_tracking.url}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(f"127.0.0.1:{shared_tracking.port}") == 200
    assert status(f"localhost:{shared_tracking.port}") == 200
    assert status("attacker.example") == 403  # DNS rebinding: a foreign Host header is refused


def test_search_sweep_tracks_in_postgres_with_artifacts_in_s3(ray_cluster, postgres, shared_tracking, tmp_path,
                                                              monkeypatch, capsys):
    import boto3
    import optuna
    import psycopg
    from mlflow import MlflowClient

    monkeypatch.delenv(execution.FAULT_ENV, raising=False)
    optuna_url = postgres.url("optuna")
    spec_path = _variant(tmp_path, "pg.yaml", "schedule_search.yaml",
                         **{"num_trials: 4": f"num_trials: 2\n  storage: {optuna_url}"})
    assert sweep.main([spec_path, "--storage", str(tmp_path / "runs"), "--tracking-uri", shared_tracking.url]) == 0
    out = capsys.readouterr().out
    spec = load_spec(spec_path)

    # MLflow: the sweep run and one child per trial (baseline + 2 searched), metrics with their histories
    client = MlflowClient(shared_tracking.url)
    exp = client.get_experiment_by_name(spec.experiment_name)
    assert exp.artifact_location.startswith("mlflow-artifacts:/")  # proxied by the server, to S3
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == spec.search.num_trials + 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    for r in children:
        assert "val_bpb" in r.data.metrics and "flops" in r.data.metrics
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) >= 2
    # ... and those rows are in PostgreSQL's `mlflow` database itself
    with psycopg.connect(serve.driver_free(postgres.url("mlflow"))) as db:
        n_runs = db.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),)).fetchone()
        n_points = db.execute("SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                              "WHERE r.experiment_id = %s", (int(exp.experiment_id),)).fetchone()
    assert n_runs[0] == len(runs) and n_points[0] > 10 * len(children)

    # Optuna: the study in PostgreSQL's `optuna` database, nothing next to the sweep
    study = optuna.load_study(study_name=f"{spec.experiment}-{spec_hash(spec)}", storage=optuna_url)
    assert len(study.trials) == spec.search.num_trials
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert not list((tmp_path / "runs").rglob("optuna.db"))
    assert f"optuna-dashboard {optuna_url}" in out

    # S3: the sweep run's plots, uploaded through the server into the bucket
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=shared_tracking.bucket, Prefix="mlflow/").get("Contents", [])]
    plots = [k for k in keys if f"/{parent.info.run_id}/artifacts/plots/" in k]
    assert any(k.endswith("/plots/paired_difference.png") for k in plots), keys
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} >= {"plots/paired_difference.png"}

    # the database password is in the password file only: not in the output, the spec or the server's log
    pw = postgres.passfile.read_text().strip().rsplit(":", 1)[1]
    assert pw not in out and pw not in Path(spec_path).read_text() and pw not in shared_tracking.log.read_text()


# ---------------------------------------------------------------------------
# infra/local/up and infra/local/down


def test_agent_problem_says_when_another_process_holds_the_agent_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # held by this test process, which is no descendant of the "head" (a pid beyond pid_max: none)
        head = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        problem = stack.agent_problem(port, head, str(tmp_path))
    assert problem and f"port {port} (the dashboard agent's) is taken by another process (pid {os.getpid()}" in problem
    assert "--dashboard-agent-listen-port" in problem
    problem = stack.agent_problem(port, os.getpid(), str(tmp_path))  # closed now: nobody listens
    assert problem.startswith(f"the head's dashboard agent is not up on 127.0.0.1:{port}")


def test_free_ports_avoid_rays_worker_range_and_default_ports():
    taken = set()
    ports = [stack.free_port(taken) for _ in range(50)]
    assert len(set(ports)) == 50 and taken == set(ports)
    assert not [p for p in ports if p in stack.RAY_WORKER_PORTS or p in stack.DEFAULT_PORTS]


def _exports(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            k, v = line[len("export "):].split("=", 1)
            out[k] = shlex.split(v)[0]
        else:
            assert line.startswith("#"), f"not a comment, so `eval \"$(infra/local/up)\"` would break: {line}"
    return out


def _gone(state: dict) -> list[str]:
    """What is still alive of the stack recorded in state: its processes, their groups, its ports."""
    left = []
    for name, s in state["services"].items():
        if stack.alive(s["pid"], s["start"]):
            left.append(f"{name} pid {s['pid']}")
        left += [f"{name} group member {p}" for p in stack.group_members(s["pid"])]
        ports = [s["port"], *s.get("ports", {}).values()] + ([s["dashboard_port"]] if "dashboard_port" in s else [])
        left += [f"{name} port {p} listening" for p in ports if stack.listener_pids(p)]
    left += [f"ray process {p}" for p in stack.processes_using(state["services"]["ray"]["temp_dir"])]
    return left


@pytest.mark.ray_job
def test_local_stack_up_runs_a_submitted_sweep_and_down_stops_it(tmp_path):
    import boto3
    from mlflow import MlflowClient

    sdir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_")) and k not in ("PGPASSFILE", execution.FAULT_ENV)}
    env["LRT_PYTHON"] = PY
    up = subprocess.run([str(ROOT / "infra" / "local" / "up"), "--state-dir", str(sdir), "--num-cpus", "2"],
                        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    state = json.loads((sdir / "stack.json").read_text()) if (sdir / "stack.json").exists() else None
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        exports = _exports(up.stdout)
        assert set(exports) >= {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI",
                                "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"}
        assert exports["RAY_AUTH_MODE"] == "token"
        assert (sdir / "env.sh").read_text().count("export ") == len(exports)
        backend = state["mlflow_backend"]
        assert backend.startswith("postgresql+psycopg://" if stack.postgres_bindir() else "sqlite:///")
        all_ports = [s["port"] for s in state["services"].values()] + list(state["services"]["ray"]["ports"].values())
        assert not [p for p in all_ports if p in stack.RAY_WORKER_PORTS]
        with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on: no token, no jobs
            urllib.request.urlopen(f"{exports['RAY_ADDRESS']}/api/jobs/", timeout=30)
        assert refused.value.code == 401
        assert f"MLflow runs: {exports['MLFLOW_TRACKING_URI']}/#/experiments" in up.stdout
        again = subprocess.run([str(ROOT / "infra" / "local" / "up"), "--state-dir", str(sdir)], capture_output=True,
                               text=True, timeout=120, env=env, cwd=ROOT)
        assert again.returncode == 1 and "already up" in again.stderr  # ... and leaves that stack running:

        # the printed `ray job submit` line, for the quickstart twin, right away (no retry: up waited)
        line = [l for l in up.stdout.splitlines() if l.startswith("#   ray job submit ")][0][len("#   "):]
        submit = shlex.split(line.replace("sweep_specs/quickstart.yaml", "sweep_specs/tiny/quickstart.yaml"))
        submission = f"lrt-test-{uuid.uuid4().hex[:8]}"
        submit[0] = os.path.join(os.path.dirname(PY), "ray")
        submit[3:3] = ["--submission-id", submission]
        job_env = {**env, **exports}
        job = subprocess.run(submit, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=420)
        status = subprocess.run([submit[0], "job", "status", "--address", exports["RAY_ADDRESS"], submission],
                                env=job_env, capture_output=True, text=True, timeout=120)
        assert "succeeded" in (status.stdout + status.stderr).lower(), job.stdout[-3000:] + job.stderr[-3000:]
        assert "orchestration overhead" in job.stdout

        # the results, from that MLflow and that S3
        spec = load_spec(f"{ROOT}/sweep_specs/tiny/quickstart.yaml")
        client = MlflowClient(exports["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name(spec.experiment_name)
        runs = client.search_runs([exp.experiment_id])
        trials = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
        parent = [r for r in runs if r.data.tags.get("run_kind") == "sweep"][0]
        assert len(trials) == 4 and all(r.info.status == "FINISHED" and "val_bpb" in r.data.metrics for r in trials)
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])

        def keys(bucket: str) -> list[str]:
            return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

        assert any(f"/{parent.info.run_id}/artifacts/plots/" in k for k in keys(stack.BUCKETS["artifacts"]))
        assert sum(k.endswith("/progress.json") for k in keys(stack.BUCKETS["sweeps"])) == 4  # sweep storage
    finally:
        if state is not None and (sdir / "stack.json").exists():
            down = subprocess.run([str(ROOT / "infra" / "local" / "down"), "--state-dir", str(sdir), "--purge"],
                                  capture_output=True, text=True, timeout=180, env=env)
            assert down.returncode == 0, down.stderr
            assert "stopped: ray, mlflow, s3" in down.stdout
    state = json.loads((sdir / "stack.json").read_text()) if (sdir / "stack.json").exists() else state
    assert not _gone(state), _gone(state)
    assert not sdir.exists()
    if "postgres" in state["services"]:
        assert not Path(state["services"]["postgres"]["home"]).exists()
