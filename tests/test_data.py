"""Tests for lrt_model.data and lrt_model.tokenizer: tokenizers, packing, loader, corpora, errors.

Tiny hand-written parquet corpora keep most tests instant; the standard-library
corpus is built once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrt_model import data
from lrt_model.data import (
    DataError,
    TokenLoader,
    build_stdlib_corpus,
    build_text_dir_corpus,
    pack_rows,
    resolve_corpus,
    validation_rows,
)
from lrt_model.tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer

SAMPLE = "def f(x):\n    return x + 1  # héllo wörld ✓ 日本\n\tpass\r\n"


def write_corpus(directory, shards: list[list[str]]) -> str:
    os.makedirs(directory, exist_ok=True)
    for i, texts in enumerate(shards):
        pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), os.path.join(directory, f"s{i:03d}.parquet"))
    return str(directory)


def random_docs(rng: np.random.Generator, n: int, max_len: int = 120) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    return ["".join(rng.choice(letters, size=int(rng.integers(1, max_len)))) for _ in range(n)]


@pytest.fixture
def tiny_corpus(tmp_path) -> str:
    rng = np.random.default_rng(0)
    return write_corpus(tmp_path / "tiny", [random_docs(rng, 15) for _ in range(4)])  # 3 train shards + val


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory) -> str:
    return build_stdlib_corpus(str(tmp_path_factory.mktemp("cache") / "stdlib"))


# ---------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip_and_token_bytes():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and tok.bos_id not in ids  # no BOS added
    assert tok.decode(ids) == SAMPLE
    assert tok.decode([tok.bos_id, *ids, tok.bos_id]) == SAMPLE  # specials skipped
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not raised
    batch = tok.encode_batch([SAMPLE, "", "a"])
    assert [b.tolist() for b in batch] == [ids, [], [97]]
    tb = tok.token_bytes()
    assert tok.vocab_size == 257 and tok.name == "byte"
    assert tb.shape == (257,) and tb.dtype == np.int32 and tb[256] == 0 and tb[:256].sum() == 256


def test_bpe_train_round_trip_token_bytes_and_save_load(tmp_path):
    texts = [SAMPLE * 3, "import os\nimport sys\n" * 20, "for i in range(10):\n    print(i)\n" * 10]
    tok = BPETokenizer.train(texts, vocab_size=300)
    assert 258 <= tok.vocab_size <= 300 and tok.name == "bpe:300"
    text = "for x in range(3):\n    print(x, 'héllo ✓')  \n\n"
    ids = tok.encode(text)
    assert tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids]) == text
    assert len(ids) < len(text.encode())  # merges learned
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb[tok.bos_id] == 0
    assert tb[ids].sum() == len(text.encode("utf-8"))  # counts real bytes, not ByteLevel's unicode stand-ins
    assert [b.tolist() for b in tok.encode_batch([text, SAMPLE])] == [ids, tok.encode(SAMPLE)]
    tok.save(str(tmp_path / "tk"))
    assert os.listdir(tmp_path / "tk") == ["tokenizer.json"]  # no temp files left behind
    again = BPETokenizer.load(str(tmp_path / "tk"))
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size


def test_get_tokenizer(tiny_corpus):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(DataError, match="use 'byte' or 'bpe:N'"):
        get_tokenizer("wordpiece")
    with pytest.raises(DataError, match="pass corpus_dir"):
        get_tokenizer("bpe:300")
    tok = get_tokenizer("bpe:300", tiny_corpus)
    assert os.path.isfile(os.path.join(tiny_corpus, "tokenizer-bpe-300", "tokenizer.json"))
    cached = get_tokenizer(tok.name, tiny_corpus)  # name round-trips to the cached file
    assert cached.name == "bpe:300" and cached.encode("hello world") == tok.encode("hello world")
    assert resolve_corpus(tiny_corpus)  # the tokenizer folder is not mistaken for a shard


# ---------------------------------------------------------------------------
# packing

BOS = 10**6


def id_docs(lengths: list[int]) -> list[np.ndarray]:
    """Doc d's tokens are d*1000 + position, so every packed token says where it came from."""
    return [np.arange(n, dtype=np.int32) + 1000 * d for d, n in enumerate(lengths)]


def segments(rows: np.ndarray) -> list[tuple[int, int, int, bool, bool]]:
    """Split rows into (doc, first position, length, has_bos, ends_row) runs of consecutive tokens."""
    out = []
    for row in rows.tolist():
        i = 0
        while i < len(row):
            bos = row[i] == BOS
            j = i + 1 if bos else i
            if j == len(row):  # a piece cropped down to its BOS alone
                out.append((None, 0, 0, True, True))
                break
            k = j + 1
            while k < len(row) and row[k] == row[k - 1] + 1:
                k += 1
            out.append((row[j] // 1000, row[j] % 1000, k - j, bos, k == len(row)))
            i = k
    return out


def test_pack_rows_full_rows_best_fit_and_crops_only_at_row_end():
    row_len = 33
    lengths = [int(n) for n in np.random.default_rng(1).integers(1, 31, size=300)]  # all shorter than a row
    rows = pack_rows(id_docs(lengths), BOS, row_len)
    assert rows.dtype == np.int32 and rows.shape[1] == row_len and len(rows) > 0
    assert np.isin(rows, [BOS, *np.concatenate(id_docs(lengths))]).all()  # no padding anywhere
    assert (rows[:, 0] == BOS).all()  # every row starts at a piece (here: document) start
    segs = segments(rows)
    seen = set()
    for doc, first, n, bos, ends_row in segs:
        assert bos and first == 0 and (doc is None or doc not in seen)  # each doc once, whole or as a prefix
        if doc is None:
            assert ends_row
            continue
        seen.add(doc)
        assert n == lengths[doc] or ends_row  # cropped only to fill the end of a row
    cropped = sum(d is None or n < lengths[d] for d, _, n, _, _ in segs)
    assert cropped <= len(rows)
    # docs never seen: those cropped down to a lone BOS (unknown which) and those in the dropped final partial row
    unseen = sorted(lengths[d] + 1 for d in range(len(lengths)) if d not in seen)
    bos_only = sum(d is None for d, *_ in segs)
    assert sum(unseen[:len(unseen) - bos_only]) < row_len
    kept = rows.size / (sum(lengths) + len(lengths))
    assert kept > 0.9  # best fit wastes little


def test_pack_rows_keeps_every_token_when_docs_fit():
    # 40 docs of [BOS] + 3 tokens tile rows of 16 exactly: nothing may be lost
    docs = id_docs([3] * 40)
    rows = pack_rows(docs, BOS, 16)
    assert rows.shape == (10, 16)
    assert sorted(rows[rows != BOS].tolist()) == sorted(np.concatenate(docs).tolist())
    assert (rows == BOS).sum() == 40


def test_pack_rows_splits_long_docs_instead_of_cropping():
    row_len = 16
    lengths = [3 * row_len - 1, 5, 40, 7, 2 * row_len + 3]  # [BOS] + 47 = exactly 3 full pieces
    rows = pack_rows(id_docs(lengths), BOS, row_len)
    flat = rows.ravel().tolist()
    assert all(1000 * 0 + i in flat for i in range(lengths[0]))  # the long doc survives whole
    for doc, first, n, bos, _ in segments(rows):
        assert bos == (first == 0)  # only a doc's first piece carries BOS
        if not bos:
            assert (first + 1) % row_len == 0  # continuation pieces start at piece boundaries
    assert (rows[rows != BOS] < 1000).sum() == lengths[0]


def test_pack_rows_deterministic_and_validates_row_len():
    docs = id_docs([int(n) for n in np.random.default_rng(2).integers(1, 200, size=100)])
    assert np.array_equal(pack_rows(docs, BOS, 65), pack_rows(docs, BOS, 65))
    assert pack_rows([], BOS, 8).shape == (0, 8)
    with pytest.raises(DataError, match="row_len"):
        pack_rows(docs, BOS, 1)


# ---------------------------------------------------------------------------
# loader


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_loader_batches_shapes_and_determinism(tiny_corpus):
    tok = ByteTokenizer()
    a = TokenLoader(tiny_corpus, tok, "train", seq_len=32, batch_size=8, seed=3)
    b = TokenLoader(tiny_corpus, tok, "train", seq_len=32, batch_size=8, seed=3)
    for (x, y), (x2, y2) in zip(take(a, 12), take(b, 12)):
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert a.state_dict()["epoch"] >= 1  # 12 batches run past the end of the tiny split: it cycles
    first = [take(TokenLoader(tiny_corpus, tok, seq_len=32, batch_size=8, seed=s), 1)[0][0] for s in (3, 4)]
    assert not torch.equal(*first)  # the seed changes the shuffle


def test_loader_resume_gives_identical_batches(tiny_corpus):
    tok = ByteTokenizer()
    for world_size in (1, 2):
        for split in ("train", "val"):
            loader = TokenLoader(tiny_corpus, tok, split, seq_len=32, batch_size=8, world_size=world_size)
            take(loader, 5)
            state = loader.state_dict()
            assert all(type(v) is int for v in state.values())
            expected = take(loader, 5)
            resumed = TokenLoader(tiny_corpus, tok, split, seq_len=32, batch_size=8, world_size=world_size)
            resumed.load_state_dict(state)
            for (x, y), (x2, y2) in zip(expected, take(resumed, 5)):
                assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(DataError, match="state_dict"):
        loader.load_state_dict({"epoch": 0})


def test_loader_ranks_are_disjoint_and_in_lockstep(tiny_corpus):
    tok = ByteTokenizer()
    loaders = [TokenLoader(tiny_corpus, tok, "train", seq_len=32, batch_size=1, rank=r, world_size=2) for r in (0, 1)]
    seen = [[], []]
    while loaders[0].state_dict()["epoch"] == 0:
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            seen[r].append(tuple(torch.cat([x[0], y[0, -1:]]).tolist()))
        assert loaders[0].state_dict() == loaders[1].state_dict()  # one checkpointed state serves every rank
    assert len(seen[0]) == len(seen[1]) > 0
    assert not set(seen[0]) & set(seen[1])
    fs, shards = data._list_shards(tiny_corpus)
    every = {tuple(r) for s in shards[:-1] for r in data._pack_shard(fs, s, tok, 33).tolist()}
    assert set(seen[0]) | set(seen[1]) <= every
    assert len(every) - 2 * len(seen[0]) <= len(shards) - 1  # at most one row per shard trimmed for lockstep


def test_corpus_as_uri_goes_through_pyarrow_fs(tiny_corpus):
    uri = "file://" + tiny_corpus  # the same code path an s3:// corpus takes
    assert resolve_corpus(uri) == uri
    tok = ByteTokenizer()
    x, _ = TokenLoader(uri, tok, "train", seq_len=16, batch_size=2).next_batch()
    assert torch.equal(x, TokenLoader(tiny_corpus, tok, "train", seq_len=16, batch_size=2).next_batch()[0])
    assert torch.equal(validation_rows(uri, tok, 16, 3), validation_rows(tiny_corpus, tok, 16, 3))
    bpe = get_tokenizer("bpe:280", uri)
    assert os.path.isfile(os.path.join(tiny_corpus, "tokenizer-bpe-280", "tokenizer.json"))
    assert get_tokenizer("bpe:280", uri).encode("abc def") == bpe.encode("abc def")


def test_validation_rows_and_val_loader(tiny_corpus):
    tok = ByteTokenizer()
    rows = validation_rows(tiny_corpus, tok, seq_len=16, max_rows=5)
    assert rows.shape == (5, 17) and rows.dtype == torch.int64
    assert torch.equal(rows, validation_rows(tiny_corpus, tok, seq_len=16, max_rows=5))
    everything = validation_rows(tiny_corpus, tok, seq_len=16, max_rows=10**6)
    assert 5 < len(everything) < 10**6 and torch.equal(everything[:5], rows)
    x, y = TokenLoader(tiny_corpus, tok, "val", seq_len=16, batch_size=5).next_batch()
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])  # val is unshuffled
    with pytest.raises(DataError, match="smaller seq_len"):
        validation_rows(tiny_corpus, tok, seq_len=100_000, max_rows=5)
    with pytest.raises(DataError, match="smaller seq_len"):
        TokenLoader(tiny_corpus, tok, "train", seq_len=100_000, batch_size=1).next_batch()


# ---------------------------------------------------------------------------
# corpora


def test_stdlib_corpus_split_is_deterministic_and_val_last(stdlib_corpus, monkeypatch):
    names = sorted(n for n in os.listdir(stdlib_corpus) if n.endswith(".parquet"))
    assert len(names) >= 3
    texts = [pq.read_table(os.path.join(stdlib_corpus, n)).column("text").to_pylist() for n in names]
    files = data.stdlib_files()
    assert not any("site-packages" in rel for rel, _ in files)
    in_val = [zlib.crc32(rel.encode()) % 20 == 0 for rel, _ in files]
    docs = [p.read_bytes().decode("utf-8", errors="replace") for _, p in files]
    assert texts[-1] == [d for d, v in zip(docs, in_val) if v and d]  # the LAST shard is validation
    train = [(zlib.crc32(b"order:" + rel.encode()), rel, d) for (rel, _), d, v in zip(files, docs, in_val) if not v and d]
    assert sum(texts[:-1], []) == [d for _, _, d in sorted(train)]  # train docs in hash order: mixed shards
    assert all(len("".join(t).encode()) < 9 * 2**20 for t in texts[:-1])  # ~8 MB train shards
    monkeypatch.setattr(data, "stdlib_files", lambda: pytest.fail("a finished corpus must be a cache hit"))
    assert build_stdlib_corpus(stdlib_corpus) == stdlib_corpus


def test_stdlib_corpus_default_location_and_loader(stdlib_corpus, monkeypatch, tmp_path):
    monkeypatch.setenv("LRT_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "stdlib_files", lambda: [])
    monkeypatch.setattr(data, "_write_corpus", lambda docs, out_dir: out_dir)
    tag = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{data.CORPUS_FORMAT}"
    assert build_stdlib_corpus() == str(tmp_path / "corpora" / tag)
    monkeypatch.setattr(data, "build_stdlib_corpus", lambda out_dir=None: stdlib_corpus)
    assert resolve_corpus("stdlib") == stdlib_corpus
    x, y = TokenLoader("stdlib", ByteTokenizer(), "train", seq_len=128, batch_size=4).next_batch()
    assert x.shape == (4, 128) and int(x.max()) <= 256


def test_corpus_build_race_loser_uses_winners_corpus(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.txt").write_text(f"document {i}\n" * 5)
    out = str(tmp_path / "out")
    real_split = data._split_docs

    def winner_finishes_first(docs):
        monkeypatch.setattr(data, "_split_docs", real_split)
        data._write_corpus(docs, out)  # another process completes the same build meanwhile
        return real_split(docs)

    monkeypatch.setattr(data, "_split_docs", winner_finishes_first)
    assert build_text_dir_corpus(str(src), out) == out
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # the loser cleaned up
    assert resolve_corpus(out) == out


def test_text_dir_corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    for i in range(25):
        (src / "sub" / f"{i}.md").write_text(f"# note {i}\nsome text\n")
    (src / "bad.txt").write_bytes(b"caf\xe9 ok\n")  # not UTF-8: kept with U+FFFD
    (src / "blob.bin").write_bytes(b"\x00\x01\x02binary")  # skipped
    (src / "empty.txt").write_text("")  # skipped
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: skipped
    out = build_text_dir_corpus(str(src), str(tmp_path / "out"))
    fs, shards = data._list_shards(out)
    docs = [t for s in shards for t in data._read_texts(fs, s)]
    assert len(docs) == 26 and "caf\ufffd ok\n" in docs
    assert not any("binary" in d or "refs/heads" in d for d in docs)
    assert len(validation_rows(out, ByteTokenizer(), seq_len=8, max_rows=100)) > 0


# ---------------------------------------------------------------------------
# errors: one line that names the problem and the fix


def test_error_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist: pass --corpus stdlib, a directory of .parquet shards"):
        resolve_corpus(str(tmp_path / "nope"))


def test_error_directory_without_shards(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no \.parquet shards in .*build_text_dir_corpus"):
        resolve_corpus(str(tmp_path))


def test_error_single_shard(tmp_path):
    write_corpus(tmp_path, [["only one shard"]])
    with pytest.raises(DataError, match="single shard.*add a second, validation shard"):
        resolve_corpus(str(tmp_path))


def test_error_shard_without_text_column(tmp_path):
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"content": ["x"], "id": [1]}), str(tmp_path / name))
    with pytest.raises(DataError, match=r"no 'text' column \(columns found: content, id\)"):
        resolve_corpus(str(tmp_path))
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / name))
    with pytest.raises(DataError, match="not string"):
        resolve_corpus(str(tmp_path))


def test_error_empty_text_dir(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty text files under .*add text files"):
        build_text_dir_corpus(str(tmp_path / "src"), str(tmp_path / "out"))
    with pytest.raises(DataError, match="does not exist"):
        build_text_dir_corpus(str(tmp_path / "missing"), str(tmp_path / "out"))


def test_error_bad_loader_arguments(tiny_corpus):
    with pytest.raises(DataError, match="split='test' is not allowed; choose one of train, val"):
        TokenLoader(tiny_corpus, ByteTokenizer(), "test")
    with pytest.raises(DataError, match="rank=2"):
        TokenLoader(tiny_corpus, ByteTokenizer(), rank=2, world_size=2)


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(DataError) as info:
        resolve_corpus(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


def _invalid_utf8_table() -> pa.Table:
    # parquet does not check UTF-8 when writing: a string column can hold any bytes
    return pa.table({"text": pa.array([b"fine", b"bad \xff\xfe bytes"], pa.binary()).view(pa.string())})


@pytest.mark.parametrize("write, fragment", [
    (lambda p: pq.write_table(_invalid_utf8_table(), p), "column 'text' is not valid UTF-8"),
    (lambda p: pq.write_table(pa.table({"text": [1, 2]}), p), "has type int64, not string"),
    (lambda p: pq.write_table(pa.table({"text": pa.array(["a"]).dictionary_encode()}), p), "not string"),
    (lambda p: open(p, "wb").close(), "is not a readable parquet file (Parquet file size is 0 bytes)"),
    (lambda p: open(p, "wb").write(b"PAR1" + bytes(range(256)) * 8), "is not a readable parquet file"),
    # an intact footer over zeroed pages: the schema reads, the pages do not
    (lambda p: (pq.write_table(pa.table({"text": ["x" * 1000] * 100}), p), open(p, "r+b").write(b"\0" * 200)),
     "is not a readable parquet file"),
])
def test_bad_shards_are_one_line_naming_the_file(tmp_path, write, fragment):
    good = ["hello world " * 5] * 4  # a few rows: the loader reaches the next shard soon
    write_corpus(tmp_path, [good, good, good])
    bad = str(tmp_path / "s001.parquet")
    write(bad)
    for split in ("train", "val"):
        if split == "val":  # the validation shard is the last one
            os.replace(bad, str(tmp_path / "s002.parquet"))
            bad = str(tmp_path / "s002.parquet")
        with pytest.raises(DataError) as info:
            loader = TokenLoader(str(tmp_path), ByteTokenizer(), split, seq_len=16, batch_size=4)
            for _ in range(100):
                loader.next_batch()
            validation_rows(str(tmp_path), ByteTokenizer(), 16, 4)
        msg = str(info.value)
        assert bad in msg and fragment in msg and "\n" not in msg, msg


def test_empty_shards_are_skipped(tmp_path):
    good = ["hello world " * 20] * 30
    write_corpus(tmp_path, [good, [], [None, ""], good])
    x, _ = TokenLoader(str(tmp_path), ByteTokenizer(), "train", seq_len=16, batch_size=4).next_batch()
    assert x.shape == (4, 16)


# ---------------------------------------------------------------------------
# manifests: upload and verify


def _flip_byte(path: str) -> None:
    """Flip byte 4, the first page's header: the size and the footer (rows, schema) stay as they were."""
    with open(path, "r+b") as f:
        f.seek(4)
        b = f.read(1)
        f.seek(4)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


CORRUPTIONS = {  # name -> (damage done to an uploaded corpus, what its one problem line says)
    "flipped byte": (lambda d: _flip_byte(os.path.join(d, "s001.parquet")), "shard s001.parquet has SHA-256"),
    "removed shard": (lambda d: os.remove(os.path.join(d, "s001.parquet")),
                      "shard s001.parquet is missing (the manifest lists it)"),
    "truncated shard": (lambda d: _truncate(os.path.join(d, "s001.parquet")), "shard s001.parquet is "),
    "missing manifest": (lambda d: os.remove(os.path.join(d, data.MANIFEST)), "has no manifest.json"),
    "extra shard": (lambda d: pq.write_table(pa.table({"text": ["stray"]}), os.path.join(d, "s009.parquet")),
                    "shard s009.parquet is not in the manifest"),
}


@pytest.fixture
def uploaded(tiny_corpus, tmp_path) -> str:
    dest = str(tmp_path / "uploaded")
    assert data.main(["upload", tiny_corpus, dest]) == 0
    return dest


def test_upload_then_verify(tiny_corpus, uploaded, capsys):
    with open(os.path.join(uploaded, data.MANIFEST)) as f:
        manifest = json.load(f)
    names = sorted(n for n in os.listdir(tiny_corpus) if n.endswith(".parquet"))
    assert [s["name"] for s in manifest["shards"]] == names and manifest["val_shard"] == names[-1]
    assert manifest["schema"] == [{"name": "text", "type": "string"}]
    for s in manifest["shards"]:
        raw = open(os.path.join(tiny_corpus, s["name"]), "rb").read()
        assert s["bytes"] == len(raw) and s["sha256"] == hashlib.sha256(raw).hexdigest() and s["rows"] == 15
    assert not [n for n in os.listdir(uploaded) if n.startswith(".")]  # no temp file left by write_atomic
    assert data.verify_corpus(uploaded) == {"corpus": uploaded, "shards": 4, "rows": 60,
                                            "bytes": sum(s["bytes"] for s in manifest["shards"]), "checksums": True}
    assert data.main(["verify", uploaded]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {uploaded}: 4 shards, 60 rows")
    tok = ByteTokenizer()  # the copy reads as the original
    assert torch.equal(TokenLoader(uploaded, tok, seq_len=16, batch_size=2).next_batch()[0],
                       TokenLoader(tiny_corpus, tok, seq_len=16, batch_size=2).next_batch()[0])
    # a corpus without a manifest is accepted where one is optional (the planner's call), refused where required
    assert data.verify_corpus(tiny_corpus, checksums=False, require_manifest=False) is None
    assert data.verify_corpus("stdlib", require_manifest=False) is None
    # in place: DIR = DEST adds a manifest to a corpus; re-uploading over a manifest replaces it
    assert data.main(["upload", tiny_corpus, tiny_corpus]) == 0 and data.verify_corpus(tiny_corpus)["shards"] == 4
    assert data.main(["upload", tiny_corpus, uploaded]) == 0 and data.verify_corpus(uploaded)["shards"] == 4
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"uploaded 4 shards (60 rows, {manifest['bytes']:,} "
                                                               f"bytes; validation shard s003.parquet) to {uploaded}")


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_reports_each_problem_in_one_line(uploaded, kind, capsys):
    damage, fragment = CORRUPTIONS[kind]
    damage(uploaded)
    capsys.readouterr()
    assert data.main(["verify", uploaded]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and fragment in lines[0] and uploaded in lines[0], lines
    with pytest.raises(DataError) as info:
        data.verify_corpus(uploaded)
    assert str(info.value) == lines[0]
    # the planner's check reads no page: every problem but a byte flipped inside a page shows there too
    if kind == "flipped byte":
        assert data.verify_corpus(uploaded, checksums=False)["shards"] == 4
        assert data.main(["verify", "--no-checksums", uploaded]) == 0
    else:
        with pytest.raises(DataError, match=re.escape(fragment)):
            data.verify_corpus(uploaded, checksums=False, require_manifest=False) if kind != "missing manifest" \
                else data.verify_corpus(uploaded, checksums=False)


def test_verify_lists_every_problem(uploaded, capsys):
    for kind in ("flipped byte", "truncated shard", "extra shard"):
        CORRUPTIONS[kind][0](uploaded)
    os.remove(os.path.join(uploaded, "s002.parquet"))
    capsys.readouterr()
    assert data.main(["verify", uploaded]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "s001.parquet is" in out[0] and "s002.parquet is missing" in out[1], out
    assert "s009.parquet is not in the manifest" in out[2]
    with pytest.raises(DataError, match=r"\(and 2 more problem\(s\): python -m lrt_model.data verify "):
        data.verify_corpus(uploaded)
    with open(os.path.join(uploaded, data.MANIFEST), "w") as f:
        f.write('{"format": 1, "shards": "no"}')
    with pytest.raises(DataError, match="manifest.json is unreadable"):
        data.verify_corpus(uploaded, checksums=False, require_manifest=False)


def test_an_interrupted_upload_leaves_no_manifest(tiny_corpus, uploaded, monkeypatch):
    real, calls = data._sha256, []

    def failing(fs, path, copy_to=None):
        calls.append(path)
        if path.endswith("s002.parquet"):
            raise OSError("connection reset")
        return real(fs, path, copy_to)

    monkeypatch.setattr(data, "_sha256", failing)
    with pytest.raises(DataError, match=r"^uploading .* failed \(connection reset\): check the destination"):
        data.upload_corpus(tiny_corpus, uploaded)  # over a finished upload: its manifest goes first
    assert calls and not os.path.exists(os.path.join(uploaded, data.MANIFEST))
    with pytest.raises(DataError, match="has no manifest.json"):
        data.verify_corpus(uploaded)


def test_upload_errors_are_one_line_with_exit_2(tiny_corpus, tmp_path, capsys):
    write_corpus(tmp_path / "other", [["a"], ["b"], ["c"], ["d"], ["e"]])  # s000..s004: more than tiny's 4
    write_corpus(tmp_path / "mixed", [["a"], ["b"]])
    pq.write_table(pa.table({"text": ["c"], "id": [1]}), str(tmp_path / "mixed" / "s002.parquet"))
    cases = [
        (["upload", str(tmp_path / "nope"), str(tmp_path / "d1")], "upload source"),
        (["upload", tiny_corpus, str(tmp_path / "other")], "already holds shards that"),  # s004 would stay
        (["upload", str(tmp_path / "mixed"), str(tmp_path / "d2")], "write every shard with the same columns"),
        (["upload", tiny_corpus, os.path.join(tiny_corpus, "s000.parquet")], "is a file"),
        (["upload", tiny_corpus], "the following arguments are required: DEST"),
        (["bogus"], "invalid choice: 'bogus'"),
    ]
    for argv, fragment in cases:
        capsys.readouterr()
        assert data.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(tmp_path / "d1") and not os.path.exists(tmp_path / "d2")
    assert data.main(["verify", "stdlib"]) == 1 and "has no manifest.json" in capsys.readouterr().out


def test_the_module_runs_as_a_command(uploaded):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "lrt_model.data", "verify", uploaded], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok: ") and not r.stderr, r
