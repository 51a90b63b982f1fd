"""Files on any pyarrow filesystem (a local path or an s3:// URI): the one path resolver and the one atomic
write that corpora, tokenizers, checkpoints and sweep storage all go through.

Design choices:
- `resolve` turns a string into (filesystem, path): a local path is made
  absolute (~ expanded); a URI goes through `pyarrow.fs.FileSystem.from_uri`,
  with an S3 filesystem rebuilt to retry throttling (the measurements are in
  `resolve`'s comments).
- `write_atomic`: readers never see a half-written file. Locally the bytes go
  to a hidden temporary file in the target's folder (`.<name>.<hex>.tmp`),
  then a rename puts them in place (atomic on a POSIX filesystem); a write
  that fails removes its temporary file. On an object store a single PUT is
  atomic by itself (an object appears whole or not at all).
- Options of that one write: `replace=False` publishes only if the target is
  absent (a hard link, which fails on an existing name; locally), so racing
  writers agree on the first file; `backup` keeps the file being replaced
  under another name in the same folder (moved aside just before the rename;
  on S3 copied before the PUT): the checkpoint's previous.pt.
- lrt_model stands alone: lrt_platform.storage imports from here, never the
  other way round.

Example:
    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> fs, path = resolve(tmp.name + "/out/note.txt")
    >>> write_atomic(fs, path, b"first")
    >>> write_atomic(fs, path, b"second", backup="note.old")
    >>> write_atomic(fs, path, b"third", replace=False)  # the target exists: it stays
    >>> sorted(os.listdir(tmp.name + "/out")), open(path, "rb").read()
    (['note.old', 'note.txt'], b'second')
    >>> tmp.cleanup()
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for a URI such as s3://bucket/prefix, False for a local path."""
    return "://" in path


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/prefix."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    fs, path = pafs.FileSystem.from_uri(uri)
    # S3 answers 500 InternalError and 503 SlowDown under load; they must be retried with backoff.
    # Measured (pyarrow 25, the fault proxy of tests/test_s3.py): from_uri's filesystem retries them
    # every 200 ms and gives up after 6 s, so 8 s of throttling failed a read or a write.
    # AwsDefaultS3RetryStrategy (10 retries: one at once, then after 0.05 s doubling to 12.8 s, ~25 s in
    # all) rode it out.
    # AwsStandardS3RetryStrategy adds jitter, but pyarrow never refills its retry budget: one filesystem
    # stopped retrying at its 101st fault. from_uri's other settings (endpoint, bucket region, source of
    # credentials) are kept via __reduce__, unless the URI has a query option S3FileSystem() cannot take.
    from urllib.parse import parse_qsl, urlsplit

    rebuildable = {"region", "scheme", "endpoint_override", "allow_delayed_open", "allow_bucket_creation",
                   "allow_bucket_deletion", "tls_ca_file_path"}
    if (isinstance(fs, pafs.S3FileSystem)
            and {k for k, _ in parse_qsl(urlsplit(uri).query, keep_blank_values=True)} <= rebuildable):
        fs = pafs.S3FileSystem(**fs.__reduce__()[1][0], retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=10))
    return fs, path


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes, replace: bool = True,
                 backup: str | None = None) -> None:
    """Write `data` to `path` (from `resolve`) so that no reader sees a partial file; its folder is created.
    replace=False: keep an existing file (locally; an object store's PUT always replaces).
    backup: a file name in the same folder that the replaced file is kept under (if there is one)."""
    if backup is not None and not replace:
        raise ValueError("backup keeps the file a write replaces: it needs replace=True")
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    keep = backup is not None and fs.get_file_info(path).type == pafs.FileType.File
    if not isinstance(fs, pafs.LocalFileSystem):
        if keep:
            fs.copy_file(path, f"{folder}/{backup}")
        with fs.open_output_stream(path) as f:  # one PUT: atomic on object stores
            f.write(data)
        return
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if not replace:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another writer published first: its file wins
            return
        if keep:  # a crash between these renames leaves the backup, which a reader can fall back to
            fs.move(path, f"{folder}/{backup}")
        fs.move(tmp, path)  # rename: atomic on a POSIX filesystem
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
