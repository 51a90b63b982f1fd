"""Storage URIs for sweeps: one layout, local paths and s3:// alike.

Design choices:
- Every path operation goes through `pyarrow.fs`, so a sweep stored under
  `s3://bucket/prefix` works wherever `./runs` does (Ray Tune, the trainer's
  checkpoints and this module all speak pyarrow filesystems).
- Local paths are made absolute once, in the driver: Ray Tune changes each
  trial's working directory, so a relative path would point somewhere else
  inside a trial.
- Layout of one sweep (`spec_hash` keeps two versions of a spec apart):
    <storage>/<experiment>/<spec_hash>/
        tune/ or tune-grid/, tune-search/   Ray Tune experiment state (Tuner.restore reads it)
        trials/<trial_id>/ckpt/latest.pt    the trainer's own checkpoint (train() resumes from it)
        trials/<trial_id>/progress.json     attempts and last checkpoint step (cheap to read)
        trials/<trial_id>/tracking.json     the trial's tracking journal (outbox.py)
        sweep_tracking.json                 the sweep run's end, while an outage keeps trial records
        train/                              Ray Train run state for multi-worker trials
        optuna.db                           Optuna study (local storage only)
- Small JSON files are written whole (local: temp file + rename) so a crash
  never leaves half a file.

Example:
    >>> from lrt_platform import storage
    >>> root = storage.sweep_root("./runs", "quickstart", "3f1c0a9e2b7d")
    >>> storage.write_json(storage.join(root, "note.json"), {"ok": True})
    >>> storage.read_json(storage.join(root, "note.json"))
    {'ok': True}
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pyarrow.fs as pafs

from lrt_model.checkpoint import resolve  # the one pyarrow filesystem resolver


def is_uri(path: str) -> bool:
    return "://" in path


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
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # atomic rename
    else:
        with fs.open_output_stream(path) as f:  # one PUT: atomic on object stores
            f.write(data)


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
