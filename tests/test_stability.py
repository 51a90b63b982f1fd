"""benchmarks.stability: the rise and spread arithmetic, and one tiny end-to-end run."""

import json

import pytest

from benchmarks.stability import main, max_rise, summarise


def _evals(steps, bpb):
    return [{"step": s, "val_bpb": b} for s, b in zip(steps, bpb)]


def test_max_rise_ignores_warmup_and_falls():
    evals = _evals([0, 10, 20, 30, 40], [8.0, 3.0, 3.5, 3.2, 3.25])
    assert max_rise(evals, warmup=0) == (pytest.approx(0.5), 20)  # step 0 (before training) never counts
    assert max_rise(evals, warmup=20) == (pytest.approx(0.05), 40)  # only evaluations at/after warm-up
    assert max_rise(_evals([0, 10, 20], [8.0, 3.0, 2.0]), warmup=0) == (0.0, None)


def test_summarise_spread_and_worst_seed():
    def run(finals):
        return {"val_bpb": finals[-1], "evals": _evals([0, 10, 20], finals), "tokens": 100, "steps": 20,
                "params": 10, "wall_s": 1.0}

    s = summarise("baseline", {0: run([8.0, 3.0, 2.0]), 1: run([8.0, 2.5, 2.6])}, warmup=1)
    assert s["std_val_bpb"] == pytest.approx(0.4243, abs=1e-4) and s["mean_val_bpb"] == pytest.approx(2.3)
    assert s["max_eval_rise"] == pytest.approx(0.1) and s["max_eval_rise_at"] == {"seed": 1, "step": 20}
    assert not s["meets_targets"]


def test_tiny_end_to_end(capsys):
    rc = main(["--depth", "1", "--width", "32", "--head-dim", "16", "--seq-len", "32", "--batch-size", "4",
               "--tokens", "2048", "--eval-tokens", "256", "--seeds", "0", "1", "--jobs", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc in (0, 1) and rc == (0 if report["meets_targets"] else 1)
    base, lrt = report["arms"]["baseline"], report["arms"]["lrt_s2"]
    assert base["seeds"] == [0, 1] and len(base["final_val_bpb"]) == 2 and base["steps"] == 16
    assert len(lrt["interleave_gap"]) == 2 and lrt["final_val_bpb"] == lrt["final_val_bpb_sequential"]
    assert base["final_val_bpb"][0] != base["final_val_bpb"][1]  # seeds differ
