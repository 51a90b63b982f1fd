#!/usr/bin/env python3
"""A whole platform on one machine, on 127.0.0.1: what infra/local/up and infra/local/down run.

    infra/local/up [--state-dir DIR] [--num-cpus N] [--no-postgres]
    infra/local/down [--state-dir DIR] [--purge]

`up` starts, each on a free port outside Ray's worker range (10002-19999):
- PostgreSQL (databases `mlflow` and `optuna`, user `lrt`, a random password in
  DIR/pgpass that clients find through PGPASSFILE), when its binaries are
  installed (LRT_PG_BIN names their folder); sqlite otherwise;
- a moto S3 endpoint with buckets `lrt-mlflow` (MLflow's artifacts) and
  `lrt-sweeps` (sweep storage); moto keeps objects in memory, so they go with `down`;
- `mlflow server` on that database, artifacts proxied to S3 (infra/mlflow/serve.py);
- a Ray head (`ray start --head --block`, token authentication on with a token
  of its own in DIR/ray_auth_token, the dashboard on loopback), whose processes inherit the stack's environment, so a
  submitted job reaches MLflow, S3 and PostgreSQL as a shell with the exports does.
It waits until the head's job agent answers (the dashboard answers before it,
and an agent that cannot bind its port leaves `ray start` reporting success),
then prints the exports, the MLflow address and a `ray job submit` line; the
same exports go to DIR/env.sh. Every line it prints but the exports starts with
`#`, so `eval "$(infra/local/up)"` works.

DIR is --state-dir, else $LRT_STACK_DIR, else ~/.cache/lrt/stack. DIR/stack.json
records each process `up` started (pid, its start time, ports); `down` stops
those and nothing else, by pid: Ray through the `ray start --block` process
(SIGTERM, as a Ray cluster of this user started elsewhere must keep running:
never `ray stop`), PostgreSQL through its postmaster (fast shutdown). The
PostgreSQL data stays between `down` and `up` unless `down --purge`.

Run as root, PostgreSQL (which refuses root) runs as an unprivileged account
($LRT_PG_OS_USER, else `postgres`, else `nobody`) with its data in /tmp.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "infra" / "mlflow" / "serve.py"
HOST = "127.0.0.1"
RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min-worker-port..--max-worker-port
# ports Ray, MLflow and moto take when not told otherwise: never handed out
DEFAULT_PORTS = {5000, 5432, 6379, 8076, 8265, 10001, 44217, 44227, 52365, 52366}
RAY_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                  "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
PG_USER = "lrt"
PG_DATABASES = ("mlflow", "optuna")
BUCKETS = {"artifacts": "lrt-mlflow", "sweeps": "lrt-sweeps"}
# moto accepts any key pair; these are its documented placeholders, not credentials
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1"}
RUNTIME_ENV = {"excludes": [".git", "runs", "mlruns", "mlartifacts", "*.db", "venv", ".venv", "**/__pycache__",
                            ".pytest_cache", "*.egg-info"]}
START_TIMEOUT_S = 180


class StackError(RuntimeError):
    pass


def say(*lines: str) -> None:
    for line in lines:
        print(f"# {line}", flush=True)


# ---------------------------------------------------------------------------
# Ports and processes


def free_port(taken: set[int] | None = None) -> int:
    """A free TCP port on 127.0.0.1, outside Ray's worker range and the services' default ports."""
    taken = taken if taken is not None else set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in RAY_WORKER_PORTS and port not in DEFAULT_PORTS and port not in taken:
            taken.add(port)
            return port
    raise StackError("no free port outside Ray's worker range 10002-19999")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when it is gone
    or a zombie. Recorded with each pid, so that `down` never signals a process that merely reused it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(pid: int, started: int | None = None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def group_members(pgid: int) -> list[int]:
    """Live processes in process group pgid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def descendants(root: int) -> set[int]:
    """Live processes below root in the process tree (Ray names its processes `ray::...`, so the tree,
    not the command line, says which are this head's)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def processes_using(folder: str) -> list[int]:
    """Live processes of this user with their working directory, or a file open, in folder (the stack's
    own Ray temp dir: every process of that cluster keeps its log files open there)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        if pid == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            links = [os.readlink(f"/proc/{entry}/cwd")]
            links += [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        if any(link == folder or link.startswith(folder + "/") for link in links) and alive(pid):
            out.append(pid)
    return out


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.time() + timeout
    while any(alive(p) for p in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def spawn(cmd: list[str], log: Path, env: dict | None = None, run_as: str | None = None,
          cwd: str | None = None) -> subprocess.Popen:
    """Start cmd in its own session (it outlives `up`; `down` signals its group), output to log."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True, **_as_user(run_as))


def record(proc: subprocess.Popen, **extra) -> dict:
    return {"pid": proc.pid, "start": start_time(proc.pid), **extra}


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def wait_http(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not http_ok(url):
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; {log} ends with:\n{tail(log)}")
        if time.time() > deadline:
            raise StackError(f"{what} did not answer {url} in {timeout:.0f} s; {log} ends with:\n{tail(log)}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------
# PostgreSQL


def postgres_bindir() -> str | None:
    """The folder with initdb and postgres: $LRT_PG_BIN, `pg_config --bindir`, /usr/lib/postgresql/*/bin
    (newest first), or the folder of an initdb on PATH; None when PostgreSQL is not installed."""
    candidates = [os.environ["LRT_PG_BIN"]] if os.environ.get("LRT_PG_BIN") else []
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    candidates += ["/usr/local/pgsql/bin"] + ([os.path.dirname(shutil.which("initdb"))] if shutil.which("initdb")
                                               else [])
    for c in candidates:
        if c and all(os.access(os.path.join(c, b), os.X_OK) for b in ("initdb", "postgres", "pg_isready", "psql")):
            return c
    return None


def postgres_os_user() -> str | None:
    """The account PostgreSQL runs as: None (this one) unless this is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in filter(None, (os.environ.get("LRT_PG_OS_USER"), "postgres", "nobody")):
        try:
            if pwd.getpwnam(name).pw_uid != 0:
                return name
        except KeyError:
            continue
    raise StackError("running as root, and no unprivileged account to run PostgreSQL as; set LRT_PG_OS_USER")


def _as_user(name: str | None) -> dict:
    if name is None:
        return {}
    entry = pwd.getpwnam(name)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Postgres:
    """A PostgreSQL server of its own: initdb (once) into `home`/data, listening on 127.0.0.1:port only
    (no Unix socket), password authentication (scram-sha-256) for user `lrt`, the password in `passfile`
    (libpq's password-file format, for PGPASSFILE). `home` must be reachable by `run_as`."""

    def __init__(self, bindir: str, home: Path, passfile: Path, port: int, run_as: str | None = None):
        self.bindir, self.home, self.passfile, self.port, self.run_as = bindir, Path(home), Path(passfile), port, run_as
        self.data, self.log = self.home / "data", self.home / "postgres.log"
        self.proc: subprocess.Popen | None = None

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@{HOST}:{self.port}/{database}"  # psycopg 3, whatever SQLAlchemy

    @property
    def env(self) -> dict:
        return {"PGPASSFILE": str(self.passfile)}

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def init(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.home, entry.pw_uid, entry.pw_gid)
        if (self.data / "PG_VERSION").exists():
            if not self.passfile.exists():
                raise StackError(f"{self.data} exists but its password file {self.passfile} does not; "
                                 "`down --purge` removes both")
            return
        shutil.rmtree(self.data, ignore_errors=True)  # a half-made one
        pw = secrets.token_urlsafe(24)
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{HOST}:*:*:{PG_USER}:{pw}\n")
        pwfile = self.home / "initdb-pw"
        try:
            pwfile.write_text(pw + "\n")
            if self.run_as:
                entry = pwd.getpwnam(self.run_as)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            os.chmod(pwfile, 0o600)
            proc = subprocess.run([self._bin("initdb"), "-D", str(self.data), "-U", PG_USER, "-E", "UTF8",
                                   "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-instructions"],
                                  capture_output=True, text=True, timeout=300, cwd=self.home, **_as_user(self.run_as))
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise StackError(f"initdb failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")

    def start(self) -> subprocess.Popen:
        cmd = [self._bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-c", f"listen_addresses={HOST}",
               "-c", "unix_socket_directories="]
        self.proc = spawn(cmd, self.log, run_as=self.run_as, cwd=str(self.home))
        return self.proc

    def wait(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        while subprocess.run([self._bin("pg_isready"), "-q", "-h", HOST, "-p", str(self.port)],
                             timeout=30).returncode != 0:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"postgres exited with code {self.proc.returncode}; {self.log} ends with:\n"
                                 f"{tail(self.log)}")
            if time.time() > deadline:
                raise StackError(f"postgres did not accept connections on {HOST}:{self.port} in {timeout:.0f} s")
            time.sleep(0.3)

    def psql(self, sql: str, database: str = "postgres") -> str:
        proc = subprocess.run([self._bin("psql"), "-h", HOST, "-p", str(self.port), "-U", PG_USER, "-d", database,
                               "-w", "-tAc", sql], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.env})
        if proc.returncode != 0:
            raise StackError(f"psql {sql!r} failed: {proc.stderr.strip()}")
        return proc.stdout

    def create_databases(self, names=PG_DATABASES) -> None:
        have = set(self.psql("SELECT datname FROM pg_database").split())
        for name in names:
            if name not in have:
                self.psql(f"CREATE DATABASE {name}")


def stop_postgres(pid: int, started: int | None, timeout: float = 30) -> None:
    """Fast shutdown (SIGINT to the postmaster: clients disconnected, data consistent on disk)."""
    if not alive(pid, started):
        return
    os.kill(pid, signal.SIGINT)
    if not wait_gone([pid], timeout):
        os.kill(pid, signal.SIGQUIT)
        wait_gone([pid], 10)


# ---------------------------------------------------------------------------
# The stack


def state_dir(given: str | None) -> Path:
    return Path(given or os.environ.get("LRT_STACK_DIR") or Path.home() / ".cache" / "lrt" / "stack").absolute()


def read_state(sdir: Path) -> dict | None:
    try:
        return json.loads((sdir / "stack.json").read_text())
    except FileNotFoundError:
        return None


def write_state(sdir: Path, state: dict) -> None:
    tmp = sdir / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(sdir / "stack.json")


def postgres_home(sdir: Path, run_as: str | None) -> Path:
    """Under the state dir, or for root a folder in /tmp that the PostgreSQL account can reach."""
    if run_as is None:
        return sdir / "postgres"
    return Path(tempfile.gettempdir()) / f"lrt-pg-{hashlib.sha256(str(sdir).encode()).hexdigest()[:12]}"


def ray_token(sdir: Path) -> Path:
    """The cluster's own token (256 random bits, as `ray get-auth-token --generate` makes), in the state dir
    (mode 600, kept across `down` and `up`): clients find it through RAY_AUTH_TOKEN_PATH, and
    ~/.ray/auth_token, which other clusters of this user may use, is left alone."""
    path = sdir / "ray_auth_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def ray_bin() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.access(here, os.X_OK) else (shutil.which("ray") or "ray")


def listener_pids(port: int) -> list[int] | None:
    """Processes listening on TCP port (from /proc/net/tcp*); None where that cannot be read."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            return None
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
                inodes.add(cols[9])
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                    pids.append(int(entry))
                    break
        except OSError:
            continue
    return pids if pids or not inodes else None  # inodes but no readable owner: someone else's process


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def agent_problem(agent_port: int, head_pid: int, temp_dir: str) -> str | None:
    """None when this cluster's dashboard agent answers on agent_port; else what is wrong, in words."""
    holders = listener_pids(agent_port)
    ours = holders is not None and bool(set(holders) & descendants(head_pid))
    if ours and http_ok(f"http://{HOST}:{agent_port}/api/healthz"):
        return None
    log = Path(temp_dir) / "session_latest" / "logs" / "dashboard_agent.log"
    if holders is None:
        return (f"port {agent_port} (the dashboard agent's) is taken by a process of another user; give the "
                f"agent a free port (--dashboard-agent-listen-port)")
    if holders and not ours:
        who = "; ".join(f"pid {p}: {cmdline(p)[:160]}" for p in holders)
        return (f"port {agent_port} (the dashboard agent's) is taken by another process ({who}), so this head's "
                f"job agent could not bind it and jobs cannot be submitted; give the agent a free port "
                f"(--dashboard-agent-listen-port)")
    return (f"the head's dashboard agent is not up on {HOST}:{agent_port} (no job can be submitted); "
            f"{log} ends with:\n{tail(log, 2000)}")


def wait_for_job_agent(dashboard: str, agent_port: int, temp_dir: str, head: subprocess.Popen, log: Path,
                       env: dict, timeout: float = START_TIMEOUT_S) -> None:
    """Until the dashboard lists jobs (with the token) and this head's own job agent answers on its port."""
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # the job client sends the cluster's token
        os.environ[k] = env[k]
    os.environ.pop("RAY_AUTH_TOKEN", None)
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    listed, problem, taken = False, "the dashboard did not answer", 0
    while time.time() < deadline and taken < 3:  # a port another process holds stays taken: fail fast
        if head.poll() is not None:
            raise StackError(f"ray start --head exited with code {head.returncode}; {log} ends with:\n{tail(log)}")
        if not listed and http_ok(f"{dashboard}/api/gcs_healthz"):
            try:
                JobSubmissionClient(dashboard).list_jobs()
                listed = True
            except Exception as e:  # noqa: BLE001 - not up yet, or refused: the last reason is reported
                problem = f"the dashboard at {dashboard} does not list jobs: {str(e).splitlines()[0][:300]}"
        if listed:
            problem = agent_problem(agent_port, head.pid, temp_dir)
            if problem is None:
                return
            taken += "is taken" in problem
        time.sleep(1)
    raise StackError(problem)


def up(sdir: Path, num_cpus: int, use_postgres: bool = True) -> dict:
    old = read_state(sdir)
    if old and any(s.get("start") is not None and alive(s["pid"], s["start"]) for s in old["services"].values()):
        raise StackError(f"a stack is already up with state in {sdir}; `infra/local/down --state-dir {sdir}` "
                         "stops it")
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    state = {"state_dir": str(sdir), "services": {}, "python": sys.executable}
    write_state(sdir, state)  # from here on `down` can stop whatever started
    try:
        return _start(sdir, state, num_cpus, use_postgres)
    except BaseException:
        down(sdir)  # what this `up` started, and only that
        raise


def _start(sdir: Path, state: dict, num_cpus: int, use_postgres: bool) -> dict:
    logs, ports = sdir / "logs", set()
    env = {**os.environ, **MOTO_ENV}
    env.pop("RAY_ADDRESS", None)
    env.pop("AWS_ENDPOINT_URL_S3", None)  # boto3 and pyarrow prefer it to AWS_ENDPOINT_URL
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` in jobs: this one

    # PostgreSQL, or sqlite without it
    bindir = postgres_bindir() if use_postgres else None
    if bindir:
        run_as = postgres_os_user()
        pg = Postgres(bindir, postgres_home(sdir, run_as), sdir / "pgpass", free_port(ports), run_as)
        pg.init()
        proc = pg.start()
        state["services"]["postgres"] = record(proc, port=pg.port, home=str(pg.home), signal="postmaster")
        write_state(sdir, state)
        pg.wait()
        pg.create_databases()
        env.update(pg.env)
        backend, optuna = pg.url("mlflow"), pg.url("optuna")
        say(f"postgres {pg.bindir} on {HOST}:{pg.port} (as {run_as or 'this user'}; data {pg.data})")
    else:
        backend, optuna = f"sqlite:///{sdir}/mlflow.db", None
        say("PostgreSQL binaries not found (set LRT_PG_BIN): MLflow on sqlite, Optuna studies next to each sweep"
            if use_postgres else "--no-postgres: MLflow on sqlite")

    # S3 (moto)
    s3_port = free_port(ports)
    s3 = f"http://{HOST}:{s3_port}"
    proc = spawn([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(s3_port)], logs / "moto.log", env=env)
    state["services"]["s3"] = record(proc, port=s3_port, signal="group")
    write_state(sdir, state)
    wait_http(f"{s3}/moto-api/", proc, "moto server", logs / "moto.log")
    env.update(AWS_ENDPOINT_URL=s3, MLFLOW_S3_ENDPOINT_URL=s3)
    import boto3

    keys = {k.lower(): MOTO_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **keys)
    for bucket in BUCKETS.values():
        client.create_bucket(Bucket=bucket)

    # MLflow (started, then Ray starts while it comes up)
    ml_port = free_port(ports)
    tracking = f"http://{HOST}:{ml_port}"
    ml_log = logs / "mlflow.log"
    mlflow_proc = spawn([sys.executable, str(SERVE), "--backend-store-uri", backend, "--artifacts-destination",
                         f"s3://{BUCKETS['artifacts']}/artifacts", "--host", HOST, "--port", str(ml_port),
                         "--workers", "1"], ml_log, env=env, cwd=str(sdir))
    state["services"]["mlflow"] = record(mlflow_proc, port=ml_port, signal="group")
    write_state(sdir, state)
    env["MLFLOW_TRACKING_URI"] = tracking

    # Ray head
    gcs, dash = free_port(ports), free_port(ports)
    extra = {flag: free_port(ports) for flag in RAY_PORT_FLAGS}
    temp_dir = tempfile.mkdtemp(prefix="lrt-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token(sdir))}  # token auth stays on
    ray_env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    ray_log = logs / "ray-head.log"
    head = spawn([ray_bin(), "start", "--head", "--block", "--port", str(gcs), "--node-ip-address", HOST,
                  "--dashboard-host", HOST, "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
                  "--temp-dir", temp_dir, "--disable-usage-stats", *(f"--{k}={v}" for k, v in extra.items())],
                 ray_log, env=ray_env, cwd=str(sdir))
    dashboard = f"http://{HOST}:{dash}"
    state["services"]["ray"] = record(head, port=gcs, dashboard_port=dash, ports=extra, temp_dir=temp_dir,
                                      signal="ray")
    write_state(sdir, state)

    wait_http(f"{tracking}/health", mlflow_proc, "mlflow server", ml_log)
    wait_for_job_agent(dashboard, extra["dashboard-agent-listen-port"], temp_dir, head, ray_log, ray_env)

    exports = {"RAY_ADDRESS": dashboard, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": ray_env["RAY_AUTH_TOKEN_PATH"],
               "MLFLOW_TRACKING_URI": tracking,
               "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, **MOTO_ENV}
    if bindir:
        exports["PGPASSFILE"] = str(sdir / "pgpass")
    state.update(exports=exports, optuna_storage=optuna, mlflow_backend=backend, gcs_address=f"{HOST}:{gcs}",
                 sweep_storage=f"s3://{BUCKETS['sweeps']}/runs")
    write_state(sdir, state)
    (sdir / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items()))
    return state


def submit_line(state: dict, spec: str = "sweep_specs/quickstart.yaml") -> list[str]:
    """The `ray job submit` command for a spec, from the repository root (the job inherits the stack's env)."""
    return ["ray", "job", "submit", "--address", state["exports"]["RAY_ADDRESS"], "--working-dir", ".",
            "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", "python", "-m", "lrt_platform.sweep", spec,
            "--storage", state["sweep_storage"], "--tracking-uri", state["exports"]["MLFLOW_TRACKING_URI"]]


def report(state: dict) -> None:
    sdir = state["state_dir"]
    for k, v in state["exports"].items():
        print(f"export {k}={shlex.quote(v)}")
    svc = state["services"]
    say(f"local stack up; state in {sdir} (also {sdir}/env.sh); stop it: infra/local/down --state-dir {sdir}",
        f"Ray head: GCS {state['gcs_address']}, dashboard {state['exports']['RAY_ADDRESS']} (token auth; "
        f"a sweep run outside a job: --address {state['gcs_address']})",
        f"MLflow runs: {state['exports']['MLFLOW_TRACKING_URI']}/#/experiments (backend {state['mlflow_backend']}, "
        f"artifacts s3://{BUCKETS['artifacts']}/artifacts)",
        f"S3 (moto): {state['exports']['AWS_ENDPOINT_URL']}, buckets {', '.join(BUCKETS.values())}")
    if state.get("optuna_storage"):
        say(f"PostgreSQL on {HOST}:{svc['postgres']['port']}; for an Optuna study there, in a spec: "
            f"search: {{storage: {state['optuna_storage']}}}")
    say("submit a sweep from the repository root:",
        "  " + shlex.join(submit_line(state)))


def down(sdir: Path, purge: bool = False) -> list[str]:
    """Stop what `up` recorded in sdir, newest first; returns what was stopped."""
    state = read_state(sdir)
    if state is None:
        if not purge:
            raise StackError(f"no stack state in {sdir} (nothing to stop)")
        for folder in (postgres_home(sdir, postgres_os_user()), sdir):  # a stack stopped before: its data
            shutil.rmtree(folder, ignore_errors=True)
        return []
    stopped = []
    for name in ("ray", "mlflow", "s3", "postgres"):
        s = state["services"].get(name)
        if s is None:
            continue
        pid, started = s["pid"], s.get("start")
        ours = started is not None and alive(pid, started)  # not a process that merely reused the pid
        if s["signal"] == "postmaster":
            if ours:
                stop_postgres(pid, started)
                stopped.append(name)
            continue
        tree = {p: start_time(p) for p in descendants(pid)} if ours else {}
        if ours:
            os.kill(pid, signal.SIGTERM)  # `ray start --block` stops its own cluster on SIGTERM
            wait_gone([pid], 30 if name == "ray" else 15)
            stopped.append(name)
        # what is left: its process tree as it was, its process group (a group outlives its leader while
        # members remain, and its id is not reused meanwhile), for Ray anything using its own temp dir
        rest = [p for p, t in tree.items() if alive(p, t)] + (group_members(pid) if ours else [])
        if name == "ray":
            rest += processes_using(s["temp_dir"])
        for p in set(rest):
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if rest and not wait_gone(rest, 10):
            for p in rest:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_gone(rest, 5)
        if name == "ray":
            shutil.rmtree(s["temp_dir"], ignore_errors=True)
    (sdir / "stack.json").unlink(missing_ok=True)
    if purge:
        pg = state["services"].get("postgres")
        if pg:
            shutil.rmtree(pg["home"], ignore_errors=True)
        shutil.rmtree(sdir, ignore_errors=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the local stack: up | down")
    p.add_argument("command", choices=["up", "down"])
    p.add_argument("--state-dir", default=None, help="default $LRT_STACK_DIR, else ~/.cache/lrt/stack")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="up: CPUs the Ray head offers")
    p.add_argument("--no-postgres", action="store_true", help="up: MLflow on sqlite even with PostgreSQL installed")
    p.add_argument("--purge", action="store_true", help="down: also delete the state dir and PostgreSQL's data")
    args = p.parse_args(argv)
    sdir = state_dir(args.state_dir)
    try:
        if args.command == "down":
            stopped = down(sdir, args.purge)
            say(f"stopped: {', '.join(stopped) or 'nothing was running'}" + (f"; removed {sdir}" if args.purge
                                                                             else ""))
            return 0
        report(up(sdir, args.num_cpus, not args.no_postgres))
        return 0
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
