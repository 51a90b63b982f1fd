"""compare: exact arithmetic on a hand-built sweep, unmatched partners, errors, formats, plots.

The sweeps are written through `Tracker` into the session's real `mlflow server`
with synthetic trainer events whose numbers are known, so every figure in the
report can be checked against a hand computation (the statistics module and
closed forms, not numpy).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from lrt_platform import compare as cmp
from lrt_platform import scaling
from lrt_platform.plots import make_plots
from lrt_platform.tracking import Tracker

BASE = {"E": 0.8, "A": 1.0e4, "alpha": 0.3}
LRT = {"E": 0.78, "A": 9.0e3, "alpha": 0.31}
FLOPS = {"b0": 1e15, "b1": 1e16, "b2": 1e17}
OFFSETS = {"baseline": (0.004, -0.004), "lrt": (0.001, -0.001)}  # per seed; mean offset 0
PARAMS = {"baseline": 1_000_000, "lrt": 1_003_000}
GAPS = (0.010, 0.020)
ICL = {"baseline": (0.30, 0.32), "lrt": (0.33, 0.36)}
T975_DF1 = math.tan(math.pi * (0.975 - 0.5))  # Student t with 1 dof is Cauchy: closed-form quantile


def law(p: dict, c: float) -> float:
    return p["E"] + p["A"] * c ** -p["alpha"]


def bpb(arm: str, budget: str, seed: int) -> float:
    return law(BASE if arm == "baseline" else LRT, FLOPS[budget]) + OFFSETS[arm][seed]


def tokens(arm: str, budget: str) -> int:
    return int(FLOPS[budget] / (6e6 if arm == "baseline" else 1.2e7))  # LRT: ~2x the cost per token


def _exp(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def log_trial(tr: Tracker, parent: str, arm: str, budget: str, seed: int, *, pair: str | None = None,
              status: str = "FINISHED", value: float | None = None, extra: dict | None = None) -> str:
    """One trial through the real tracking path: start, two evals, done, end."""
    lrt = arm != "baseline"
    trial = {"trial_id": f"{budget}-{arm}-{seed}", "arm": arm, "budget_id": budget,
             "pair_id": pair or f"{budget}-s{seed}", "seed": seed, "matching": "compute",
             "strategy": "interleaved" if lrt else "baseline", "config": {"model": {"depth": 2}},
             "tokens": tokens(arm, budget), "flops": FLOPS[budget], **(extra or {})}
    run = tr.start_trial(parent, trial)
    v = bpb(arm, budget, seed) if value is None else value
    n = tokens(arm, budget)
    final = {"tokens": n, "flops": FLOPS[budget], "val_bpb": v, "val_bpb_full": v + (0.05 if lrt else 0.0)}
    if lrt:
        final.update(val_bpb_sequential=v, val_bpb_merged=v + GAPS[seed], interleave_gap=GAPS[seed])
    tr.log_event(run, {"event": "eval", "step": 1, **final, "tokens": n // 2, "val_bpb": v + 0.5,
                       "val_bpb_sequential": v + 0.5, "val_bpb_full": v + 0.5})
    if status == "FINISHED":
        tr.log_event(run, {"event": "eval", "step": 2, **final})
        tr.log_event(run, {"event": "checkpoint", "step": 2, "path": f"/ck/{budget}-{arm}-{seed}/step2.pt"})
        tr.log_event(run, {"event": "done", **final, "params": PARAMS[arm], "finished": True,
                           "icl_score": ICL[arm][seed]})
    tr.end_trial(run, status, reason="OOM at step 1" if status == "FAILED" else None)
    return run


@pytest.fixture(scope="module")
def scaling_sweep(mlflow_server):
    """3 budgets x 2 seeds x (baseline, lrt), numbers from the power laws above."""
    tr = Tracker(mlflow_server, _exp("scaling"))
    parent = tr.start_sweep("scaling.yaml", "experiment: scaling\n", "hash-scaling", [])
    for budget in FLOPS:
        for seed in (0, 1):
            for arm in ("baseline", "lrt"):
                log_trial(tr, parent, arm, budget, seed)
    tr.end_sweep(parent)
    return tr, parent


# ---------------------------------------------------------------------------
# (a) exact arithmetic


def test_report_arithmetic_is_exact(scaling_sweep, mlflow_server):
    tr, parent = scaling_sweep
    report = cmp.compare(mlflow_server, tr.experiment)  # latest sweep: this one
    assert report["sweep_run_id"] == parent
    assert report["counts"]["trials"] == 12 and report["counts"]["usable"] == 12
    assert report["unmatched"] == [] and report["excluded"] == []
    assert report["budgets"] == ["b0", "b1", "b2"]
    assert len(report["comparisons"]) == 3  # one per (budget, LRT arm)

    for c in report["comparisons"]:
        b = c["budget_id"]
        base = [bpb("baseline", b, s) for s in (0, 1)]
        lrt = [bpb("lrt", b, s) for s in (0, 1)]
        assert (c["view_lrt"], c["view_baseline"]) == ("sequential", "full")
        assert c["n_pairs"] == 2 and c["n_lrt"] == 2 and c["n_baseline"] == 2
        assert c["baseline"]["val_bpb"]["mean"] == pytest.approx(statistics.mean(base), rel=1e-12)
        assert c["baseline"]["val_bpb"]["std"] == pytest.approx(statistics.stdev(base), rel=1e-9)
        assert c["lrt"]["val_bpb"]["mean"] == pytest.approx(statistics.mean(lrt), rel=1e-12)
        assert c["lrt"]["val_bpb"]["std"] == pytest.approx(statistics.stdev(lrt), rel=1e-9)

        d = [l - s for l, s in zip(lrt, base)]
        half = T975_DF1 * statistics.stdev(d) / math.sqrt(2)
        assert c["delta"]["mean"] == pytest.approx(statistics.mean(d), rel=1e-12)
        assert c["delta"]["ci95"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half], rel=1e-9)
        r = [x / s for x, s in zip(d, base)]
        half_r = T975_DF1 * statistics.stdev(r) / math.sqrt(2)
        assert c["relative"]["mean"] == pytest.approx(statistics.mean(r), rel=1e-12)
        ci_r = [statistics.mean(r) - half_r, statistics.mean(r) + half_r]
        assert c["relative"]["ci95"] == pytest.approx(ci_r, rel=1e-9)

        assert c["lrt"]["flops"] == FLOPS[b] and c["lrt"]["tokens"] == tokens("lrt", b)
        assert c["lrt"]["params"] == PARAMS["lrt"]
        assert c["lrt"]["tokens_per_param"] == pytest.approx(tokens("lrt", b) / PARAMS["lrt"], rel=1e-12)
        assert c["baseline"]["tokens_per_param"] == pytest.approx(tokens("baseline", b) / PARAMS["baseline"], rel=1e-12)
        assert c["interleave_gap"]["mean"] == pytest.approx(statistics.mean(GAPS), rel=1e-12)
        assert c["icl"]["icl_score"]["baseline"] == pytest.approx(statistics.mean(ICL["baseline"]), rel=1e-12)
        assert c["icl"]["icl_score"]["lrt"] == pytest.approx(statistics.mean(ICL["lrt"]), rel=1e-12)

        # Effective compute multiplier: invert the true baseline law at the LRT mean loss.
        need = (BASE["A"] / (statistics.mean(lrt) - BASE["E"])) ** (1 / BASE["alpha"])
        m = c["compute_multiplier"]
        assert m["method"] == "power_law"
        assert m["value"] == pytest.approx(need / FLOPS[b], rel=1e-6)
        assert m["extrapolated"] == (not min(FLOPS.values()) <= need <= max(FLOPS.values()))
    flags = [c["compute_multiplier"]["extrapolated"] for c in report["comparisons"]]
    assert flags == [False, True, True]  # both cases are exercised

    for arm, truth in (("baseline", BASE), ("lrt", LRT)):
        fit = report["scaling"][arm]["fit"]
        assert fit["ok"] and fit["n_points"] == 3
        assert fit["E"] == pytest.approx(truth["E"], rel=1e-6)
        assert fit["A"] == pytest.approx(truth["A"], rel=1e-6)
        assert fit["alpha"] == pytest.approx(truth["alpha"], rel=1e-6)


def test_power_law_fit_and_log_linear_fallback():
    truth = {"E": 1.7, "A": 350.0, "alpha": 0.25}
    c = [1e12, 1e13, 1e14, 1e15, 1e16]
    fit = scaling.fit_power_law(c, [law(truth, x) for x in c])
    for k in truth:
        assert fit[k] == pytest.approx(truth[k], rel=1e-9)
    assert fit["rmse"] < 1e-12
    assert scaling.fit_power_law(c[:2], [2.0, 1.9]) is None  # < 3 budgets
    # No fit: L linear in log10 C between (1e15, 1.0) and (1e16, 0.9).
    pts = [(1e15, 1.0), (1e16, 0.9)]
    m = scaling.compute_multiplier(0.95, 1e15, pts, None)
    assert m["method"] == "log_linear" and not m["extrapolated"]
    assert m["baseline_flops_needed"] == pytest.approx(10**15.5, rel=1e-12)
    m = scaling.compute_multiplier(0.85, 1e16, pts, None)
    assert m["extrapolated"] and m["value"] == pytest.approx(10**16.5 / 1e16, rel=1e-12)
    assert scaling.compute_multiplier(0.85, 1e16, pts[:1], None)["value"] is None


# ---------------------------------------------------------------------------
# (e) unmatched partners, failures, errors


@pytest.fixture(scope="module")
def unmatched_sweep(mlflow_server):
    tr = Tracker(mlflow_server, _exp("unmatched"))
    parent = tr.start_sweep("u.yaml", "x\n", "hash-unmatched", [])
    log_trial(tr, parent, "baseline", "b0", 0, pair="p0")
    log_trial(tr, parent, "lrt", "b0", 0, pair="p0")
    log_trial(tr, parent, "baseline", "b0", 1, pair="p1")
    log_trial(tr, parent, "lrt", "b0", 1, pair="p1", status="FAILED")
    log_trial(tr, parent, "lrt", "b0", 0, pair="p2", extra={"trial_id": "lonely"})
    tr.end_sweep(parent)
    return tr, parent


def test_unmatched_partners_are_listed(unmatched_sweep, mlflow_server):
    tr, parent = unmatched_sweep
    report = cmp.compare(mlflow_server, tr.experiment, parent)
    [c] = report["comparisons"]
    assert c["n_pairs"] == 1 and c["n_lrt"] == 2 and c["n_baseline"] == 2
    assert c["delta"]["ci95"] is None and c["delta"]["std"] is None and "n=1" in c["delta"]["ci_note"]
    assert c["delta"]["mean"] == pytest.approx(bpb("lrt", "b0", 0) - bpb("baseline", "b0", 0), rel=1e-12)
    reasons = {u["pair_id"]: u["reason"] for u in report["unmatched"]}
    assert set(reasons) == {"p1", "p2"}
    assert "FAILED: OOM at step 1" in reasons["p1"] and "baseline run missing" in reasons["p2"]
    assert [e["status"] for e in report["excluded"]] == ["FAILED"]
    table = cmp.format_report(report)
    assert "CI undefined, n=1" in table
    assert "unmatched: budget b0 arm lrt pair p1" in table and "pair p2" in table
    assert "no power-law fit" in table


def test_missing_experiment_is_one_line_and_nonzero(mlflow_server):
    r = subprocess.run([sys.executable, "-m", "lrt_platform.compare", "--experiment", "no-such-experiment",
                        "--tracking-uri", mlflow_server], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-experiment" in lines[0] and lines[0].startswith("error:")


def test_missing_sqlite_database_is_not_created(tmp_path, capsys):
    db = tmp_path / "absent.db"
    assert cmp.main(["--experiment", "x", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no MLflow database" in capsys.readouterr().err and not db.exists()


# ---------------------------------------------------------------------------
# Formats and (f) plots


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 2000
    return struct.unpack(">II", data[16:24])


def test_formats_and_plots_via_cli(scaling_sweep, mlflow_server, tmp_path, capsys):
    tr, parent = scaling_sweep
    args = ["--experiment", tr.experiment, "--tracking-uri", mlflow_server]
    assert cmp.main(args + ["--format", "json", "--plots", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p.rsplit("/", 1)[-1] for p in report["plots"]] == [
        "paired_difference.png", "scaling.png", "delta_vs_tokens_per_param.png", "loss_curves.png"]
    for p in report["plots"]:
        w, h = _png_size(p)
        assert w > 100 and h > 100
    logged = MlflowClient(mlflow_server).list_artifacts(parent, "plots")
    assert sorted(a.path for a in logged) == ["plots/delta_vs_tokens_per_param.png", "plots/loss_curves.png",
                                              "plots/paired_difference.png", "plots/scaling.png"]

    assert cmp.main(args + ["--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["budget_id"], r["arm"]) for r in rows] == [(b, a) for b in FLOPS for a in ("baseline", "lrt")]
    lrt_b0 = rows[1]
    assert float(lrt_b0["delta_mean"]) == pytest.approx(report["comparisons"][0]["delta"]["mean"], rel=1e-12)
    assert lrt_b0["view"] == "sequential" and rows[0]["view"] == "full" and lrt_b0["icl_score_mean"]

    assert cmp.main(args + ["--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert sum(line.startswith(("| b0 |", "| b1 |", "| b2 |")) for line in md.splitlines()) == 6
    assert "scaling baseline: L(C) = 0.8000 + " in md
    assert cmp.main(args) == 0
    table = capsys.readouterr().out
    assert "sequential" in table and "compute x" in table and "MLflow runs table: http" in table


def test_search_sweep_history_importance_and_plots(mlflow_server, tmp_path):
    tr = Tracker(mlflow_server, _exp("search"))
    parent = tr.start_sweep("search.yaml", "experiment: s\nsearch:\n  num_trials: 9\n", "hash-search", [])
    injections = ["kv", "residual", "both"]
    for i in range(9):
        passes, inj = 1 + i % 3, injections[(i // 3) % 3]
        value = 1.5 - 0.1 * passes + (0.01 if inj == "kv" else 0.0)  # passes matters most
        log_trial(tr, parent, "lrt", "b0", i % 2, pair=f"trial{i}", value=value,
                  extra={"trial_id": f"t{i}", "trial_number": i, "search": {"passes": passes, "injection": inj}})
    tr.end_sweep(parent)
    report = cmp.compare(mlflow_server, tr.experiment)
    assert report["sweep_kind"] == "search"  # from the spec's search block
    s = report["search"]
    assert [h["order"] for h in s["history"]] == list(range(9))
    best = [h["best_so_far"] for h in s["history"]]
    assert best == sorted(best, reverse=True) and best[-1] == pytest.approx(1.2)
    assert set(s["importance"]) == {"passes", "injection"}
    assert max(s["importance"], key=s["importance"].get) == "passes"
    assert s["importance_method"]
    assert s["best"]["val_bpb"] == pytest.approx(1.2)
    assert s["best"]["params"]["passes"] == 3 and s["best"]["params"]["injection"] in ("residual", "both")  # typed
    assert "PED-ANOVA" in s["importance_method"] and "only 9 finished trials" in s["importance_warning"]
    assert "WARNING: search importance: only 9" in cmp.format_report(report)
    assert report["unmatched"] == [] and "nothing to pair" in report["notes"][0]
    paths = make_plots(report, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths][-2:] == ["search_history.png", "search_importance.png"]
    from lrt_platform.plots import importance_figure, paired_figure, search_history_figure

    for fig in (search_history_figure(report), importance_figure(report), paired_figure(report)):
        assert _overlaps(_tick_texts(fig)) == []  # every plot of a search sweep is readable too
    for p in paths:
        _png_size(p)


def test_correlation_importance_fallback():
    cols = {"lr": [0.1, 0.2, 0.3, 0.4], "inj": ["kv", "kv", "both", "both"]}
    imp = cmp._correlation_importance(cols, [4.0, 3.0, 2.0, 1.0])
    assert sum(imp.values()) == pytest.approx(1.0) and set(imp) == {"lr", "inj"}


def test_empty_sweep_renders_and_plots(tmp_path):
    data = {"experiment": "e", "sweep": {"run_id": "r0", "name": "s", "status": "RUNNING", "tags": {}}, "trials": []}
    report = cmp.build_report(data)
    assert report["comparisons"] == [] and report["counts"]["trials"] == 0
    assert "(no usable trials)" in cmp.format_report(report)
    for fmt in ("markdown", "csv", "json"):
        assert cmp.format_report(report, fmt)
    for p in make_plots(report, str(tmp_path)):
        _png_size(p)


# ---------------------------------------------------------------------------
# Verdict, power, tuning


def _mc_power(effect: float, sd: float, n: int, sims: int = 20_000, seed: int = 0) -> float:
    """Reference: the share of simulated paired experiments whose two-sided t-test rejects at 0.05."""
    from scipy import stats

    d = np.random.default_rng(seed).normal(effect, sd, size=(sims, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    return float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))


@pytest.mark.parametrize("effect,sd,n", [(0.0, 1.0, 6), (0.5, 1.0, 5), (1.0, 1.0, 10), (0.02, 0.03, 8),
                                         (3.0, 1.0, 3), (-0.8, 0.5, 4)])
def test_paired_power_matches_monte_carlo(effect, sd, n):
    assert cmp.paired_power(effect, sd, n) == pytest.approx(_mc_power(effect, sd, n), abs=0.015)


def test_mde_and_seeds_needed_against_monte_carlo():
    for sd, n in ((0.01, 2), (0.01, 3), (0.02, 7), (1.0, 30)):
        mde = cmp.min_detectable_effect(sd, n)
        assert cmp.paired_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
        assert _mc_power(mde, sd, n, seed=n) == pytest.approx(0.8, abs=0.015)
    effect, sd = 0.046, 0.05  # 2% of a 2.3 bpb baseline, a noisy pair difference
    n = cmp.seeds_needed(effect, sd)
    assert n > 2 and cmp.paired_power(effect, sd, n - 1) < 0.8 <= cmp.paired_power(effect, sd, n)
    assert _mc_power(effect, sd, n, seed=1) >= 0.8 - 0.015 and _mc_power(effect, sd, n - 1, seed=2) < 0.8 + 0.015


def test_power_monotone_limits_and_degenerate_cases():
    from scipy import stats

    powers = [cmp.paired_power(e, 1.0, 6) for e in (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)]
    assert powers[0] == pytest.approx(0.05, abs=1e-9) and powers == sorted(powers) and powers[-1] > 0.99
    assert [cmp.paired_power(0.5, 1.0, n) for n in (2, 4, 8, 16, 64)] == sorted(
        cmp.paired_power(0.5, 1.0, n) for n in (2, 4, 8, 16, 64))
    mdes = [cmp.min_detectable_effect(1.0, n) for n in (2, 3, 5, 10, 100)]
    assert mdes == sorted(mdes, reverse=True)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)  # large n: the t-test becomes the z-test
    assert cmp.min_detectable_effect(1.0, 10_000) == pytest.approx(z / 100, rel=1e-3)
    assert cmp.min_detectable_effect(0.3, 10) == pytest.approx(0.3 * cmp.min_detectable_effect(1.0, 10), rel=1e-9)
    assert cmp.seeds_needed(0.1, 1.0) == pytest.approx((z / 0.1) ** 2, abs=3)
    assert cmp.seeds_needed(0.001, 1.0) is None and cmp.seeds_needed(0.0, 1.0) is None  # beyond the cap
    assert cmp.min_detectable_effect(0.0, 3) == 0.0 and cmp.seeds_needed(0.01, 0.0) == 2
    with pytest.raises(ValueError, match="n=1"):
        cmp.min_detectable_effect(1.0, 1)


def _run(arm: str, budget: str, seed: int, value: float, flops: float, **tags) -> dict:
    """A run as `Tracker.load_sweep` returns it, without MLflow."""
    lrt = arm != "baseline"
    metrics = {"flops": flops, "tokens": flops / 6e6, "params": 1e6,
               ("val_bpb_sequential" if lrt else "val_bpb_full"): value}
    return {"run_id": f"{budget}-{arm}-{seed}", "name": f"{arm}-{budget}-s{seed}", "status": "FINISHED",
            "start_time": seed, "params": {}, "metrics": metrics,
            "tags": {"arm": arm, "budget_id": budget, "pair_id": f"{budget}-s{seed}", "seed": str(seed),
                     "strategy": "interleaved" if lrt else "baseline", "finished": "true", **tags}}


def _report(runs: list[dict], **kw) -> dict:
    sweep = {"run_id": "r0", "name": "s", "status": "FINISHED", "tags": {}}
    return cmp.build_report({"experiment": "e", "sweep": sweep, "trials": runs}, **kw)


TUNED = json.dumps({"sampler": "tpe", "trials": 8, "space": ["optim.lr_scale", "optim.warmup_frac"], "seed": 1000,
                    "best": {"optim.lr_scale": 0.5}, "best_value": 2.31})


def test_verdict_power_and_tuning_per_comparison():
    base = [2.30, 2.32, 2.31]
    runs = [_run("baseline", "b0", s, v, 1e15, tuning=TUNED) for s, v in enumerate(base)]
    runs += [_run("better", "b0", s, v - 0.04 + 0.005 * s, 1e15, tuning=TUNED) for s, v in enumerate(base)]
    runs += [_run("worse", "b0", s, v + 0.04 + 0.005 * s, 1e15) for s, v in enumerate(base)]
    runs += [_run("unclear", "b0", s, v + (0.03, -0.03, 0.0)[s], 1e15) for s, v in enumerate(base)]
    runs += [_run("single", "b0", 0, 2.2, 1e15)]
    report = _report(runs, effect=0.01)
    c = {x["arm"]: x for x in report["comparisons"]}
    assert {a: c[a]["verdict"] for a in c} == {"better": "lrt_better", "worse": "lrt_worse",
                                               "unclear": "no_conclusion", "single": "no_conclusion"}
    assert "1 pair" in c["single"]["verdict_note"] and c["single"]["mde"] is None and c["single"]["mde_note"]
    for arm in ("better", "worse", "unclear"):
        d = c[arm]["delta"]
        assert c[arm]["mde"] == pytest.approx(cmp.min_detectable_effect(d["std"], 3), rel=1e-12)
        assert c[arm]["mde_relative"] == pytest.approx(c[arm]["mde"] / statistics.mean(base), rel=1e-12)
        assert c[arm]["effect"] == pytest.approx(0.01 * statistics.mean(base), rel=1e-12)
        assert c[arm]["effect_relative"] == 0.01
        assert c[arm]["seeds_needed"] == cmp.seeds_needed(0.01 * statistics.mean(base), d["std"])
    tuning = "tpe 8 trials over optim.lr_scale, optim.warmup_frac"
    assert c["better"]["tuning"] == {"baseline": tuning, "lrt": tuning, "equal": True}
    assert c["worse"]["tuning"] == {"baseline": tuning, "lrt": "untuned (spec defaults)", "equal": False}

    table = cmp.format_report(report)
    header = table.splitlines()[1]
    assert "verdict" in header and "MDE (80%)" in header and "seeds for 1%" in header
    assert f"tuning b0/better: baseline {tuning}; better the same (equal)" in table
    assert f"WARNING tuning b0/worse: baseline {tuning}; worse untuned (spec defaults)" in table
    assert sum(line.startswith("verdict: lrt_better if") for line in table.splitlines()) == 1
    assert "seeds for 1%" in cmp.format_report(report, "markdown")
    rows = {r["arm"]: r for r in csv.DictReader(io.StringIO(cmp.format_report(report, "csv")))}
    assert rows["better"]["verdict"] == "lrt_better" and float(rows["worse"]["mde"]) == pytest.approx(c["worse"]["mde"])
    assert rows["better"]["seeds_needed"] == str(c["better"]["seeds_needed"]) and rows["single"]["mde"] == ""
    keys = {"verdict", "mde", "mde_relative", "seeds_needed", "effect", "effect_relative", "tuning"}
    assert all(keys <= set(x) for x in json.loads(cmp.format_report(report, "json"))["comparisons"])
    assert "seeds for 2%" in cmp.format_report(_report(runs))  # the default effect
    assert c["better"]["regime"]["in_paper_regime"] and "WARNING regime" not in table  # 167 tokens/param
    low = _report([dict(r, metrics={**r["metrics"], "params": 1e8}) for r in runs])  # 1.67 tokens/param
    assert not low["comparisons"][0]["regime"]["in_paper_regime"]
    assert "WARNING regime b0/better: the baseline trained on 1.7 tokens per parameter" in cmp.format_report(low)


def test_search_sweep_tuning_is_unequal():
    runs = [_run("baseline", "b0", 0, 2.3, 1e15)]
    runs += [_run(f"lrt-t{i:03d}", "b0", 0, 2.3 - 0.01 * i, 1e15, search="true", trial_number=str(i)) for i in range(4)]
    report = _report(runs)
    assert [c["tuning"] for c in report["comparisons"]] == [
        {"baseline": "untuned (spec defaults)", "lrt": "searched by Optuna (4 trials)", "equal": False}] * 4
    assert "WARNING tuning b0/lrt-t000: baseline untuned (spec defaults); lrt-t000 searched by Optuna (4 trials)" \
        in cmp.format_report(report)


DIVERGED = ("Diverged: diverged at step 37: train loss is nan; likely cause: the learning rates (optim.matrix_lr=0.02, "
            "embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.1, lr_scale=8): lower them (optim.lr_scale) or "
            "lengthen warm-up (optim.warmup_frac=0.01)")


def _diverged(run: dict, reason: str | None = DIVERGED, **tags) -> dict:
    """A trial as the sweep records a divergence: FAILED, tagged diverged=true, the trainer's line as the reason."""
    tags = {**run["tags"], "diverged": "true", "finished": "false", **tags}
    if reason is not None:
        tags["failure_reason"] = reason
    return dict(run, status="FAILED", metrics={}, tags=tags)


def test_diverged_trials_are_listed_apart_from_failures():
    runs = [_run("baseline", "b0", s, 2.30 + 0.01 * s, 1e15) for s in range(3)]
    runs += [_run("lrt", "b0", s, 2.25 + 0.01 * s, 1e15) for s in (0, 2)] + [_diverged(_run("lrt", "b0", 1, 0, 1e15))]
    runs += [_diverged(_run("wild", "b0", s, 0, 1e15), None, diverged_step=str(3 + s)) for s in range(2)]
    runs += [dict(_run("oom", "b0", 0, 0, 1e15), status="FAILED", tags={**_run("oom", "b0", 0, 0, 1e15)["tags"],
                                                                         "failure_reason": "OutOfMemoryError"})]
    runs += [_diverged(_run("lrt", "b0", 9, 0, 1e15), tuning_trial="true", pair_id="")]
    report = _report(runs)

    c = report["counts"]
    assert (c["diverged"], c["failed"], c["diverged_tuning"], c["status_FAILED"]) == (3, 1, 1, 4)
    line = DIVERGED[len("Diverged: "):]  # the exception's name is cut off: the trainer's one line remains
    by_run = {d["run_id"]: d for d in report["diverged"]}
    assert by_run["b0-lrt-1"]["step"] == 37 and by_run["b0-lrt-1"]["reason"] == line
    assert by_run["b0-wild-0"]["reason"] == "diverged at step 3" and by_run["b0-lrt-9"]["tuning_trial"]
    [comp] = [x for x in report["comparisons"] if x["arm"] == "lrt"]
    assert comp["n_pairs"] == 2 and [d["run_id"] for d in comp["diverged"]] == ["b0-lrt-1"]
    assert all(x["arm"] != "wild" for x in report["comparisons"])  # nothing trained: no comparison, but listed
    unmatched = {(u["arm"], u["pair_id"]): u for u in report["unmatched"]}
    why = unmatched[("lrt", "b0-s1")]["reason"]
    assert why.startswith("lrt seed 1 diverged at step 37 (run b0-lrt-1: train loss is nan; likely cause: the learning")
    assert unmatched[("wild", "b0-s0")]["diverged"][0]["step"] == 3
    assert {e["run_id"]: e["diverged"] for e in report["excluded"]} == {
        "b0-lrt-1": True, "b0-wild-0": True, "b0-wild-1": True, "b0-oom-0": False}

    table = cmp.format_report(report)
    assert "4 excluded (3 diverged)" in table.splitlines()[0]
    rows = {r.split()[1]: r for r in table.splitlines()[3:] if r.startswith("b0 ")}
    assert "2 (+1 diverged)" in rows["lrt"] and "0 (+2 diverged)  all diverged" in rows["wild"]
    assert ("WARNING diverged b0/lrt: lrt seed 1 at step 37; the verdict covers only the 2 pair(s) where both arms "
            "trained") in table
    assert "WARNING diverged b0/wild: every run of the arm diverged (wild seed 0 at step 3, wild seed 1 at step 4)" \
        in table
    assert f"diverged (tuning trial): lrt-b0-s9 (lrt, budget b0, seed 9): {line}" in table
    assert "excluded: oom-b0-s0 (oom, budget b0, seed 0): run FAILED: OutOfMemoryError" in table
    assert "excluded: lrt-b0-s1" not in table
    assert table.count(line[len("diverged at step 37"):]) == 2  # its unmatched line and the tuning trial's
    assert "| b0 | wild |  | 0 (+2 diverged) | all diverged |" in cmp.format_report(report, "markdown")
    csv_rows = {r["arm"]: r for r in csv.DictReader(io.StringIO(cmp.format_report(report, "csv")))}
    assert csv_rows["lrt"]["n_diverged"] == "1" and csv_rows["lrt"]["diverged"] == line
    assert csv_rows["wild"]["n"] == "0" and csv_rows["wild"]["n_diverged"] == "2"
    assert csv_rows["baseline"]["n_diverged"] == "0"
    j = json.loads(cmp.format_report(report, "json"))
    assert j["counts"]["diverged"] == 3 and j["counts"]["failed"] == 1 and len(j["diverged"]) == 4


def test_a_diverged_baseline_leaves_every_arm_with_a_reason():
    runs = [_run("baseline", "b0", 0, 2.3, 1e15), _diverged(_run("baseline", "b0", 1, 0, 1e15))]
    runs += [_run(arm, "b0", s, 2.2, 1e15) for arm in ("lrt", "lrt2") for s in (0, 1)]
    report = _report(runs)
    for arm in ("lrt", "lrt2"):
        [u] = [u for u in report["unmatched"] if u["arm"] == arm]
        assert u["reason"].startswith("baseline seed 1 diverged at step 37 (")
    assert all([d["arm"] for d in c["diverged"]] == ["baseline"] for c in report["comparisons"])
    assert "WARNING diverged b0/lrt2: baseline seed 1 at step 37" in cmp.format_report(report)


def test_effect_flag_is_checked(capsys):
    assert cmp.main(["--experiment", "x", "--effect", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--effect=0" in err[0]


# ---------------------------------------------------------------------------
# Plots with one budget or close budgets


def _tick_texts(fig) -> list:
    """The drawn tick labels (inside the view) and axis labels of every axes, after layout."""
    fig.tight_layout()
    fig.canvas.draw()
    out = []
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels()):
                if label.get_visible() and label.get_text() and min(lo, hi) <= loc <= max(lo, hi):
                    out.append((axis.axis_name, label))
            if axis.label.get_text():
                out.append(("label", axis.label))
    return out


def _overlaps(texts) -> list[tuple[str, str]]:
    if not texts:
        return []
    r = texts[0][1].figure.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(r)) for _, t in texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


@pytest.mark.parametrize("flops", [{"b0": 1e15}, {"b0": 1e15, "b1": 1.3e15}, FLOPS])
def test_plots_draw_fits_only_with_three_budgets_and_ticks_do_not_collide(flops, tmp_path):
    from lrt_platform.plots import curves_figure, delta_figure, paired_figure, scaling_figure

    runs = [_run(arm, b, s, law(BASE if arm == "baseline" else LRT, c) + OFFSETS[arm][s], c)
            for b, c in flops.items() for s in (0, 1) for arm in ("baseline", "lrt")]
    report = _report(runs)
    fig = scaling_figure(report)
    ax = fig.axes[0]
    fit_lines = [l for l in ax.get_lines() if l.get_linestyle() not in ("None", "")]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    if len(flops) < 3:  # no fit: points only, no line joining the means, no fit in the legend
        assert fit_lines == [] and not any("fit" in t for t in legend)
    else:
        assert len(fit_lines) == 2 and sum("fit" in t for t in legend) == 2
    multiplier = any((c["compute_multiplier"] or {}).get("value") is not None for c in report["comparisons"])
    assert ("compute multiplier" in ax.get_xlabel()) == multiplier  # the label promises only what is drawn
    for f in (fig, delta_figure(report)):
        texts = _tick_texts(f)
        x_ticks = [t for kind, t in texts if kind == "x"]
        assert 1 <= len(x_ticks) <= 4, [t.get_text() for t in x_ticks]
        assert _overlaps(texts) == []
    curves = {t["run_id"]: {"step": [0, 1, 2], "val_bpb": [3.0, 2.5, t["val_bpb"]], "tokens": [0, 1e6, 2e6],
                            "flops": [0, t["flops"] / 2, t["flops"]]} for t in report["trials"]}
    for f in (paired_figure(report), curves_figure(report, curves)):
        assert _overlaps(_tick_texts(f)) == []
    names = [p.rsplit("/", 1)[-1] for p in make_plots(report, str(tmp_path), curves)]
    # no scaling line or delta trend through a single budget: its paired differences stand alone
    assert names == ["paired_difference.png"] + (["scaling.png", "delta_vs_tokens_per_param.png"]
                                                 if len(flops) >= 2 else []) + ["loss_curves.png"]


def test_paired_difference_plot_shows_each_seed_the_mean_its_ci_and_zero():
    from lrt_platform.plots import paired_figure

    base = [2.30, 2.32, 2.31]
    runs = [_run("baseline", "b0", s, v, 1e15) for s, v in enumerate(base)]
    runs += [_run("lrt", "b0", s, v - 0.04 + 0.005 * s, 1e15) for s, v in enumerate(base)]
    report = _report(runs)
    c = report["comparisons"][0]
    ax = paired_figure(report).axes[0]
    seeds = np.concatenate([coll.get_offsets()[:, 1] for coll in ax.collections if len(coll.get_offsets()) == 3])
    assert sorted(seeds) == pytest.approx(sorted(p["delta"] for p in c["pairs"]))
    lines = {tuple(l.get_ydata()) for l in ax.get_lines()}
    assert (0.0, 0.0) in lines  # the zero line
    assert any(len(y) == 1 and y[0] == pytest.approx(c["delta"]["mean"]) for y in lines)
    caps = sorted(y for l in ax.get_lines() if l.get_marker() == "_" for y in l.get_ydata())
    assert caps == pytest.approx(sorted(c["delta"]["ci95"]))
    assert "sequential" in ax.get_ylabel() and "full" in ax.get_ylabel()
    assert [t.get_text() for t in ax.texts] == [c["verdict"]] == ["lrt_better"]


# ---------------------------------------------------------------------------
# The sweep's final printout and the parent run's summary


def reported_sweep(mlflow_server: str, name: str) -> tuple[Tracker, str]:
    """A finished sweep (baseline and LRT at budget b0, seeds 0 and 1) reported as a sweep ends
    (`sweep._report`: the table, and verdicts, metrics, renders and plots on the parent run).
    Returns the tracker and the parent run id."""
    import time
    from types import SimpleNamespace

    from lrt_platform import sweep

    tr = Tracker(mlflow_server, _exp(name))
    parent = tr.start_sweep(f"{name}.yaml", f"experiment: {name}\n", f"hash-{name}", [])
    for seed in (0, 1):
        for arm in ("baseline", "lrt"):
            log_trial(tr, parent, arm, "b0", seed)
    tr.end_sweep(parent)
    sweep._report(SimpleNamespace(experiment_name=tr.experiment), mlflow_server, tr, parent, [],
                  {"start": time.time()}, 0)
    return tr, parent


def test_sweep_report_prints_verdicts_and_logs_them_to_the_parent_run(mlflow_server, capsys, tmp_path):
    import time
    from types import SimpleNamespace

    from lrt_platform import sweep
    from lrt_platform.tracking import TrackingError

    tr, parent = reported_sweep(mlflow_server, "summary")
    spec = SimpleNamespace(experiment_name=tr.experiment)
    out = capsys.readouterr()
    assert "seeds for 2%" in out.out and "lrt_better" in out.out and "warning" not in out.err
    run = MlflowClient(mlflow_server).get_run(parent)
    assert run.data.tags["verdict.b0.lrt"] == "lrt_better"
    delta = statistics.mean(bpb("lrt", "b0", s) - bpb("baseline", "b0", s) for s in (0, 1))
    assert run.data.metrics["delta.b0.lrt"] == pytest.approx(delta, abs=1e-9)
    logged = json.loads(_artifact_text(mlflow_server, parent, "comparison.json", tmp_path))
    assert logged["comparisons"][0]["verdict"] == "lrt_better" and logged["comparisons"][0]["mde"] > 0
    assert "MDE (80%)" in _artifact_text(mlflow_server, parent, "comparison.txt", tmp_path)
    assert run.data.params["verdict.b0.lrt"] == "lrt_better"
    lo, hi = logged["comparisons"][0]["delta"]["ci95"]
    assert run.data.metrics["delta_ci_low.b0.lrt"] == pytest.approx(lo) and run.data.metrics["delta_ci_high.b0.lrt"] \
        == pytest.approx(hi)
    page = _artifact_text(mlflow_server, parent, "comparison.html", tmp_path)
    assert page.startswith("<!doctype html>") and "lrt_better" in page and f"{delta:+.4f}" in page
    assert "| lrt_better |" in _artifact_text(mlflow_server, parent, "comparison.md", tmp_path).replace("  ", " ")
    plots = {a.path for a in MlflowClient(mlflow_server).list_artifacts(parent, "plots")}
    assert plots == {"plots/paired_difference.png", "plots/loss_curves.png"}, plots  # one budget: no scaling
    for run_id in MlflowClient(mlflow_server).search_runs([tr.experiment_id()], "tags.run_kind = 'trial'"):
        arts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id.info.run_id)}
        assert {"loss_curve.png", "checkpoint.json"} <= arts, arts  # each child run's own curve and checkpoint
    link = json.loads(_artifact_text(mlflow_server, run_id.info.run_id, "checkpoint.json", tmp_path))
    assert link["uri"] == f"/ck/{run_id.data.tags['trial_id']}/step2.pt" and link["step"] == 2
    assert link["sample"] == f"python -m lrt_model.sample /ck/{run_id.data.tags['trial_id']}"

    capsys.readouterr()  # drop MLflow's download progress bars

    class Broken(Tracker):
        def log_sweep_summary(self, *a, **k):
            raise TrackingError("MLflow log sweep summary failed (here): boom\nsecond line")

    sweep._report(spec, mlflow_server, Broken(mlflow_server, tr.experiment), parent, [], {"start": time.time()}, 0)
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err == ["[sweep] warning: comparison not logged to the sweep run: MLflow log sweep summary failed "
                   "(here): boom"]


def _artifact_text(uri: str, run_id: str, path: str, tmp_path) -> str:
    with open(MlflowClient(uri).download_artifacts(run_id, path, str(tmp_path))) as f:
        return f.read()


def test_compare_reads_the_experiment_and_tracking_uri_from_a_spec(tmp_path, capsys):
    from lrt_platform.compare import main

    root = Path(__file__).resolve().parents[1]
    spec = tmp_path / "s.yaml"
    spec.write_text((root / "sweep_specs/tiny/quickstart.yaml").read_text()
                    + f"tracking: {{uri: 'sqlite:///{tmp_path}/elsewhere.db'}}\n")
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert "'quickstart_tiny' not found" in err and f"{tmp_path}/elsewhere.db" in err and len(err.splitlines()) == 1
    assert main([]) == 2 and "give a sweep spec" in capsys.readouterr().err


def test_units_are_si_as_in_the_planner():
    """compare and the planner's dry run share render.si: k, M, G, T, P, E (never K or B)."""
    from lrt_platform.render import si

    report = _report([_run("baseline", "b0", 0, 2.3, 1.2e16), _run("lrt", "b0", 0, 2.2, 1.2e16)])
    header, rows = cmp.table_rows(report)
    base = dict(zip(header, rows[0]))
    assert (base["tokens"], base["params"], base["tok/param"]) == ("2G", "1M", "2k")  # 2e9 tokens, 1e6 params
    assert [si(x) for x in (999, 1e3, 1.5e6, 2e9, 3e12, 4e15, 5e18)] == ["999", "1k", "1.5M", "2G", "3T", "4P", "5E"]
    assert si(None) == "n/a" and si(123_456, 4) == "123.5k"


def _import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package at `root` it imports, at module level or inside functions
    (every ast node)."""
    import ast

    package = root.name
    modules = {p.stem: p for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                absolute = node.level == 0 and node.module and node.module.split(".")[0] == package
                if node.level == 1 or absolute:  # from .x import y / from . import x / from package.x import y
                    parts = (node.module or "").split(".")[1 if absolute else 0:]
                    deps |= {parts[0]} if parts and parts[0] else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_lrt_platform_has_no_import_cycle(tmp_path):
    # the check itself: a function-level import closes a cycle as well as a module-level one
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("def f():\n    from pkg.a import g\n")
    assert _cycle(_import_graph(pkg)) == ["a", "b", "c", "a"]

    graph = _import_graph(Path(__file__).resolve().parents[1] / "lrt_platform")
    assert {"compare", "plots", "scaling", "render", "planner"} <= set(graph)
    assert "scaling" in graph["plots"] and "compare" not in graph["plots"]  # the cycle this replaced
    assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph))
