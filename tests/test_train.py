"""The single-run trainer: budgets, evaluation, exact resume, CLI, clear errors."""

import json
import math
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrt_model import checkpoint as ckpt
from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.flops import training_flops_per_token
from lrt_model import train as train_module
from lrt_model.optim import OptimConfig
from lrt_model.train import Diverged, TrainConfig, divergence_cause, train


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


# ---------------------------------------------------------------------------
# Divergence: one line, the likely cause, within one step, nothing saved


def test_absurd_learning_rate_diverges_within_one_step(tmp_path, monkeypatch):
    losses = []

    def recording_loss(*args, **kwargs):  # every step's loss as the trainer computes it (one micro-batch)
        loss, out = training_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss, out

    training_loss = train_module.training_loss
    monkeypatch.setattr(train_module, "training_loss", recording_loss)
    events = []
    with pytest.raises(Diverged) as info:
        train(tiny(tokens=10 * 4 * 32, eval_every=100, optim=OptimConfig(lr_scale=1e20),
                   checkpoint_dir=str(tmp_path)), callback=events.append)
    e = info.value
    first_bad = next(i for i, x in enumerate(losses) if not math.isfinite(x))
    assert e.step == first_bad > 0 and len(losses) == first_bad + 1  # stopped at the first non-finite loss
    assert e.cause == "learning_rate" and str(e) == e.reason and "\n" not in str(e)
    assert str(e).startswith(f"diverged at step {e.step}: train loss is nan; likely cause: the learning rates")
    assert "lr_scale=1e+20" in str(e) and f"at step {e.step - 1}" in str(e)  # the settings and the last finite loss
    assert events[-1] == {"event": "diverged", "step": e.step, "tokens": e.step * 4 * 32, "reason": e.reason,
                          "cause": "learning_rate"}
    assert not list(tmp_path.iterdir())  # no checkpoint of the diverged weights to resume from


def test_nan_loss_weight_is_named_before_or_at_the_first_step():
    """Refused by validation (ConfigError) or, should a run get that far, Diverged at step 0 naming it."""
    with pytest.raises((ConfigError, Diverged)) as info:
        train(tiny(RecurrenceConfig(strategy="interleaved", passes=2, loss_weights=[1.0, math.nan, 1.0])))
    assert "loss_weights" in str(info.value) and "\n" not in str(info.value)
    if isinstance(info.value, Diverged):
        assert info.value.step == 0 and info.value.cause == "loss_weights"


def test_divergence_cause_names_what_can_be_checked():
    """Non-finite settings first (exact), then: no update yet -> not the learning rates; else the learning rates."""
    cfg = tiny(RecurrenceConfig(strategy="interleaved", passes=2, loss_weights=[1.0, 1.0, 1.0]))
    cfg.model.recurrence.loss_weights = [1.0, math.nan, 1.0]  # past validation, as a caller could
    cause, why = divergence_cause(cfg, cfg.model, 0, None, None)
    assert cause == "loss_weights" and "recurrence.loss_weights=[1.0, nan, 1.0]" in why

    cfg = tiny()
    cfg.optim.matrix_lr = math.inf
    assert divergence_cause(cfg, cfg.model, 1, (0, 5.5), (0, 5.5)) == (
        "learning_rate", "likely cause: the learning rates: optim.matrix_lr=inf is not finite; give a finite value")
    cfg = tiny()
    cfg.model.softcap = math.nan
    assert divergence_cause(cfg, cfg.model, 0, None, None)[0] == "setting"

    cause, why = divergence_cause(tiny(), tiny().model, 0, None, None)
    assert cause == "data" and "not the learning rates" in why and "'stdlib'" in why
    cause, why = divergence_cause(tiny(), tiny().model, 7, (0, 5.5), (6, 9.25))
    assert cause == "learning_rate" and "lr_scale=1" in why and why.endswith("train loss 5.5 at step 0, 9.25 at step 6")


def test_cli_divergence_is_one_line_and_nonzero():
    r = _cli("--depth", "1", "--head-dim", "16", "--width", "32", "--seq-len", "32", "--batch-size", "4",
             "--tokens", "1280", "--eval-tokens", "256", "--lr-scale", "1e20", "--quiet", "--no-icl")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: diverged at step "), r.stderr
    assert "likely cause: the learning rates" in lines[0]


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


def test_final_evaluation_notes_are_returned_and_printed_only_with_progress(capsys, monkeypatch):
    """A sweep trains with progress off and summarises the notes once; the CLI shows them as they come."""
    from lrt_model.evaluation import icl as icl_mod

    settings = {"evals": ["copy"], "ks": [1, 8], "items": 2}
    for progress in (False, True):
        monkeypatch.setattr(icl_mod, "_said", set())  # each message is said once per process
        m = train(tiny(icl=settings, progress=progress, tokens=2 * 4 * 32))
        assert "copy k=8 skipped" in m["notes"] and "seq_len 32" in m["notes"]
        err = capsys.readouterr().err
        assert ("copy k=8 skipped" in err) == progress


# ---------------------------------------------------------------------------
# Inputs read only at the end of a run are checked before it starts


def test_a_wrong_core_dir_fails_before_any_training_step(tmp_path, monkeypatch):
    """The CORE bundle is read by the final ICL evaluation only: validate() and train() check it first."""
    from lrt_model.evaluation.core import CORE_ENV

    monkeypatch.delenv(CORE_ENV, raising=False)
    bad = str(tmp_path / "no_such_bundle")
    with pytest.raises(ConfigError) as e:
        tiny(icl={"core_dir": bad}).validate()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"icl.core_dir={bad!r}: no such folder; point icl.core_dir"), msg

    events = []
    monkeypatch.setattr(train_module, "GPT", None)  # nothing may be built, let alone trained
    with pytest.raises(ConfigError, match="no such folder"):
        train(tiny(icl={"core_dir": bad}), callback=events.append)
    assert events == []  # not even the evaluation before the first step
    monkeypatch.undo()
    monkeypatch.delenv(CORE_ENV, raising=False)

    monkeypatch.setenv(CORE_ENV, bad)  # the variable the end of the run would read instead
    with pytest.raises(ConfigError, match=rf"^\${CORE_ENV}='.*no_such_bundle' \(icl.core_dir unset\): no such folder"):
        tiny(icl=None).validate()
    tiny(icl={"evals": ["score"]}).validate()  # no CORE evaluation: nothing to read
    monkeypatch.delenv(CORE_ENV)

    broken = tmp_path / "broken"  # a bundle whose task has no data file
    (broken / "eval_data").mkdir(parents=True)
    (broken / "core.yaml").write_text("icl_tasks:\n- {label: t, dataset_uri: t.jsonl, icl_task_type: schema}\n")
    (broken / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,50\n")
    with pytest.raises(ConfigError, match="CORE task 't' has no data file .*t.jsonl; point icl.core_dir"):
        tiny(icl={"core_dir": str(broken)}).validate()
    (broken / "eval_data" / "t.jsonl").write_text("{}\n")
    tiny(icl={"core_dir": str(broken)}).validate()


def test_cli_wrong_core_dir_is_one_line_before_training(tmp_path):
    r = _cli("--depth", "1", "--tokens", "100", "--core-dir", str(tmp_path / "nowhere"))
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: icl.core_dir={str(tmp_path / 'nowhere')!r}: no such folder")


def test_flex_attention_and_eval_decode_are_config_fields_the_environment_overrides(monkeypatch, capsys):
    from lrt_model import recurrence
    from lrt_model.train import build_parser, config_from_args, run_switches

    monkeypatch.delenv("LRT_FLEX", raising=False)
    monkeypatch.delenv("LRT_EVAL_DECODE", raising=False)
    assert run_switches(tiny()) == (None, None)  # unset: the module defaults (FlexAttention on, "auto")
    cfg = tiny(flex_attention=False, eval_decode="eager").validate()
    assert run_switches(cfg) == (False, "eager") and capsys.readouterr().err == ""
    monkeypatch.setenv("LRT_FLEX", "1")
    monkeypatch.setenv("LRT_EVAL_DECODE", "static")
    assert run_switches(cfg) == (True, "static")
    err = capsys.readouterr().err
    assert "LRT_FLEX=1 overrides flex_attention=False" in err and "LRT_EVAL_DECODE=static overrides" in err
    with pytest.raises(ConfigError, match="eval_decode='graphs' is not known"):
        tiny(eval_decode="graphs").validate()
    args = build_parser().parse_args(["--no-flex-attention", "--eval-decode", "eager", "--tokens", "64"])
    got = config_from_args(args)
    assert (got.flex_attention, got.eval_decode) == (False, "eager")

    # the run uses them, and reports what it used: the sequential views step in the configured mode
    monkeypatch.delenv("LRT_FLEX")
    monkeypatch.delenv("LRT_EVAL_DECODE")
    modes = []
    real = recurrence.decode_step
    monkeypatch.setattr(recurrence, "decode_step", lambda m, b, t, mode: (modes.append(mode), real(m, b, t, mode))[1])
    m = train(tiny(RecurrenceConfig(strategy="interleaved", passes=2), eval_decode="static", tokens=2 * 4 * 32))
    assert (m["eval_decode"], m["flex_attention"]) == ("static", True) and modes and set(modes) == {"static"}


def test_config_file_with_other_flags_is_refused_not_half_applied(tmp_path, capsys):
    from lrt_model.train import main

    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny().to_dict()))
    assert main(["--config", str(path), "--depth", "3", "--no-gates"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop the other flags (--depth, --no-gates)" in err
