"""Atomic checkpoints on any pyarrow filesystem (local path or s3:// URI).

Design choices:
- Everything in a checkpoint is a tensor, a number, a string or a plain
  container, so it loads with `torch.load(weights_only=True)`: no pickled
  code runs when a user opens a checkpoint from someone else.
- Atomic: the bytes go to a temporary name, then a rename (local) or a single
  PUT (S3: an object appears whole or not at all). A crash mid-write leaves
  the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import uuid

import pyarrow.fs as pafs
import torch

LATEST = "latest.pt"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/prefix: the one
    resolver that data, tokenizers, checkpoints and sweep storage all go through."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def save(state: dict, directory: str, name: str = LATEST) -> str:
    fs, root = resolve(directory)
    fs.create_dir(root, recursive=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    final = f"{root}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{root}/.{name}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(buf.getvalue())
        fs.move(tmp, final)  # rename: atomic on a POSIX filesystem
    else:
        with fs.open_output_stream(final) as f:  # one PUT: atomic on object stores
            f.write(buf.getvalue())
    return final


def load(directory: str, name: str = LATEST, map_location="cpu") -> dict | None:
    """The checkpoint under `directory`, or None when there is none yet."""
    fs, root = resolve(directory)
    path = f"{root}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
