#!/usr/bin/env python3
"""Run `mlflow server` as a shared team server: runs in PostgreSQL, artifacts in S3.

    python infra/mlflow/serve.py \
        --backend-store-uri postgresql://mlflow@db.internal:5432/mlflow \
        --artifacts-destination s3://lrt-mlflow/artifacts \
        --host 0.0.0.0 --port 5000 --allowed-hosts mlflow.internal:5000

Run it with the interpreter that has this project installed (mlflow, boto3,
psycopg). It checks its settings, then replaces itself with
`python -m mlflow server` (same pid, so a process manager or `kill` reaches the
server itself).

- Credentials never go on the command line (it shows in `ps`): the database
  password comes from libpq's own sources, PGPASSWORD or a password file
  (~/.pgpass, or PGPASSFILE); a URI with a password in it is refused. S3
  access comes from the standard AWS chain (AWS_ACCESS_KEY_ID/..., AWS_PROFILE,
  ~/.aws, an instance or pod role); for an S3-compatible store that is not AWS
  set MLFLOW_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL).
- The server proxies artifacts (`--serve-artifacts`): clients log to
  `mlflow-artifacts:/` through it and need no S3 access of their own.
- `--allowed-hosts` is the list of Host headers the server answers (DNS
  rebinding protection); by default the address it binds to, with its port,
  and localhost. Binding 0.0.0.0 needs the names clients use.
- Before starting it connects to the database once and lists the bucket once,
  so a wrong URI, password, database name or bucket is one line here rather
  than a traceback in the server's log (`--no-check` skips this).
- sqlite:///ABSOLUTE/PATH.db works too (one machine; no concurrent writers
  across machines).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse

SCHEMES = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2", "sqlite")


class ConfigError(ValueError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
                   help="postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or a password file) or "
                        "sqlite:////abs/path.db; default $MLFLOW_BACKEND_STORE_URI")
    p.add_argument("--artifacts-destination", default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"),
                   help="s3://BUCKET[/PREFIX] (or a local path for a one-machine server); "
                        "default $MLFLOW_ARTIFACTS_DESTINATION")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host headers to answer (default: HOST:PORT, localhost:PORT)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    p.add_argument("--no-check", action="store_true", help="do not test the database and bucket first")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command and exit")
    return p.parse_args(argv)


def driver_free(uri: str) -> str:
    """postgresql+DRIVER://... -> postgresql://... (what libpq takes)."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme.split('+')[0]}://{rest}"


def sqlalchemy_uri(uri: str) -> str:
    """A postgresql:// URI names psycopg (3) explicitly: SQLAlchemy 2.0 would pick psycopg2 for a bare
    postgresql://, 2.1 psycopg; this project installs psycopg."""
    return "postgresql+psycopg://" + uri[len("postgresql://"):] if uri.startswith("postgresql://") else uri


def check_backend(uri: str | None) -> str:
    if not uri:
        raise ConfigError("no backend store: pass --backend-store-uri postgresql://USER@HOST:PORT/DB "
                          "or set MLFLOW_BACKEND_STORE_URI")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"--backend-store-uri: scheme {parts.scheme!r} is not one of {', '.join(SCHEMES)}")
    if parts.scheme.startswith("postgresql"):
        if parts.password is not None:
            raise ConfigError("--backend-store-uri holds a password, which would show in the process list; "
                              "remove it and set PGPASSWORD or use a password file (~/.pgpass or PGPASSFILE)")
        if not parts.hostname or not parts.path.strip("/"):
            raise ConfigError(f"--backend-store-uri: give a host and a database, e.g. "
                              f"postgresql://mlflow@db.internal:5432/mlflow (got {uri})")
    elif not uri.startswith("sqlite:////"):
        raise ConfigError("--backend-store-uri: a sqlite database needs an absolute path, sqlite:////abs/path.db")
    return uri


def check_artifacts(dest: str | None) -> str:
    if not dest:
        raise ConfigError("no artifact destination: pass --artifacts-destination s3://BUCKET/PREFIX "
                          "or set MLFLOW_ARTIFACTS_DESTINATION")
    parts = urllib.parse.urlsplit(dest)
    if parts.scheme == "s3":
        if not parts.netloc or "@" in parts.netloc:
            raise ConfigError(f"--artifacts-destination: expected s3://BUCKET[/PREFIX], got {dest}")
    elif parts.scheme not in ("", "file"):
        raise ConfigError(f"--artifacts-destination: scheme {parts.scheme!r} is not s3 or a local path")
    elif not os.path.isabs(parts.path):
        raise ConfigError("--artifacts-destination: a local destination needs an absolute path")
    return dest


def allowed_hosts(host: str, port: int, given: str | None) -> str:
    if given:
        return given
    names = [host] if host not in ("0.0.0.0", "::") else []
    names += ["localhost", "127.0.0.1"]
    return ",".join(dict.fromkeys(f"{n}:{port}" for n in names))


def s3_endpoint() -> str | None:
    return os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")


def probe_backend(uri: str) -> None:
    """Connect once, so a wrong host, password or database name is one line here."""
    if uri.startswith("sqlite"):
        return
    driver = "psycopg2" if uri.startswith("postgresql+psycopg2:") else "psycopg"
    try:
        db = __import__(driver)
    except ImportError:
        raise ConfigError(f"a postgresql backend needs {driver} in this interpreter: pip install "
                          + ("psycopg2-binary" if driver == "psycopg2" else "'psycopg[binary]'"))
    try:
        db.connect(driver_free(uri), connect_timeout=10).close()
    except db.OperationalError as e:
        raise ConfigError(f"cannot reach the backend store {uri}: {' '.join(str(e).split())}")


def probe_bucket(dest: str) -> None:
    """List the bucket once with the credentials of the standard chain, as the server will."""
    if not dest.startswith("s3://"):
        return
    import boto3
    import botocore.exceptions

    bucket, _, prefix = dest[len("s3://"):].partition("/")
    session = boto3.Session()
    if session.get_credentials() is None:
        raise ConfigError("no AWS credentials found in the standard chain (AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, an instance or pod role)")
    try:
        session.client("s3", endpoint_url=s3_endpoint()).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise ConfigError(f"cannot list {dest} (endpoint {s3_endpoint() or 'AWS'}): {e}")


def command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", sqlalchemy_uri(check_backend(args.backend_store_uri)),
            "--serve-artifacts", "--artifacts-destination", check_artifacts(args.artifacts_destination),
            "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
            "--allowed-hosts", allowed_hosts(args.host, args.port, args.allowed_hosts)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cmd = command(args)
        if args.print_command:
            print(" ".join(cmd))
            return 0
        if not args.no_check:
            probe_backend(args.backend_store_uri)
            probe_bucket(args.artifacts_destination)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s3_endpoint() and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint()  # mlflow's S3 store reads this one
    print(f"[serve] mlflow server on http://{args.host}:{args.port} (runs: {args.backend_store_uri}, "
          f"artifacts: {args.artifacts_destination})", flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
