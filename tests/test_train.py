"""The single-run trainer: budgets, evaluation, exact resume, CLI, clear errors."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrt_model import checkpoint as ckpt
from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.flops import training_flops_per_token
from lrt_model.train import TrainConfig, train


def tiny(rec=None, **kw) -> TrainConfig:
    model = ModelConfig(depth=1, head_dim=16, width=32, seq_len=32, recurrence=rec)
    base = dict(model=model, batch_size=4, tokens=20 * 4 * 32, eval_tokens=8 * 32, eval_every=10, progress=False,
                icl={"evals": []})
    base.update(kw)
    return TrainConfig(**base)


def test_baseline_run_reports_metrics_and_learns():
    events = []
    m = train(tiny(tokens=60 * 4 * 32), callback=events.append)
    for key in ("params", "tokens", "flops", "steps", "train_loss", "val_bpb", "tokens_per_s", "wall_s", "evals"):
        assert key in m
    assert m["steps"] == 60 and m["tokens"] == 60 * 4 * 32
    assert m["evals"][0]["tokens"] == 0  # first evaluation before the first step
    assert m["evals"][-1]["val_bpb"] < 0.8 * m["evals"][0]["val_bpb"]
    assert m["flops"] == pytest.approx(m["tokens"] * training_flops_per_token(ModelConfig(depth=1, head_dim=16, width=32, seq_len=32, vocab_size=257)))
    assert [e["event"] for e in events][-1] == "done"
    assert "val_bpb_merged" not in m and m["param_overhead"] == 0


def test_lrt_run_reports_three_views_and_the_gap():
    rec = RecurrenceConfig(strategy="interleaved", passes=2)
    m = train(tiny(rec, tokens=4 * 4 * 32, eval_every=4, icl={"ks": [1], "items": 4, "score_rows": 4}))
    for key in ("icl_score", "icl_score_full", "icl_score_sequential", "icl_score_merged",
                "icl_recall_acc_k1", "icl_recall_acc_k1_full", "icl_induction_acc_k1_sequential"):  # copy k=1 does not fit 32 tokens
        assert key in m, key
    assert m["val_bpb"] == m["val_bpb_sequential"]
    assert m["interleave_gap"] == pytest.approx(m["val_bpb_merged"] - m["val_bpb_sequential"])
    assert 0 < m["param_overhead"] < 0.5
    assert set(m["val_bpb_by_position"]) == {"0-7", "8-15", "16-23", "24-31"}


def test_budgets_flops_and_tokens_per_param():
    cfg = tiny(tokens=None, flops=3e9)
    fpt = training_flops_per_token(ModelConfig(**{**cfg.model.to_dict(), "vocab_size": 257}))
    m = train(tiny(tokens=None, flops=3e9, eval_every=1000))
    assert m["tokens"] == pytest.approx(3e9 / fpt, abs=4 * 32)
    m2 = train(tiny(tokens=None, tokens_per_param=0.05, eval_every=1000))
    assert m2["tokens"] == pytest.approx(0.05 * m2["params"], abs=4 * 32)
    with pytest.raises(ConfigError, match="exactly one budget"):
        train(tiny(flops=1e9))
    with pytest.raises(ConfigError, match="positive"):
        train(tiny(tokens=-5))


def test_gradient_accumulation_reaches_the_target_batch():
    m = train(tiny(total_batch_tokens=3 * 4 * 32, tokens=5 * 3 * 4 * 32, eval_every=1000))
    assert m["steps"] == 5 and m["tokens"] == 5 * 3 * 4 * 32
    with pytest.raises(ConfigError, match="multiple"):
        train(tiny(total_batch_tokens=100))


@pytest.mark.parametrize("rec", [None, RecurrenceConfig(strategy="interleaved", passes=2)])
def test_resume_continues_the_exact_same_run(tmp_path, rec):
    straight = train(tiny(rec, eval_every=5))
    first = train(tiny(rec, eval_every=5, checkpoint_dir=str(tmp_path), stop_after_steps=10))
    assert first["steps"] == 10 and not first["finished"]
    state = ckpt.load(str(tmp_path))  # weights_only=True inside
    assert state["step"] == 10 and "loader" in state and "rng" in state
    resumed = train(tiny(rec, eval_every=5, checkpoint_dir=str(tmp_path)))
    assert resumed["steps"] == 20 and resumed["finished"]
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-6)
    assert resumed["val_bpb"] == pytest.approx(straight["val_bpb"], abs=1e-6)
    assert [e["tokens"] for e in resumed["evals"]] == [e["tokens"] for e in straight["evals"]]


def test_resume_may_switch_the_muon_implementation(tmp_path):
    """optim.muon says how Muon runs, not what it computes: a run checkpointed with the
    library's loop resumes with the batched one (and one saved before the field existed)."""
    from lrt_model.optim import OptimConfig

    straight = train(tiny(eval_every=5, optim=OptimConfig(muon="torch")))
    train(tiny(eval_every=5, optim=OptimConfig(muon="torch"), checkpoint_dir=str(tmp_path), stop_after_steps=10))
    state = ckpt.load(str(tmp_path))
    del state["config"]["optim"]["muon"]  # as written before optim.muon existed
    del state["config"]["optim"]["lr_scale"]  # ... and before optim.lr_scale (1.0 then) existed
    ckpt.save(state, str(tmp_path))
    resumed = train(tiny(eval_every=5, optim=OptimConfig(muon="batched"), checkpoint_dir=str(tmp_path)))
    assert resumed["steps"] == 20 and resumed["finished"]
    assert resumed["val_bpb"] == pytest.approx(straight["val_bpb"], abs=1e-5)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(tiny(checkpoint_dir=str(tmp_path), stop_after_steps=2))
    with pytest.raises(ConfigError, match="different"):
        train(tiny(checkpoint_dir=str(tmp_path), seed=1))


def test_resume_accepts_a_checkpoint_from_before_passes_schedule(tmp_path):
    rec = RecurrenceConfig(strategy="interleaved", passes=2)
    train(tiny(rec, checkpoint_dir=str(tmp_path), stop_after_steps=10))
    state = ckpt.load(str(tmp_path))
    del state["config"]["model"]["recurrence"]["passes_schedule"]  # as written before the field existed
    ckpt.save(state, str(tmp_path))
    assert train(tiny(rec, checkpoint_dir=str(tmp_path)))["steps"] == 20
    sched = RecurrenceConfig(strategy="interleaved", passes=4, passes_schedule=[[0.0, 2], [0.5, 4]])
    with pytest.raises(ConfigError, match="different model"):  # a schedule is a different run
        train(tiny(sched, checkpoint_dir=str(tmp_path)))


def test_resume_refuses_another_lr_scale(tmp_path):
    from lrt_model.optim import OptimConfig

    train(tiny(checkpoint_dir=str(tmp_path), stop_after_steps=2))
    with pytest.raises(ConfigError, match="different optim"):
        train(tiny(checkpoint_dir=str(tmp_path), optim=OptimConfig(lr_scale=0.5)))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    train(tiny(checkpoint_dir=str(tmp_path), stop_after_steps=2))
    before = (tmp_path / "latest.pt").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial")  # a crash in the middle of serialising
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save({"x": torch.zeros(3)}, str(tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "latest.pt").read_bytes() == before  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # and no temp file is left behind
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 2


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lrt_model.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_json_is_the_last_line():
    r = _cli("--depth", "1", "--head-dim", "16", "--width", "32", "--seq-len", "32", "--batch-size", "4",
             "--tokens", "640", "--eval-tokens", "256", "--strategy", "interleaved", "--passes", "2", "--json", "--quiet",
             "--no-icl")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 5 and "val_bpb_sequential" in metrics


def _bad_corpora(tmp_path):
    no_text = tmp_path / "no_text"
    no_text.mkdir()
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"content": ["x = 1"]}), no_text / name)
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"missing": str(tmp_path / "nowhere"), "no_text": str(no_text), "empty": str(empty)}


@pytest.mark.parametrize("case,fragment", [("missing", "does not exist"), ("no_text", "text"), ("empty", "parquet")])
def test_cli_bad_corpus_is_one_clear_line(tmp_path, case, fragment):
    r = _cli("--depth", "1", "--tokens", "100", "--corpus", _bad_corpora(tmp_path)[case])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], r.stderr
