"""Corpora, BOS-aligned best-fit packing and a resumable token loader.

Design choices:
- A corpus is a directory of parquet shards `*.parquet`, sorted by name, each
  with one string column `text` (nanochat/FineWeb format). The LAST shard is
  validation, the others train (nanochat's convention), so a corpus needs at
  least two shards.
- Every corpus path operation and read goes through `pyarrow.fs` (never
  `open()`/`os.path` on a corpus), so an `s3://bucket/dir` URI works wherever
  a local directory does.
- The embedded default corpus is the running interpreter's standard library
  (`*.py`, site-packages excluded): present on every machine, no download.
  Documents go to validation when `crc32(relpath) % 20 == 0`, so the split
  is the same on every machine with the same Python. Corpora are built into
  a temp dir and renamed into place; a completion marker makes the build a
  cache hit next time, and a process that loses a build race uses the winner's.
- Packing is nanochat's BOS-aligned best-fit with no padding: every row is
  full, every document starts with BOS. Unlike nanochat, a document longer
  than a row is first split into row-sized pieces (only the first keeps the
  BOS) so that long source files are not cropped away.
- The loader packs one shard at a time (memory ~ one shard), shuffles train
  rows with a generator seeded by (seed, epoch, shard), and gives rank r the
  rows r::world_size after trimming each shard to a multiple of world_size.
  Trimming keeps ranks in lockstep, so every rank's `state_dict()` is the
  same and resuming re-packs the current shard and skips rows: the resumed
  loader yields exactly the batches the original would have.
- Manifests (`python -m lrt_model.data upload DIR DEST`): an uploaded corpus
  carries `manifest.json` (per shard: name, bytes, parquet rows, SHA-256; the
  shared schema), written last and atomically, so a half-finished upload has
  none. `verify` re-reads every byte against it; `verify_corpus(...,
  checksums=False)` (what the sweep's planner runs) checks only what costs no
  full read: the shard list, sizes (one listing) and row counts and schema
  (parquet footers), so a truncated, missing or extra shard is caught at plan
  time, a flipped byte inside a page only by `verify`. A corpus without a
  manifest (stdlib, the builders' folders) is read as before.

Example:
    >>> from lrt_model.data import TokenLoader
    >>> from lrt_model.tokenizer import ByteTokenizer
    >>> loader = TokenLoader("stdlib", ByteTokenizer(), "train", seq_len=256, batch_size=8)
    >>> x, y = loader.next_batch()  # int64 (8, 256) each; y is x shifted by one
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import sys
import sysconfig
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from .fs import resolve, write_atomic

SHARD_BYTES = 8 * 1024 * 1024  # train shard size target: a shard packs in about a second
VAL_MODULUS = 20  # crc32(relpath) % 20 == 0 -> validation (~5% of documents)
MARKER = "_COMPLETE"  # written last into the temp dir: its presence means the build finished
LOOKAHEAD = 256  # pieces the best-fit packer may choose from


class DataError(Exception):
    """A corpus or data setting is unusable; the one-line message names the problem and the fix."""


# ---------------------------------------------------------------------------
# Filesystem helpers: the only place that turns a corpus string into (fs, path)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/dir."""
    try:
        return resolve(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError, as is a path that is not valid UTF-8
        raise DataError(f"cannot open corpus location {uri!r} ({_one_line(e)}): pass a local directory or an s3:// URI") from e


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _normalize(spec: str) -> str:
    """Absolute local path (URIs unchanged): the stable name of a corpus."""
    return spec if "://" in spec else os.path.abspath(os.path.expanduser(spec))


def _list_shards(corpus: str) -> tuple[pafs.FileSystem, list[str]]:
    """All `*.parquet` shards of a corpus, sorted by file name; errors say how to fix the corpus."""
    fs, path = _fs(corpus)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(
            f"corpus path {corpus} does not exist: pass --corpus stdlib, a directory of .parquet shards, "
            "or a directory of text files via build_text_dir_corpus"
        )
    if info.type != pafs.FileType.Directory:
        raise DataError(f"corpus path {corpus} is a file, not a directory: "
                        "pass the directory that holds the .parquet shards")
    shards = [f.path for _, f in sorted(_parquet_files(fs, path).items())]  # sorted by file name
    if not shards:
        raise DataError(
            f"no .parquet shards in {corpus}: a corpus is a directory of parquet files with a string column 'text' "
            "(build one from text files with build_text_dir_corpus)"
        )
    if len(shards) == 1:
        raise DataError(
            f"corpus {corpus} has a single shard; the last shard (by name) is the validation split, "
            "so add a second, validation shard that sorts after it"
        )
    return fs, shards


def _one_line(error: Exception, limit: int = 200) -> str:
    text = " ".join(str(error).split())  # pyarrow's messages span lines
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_text_column(fs: pafs.FileSystem, path: str) -> None:
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"shard {path} is not a readable parquet file ({_one_line(e)}): rewrite or remove it") from e
    if "text" not in schema.names:
        raise DataError(f"shard {path} has no 'text' column (columns found: {', '.join(schema.names) or 'none'}): "
                        "write the documents into a string column named 'text'")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"shard {path} column 'text' has type {kind}, not string: "
                        "store one document per row as a string")


def _read_texts(fs: pafs.FileSystem, path: str) -> list[str]:
    """The non-empty documents of one shard, in row order. A shard that cannot be read (corrupt pages,
    invalid UTF-8) is a DataError naming it: a footer can be intact while the pages are not."""
    _check_text_column(fs, path)
    try:
        column = pq.read_table(path, columns=["text"], filesystem=fs).column("text")
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"shard {path} is not a readable parquet file ({_one_line(e)}): rewrite or remove it") from None
    try:
        column.validate(full=True)  # parquet does not check UTF-8 on write: a bad row fails here, by index
        return [t for t in column.to_pylist() if t]
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise DataError(f"shard {path} column 'text' is not valid UTF-8 ({_one_line(e)}): rewrite the shard with "
                        "its documents as UTF-8 strings") from None


# ---------------------------------------------------------------------------
# Building corpora


CORPUS_FORMAT = "v2"  # bump when the builders' output changes, so stale caches are not reused


def _cache_root() -> str:
    return os.environ.get("LRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lrt")


def _write_corpus(docs: list[tuple[str, str]], out_dir: str) -> str:
    """Write (relpath, text) docs as train shards + one last validation shard, atomically.

    Builds into a sibling temp dir and renames it into place, so readers never
    see a half-written corpus; if another process won the race, use its corpus.
    """
    out_dir = _normalize(out_dir)
    fs, out = _fs(out_dir)
    if fs.get_file_info(_join(out, MARKER)).type == pafs.FileType.File:
        return out_dir  # cached: a finished build is immutable
    train, val = _split_docs(docs)
    tmp = f"{out}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    try:
        shards = _chunk_by_bytes(train, SHARD_BYTES) + [val]  # validation last so it sorts last
        for i, texts in enumerate(shards):
            table = pa.table({"text": pa.array(texts, type=pa.string())})
            pq.write_table(table, _join(tmp, f"shard_{i:05d}.parquet"), filesystem=fs)
        with fs.open_output_stream(_join(tmp, MARKER)) as f:
            f.write(f"{len(train)} train docs in {len(shards) - 1} shards, {len(val)} val docs\n".encode())
        try:
            fs.move(tmp, out)
        except OSError:
            if fs.get_file_info(out).type == pafs.FileType.NotFound:
                raise  # not a race: report the real failure (permissions, full disk, ...)
            if fs.get_file_info(_join(out, MARKER)).type != pafs.FileType.File:
                raise DataError(f"{out_dir} exists but is not a finished corpus (no {MARKER} marker): "
                                "delete it and build again")
            # lost a race to an identical build: the winner's corpus is as good as ours
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp)
    return out_dir


def _split_docs(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Hash-based split, so adding a file never moves other files between splits."""
    train, val = [], []
    # train documents go in a hash order, so every shard is a cross-section of the
    # corpus (path order would give a short run only asyncio/, collections/, ...)
    order = lambda d: (zlib.crc32(b"order:" + d[0].encode("utf-8")), d[0])  # noqa: E731
    for rel, text in docs:
        if zlib.crc32(rel.encode("utf-8")) % VAL_MODULUS == 0:
            val.append(text)
    train = [text for rel, text in sorted(docs, key=order) if zlib.crc32(rel.encode("utf-8")) % VAL_MODULUS]
    if len(docs) < 2:
        raise DataError(f"a corpus needs at least 2 non-empty documents (found {len(docs)}): add more text files")
    if not val:  # tiny corpora: still guarantee a validation split
        val.append(train.pop())
    if not train:
        train.append(val.pop(0))
    return train, val


def _chunk_by_bytes(texts: list[str], limit: int) -> list[list[str]]:
    chunks, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t.encode("utf-8"))
        if size >= limit:
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def _read_source(path: Path) -> str:
    # a few stdlib files are not valid UTF-8; keep them, with U+FFFD for the bad bytes
    return path.read_bytes().decode("utf-8", errors="replace")


def stdlib_files() -> list[tuple[str, Path]]:
    """(relpath, path) of the interpreter's standard-library `*.py` files, sorted by relpath."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")]
    return sorted((rel, p) for rel, p in files if "site-packages" not in rel.split("/") and p.is_file())


def build_stdlib_corpus(out_dir: str | None = None) -> str:
    """Build (or reuse) the standard-library corpus; returns its directory.

    Default location: $LRT_CACHE/corpora/stdlib-py<major><minor> ($LRT_CACHE
    defaults to ~/.cache/lrt). Another Python version has other files, so it
    gets its own corpus.
    """
    if out_dir is None:
        tag = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{CORPUS_FORMAT}"
        out_dir = os.path.join(_cache_root(), "corpora", tag)
    fs, out = _fs(_normalize(out_dir))
    if fs.get_file_info(_join(out, MARKER)).type == pafs.FileType.File:
        return _normalize(out_dir)  # cache hit: skip reading 30 MB of source
    docs = [(rel, text) for rel, p in stdlib_files() if (text := _read_source(p))]
    return _write_corpus(docs, out_dir)


def build_text_dir_corpus(src_dir: str, out_dir: str) -> str:
    """Build (or reuse) a corpus from every text file under a local directory, one document per file.

    Files with NUL bytes in their first 8 KiB are treated as binary and
    skipped; other bytes that are not UTF-8 become U+FFFD. Hidden files and
    directories (.git, ...) and empty files are skipped.
    """
    root = Path(src_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"text directory {src_dir} does not exist or is not a directory: "
                        "pass a directory of text files")
    docs = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        raw = p.read_bytes()
        if b"\x00" in raw[:8192]:
            continue  # binary file
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            docs.append((rel, text))
    if not docs:
        raise DataError(f"no non-empty text files under {src_dir}: add text files (one document per file)")
    return _write_corpus(docs, out_dir)


def resolve_corpus(spec: str) -> str:
    """'stdlib' -> the built standard-library corpus; else a validated directory/URI of parquet shards."""
    if spec == "stdlib":
        return build_stdlib_corpus()
    spec = _normalize(spec)
    fs, shards = _list_shards(spec)
    _check_text_column(fs, shards[0])
    return spec


def iter_texts(corpus: str, split: str = "train") -> Iterator[str]:
    """Documents of one split, shard by shard (used e.g. to train a BPE tokenizer)."""
    fs, shards = _list_shards(resolve_corpus(corpus))
    for path in _split_shards(shards, split):
        yield from _read_texts(fs, path)


def _split_shards(shards: list[str], split: str) -> list[str]:
    if split == "train":
        return shards[:-1]
    if split == "val":
        return shards[-1:]
    raise DataError(f"split={split!r} is not allowed; choose one of train, val")


# ---------------------------------------------------------------------------
# Manifests: uploading a corpus and verifying it


MANIFEST = "manifest.json"  # written last by `upload`: present means every shard it lists was written whole
MANIFEST_FORMAT = 1
COPY_CHUNK = 8 * 1024 * 1024  # bytes per read when copying or hashing a shard
IO_THREADS = 16  # shards copied, hashed or footer-read at once: on S3 the limit is latency, not CPU


def _again(corpus: str) -> str:
    return f"upload the corpus again (python -m lrt_model.data upload DIR {corpus})"


def _schema_fields(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def _schema_text(fields: list[dict]) -> str:
    return "{" + ", ".join(f"{f['name']}: {f['type']}" for f in fields) + "}"


def _footer(fs: pafs.FileSystem, path: str) -> tuple[int, list[dict]]:
    """(rows, schema) from a shard's parquet footer: a few KB read, not the shard."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        return pf.metadata.num_rows, _schema_fields(pf.schema_arrow)


def _sha256(fs: pafs.FileSystem, path: str, copy_to: tuple[pafs.FileSystem, str] | None = None) -> tuple[int, str]:
    """(bytes, SHA-256) of a file, read once; `copy_to` (filesystem, path) also writes the bytes there."""
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as src:
        out = copy_to[0].open_output_stream(copy_to[1]) if copy_to else None
        try:
            while chunk := src.read(COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
    return size, digest.hexdigest()


def _parallel(fn, items: list) -> list:
    with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(items)))) as pool:
        return list(pool.map(fn, items))


def _parquet_files(fs: pafs.FileSystem, path: str) -> dict[str, pafs.FileInfo]:
    """name -> FileInfo (with its size) of the `*.parquet` files directly in a folder: one listing."""
    files = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return {f.base_name: f for f in files if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")}


def upload_corpus(src: str, dest: str) -> dict:
    """Copy a corpus's shards (a local folder or URI) to `dest` (a local folder or s3://bucket/prefix) and
    write `dest/manifest.json` last, atomically: per shard its name, bytes, parquet rows and SHA-256, and
    the schema every shard shares. Returns the manifest. An existing manifest at `dest` is deleted before
    the first shard is written, so an interrupted upload leaves none. `src == dest` writes the manifest of
    a corpus in place; `src="stdlib"` uploads the built standard-library corpus."""
    src = build_stdlib_corpus() if src == "stdlib" else _normalize(src)
    dest = _normalize(dest)
    sfs, spath = _fs(src)
    if sfs.get_file_info(spath).type == pafs.FileType.NotFound:
        raise DataError(f"upload source {src} does not exist: pass a folder of .parquet shards, or stdlib")
    sfs, shards = _list_shards(src)  # >= 2 shards, sorted; the last one is validation
    for path in shards:
        _check_text_column(sfs, path)  # a string column 'text' in every shard
    try:
        footers = _parallel(lambda p: _footer(sfs, p), shards)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"reading the shards of {src} failed ({_one_line(e)}): check them and upload again") from None
    names = [p.rsplit("/", 1)[-1] for p in shards]
    schema = footers[0][1]
    for name, (_, fields) in zip(names[1:], footers[1:]):
        if fields != schema:
            raise DataError(f"shard {name} of {src} has schema {_schema_text(fields)} but {names[0]} has "
                            f"{_schema_text(schema)}: write every shard with the same columns and types")
    dfs, out = _fs(dest)
    in_place = dest.rstrip("/") == src.rstrip("/")
    try:
        kind = dfs.get_file_info(out).type
        if kind == pafs.FileType.File:
            raise DataError(f"upload destination {dest} is a file: pass a folder or an s3://bucket/prefix")
        stray = sorted(set(_parquet_files(dfs, out)) - set(names))
        if stray:
            raise DataError(f"{dest} already holds shards that {src} does not ({', '.join(stray[:3])}"
                            f"{', ...' if len(stray) > 3 else ''}), and a corpus is every shard in its folder: "
                            "upload to an empty prefix or delete them")
        if dfs.get_file_info(_join(out, MANIFEST)).type == pafs.FileType.File:
            dfs.delete_file(_join(out, MANIFEST))  # until the new one is written, the upload is unfinished
        dfs.create_dir(out, recursive=True)
        copied = _parallel(lambda p: _sha256(sfs, p, None if in_place else (dfs, _join(out, p.rsplit("/", 1)[-1]))),
                           shards)
        landed = _parquet_files(dfs, out)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"uploading {src} to {dest} failed ({_one_line(e)}): check the destination's "
                        "credentials and space, then upload again") from None
    entries = []
    for name, (size, sha), (rows, _) in zip(names, copied, footers):
        if name not in landed or landed[name].size != size:
            found = f"{landed[name].size} bytes" if name in landed else "missing"
            raise DataError(f"shard {name} reached {dest} incomplete ({found}, {size} bytes sent): upload again")
        entries.append({"name": name, "bytes": size, "rows": rows, "sha256": sha})
    manifest = {"format": MANIFEST_FORMAT, "schema": schema, "rows": sum(e["rows"] for e in entries),
                "bytes": sum(e["bytes"] for e in entries), "val_shard": names[-1], "shards": entries}
    head = json.dumps({k: v for k, v in manifest.items() if k != "shards"})[:-1]
    text = head + ', "shards": [\n' + ",\n".join(json.dumps(e) for e in entries) + "\n]}\n"  # a shard per line
    try:
        write_atomic(dfs, _join(out, MANIFEST), text.encode())
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"writing {_join(dest, MANIFEST)} failed ({_one_line(e)}): upload again") from None
    return manifest


def _read_manifest(fs: pafs.FileSystem, path: str, corpus: str) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, None) when there is none, or (None, the problem)."""
    where = _join(path, MANIFEST)
    if fs.get_file_info(where).type != pafs.FileType.File:
        return None, None
    try:
        with fs.open_input_stream(where) as f:
            m = json.loads(f.read())
        shards = m["shards"]
        ok = (m.get("format") == MANIFEST_FORMAT and isinstance(shards, list) and shards
              and isinstance(m["schema"], list) and all(
                  isinstance(s, dict) and isinstance(s.get("name"), str) and s["name"].endswith(".parquet")
                  and "/" not in s["name"] and all(isinstance(s.get(k), int) for k in ("bytes", "rows"))
                  and isinstance(s.get("sha256"), str) for s in shards))
        if not ok:
            raise ValueError(f"not a format-{MANIFEST_FORMAT} manifest of shards")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return None, f"corpus {corpus}: {MANIFEST} is unreadable ({_one_line(e)}): {_again(corpus)}"
    return m, None


def corpus_problems(corpus: str, checksums: bool = True,
                    require_manifest: bool = True) -> tuple[dict | None, list[str]]:
    """(manifest, one line per problem) of a corpus against its manifest. Per shard the first problem found:
    missing, size, footer (unreadable, rows, schema), then (with `checksums`, a full read of every shard)
    SHA-256; also any `*.parquet` the manifest does not list, since the loader would read it. No manifest is
    a problem, or with require_manifest=False (None, [])."""
    if corpus == "stdlib":
        return None, [f"the stdlib corpus is built on each machine and has no {MANIFEST}: verify an uploaded "
                      "corpus (python -m lrt_model.data upload DIR DEST writes one)"] if require_manifest else []
    corpus = _normalize(corpus)
    fs, path = _fs(corpus)
    try:
        manifest, problem = _read_manifest(fs, path, corpus)
        if problem:
            return None, [problem]
        if manifest is None:
            if not require_manifest:
                return None, []
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None, [f"corpus {corpus} does not exist: pass the folder or s3:// prefix an upload wrote"]
            return None, [f"corpus {corpus} has no {MANIFEST}: write one with python -m lrt_model.data upload DIR "
                          f"{corpus} (an interrupted upload has none; DIR = {corpus} adds one in place)"]
        listed = [s["name"] for s in manifest["shards"]]
        present = _parquet_files(fs, path)

        def check(entry: dict) -> str | None:
            name, info = entry["name"], present.get(entry["name"])
            at = f"corpus {corpus}: shard {name}"
            if info is None:
                return f"{at} is missing (the manifest lists it): {_again(corpus)}"
            if info.size != entry["bytes"]:
                return f"{at} is {info.size} bytes, the manifest says {entry['bytes']}: {_again(corpus)}"
            try:
                rows, fields = _footer(fs, info.path)
            except (pa.ArrowException, OSError) as e:
                return f"{at} is not a readable parquet file ({_one_line(e, 120)}): {_again(corpus)}"
            if rows != entry["rows"]:
                return f"{at} has {rows} rows, the manifest says {entry['rows']}: {_again(corpus)}"
            if fields != manifest["schema"]:
                return (f"{at} has schema {_schema_text(fields)}, the manifest says "
                        f"{_schema_text(manifest['schema'])}: {_again(corpus)}")
            if checksums:
                sha = _sha256(fs, info.path)[1]
                if sha != entry["sha256"]:
                    return (f"{at} has SHA-256 {sha[:16]}..., the manifest says {entry['sha256'][:16]}... "
                            f"(same size and footer: its bytes changed): {_again(corpus)}")
            return None

        problems = [p for p in _parallel(check, manifest["shards"]) if p]
    except (pa.ArrowException, OSError, ValueError) as e:
        return None, [f"corpus {corpus}: cannot read it ({_one_line(e)}): check the location and its credentials"]
    problems += [f"corpus {corpus}: shard {name} is not in the manifest, and the loader would read it: "
                 f"delete it or {_again(corpus)}" for name in sorted(set(present) - set(listed))]
    return manifest, problems


def verify_corpus(corpus: str, checksums: bool = True, require_manifest: bool = True) -> dict | None:
    """Check a corpus against its manifest; a DataError (one line) for the first problem. Returns a summary
    {"corpus", "shards", "rows", "bytes", "checksums"}, or None for a corpus without a manifest when
    `require_manifest` is False (the stdlib corpus, the builders' folders). `checksums=False` reads only
    the listing and the parquet footers (what the sweep's planner runs); True reads every byte."""
    manifest, problems = corpus_problems(corpus, checksums, require_manifest)
    if problems:
        more = len(problems) - 1
        raise DataError(problems[0] + (f" (and {more} more problem(s): python -m lrt_model.data verify "
                                       f"{_normalize(corpus)} lists them)" if more else ""))
    if manifest is None:
        return None
    shards = manifest["shards"]
    return {"corpus": _normalize(corpus), "shards": len(shards), "rows": sum(s["rows"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards), "checksums": checksums}


# ---------------------------------------------------------------------------
# Packing


def _pieces(docs_tokens: list[np.ndarray], row_len: int) -> tuple[list[int], list[int], list[int]]:
    """Split each [BOS] + doc into pieces of at most row_len tokens.

    A piece is (doc, start, length) in the doc's virtual sequence [BOS] + tokens
    (start 0 is the BOS), so no token array is copied until rows are written.
    """
    doc, start, length = [], [], []
    for d, toks in enumerate(docs_tokens):
        total = len(toks) + 1
        if total == 1:
            continue  # an empty doc would be a lone BOS: nothing to learn from
        for s in range(0, total, row_len):
            doc.append(d)
            start.append(s)
            length.append(min(row_len, total - s))
    return doc, start, length


def _plan_rows(length: list[int], row_len: int, lookahead: int) -> list[list[tuple[int, int]]]:
    """Best-fit row plans: lists of (piece, tokens taken); only full rows are kept."""
    n = len(length)
    used = bytearray(n)
    avail: list[tuple[int, int]] = []  # sorted (length, -piece): best fit is a bisect away
    nxt = head = 0
    plans = []

    def take(key: tuple[int, int]) -> int:
        avail.pop(bisect.bisect_left(avail, key))
        used[-key[1]] = 1
        return -key[1]

    while True:
        while nxt < n and len(avail) < lookahead:
            bisect.insort(avail, (length[nxt], -nxt))
            nxt += 1
        if not avail:
            return plans
        while used[head]:
            head += 1
        # the oldest piece starts the row, so every piece leaves the buffer within ~lookahead rows
        first = take((length[head], -head))
        plan, space = [(first, length[first])], row_len - length[first]
        while space:
            while nxt < n and len(avail) < lookahead:
                bisect.insort(avail, (length[nxt], -nxt))
                nxt += 1
            if not avail:
                return plans  # out of data: drop the partial row rather than pad it
            # largest piece that fits; (space, 1) sorts after every (space, -i) so ties go to the oldest piece
            k = bisect.bisect_right(avail, (space, 1)) - 1
            if k >= 0:
                p = take(avail[k])
                plan.append((p, length[p]))
                space -= length[p]
            else:
                # nothing fits: crop the shortest piece (oldest on ties) to fill the row; its tail is dropped
                k = bisect.bisect_right(avail, (avail[0][0], 1)) - 1
                p = take(avail[k])
                plan.append((p, space))
                space = 0
        plans.append(plan)


def pack_rows(docs_tokens: list[np.ndarray], bos_id: int, row_len: int, lookahead: int = LOOKAHEAD) -> np.ndarray:
    """BOS-aligned best-fit packing without padding -> int32 array (n_rows, row_len).

    Each doc becomes [BOS] + tokens, split into pieces of at most row_len
    tokens (only the first keeps the BOS). A row starts with the oldest
    remaining piece, then takes the largest piece from the next `lookahead`
    that fits; when none fits, the shortest is cropped to fill the row exactly.
    A final partial row is dropped. Deterministic. Use row_len = seq_len + 1:
    inputs = row[:-1], targets = row[1:].
    """
    if row_len < 2:
        raise DataError(f"row_len={row_len} must be >= 2 (row_len = seq_len + 1)")
    doc, start, length = _pieces(docs_tokens, row_len)
    plans = _plan_rows(length, row_len, lookahead)
    rows = np.empty((len(plans), row_len), dtype=np.int32)
    for r, plan in enumerate(plans):
        pos = 0
        for p, n in plan:
            s, toks = start[p], docs_tokens[doc[p]]
            if s == 0:  # the piece opens its doc: BOS first
                rows[r, pos] = bos_id
                pos, n, s = pos + 1, n - 1, 1
            rows[r, pos:pos + n] = toks[s - 1:s - 1 + n]
            pos += n
    return rows


def _pack_shard(fs: pafs.FileSystem, path: str, tokenizer, row_len: int) -> np.ndarray:
    return pack_rows(tokenizer.encode_batch(_read_texts(fs, path)), tokenizer.bos_id, row_len)


# ---------------------------------------------------------------------------
# Loading


class TokenLoader:
    """Endless, resumable, rank-sharded batches of packed rows from one split.

    Both splits cycle forever (the epoch counter increments at the end); train
    rows are shuffled within each shard, val rows are not. `state_dict()` is
    the same on every rank: {"epoch", "shard", "row"}, where row counts rows
    of the current shard consumed by all ranks together.
    """

    def __init__(self, corpus: str, tokenizer, split: str = "train", seq_len: int = 256, batch_size: int = 8,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
        self.corpus = resolve_corpus(corpus)
        self.fs, shards = _list_shards(self.corpus)
        self.shards = _split_shards(shards, split)
        self.tokenizer, self.split = tokenizer, split
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = self.shard = self.local_row = 0
        self._rows: np.ndarray | None = None  # this rank's rows of the current shard
        self._rows_key: tuple[int, int] | None = None
        self._packed: tuple[int, np.ndarray] | None = None  # (shard, unshuffled rows), kept only for a 1-shard split

    def _shard_rows(self) -> np.ndarray:
        key = (self.epoch, self.shard)
        if self._rows_key != key:
            if self._packed is None or self._packed[0] != self.shard:
                self._packed = self._rows = None  # free the old shard before packing the next
                rows = _pack_shard(self.fs, self.shards[self.shard], self.tokenizer, self.seq_len + 1)
                self._packed = (self.shard, rows)
            rows = self._packed[1]
            if len(self.shards) > 1:
                self._packed = None  # the next epoch reshuffles anyway: keep one copy of a shard, not two
            if self.split == "train":
                rng = np.random.default_rng([self.seed, self.epoch, self.shard])
                rows = rows[rng.permutation(len(rows))]
            usable = len(rows) // self.world_size * self.world_size  # equal counts keep ranks in lockstep
            self._rows, self._rows_key = rows[self.rank:usable:self.world_size], key
        return self._rows

    def _advance_shard(self) -> None:
        self.shard, self.local_row = self.shard + 1, 0
        if self.shard == len(self.shards):
            self.epoch, self.shard = self.epoch + 1, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 (batch_size, seq_len); targets are inputs shifted left by one."""
        parts, need, empty = [], self.batch_size, 0
        while need:
            rows = self._shard_rows()
            got = rows[self.local_row:self.local_row + need]
            parts.append(got)
            need -= len(got)
            self.local_row += len(got)
            empty = 0 if len(got) else empty + 1
            if empty > len(self.shards):
                raise DataError(
                    f"the {self.split} split of {self.corpus} packs into no rows of seq_len+1={self.seq_len + 1} "
                    f"tokens for {self.world_size} rank(s): use a smaller seq_len or a larger corpus"
                )
            if self.local_row >= len(rows):
                self._advance_shard()
        batch = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        # contiguous so that callers may .view(-1) the targets, as loss code does
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "row": self.local_row * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where `state` was taken: the next batches equal the original loader's."""
        missing = {"epoch", "shard", "row"} - set(state)
        if missing:
            raise DataError(f"loader state lacks {', '.join(sorted(missing))}: "
                            "pass a dict from TokenLoader.state_dict()")
        if not 0 <= int(state["shard"]) < len(self.shards):
            raise DataError(f"loader state shard={state['shard']} is outside this split's {len(self.shards)} shard(s): "
                            "resume with the same corpus and split")
        self.epoch, self.shard = int(state["epoch"]), int(state["shard"])
        # row is global; rounding up means a changed world_size never repeats rows
        self.local_row = -(-int(state["row"]) // self.world_size)


def validation_rows(corpus: str, tokenizer, seq_len: int, max_rows: int) -> torch.Tensor:
    """The first max_rows packed rows of the validation shard, unshuffled: int64 (n, seq_len + 1)."""
    corpus = resolve_corpus(corpus)
    fs, shards = _list_shards(corpus)
    rows = _pack_shard(fs, shards[-1], tokenizer, seq_len + 1)[:max_rows]
    if len(rows) == 0:
        raise DataError(f"the validation shard {shards[-1]} packs into no rows of seq_len+1={seq_len + 1} tokens: "
                        "use a smaller seq_len or a larger validation shard")
    return torch.from_numpy(rows.astype(np.int64))


# ---------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """A bad argument is a one-line DataError (main prints it, exit code 2), not argparse's usage block."""

    def error(self, message: str):
        raise DataError(f"{' '.join(message.split())} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lrt_model.data",
                description="Upload a parquet corpus with a checksum manifest, or verify a corpus against its own.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{upload,verify}", parser_class=_Parser)
    up = sub.add_parser("upload", help="copy DIR's shards to DEST, then write DEST/manifest.json",
                        description="Copy the *.parquet shards of DIR (a string column 'text' in each; the last "
                                    "by name is validation) to DEST, then write DEST/manifest.json last: per shard "
                                    "its bytes, rows and SHA-256, and the schema.")
    up.add_argument("src", metavar="DIR", help="a folder (or URI) of parquet shards, or stdlib (the built-in corpus)")
    up.add_argument("dest", metavar="DEST", help="a local folder or s3://bucket/prefix (DEST = DIR: add a manifest "
                                                 "in place)")
    ve = sub.add_parser("verify", help="check DEST's shards against its manifest; one line per problem",
                        description="Check DEST's shard list, sizes, row counts, schema and SHA-256 against "
                                    "DEST/manifest.json: one line per problem, exit status 1 if any.")
    ve.add_argument("corpus", metavar="DEST", help="a local folder or s3://bucket/prefix with a manifest.json")
    ve.add_argument("--no-checksums", action="store_true",
                    help="skip the SHA-256 (a full read): the shard list, sizes, and row counts and schema from "
                         "the parquet footers only, as a sweep checks at plan time")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done / no problem, 1 verify found problems (one line each on stdout), 2 an error."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "upload":
            m = upload_corpus(args.src, args.dest)
            dest = _normalize(args.dest)
            print(f"uploaded {len(m['shards'])} shards ({m['rows']:,} rows, {m['bytes']:,} bytes; validation "
                  f"shard {m['val_shard']}) to {dest}; manifest written last: {_join(dest, MANIFEST)}")
            return 0
        manifest, problems = corpus_problems(args.corpus, checksums=not args.no_checksums)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {args.corpus}", file=sys.stderr)
        return 1
    shards = manifest["shards"]
    checked = "sizes, rows, schema" + ("" if args.no_checksums else " and SHA-256")
    print(f"ok: {_normalize(args.corpus)}: {len(shards)} shards, {sum(s['rows'] for s in shards):,} rows, "
          f"{sum(s['bytes'] for s in shards):,} bytes match its manifest ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
