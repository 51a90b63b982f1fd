"""Storage URIs for sweeps: one layout, local paths and s3:// alike.

Design choices:
- Every path operation goes through `pyarrow.fs`, so a sweep stored under
  `s3://bucket/prefix` works wherever `./runs` does (Ray Tune, the trainer's
  checkpoints and this module all speak pyarrow filesystems).
- Local paths are made absolute once, in the driver: Ray Tune changes each
  trial's working directory, so a relative path would point somewhere else
  inside a trial.
- Layout of one sweep (`sweep_root`; `spec_hash` keeps two versions of a
  spec apart):
    <storage>/<experiment>/<spec_hash>/
        grid/, search/, tune-<budget_id>-<arm>/   Ray Tune experiment state, one folder per phase
                                                  (Tuner.restore reads it)
        trials/<trial_id>/ckpt/latest.pt    the trainer's own checkpoint (`checkpoint_dir`; train()
                                            resumes from it), previous.pt the one before
        trials/<trial_id>/progress.json     attempts and last checkpoint step (cheap to read)
        trials/<trial_id>/tracking.json     the trial's tracking journal (outbox.py)
        sweep_tracking.json                 the sweep run's end, while an outage keeps trial records
        train/<trial_id>-a<attempt>/        Ray Train run state for multi-worker trials
        optuna.db                           Optuna studies (`optuna_url`); an s3:// sweep keeps it in
                                            ./runs/<experiment>/<spec_hash>/ instead (sqlite needs a
                                            local file); a search spec's search.storage may name another
- Small JSON files are written whole (`lrt_model.fs.write_atomic`: local
  temp file + rename, one PUT on S3) so a crash never leaves half a file.

Example:
    >>> import tempfile
    >>> from lrt_platform import storage
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = storage.sweep_root(tmp.name, "quickstart", "3f1c0a9e2b7d")
    >>> root[len(tmp.name):], storage.checkpoint_dir(root, "d2-tok1e6-s0-baseline")[len(root):]
    ('/quickstart/3f1c0a9e2b7d', '/trials/d2-tok1e6-s0-baseline/ckpt')
    >>> storage.write_json(storage.join(root, "note.json"), {"ok": True})
    >>> storage.read_json(storage.join(root, "note.json"))
    {'ok': True}
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import os
import time

import pyarrow.fs as pafs

from lrt_model.fs import is_uri, resolve, write_atomic  # the one resolver and atomic write


def absolute(path: str) -> str:
    """Local paths absolute (and ~ expanded); URIs unchanged."""
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def sweep_root(storage: str, experiment: str, spec_hash: str) -> str:
    return join(absolute(storage), experiment, spec_hash)


def trial_dir(root: str, trial_id: str) -> str:
    return join(root, "trials", trial_id)


def checkpoint_dir(root: str, trial_id: str) -> str:
    return join(trial_dir(root, trial_id), "ckpt")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(uri: str, attempts: int = 6) -> dict | None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    for attempt in range(attempts):
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except OSError:
            # pyarrow reads an object into a buffer of the object's size, so a 5xx error body longer than a
            # small object (S3's are ~250 bytes) fails the read instead of being retried by the S3 client
            if isinstance(fs, pafs.LocalFileSystem) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2**attempt)


def write_json(uri: str, obj: dict) -> None:
    fs, path = resolve(uri)
    write_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=True).encode())


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def optuna_url(root: str, experiment: str, spec_hash: str) -> str:
    """A sqlite Optuna storage next to the sweep; for s3:// sweeps, under ./runs (sqlite needs a local file)."""
    local = root if not is_uri(root) else sweep_root("./runs", experiment, spec_hash)
    os.makedirs(local, exist_ok=True)
    return f"sqlite:///{local}/optuna.db"


def list_files(uri: str, name: str) -> list[str]:
    """`<uri>/<child>/<name>` for every direct child folder of uri that holds a file called name."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    children = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    found = []
    for child in sorted(c.path for c in children if c.type == pafs.FileType.Directory):
        if fs.get_file_info(f"{child}/{name}").type == pafs.FileType.File:
            found.append(join(uri, child.rsplit("/", 1)[-1], name))
    return found


def remove_file(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
