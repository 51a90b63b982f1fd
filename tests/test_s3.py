"""Corpora and checkpoints on S3 (moto server on 127.0.0.1), through pyarrow.fs."""

import os

import boto3
import pytest
import torch

from lrt_model import checkpoint as ckpt
from lrt_model.config import ModelConfig
from lrt_model.data import TokenLoader, build_stdlib_corpus, resolve_corpus
from lrt_model.tokenizer import ByteTokenizer
from lrt_model.train import TrainConfig, train


def _upload_dir(local: str, bucket: str, prefix: str) -> str:
    s3 = boto3.client("s3")
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
