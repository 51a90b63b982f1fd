"""Corpora and checkpoints on S3 (moto server on 127.0.0.1), through pyarrow.fs."""

import os
import re
import time

import boto3
import pytest
import torch

from lrt_model import checkpoint as ckpt
from lrt_model.config import ModelConfig
from lrt_model.data import DataError, TokenLoader, build_stdlib_corpus, resolve_corpus, validation_rows
from lrt_model.tokenizer import ByteTokenizer
from lrt_model.train import TrainConfig, train
from lrt_platform import storage


def _upload_dir(local: str, bucket: str, prefix: str, endpoint_url: str | None = None) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    for name in sorted(os.listdir(local)):
        if name.endswith(".parquet"):
            s3.upload_file(os.path.join(local, name), bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


def test_checkpoint_round_trip_on_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/runs/trial-1/ckpt"
    assert ckpt.load(uri) is None
    ckpt.save({"step": 3, "w": torch.arange(4.0)}, uri)
    state = ckpt.load(uri)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))


def test_training_reads_an_s3_corpus_and_resumes_from_s3(s3_bucket, tmp_path):
    corpus = _upload_dir(build_stdlib_corpus(), s3_bucket, "corpora/stdlib")
    assert resolve_corpus(corpus) == corpus
    loader = TokenLoader(corpus, ByteTokenizer(), "train", 32, 2)
    x, y = loader.next_batch()
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])

    model = ModelConfig(depth=1, head_dim=16, width=32, seq_len=32)
    cfg = dict(model=model, corpus=corpus, batch_size=2, tokens=8 * 2 * 32, eval_tokens=4 * 32, eval_every=4,
               progress=False, checkpoint_dir=f"s3://{s3_bucket}/runs/t0/ckpt")
    straight = train(TrainConfig(**{**cfg, "checkpoint_dir": None}))
    train(TrainConfig(**cfg, stop_after_steps=4))
    resumed = train(TrainConfig(**cfg))
    assert resumed["steps"] == 8 and resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-6)


def test_missing_s3_corpus_is_a_clear_error(s3_bucket):
    from lrt_model.data import DataError

    with pytest.raises(DataError, match="does not exist|no .parquet"):
        resolve_corpus(f"s3://{s3_bucket}/nothing-here")


# Storage faults: S3 under load answers 500 InternalError and 503 SlowDown (tests.fixtures_s3.FaultProxy
# injects them between pyarrow and moto). Each test asserts faults were sent, so none passes vacuously.


def _progress_record(attempts: int) -> dict:
    """A sweep progress record (what execution.py keeps in progress.json)."""
    return {"attempts": [{"started": 1700000000.0 + i, "resumed_from_step": 8 * i or None, "first_eval_step": 4}
                         for i in range(attempts)], "checkpoint_step": 8 * attempts}


def test_transient_s3_errors_are_retried(s3_bucket, s3_endpoint, s3_faults):
    """Checkpoints, sweep JSON and corpus shards all come through while half of all requests fail."""
    local = build_stdlib_corpus()
    corpus = _upload_dir(local, s3_bucket, "corpora/stdlib", endpoint_url=s3_endpoint)  # straight to moto
    # Half of all requests fail, two in a row (500 then 503), so a request needs up to 3 attempts.
    s3_faults.fail(every=4, burst=2)
    faults = {}

    uri = f"s3://{s3_bucket}/runs/trial-1/ckpt"
    assert ckpt.load(uri) is None
    ckpt.save({"step": 3, "w": torch.arange(4.0)}, uri)
    ckpt.save({"step": 5, "w": torch.arange(5.0)}, uri)  # the first becomes previous.pt (a server-side copy)
    state, previous = ckpt.load(uri), ckpt.load(uri, ckpt.PREVIOUS)
    assert state["step"] == 5 and torch.equal(state["w"], torch.arange(5.0))
    assert previous["step"] == 3 and torch.equal(previous["w"], torch.arange(4.0))
    faults["checkpoint"] = s3_faults.faults

    path = storage.join(f"s3://{s3_bucket}/sweeps/exp", "trials", "t0", "progress.json")
    assert storage.read_json(path) is None
    storage.write_json(path, _progress_record(3))  # ~400 bytes; smaller files: the test below
    assert storage.read_json(path) == _progress_record(3)
    faults["json"] = s3_faults.faults - faults["checkpoint"]

    loader, reference = (TokenLoader(c, ByteTokenizer(), "train", 32, 4) for c in (corpus, local))
    for _ in range(3):
        x, y = loader.next_batch()
        want_x, want_y = reference.next_batch()
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert torch.equal(validation_rows(corpus, ByteTokenizer(), 32, 8), validation_rows(local, ByteTokenizer(), 32, 8))
    faults["corpus"] = s3_faults.faults - faults["checkpoint"] - faults["json"]

    assert all(n > 0 for n in faults.values()), faults


def test_s3_throttling_outlasting_pyarrows_default_retries(s3_bucket, s3_faults):
    """8 s of SlowDown on every request: pyarrow's own default (a retry every 200 ms for 6 s) gave up on
    this read; resolve()'s exponential backoff waits it out."""
    uri = f"s3://{s3_bucket}/runs/trial-2/ckpt"
    ckpt.save({"step": 7, "w": torch.ones(3)}, uri)
    # Throttle a load, not a save: save() starts with create_dir, whose first request is a probe that
    # pyarrow lets fail silently, so it would hide the first 6 s of an outage from the default retries.
    s3_faults.outage(8.0)
    start = time.monotonic()
    assert ckpt.load(uri)["step"] == 7
    assert time.monotonic() - start > 8.0 and s3_faults.faults >= 5, s3_faults.faults


def test_a_5xx_on_reading_a_small_object_is_retried(s3_bucket, s3_faults):
    """The S3 client cannot retry this one (the error body is longer than the object); read_json does."""
    path = f"s3://{s3_bucket}/sweeps/exp/sweep_pending.json"
    storage.write_json(path, {"parent_run_id": "abc", "status": "FAILED"})
    s3_faults.fail(every=2, methods={"GET"})  # the first GET, then every other one
    try:
        assert storage.read_json(path) == {"parent_run_id": "abc", "status": "FAILED"}
    finally:
        assert s3_faults.faults > 0


def test_upload_and_verify_a_corpus_on_s3_and_check_it_at_plan_time(s3_bucket, s3_endpoint, tmp_path, capsys):
    """`python -m lrt_model.data upload` to S3 writes the manifest last; `verify` reports each damaged shard
    in one line, and plan() refuses a corpus whose sizes or shard list no longer match it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lrt_model import data
    from lrt_platform.planner import plan
    from lrt_platform.spec import parse_spec

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        pq.write_table(pa.table({"text": [f"shard {i} document {j} " * 20 for j in range(30)]}),
                       str(src / f"s{i:03d}.parquet"))
    dest = f"s3://{s3_bucket}/corpora/tiny"
    assert data.main(["upload", str(src), dest]) == 0
    assert data.verify_corpus(dest) == {"corpus": dest, "shards": 4, "rows": 120, "checksums": True,
                                        "bytes": sum(os.path.getsize(src / n) for n in os.listdir(src))}
    x, _ = TokenLoader(dest, ByteTokenizer(), "train", 16, 2).next_batch()
    assert torch.equal(x, TokenLoader(str(src), ByteTokenizer(), "train", 16, 2).next_batch()[0])
    with open(os.path.join(os.path.dirname(__file__), "..", "sweep_specs", "tiny", "quickstart.yaml")) as f:
        spec = parse_spec(f.read().replace("corpus: stdlib", f"corpus: {dest}"))
    assert len(plan(spec, root="/tmp/x")) == 4

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    key = "corpora/tiny/s001.parquet"
    original = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    flipped = bytearray(original)
    flipped[4] ^= 0xFF  # the first page's header: size and footer unchanged
    cases = [  # (damage, what verify's one line says, refused at plan time)
        (lambda: s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(flipped)), "shard s001.parquet has SHA-256",
         False),
        (lambda: s3.delete_object(Bucket=s3_bucket, Key=key), "shard s001.parquet is missing", True),
        (lambda: s3.put_object(Bucket=s3_bucket, Key=key, Body=original[:-100]),
         f"shard s001.parquet is {len(original) - 100} bytes, the manifest says {len(original)}", True),
        (lambda: s3.delete_object(Bucket=s3_bucket, Key="corpora/tiny/manifest.json"), "has no manifest.json", False),
    ]
    manifest = s3.get_object(Bucket=s3_bucket, Key="corpora/tiny/manifest.json")["Body"].read()
    for damage, fragment, refused in cases:
        damage()
        capsys.readouterr()
        assert data.main(["verify", dest]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and fragment in lines[0] and dest in lines[0], lines
        if refused:
            with pytest.raises(DataError, match=re.escape(fragment)):
                plan(spec, root="/tmp/x")
        else:  # a page's bytes are read by `verify` only; a corpus without a manifest is planned as before
            assert len(plan(spec, root="/tmp/x")) == 4
        s3.put_object(Bucket=s3_bucket, Key=key, Body=original)
        s3.put_object(Bucket=s3_bucket, Key="corpora/tiny/manifest.json", Body=manifest)
        assert data.verify_corpus(dest)["shards"] == 4
