"""Matched baseline-vs-LRT comparison of one sweep: tables, scaling fits, compute multipliers.

Design choices:
- Reads runs only through `tracking.Tracker.load_sweep` (MLflow stays in the
  tracking module) and turns them into one JSON-able report dict;
  `format_report` renders it as table | markdown | html | csv | json (the
  table renderers and the SI number format are `render.py`'s, shared with the
  planner's dry run), `plots.py` draws it. `build_report` is pure, so the
  arithmetic is testable without MLflow.
- Which bpb: LRT arms are scored by the *sequential* view (true recurrence,
  what a user gets when decoding), the baseline by the *full* view (its only
  one). Every row says which view it shows; a run lacking its view falls back
  to the logged `val_bpb` and says so.
- Only FINISHED trials that reached their budget (tag finished != false) and
  logged their view count; every other trial is listed under `excluded` with
  its reason, and every pair that lacks a usable partner under `unmatched`.
  Nothing is dropped silently.
- Diverged trials (tag diverged=true: the loss became non-finite, the trainer's
  one-line reason in failure_reason) are listed apart from other failures
  (`diverged`, counts `diverged` vs `failed`), their pairs say which arm and
  seed diverged at which step and why, and a comparison that lost seeds to
  divergence carries a WARNING: its verdict covers only the seeds that trained.
- Per (budget, arm): mean and sample std (ddof=1) over seeds. Per (budget, LRT
  arm): paired differences d_i = LRT_i - baseline_i matched by `pair_id`,
  relative differences d_i / baseline_i; mean with a 95% confidence interval
  mean +- t(0.975, n-1) * sd / sqrt(n) (Student t over the paired
  differences). With one pair the std and CI are undefined and shown as such.
- Verdict per comparison, from that CI (bpb: lower is better): `lrt_better`
  if its upper bound < 0, `lrt_worse` if its lower bound > 0, else
  `no_conclusion` (also with < 2 pairs, when the CI is undefined; `verdict_note`
  says why).
- Power of that verdict: a two-sided paired t-test at alpha 0.05, with the sd
  of the paired differences taken as the observed one (ddof=1). Power at
  effect d with n pairs is exact from the noncentral t: P(|T'| > t(0.975,
  n-1)), T' ~ nct(n-1, d*sqrt(n)/sd) (scipy.stats.nct). `mde`: the |d| with
  power 0.8 at the observed n, solved by brentq (`mde_relative` = mde /
  baseline mean bpb of the pairs); sd == 0 gives 0, < 2 pairs None + note.
  `seeds_needed`: the least n >= 2 with power >= 0.8 for the stated effect
  `effect` = --effect (relative, default 0.02: the LRT paper's 2% gain) x
  the baseline mean bpb; None + note beyond 10,000 pairs. The observed sd is
  itself uncertain with few pairs, so both figures are estimates.
- Tuning per comparison, from the runs' `tuning` tag (JSON: sampler, trials,
  space, seed, best, best_value) or, in a classic search sweep, the
  search=true tag (that arm is "searched by Optuna (N trials)"); no tag:
  "untuned (spec defaults)". `equal` only when both sides carry tags with the
  same sampler, trial count and space; anything else is a WARNING note,
  because then the delta mixes the architecture with the tuning effort.
- Scaling: per arm with >= 3 budgets, mean bpb per budget against mean
  training FLOPs fitted to L(C) = E + A * C^-alpha, and per LRT comparison
  the effective compute multiplier against the baseline (the compute the
  baseline needs to reach the LRT loss / the LRT compute); the numerics and
  their method live in `scaling.py`, which `plots.py` draws the fits with.
- Search sweeps (parent tagged sweep_kind=search, or trials tagged search):
  optimisation history in trial order and parameter importances from
  `optuna.importance.get_param_importances` with the PED-ANOVA evaluator,
  the one optuna-dashboard uses (so both show the same ranking), on an
  in-memory study rebuilt from the finished runs' `search.*` params (or the
  config params that vary); if Optuna cannot fit it, a normalised |rank
  correlation| / correlation-ratio fallback. The report names the method used
  and, below IMPORTANCE_MIN_TRIALS finished trials, says the ranking means
  little (`importance_warning`). Best-trial params keep their types.

Example:
    python -m lrt_platform.compare --experiment quickstart
    python -m lrt_platform.compare --experiment scaling --format markdown --plots plots/
    python -m lrt_platform.compare --experiment scaling --format json --tracking-uri http://127.0.0.1:5000
    python -m lrt_platform.compare --experiment scaling --effect 0.01   # seeds needed for a 1% effect
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
import sys
from collections import defaultdict

import numpy as np

from lrt_model.config import VIEWS, headline_view

from .render import csv_text, html_table, markdown_table, si, text_table
from .scaling import compute_multiplier, fit_power_law
from .tracking import Tracker, TrackingError

CI_LEVEL = 0.95
# The LRT paper makes its claims at >= 10 training tokens per parameter; below that, halving LRT's tokens to
# pay for its ~2x compute per token decides a compute-matched comparison more than the method does.
# (Here, not in the planner, which warns with it too: compare stays free of torch.)
PAPER_TOKENS_PER_PARAM = 10.0
ALPHA = 0.05  # = 1 - CI_LEVEL: two-sided level of the paired t-test behind the verdict and the power figures
POWER = 0.80
DEFAULT_EFFECT = 0.02  # the LRT paper's relative bpb gain over the baseline
MAX_SEEDS = 10_000
# PED-ANOVA (optuna-dashboard's importance) compares the best 10% of trials with the rest and wants at least
# 2 trials in that 10%: below 20 finished trials its ranking rests on one or two trials
IMPORTANCE_MIN_TRIALS = 20
POWER_METHOD = (f"two-sided paired t-test, alpha {ALPHA:g}: power from the noncentral t (n-1 dof, "
                f"ncp = effect * sqrt(n) / sd, sd = the observed sd of the paired differences); "
                f"MDE solves power = {POWER:g} exactly (brentq); seeds = the least n reaching {POWER:g}")
_NON_SEARCH_PARAMS = ("seed", "checkpoint_dir", "checkpoint_every", "progress", "stop_after_steps", "device")


def compare(tracking_uri: str | None, experiment: str, sweep_run_id: str | None = None,
            effect: float = DEFAULT_EFFECT) -> dict:
    """The comparison report of one sweep (the latest sweep run of the experiment if None);
    `effect`: the relative bpb effect that `seeds_needed` is sized for."""
    return build_report(Tracker(tracking_uri, experiment).load_sweep(sweep_run_id), effect)


# ---------------------------------------------------------------------------
# Statistics


def t_quantile(p: float, df: int) -> float:
    from scipy import stats  # a dependency of mlflow; imported late because it is slow to load

    return float(stats.t.ppf(p, df))


def describe(values: list[float]) -> dict:
    """Mean, sample std (ddof=1; None for n < 2) and the values."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    return {"n": n, "mean": float(v.mean()) if n else None, "std": float(v.std(ddof=1)) if n > 1 else None,
            "values": [float(x) for x in v]}


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences with a Student-t confidence interval (undefined for n < 2)."""
    out = describe(diffs)
    out["ci95"] = None
    if out["n"] > 1:
        half = t_quantile(0.5 + CI_LEVEL / 2, out["n"] - 1) * out["std"] / math.sqrt(out["n"])
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    else:
        out["ci_note"] = f"CI undefined for n={out['n']}"
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def verdict(delta: dict) -> tuple[str, str | None]:
    """lrt_better / lrt_worse when the 95% CI of the paired bpb delta excludes 0 (lower bpb is better)."""
    ci = delta["ci95"]
    if ci is None:
        return "no_conclusion", f"CI undefined with {delta['n']} pair(s); a verdict needs >= 2"
    if ci[1] < 0:
        return "lrt_better", None
    if ci[0] > 0:
        return "lrt_worse", None
    return "no_conclusion", "the 95% CI includes 0"


# ---------------------------------------------------------------------------
# Power of the paired t-test


def _check_power_args(sd: float, n: int | None, alpha: float, power: float | None = None) -> None:
    if n is not None and n < 2:
        raise ValueError(f"n={n}: a paired t-test needs >= 2 pairs")
    if not sd >= 0:
        raise ValueError(f"sd={sd}: the sd of the paired differences must be >= 0")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: use a level in (0, 1), e.g. 0.05")
    if power is not None and not alpha < power < 1:
        raise ValueError(f"power={power}: use a power in (alpha, 1), e.g. 0.8")


def paired_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test (n pairs, level alpha) when the differences have mean `effect`
    and sd `sd`: P(|T'| > t(1 - alpha/2, n-1)), T' noncentral t with n-1 dof and ncp effect*sqrt(n)/sd."""
    _check_power_args(sd, n, alpha)
    if sd == 0:  # no noise: any non-zero effect is certain to show, a zero one is rejected at the size alpha
        return 1.0 if effect != 0 else alpha
    from scipy import stats

    df, ncp = n - 1, abs(effect) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    # lower tail by symmetry, P(T'(ncp) < -crit) = P(T'(-ncp) > crit): nct.cdf there returns NaN for some ncp
    return float(min(1.0, stats.nct.sf(crit, df, ncp) + stats.nct.sf(crit, df, -ncp)))


def min_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The |effect| a paired t-test with n pairs detects with probability `power`: power(effect) = power,
    solved by brentq in units of sd (power rises monotonically with |effect|)."""
    _check_power_args(sd, n, alpha, power)
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    f = lambda x: paired_power(x, 1.0, n, alpha) - power  # noqa: E731 - x = effect / sd
    hi = 1.0
    while f(hi) < 0:  # bracket the root; n=2 needs x ~ 30, so a few doublings at most
        hi *= 2
    return float(brentq(f, 0.0, hi, xtol=1e-12, rtol=1e-12)) * sd


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                 max_n: int = MAX_SEEDS) -> int | None:
    """The smallest n >= 2 paired seeds at which a paired t-test detects `effect` with probability `power`;
    None if more than max_n are needed (or effect == 0). Power rises with n, so doubling then bisection."""
    _check_power_args(sd, None, alpha, power)
    if effect == 0:
        return None
    if sd == 0:
        return 2
    ok = lambda n: paired_power(effect, sd, n, alpha) >= power  # noqa: E731
    if ok(2):
        return 2
    lo, hi = 2, 4  # invariant: ok(hi) once found, not ok(lo)
    while not ok(hi):
        if hi >= max_n:
            return None
        lo, hi = hi, min(2 * hi, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def power_fields(delta: dict, baseline_mean: float | None, effect_relative: float) -> dict:
    """The report's power keys for one comparison: mde (+ relative), seeds_needed for the stated effect."""
    n, sd = delta["n"], delta["std"]
    effect = effect_relative * baseline_mean if baseline_mean else None
    out = {"effect": effect, "effect_relative": effect_relative, "mde": None, "mde_relative": None,
           "seeds_needed": None}
    if n < 2 or sd is None:
        out["mde_note"] = out["seeds_note"] = f"needs >= 2 pairs for the sd of the paired differences (has {n})"
        return out
    out["mde"] = min_detectable_effect(sd, n)
    out["mde_relative"] = out["mde"] / baseline_mean if baseline_mean else None
    if effect is None:
        out["seeds_note"] = "no baseline mean bpb to scale the effect by"
        return out
    out["seeds_needed"] = seeds_needed(effect, sd)
    if out["seeds_needed"] is None:
        out["seeds_note"] = f"more than {MAX_SEEDS} pairs needed"
    return out


# ---------------------------------------------------------------------------
# Runs -> report


def _float(x) -> float | None:
    return None if x is None else float(x)


def trial_record(run: dict) -> dict:
    """One run as the report sees it: identity, the bpb in its view, costs, and why it is unusable if so."""
    tags, m = run["tags"], run["metrics"]
    strategy = tags.get("strategy") or ("baseline" if tags.get("arm") == "baseline" else "unknown")
    lrt = strategy != "baseline"
    view = headline_view(lrt)
    bpb = m.get(f"val_bpb_{view}")
    if bpb is None and "val_bpb" in m:
        bpb, view = m["val_bpb"], "val_bpb (logged view)"
    problem = None
    diverged = _divergence(tags, m)
    if diverged:
        problem = diverged["reason"]
    elif run["status"] != "FINISHED":
        reason = tags.get("failure_reason")
        problem = f"run {run['status']}" + (f": {reason}" if reason else "")
    elif bpb is None:
        problem = "no val_bpb metric"
    elif tags.get("finished") == "false":
        problem = "training stopped before its budget (finished=false)"
    tokens, params = _float(m.get("tokens")), _float(m.get("params"))
    return {
        "run_id": run["run_id"], "name": run.get("name"), "status": run["status"], "problem": problem,
        "diverged": diverged is not None, "diverged_step": (diverged or {}).get("step"),
        "arm": tags.get("arm", "?"), "budget_id": tags.get("budget_id", "?"), "pair_id": tags.get("pair_id"),
        "seed": tags.get("seed"), "strategy": strategy, "lrt": lrt, "matching": tags.get("matching"),
        "view": view, "val_bpb": _float(bpb), "flops": _float(m.get("flops")), "tokens": tokens, "params": params,
        "tokens_per_param": tokens / params if tokens and params else None,
        "interleave_gap": _float(m.get("interleave_gap")),
        "icl": {k: float(v) for k, v in sorted(m.items()) if k.startswith("icl_")},
        "trial_number": tags.get("trial_number"), "start_time": run.get("start_time"),
        "search": tags.get("search") == "true", "tuning": _tuning_tag(tags.get("tuning")),
        "checkpoint": tags.get("last_checkpoint_path"), "checkpoint_step": _float(tags.get("last_checkpoint_step")),
    }


_DIVERGED_AT = re.compile(r"diverged at step (\d+)")


def _divergence(tags: dict, metrics: dict) -> dict | None:
    """{"step", "reason"} of a trial tagged diverged=true (None otherwise). The reason is the trainer's one
    line ("diverged at step N: ...") from failure_reason, with any exception-name prefix cut off; the step
    from a diverged_step tag or metric, else from that line."""
    if tags.get("diverged") != "true":
        return None
    reason = (tags.get("failure_reason") or "").strip()
    at = reason.find("diverged at step")
    reason = (reason[at:] if at > 0 else reason).split("\n")[0].strip()
    step = tags.get("diverged_step", metrics.get("diverged_step"))
    if step is None and _DIVERGED_AT.match(reason):
        step = _DIVERGED_AT.match(reason).group(1)
    step = int(float(step)) if step is not None else None
    if not reason.startswith("diverged"):  # no trainer line: say what is known
        reason = "diverged" + (f" at step {step}" if step is not None else "") + (f": {reason}" if reason else "")
    return {"step": step, "reason": reason}


def _tuning_tag(raw: str | None) -> dict | None:
    """The `tuning` tag's JSON (sampler, trials, space, seed, best, best_value); None if absent."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"unreadable": raw[:200]}


def arm_summary(trials: list[dict]) -> dict:
    t0 = trials[0]
    gaps = [t["interleave_gap"] for t in trials if t["interleave_gap"] is not None]
    icl_keys = sorted({k for t in trials for k in t["icl"]})
    return {
        "budget_id": t0["budget_id"], "arm": t0["arm"], "strategy": t0["strategy"], "lrt": t0["lrt"],
        "view": t0["view"], "n": len(trials), "seeds": [t["seed"] for t in trials],
        "run_ids": [t["run_id"] for t in trials], "val_bpb": describe([t["val_bpb"] for t in trials]),
        "flops": _mean(t["flops"] for t in trials), "tokens": _mean(t["tokens"] for t in trials),
        "params": _mean(t["params"] for t in trials),
        "tokens_per_param": _mean(t["tokens_per_param"] for t in trials),
        "interleave_gap": describe(gaps) if gaps else None,
        "icl": {k: describe([t["icl"][k] for t in trials if k in t["icl"]]) for k in icl_keys},
    }


def _by_pair(trials: list[dict]) -> dict:
    """pair_id -> trial; if a pair ran twice, a usable and then the latest run wins."""
    out = {}
    for t in sorted(trials, key=lambda t: (t["problem"] is None, t["start_time"] or 0)):
        out[t["pair_id"]] = t
    return out


def _why(t: dict | None, role: str) -> str:
    if t is None:
        return f"{role} run missing"
    if t["diverged"]:  # "<arm> seed <s> diverged at step N (the trainer's reason)"
        head = f"diverged at step {t['diverged_step']}" if t["diverged_step"] is not None else "diverged"
        detail = t["problem"][len(head):].lstrip(": ") if t["problem"].startswith(head) else t["problem"]
        return f"{role} seed {t['seed']} {head} (run {t['run_id'][:8]}" + (f": {detail})" if detail else ")")
    return f"{role} run {t['run_id'][:8]}: {t['problem']}"


def diverged_entry(t: dict, tuning_trial: bool = False) -> dict:
    return {k: t[k] for k in ("run_id", "name", "arm", "budget_id", "pair_id", "seed", "status")} | {
        "step": t["diverged_step"], "reason": t["problem"], "tuning_trial": tuning_trial}


def _budget_order(trials: list[dict]) -> list[str]:
    flops = defaultdict(list)
    for t in trials:
        flops[t["budget_id"]].append(t["flops"] or 0.0)
    return sorted(flops, key=lambda b: (np.mean(flops[b]), b))


def build_report(data: dict, effect: float = DEFAULT_EFFECT) -> dict:
    """The report from `Tracker.load_sweep` output (plain dicts); `effect` as in `compare`."""
    if not (isinstance(effect, (int, float)) and 0 < effect < 1):
        raise ValueError(f"effect={effect!r}: give the relative bpb effect in (0, 1), e.g. 0.02 for 2%")
    sweep = data["sweep"]
    trials = [trial_record(r) for r in data["trials"] if r["tags"].get("tuning_trial") != "true"]  # tuning: unpaired
    usable = [t for t in trials if t["problem"] is None]
    excluded = [{k: t[k] for k in ("run_id", "name", "arm", "budget_id", "pair_id", "seed", "status", "problem",
                                   "diverged", "diverged_step")}
                for t in trials if t["problem"] is not None]
    diverged = [diverged_entry(t) for t in trials if t["diverged"]]
    # tuning trials are never paired, but a setting that diverged belongs to the story of how an arm was tuned
    tuning_diverged = [diverged_entry(trial_record(r), tuning_trial=True) for r in data["trials"]
                       if r["tags"].get("tuning_trial") == "true" and r["tags"].get("diverged") == "true"]
    groups = defaultdict(list)
    for t in usable:
        groups[(t["budget_id"], t["arm"])].append(t)
    budgets = _budget_order(trials)
    row_order = sorted(groups, key=lambda k: (budgets.index(k[0]), k[1] != "baseline", k[1]))
    arms = [arm_summary(groups[k]) for k in row_order]
    comparisons, unmatched, notes = _comparisons(trials, arms, budgets, effect)
    scaling = _scaling(arms)
    for c in comparisons:
        base = scaling.get(c["baseline_arm"], {})
        pts = [(p["flops"], p["val_bpb"]) for p in base.get("points", []) if p["flops"]]
        if c["lrt"]["val_bpb"]["mean"] is not None and c["lrt"]["flops"]:
            c["compute_multiplier"] = compute_multiplier(c["lrt"]["val_bpb"]["mean"], c["lrt"]["flops"], pts,
                                                         base.get("fit"))
    report = {
        "experiment": data["experiment"], "experiment_id": data.get("experiment_id"),
        "tracking_uri": data.get("tracking_uri"), "ui_url": data.get("ui_url"),
        "sweep_run_id": sweep["run_id"], "sweep_name": sweep.get("name"), "sweep_status": sweep["status"],
        "spec_hash": sweep["tags"].get("spec_hash"), "sweep_kind": sweep["tags"].get("sweep_kind", "grid"),
        "views": {"lrt": headline_view(True), "baseline": headline_view(False)},
        "power": {"alpha": ALPHA, "power": POWER, "effect_relative": effect, "max_seeds": MAX_SEEDS,
                  "method": POWER_METHOD},
        "counts": {"trials": len(trials), "usable": len(usable), "excluded": len(excluded),
                   "diverged": len(diverged),  # apart from failed: deterministic, a retry diverges again
                   "diverged_tuning": len(tuning_diverged),
                   "failed": sum(t["status"] == "FAILED" and not t["diverged"] for t in trials),
                   "comparisons": len(comparisons), "unmatched": len(unmatched),
                   **{f"status_{s}": n for s, n in sorted(_count(t["status"] for t in trials).items())}},
        "budgets": budgets, "arms": arms, "comparisons": comparisons, "scaling": scaling,
        "unmatched": unmatched, "excluded": excluded, "diverged": diverged + tuning_diverged, "notes": notes,
        "trials": [{k: v for k, v in t.items() if k != "start_time"} for t in trials],
    }
    if report["sweep_kind"] == "search" or any(t["search"] for t in trials):
        report["search"] = search_summary(data, trials)
    return report


def load_curves(tracker: Tracker, report: dict) -> dict:
    """{run_id: {"step", "tokens", "flops", "val_bpb": lists}} for every usable trial, its bpb in the view
    the report scores it by, joined on the optimiser step; for `plots.curves_figure`."""
    out = {}
    for t in report["trials"]:
        if t["problem"] is not None:
            continue
        key = f"val_bpb_{t['view']}" if t["view"] in VIEWS else "val_bpb"  # as trial_record read it
        hist = {k: dict(tracker.metric_history(t["run_id"], k)) for k in (key, "tokens", "flops")}
        steps = sorted(set(hist[key]) & set(hist["tokens"]) & set(hist["flops"]))
        out[t["run_id"]] = {"step": steps, "val_bpb": [hist[key][s] for s in steps],
                            "tokens": [hist["tokens"][s] for s in steps], "flops": [hist["flops"][s] for s in steps]}
    return out


def _count(items) -> dict:
    out = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


def _comparisons(trials: list[dict], arms: list[dict], budgets: list[str],
                 effect: float = DEFAULT_EFFECT) -> tuple[list, list, list]:
    comparisons, unmatched, notes = [], [], []
    n_search = sum(t["search"] for t in trials)
    summary = {(a["budget_id"], a["arm"]): a for a in arms}
    for t in trials:
        if t["pair_id"] is None and not t["search"]:  # search trials need not be paired
            unmatched.append({"budget_id": t["budget_id"], "arm": t["arm"], "pair_id": None, "seed": t["seed"],
                              "baseline_run": None, "lrt_run": t["run_id"], "reason": "run has no pair_id tag"})
    for budget in budgets:
        here = [t for t in trials if t["budget_id"] == budget and t["pair_id"] is not None]
        base_arms = sorted({t["arm"] for t in here if not t["lrt"]}, key=lambda a: (a != "baseline", a))
        lrt_arms = sorted({t["arm"] for t in here if t["lrt"]})
        if len(base_arms) > 1:
            notes.append(f"budget {budget}: several baseline arms {base_arms}; "
                         f"LRT arms are paired with {base_arms[0]!r}")
        base_arm = base_arms[0] if base_arms else None
        if base_arm is None and all(t["search"] for t in here):
            notes.append(f"budget {budget}: search trials without a baseline arm; nothing to pair")
            continue
        base = _by_pair([t for t in here if t["arm"] == base_arm])
        for arm in lrt_arms:
            lrt = _by_pair([t for t in here if t["arm"] == arm])
            pairs = []
            for pid in sorted(set(base) | set(lrt), key=str):
                b, l = base.get(pid), lrt.get(pid)
                if b is not None and l is not None and b["problem"] is None and l["problem"] is None:
                    d = l["val_bpb"] - b["val_bpb"]
                    pairs.append({"pair_id": pid, "seed": l["seed"], "baseline_run": b["run_id"],
                                  "lrt_run": l["run_id"], "baseline": b["val_bpb"], "lrt": l["val_bpb"],
                                  "delta": d, "relative": d / b["val_bpb"],
                                  "icl": {k: l["icl"][k] - b["icl"][k] for k in l["icl"] if k in b["icl"]}})
                    continue
                reasons = [r for r, bad in ((_why(b, "baseline"), b is None or b["problem"]),
                                            (_why(l, arm), l is None or l["problem"])) if bad]
                if base_arm is None:
                    reasons = ["no baseline arm at this budget"] + reasons[1:]
                unmatched.append({"budget_id": budget, "arm": arm, "baseline_arm": base_arm, "pair_id": pid,
                                  "seed": (l or b)["seed"], "baseline_run": b and b["run_id"],
                                  "lrt_run": l and l["run_id"], "reason": "; ".join(reasons),
                                  "diverged": [diverged_entry(t) for t in (b, l) if t is not None and t["diverged"]]})
            if (budget, arm) in summary:  # an arm with no usable run has only unmatched entries
                c = _comparison(budget, arm, base_arm, pairs, summary.get((budget, base_arm)),
                                summary[(budget, arm)], effect)
                c["tuning"] = tuning_summary(list(base.values()) if base_arm else None, list(lrt.values()), n_search)
                c["diverged"] = [diverged_entry(t) for t in [*base.values(), *lrt.values()] if t["diverged"]]
                comparisons.append(c)
    return comparisons, unmatched, notes


def _comparison(budget: str, arm: str, base_arm: str | None, pairs: list[dict], base: dict | None, lrt: dict,
                effect: float = DEFAULT_EFFECT) -> dict:
    icl_keys = sorted({k for p in pairs for k in p["icl"]})
    delta = paired([p["delta"] for p in pairs])
    base_mean = _mean(p["baseline"] for p in pairs) if pairs else (base or {}).get("val_bpb", {}).get("mean")
    call, why = verdict(delta)
    return {
        "budget_id": budget, "arm": arm, "strategy": lrt["strategy"], "baseline_arm": base_arm,
        "view_lrt": lrt["view"], "view_baseline": base["view"] if base else None,
        "n_pairs": len(pairs), "n_lrt": lrt["n"], "n_baseline": base["n"] if base else 0,
        "baseline": _side(base), "lrt": _side(lrt),
        "delta": delta, "relative": paired([p["relative"] for p in pairs]),
        "verdict": call, "verdict_note": why, **power_fields(delta, base_mean, effect),
        "interleave_gap": lrt["interleave_gap"],
        "icl": {k: {"baseline": (base or {}).get("icl", {}).get(k, {}).get("mean"),
                    "lrt": lrt["icl"].get(k, {}).get("mean"),
                    "delta": paired([p["icl"][k] for p in pairs if k in p["icl"]])} for k in icl_keys},
        "pairs": pairs, "compute_multiplier": None, "regime": regime((base or {}).get("tokens_per_param")),
    }


def regime(baseline_tokens_per_param: float | None) -> dict:
    """Whether the baseline trained in the paper's regime (>= 10 tokens per parameter), where the paper makes
    its claim; below it, LRT paying for its ~2x compute with half the tokens decides a compute-matched delta."""
    tpp = baseline_tokens_per_param
    return {"baseline_tokens_per_param": tpp, "paper_tokens_per_param": PAPER_TOKENS_PER_PARAM,
            "in_paper_regime": None if tpp is None else tpp >= PAPER_TOKENS_PER_PARAM}


def tuning_summary(base: list[dict] | None, lrt: list[dict], n_search: int) -> dict:
    """How each side was tuned, from the runs' `tuning` tags (or the search=true tag of a classic search
    sweep); `equal` only when both sides carry the same sampler, trial count and space."""
    b_text, b_sig = _tuning_side(base, n_search) if base is not None else ("no baseline arm", None)
    l_text, l_sig = _tuning_side(lrt, n_search)
    return {"baseline": b_text, "lrt": l_text, "equal": b_sig is not None and b_sig == l_sig}


def _tuning_side(trials: list[dict], n_search: int) -> tuple[str, str | None]:
    """(description, signature of an equal-able tuning or None) for one arm's runs at one budget."""
    tags = [t["tuning"] for t in trials]
    if all(x is None for x in tags):
        if any(t["search"] for t in trials):
            return f"searched by Optuna ({n_search} trials)", None
        return UNTUNED, None
    texts = sorted({_tuning_text(x) for x in tags})
    sigs = {_tuning_signature(x) for x in tags}
    if len(sigs) > 1 or None in sigs:  # runs of one arm tuned differently (or some not at all)
        return "mixed: " + " / ".join(texts), None
    return texts[0], sigs.pop()


UNTUNED = "untuned (spec defaults)"


def _tuning_signature(tag: dict | None) -> str | None:
    if tag is None or "unreadable" in tag:
        return None
    return json.dumps([tag.get("sampler"), tag.get("trials"), sorted(map(str, tag.get("space") or []))])


def _tuning_text(tag: dict | None) -> str:
    if tag is None:
        return UNTUNED
    if "unreadable" in tag:
        return f"unreadable tuning tag {tag['unreadable'][:40]!r}"
    space = ", ".join(map(str, tag.get("space") or [])) or "an unnamed space"
    return f"{tag.get('sampler', '?')} {tag.get('trials', '?')} trials over {space}"


def _side(a: dict | None) -> dict | None:
    if a is None:
        return None
    return {k: a[k] for k in ("arm", "view", "n", "val_bpb", "flops", "tokens", "params", "tokens_per_param")}


def _scaling(arms: list[dict]) -> dict:
    out = {}
    for name in sorted({a["arm"] for a in arms}):
        pts = sorted(((a["flops"], a["val_bpb"]["mean"], a["budget_id"]) for a in arms
                      if a["arm"] == name and a["flops"]), key=lambda p: p[0])
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        entry = {"points": [{"budget_id": b, "flops": c, "val_bpb": l} for c, l, b in pts], "fit": fit}
        if fit is None:
            entry["note"] = f"no power-law fit: needs >= 3 budgets with different FLOPs (has {len(pts)})"
        out[name] = entry
    return out


# ---------------------------------------------------------------------------
# Search sweeps: history and importances


def search_summary(data: dict, trials: list[dict]) -> dict:
    runs = {r["run_id"]: r for r in data["trials"]}
    # only the Optuna trials: the baseline reference trials of a search sweep are not candidates
    trials = [t for t in trials if t["search"]] or trials
    order = sorted(trials, key=lambda t: (_int(t["trial_number"]), t["start_time"] or 0))
    history, best = [], None
    for i, t in enumerate(order):
        v = t["val_bpb"] if t["problem"] is None else None
        best = v if v is not None and (best is None or v < best) else best
        history.append({"order": i, "run_id": t["run_id"], "name": t["name"], "arm": t["arm"],
                        "status": t["status"], "diverged": t["diverged"], "val_bpb": v, "best_so_far": best})
    done = [t for t in order if t["problem"] is None]
    rows = [(_search_params(runs[t["run_id"]]["params"]), t["val_bpb"]) for t in done]
    importance, method = param_importance(rows)
    best_t = min(done, key=lambda t: t["val_bpb"]) if done else None
    warning = None
    if importance and len(rows) < IMPORTANCE_MIN_TRIALS:
        warning = (f"only {len(rows)} finished trials: importances need >= {IMPORTANCE_MIN_TRIALS} to mean "
                   f"anything (PED-ANOVA compares the top 10% with the rest); read them as noise")
    return {"metric": "val_bpb", "direction": "minimize", "history": history, "importance": importance,
            "importance_method": method, "importance_warning": warning,
            "best": None if best_t is None else {"run_id": best_t["run_id"], "name": best_t["name"],
                                                 "val_bpb": best_t["val_bpb"],
                                                 "params": {k: _typed(v) for k, v in
                                                            _search_params(runs[best_t["run_id"]]["params"]).items()}}}


def _int(x) -> float:
    try:
        return int(x)
    except (TypeError, ValueError):
        return math.inf


def _search_params(params: dict) -> dict:
    """The sampled values (search.*) if logged, else the config (trial.* and run-only keys left out)."""
    sampled = {k[len("search."):]: v for k, v in params.items() if k.startswith("search.")}
    if sampled:
        return sampled
    return {k: v for k, v in params.items()
            if not k.startswith("trial.") and k.rsplit(".", 1)[-1] not in _NON_SEARCH_PARAMS}


def _typed(v: str):
    """An MLflow param (always a string) back as the value the spec gave: bool, int, float, None or str."""
    if v in ("True", "False"):
        return v == "True"
    if v == "None":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _parse(v: str):
    try:
        return float(v) if v not in ("True", "False", "None", "nan") else v
    except ValueError:
        return v


def param_importance(rows: list[tuple[dict, float]]) -> tuple[dict, str]:
    """{param: importance} over params that vary; Optuna's fANOVA, else a correlation fallback."""
    if len(rows) < 2:
        return {}, f"none: needs >= 2 finished trials (has {len(rows)})"
    cols = defaultdict(list)
    for params, _ in rows:
        for k in params:
            cols[k]
    values = {k: [_parse(p.get(k, "None")) for p, _ in rows] for k in cols}
    varying = {k: v for k, v in values.items() if len({str(x) for x in v}) > 1}
    if not varying:
        return {}, "none: no parameter varies across the finished trials"
    y = [v for _, v in rows]
    try:
        return _optuna_importance(varying, y), "optuna PED-ANOVA (as optuna-dashboard) on a study rebuilt from the runs"
    except Exception as e:  # too few trials for the evaluator, odd distributions, optuna missing
        method = "correlation fallback (|rank corr| / correlation ratio, normalised)"
        return _correlation_importance(varying, y), f"{method}; optuna failed: {type(e).__name__}"


def _optuna_importance(cols: dict, y: list[float]) -> dict:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists, cast = {}, {}
    for k, v in cols.items():
        if all(isinstance(x, float) for x in v):
            lo, hi = min(v), max(v)
            if all(x.is_integer() for x in v):
                dists[k], cast[k] = IntDistribution(int(lo), int(hi)), int
            else:
                dists[k], cast[k] = FloatDistribution(lo, hi), float
        else:
            dists[k], cast[k] = CategoricalDistribution(sorted({str(x) for x in v})), str
    study = optuna.create_study(direction="minimize")
    for i, value in enumerate(y):
        params = {k: cast[k](cols[k][i]) for k in cols}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    # PED-ANOVA with its defaults: what optuna-dashboard shows, so the two never disagree (deterministic;
    # it needs IMPORTANCE_MIN_TRIALS trials to populate its top-10% quantile, hence the warning)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}


def _ranks(x) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x, float), kind="stable"), kind="stable").astype(float)


def _correlation_importance(cols: dict, y: list[float]) -> dict:
    yy = np.asarray(y, float)
    raw = {}
    for k, v in cols.items():
        if all(isinstance(x, float) for x in v):
            a, b = _ranks(v), _ranks(yy)
            raw[k] = abs(float(np.corrcoef(a, b)[0, 1])) if a.std() > 0 and b.std() > 0 else 0.0
        else:  # correlation ratio: share of the spread of y explained by the category
            total = float(((yy - yy.mean()) ** 2).sum())
            between = sum(len(g) * (g.mean() - yy.mean()) ** 2
                          for g in (yy[[str(x) == c for x in v]] for c in {str(x) for x in v}))
            raw[k] = math.sqrt(between / total) if total > 0 else 0.0
    s = sum(raw.values())
    return dict(sorted(((k, v / s if s > 0 else 0.0) for k, v in raw.items()), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------
# Rendering


def _f(x, nd: int = 4, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _pm(s: dict | None, nd: int = 4) -> str:
    if not s or s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}" if s["std"] is not None else f"{s['mean']:.{nd}f} (n=1)"


def _with_ci(p: dict, scale: float = 1.0, nd: int = 4, unit: str = "") -> str:
    if p["mean"] is None:
        return "n/a"
    ci = p["ci95"]
    inner = f"{ci[0] * scale:+.{nd}f}{unit}, {ci[1] * scale:+.{nd}f}{unit}" if ci else f"CI undefined, n={p['n']}"
    return f"{p['mean'] * scale:+.{nd}f}{unit} [{inner}]"


def _mult(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    return f"{m['value']:.3g}x" + ("*" if m.get("extrapolated") else "")


def _mde(c: dict) -> str:
    if c.get("mde") is None:
        return "n/a"
    rel = f" ({c['mde_relative'] * 100:.2f}%)" if c.get("mde_relative") is not None else ""
    return f"{c['mde']:.4f}{rel}"


def _seeds(c: dict) -> str:
    if c.get("seeds_needed") is not None:
        return str(c["seeds_needed"])
    return f">{MAX_SEEDS}" if "more than" in (c.get("seeds_note") or "") else "n/a"


def _effect_pct(report: dict) -> str:
    return f"{report.get('power', {}).get('effect_relative', DEFAULT_EFFECT) * 100:g}%"


def _seeds_label(report: dict) -> str:
    return f"seeds for {_effect_pct(report)}"


def _icl_keys(report: dict) -> list[str]:
    return sorted({k for a in report["arms"] for k in a["icl"]})


HEADLINE_ICL = re.compile(r"^icl_(score|core|[a-z]+_acc)$")  # main view, averaged over k


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """One row per (budget, arm): the baseline first, then its LRT arms with their paired deltas.
    ICL: the headline columns only (score, per-task accuracy over k, CORE); json/csv carry every key."""
    icl = [k for k in _icl_keys(report) if HEADLINE_ICL.match(k)]
    header = ["budget", "arm", "view", "n", "val_bpb mean ± std", "Δ vs baseline [95% CI]", "Δ% [95% CI]",
              "pairs", "verdict", "MDE (80%)", _seeds_label(report), "FLOPs", "tokens", "params", "tok/param",
              "interleave gap", "compute x"] + icl
    comps = {(c["budget_id"], c["arm"]): c for c in report["comparisons"]}
    diverged = _diverged_by_arm(report)
    rows = []
    for a in _arm_rows(report):
        c = comps.get((a["budget_id"], a["arm"]))
        n_div = len(diverged.get((a["budget_id"], a["arm"]), []))
        if a["n"] == 0:  # every seed of this arm diverged: a row that says so, nothing to compare
            rows.append([a["budget_id"], a["arm"], "", f"0 (+{n_div} diverged)", "all diverged"]
                        + [""] * (len(header) - 5))
            continue
        rows.append([
            a["budget_id"], a["arm"], a["view"], str(a["n"]) + (f" (+{n_div} diverged)" if n_div else ""),
            _pm(a["val_bpb"]),
            _with_ci(c["delta"]) if c else "", _with_ci(c["relative"], 100, 2, "%") if c else "",
            str(c["n_pairs"]) if c else "", c["verdict"] if c else "", _mde(c) if c else "",
            _seeds(c) if c else "", f"{a['flops']:.3g}" if a["flops"] else "n/a", si(a["tokens"]),
            si(a["params"], 4), si(a["tokens_per_param"]), _pm(a["interleave_gap"]) if a["lrt"] else "",
            _mult(c["compute_multiplier"]) if c else "",
        ] + [_pm(a["icl"].get(k)) for k in icl])
    return header, rows


def _diverged_by_arm(report: dict) -> dict:
    """(budget_id, arm) -> the grid trials of that arm that diverged (tuning trials are never rows)."""
    out = defaultdict(list)
    for d in report.get("diverged", []):
        if not d.get("tuning_trial"):
            out[(d["budget_id"], d["arm"])].append(d)
    return out


def _arm_rows(report: dict) -> list[dict]:
    """The arms in table order, plus a stub (n = 0) for each arm whose every run diverged."""
    have = {(a["budget_id"], a["arm"]) for a in report["arms"]}
    stubs = [{"budget_id": b, "arm": arm, "n": 0} for (b, arm) in _diverged_by_arm(report) if (b, arm) not in have]
    if not stubs:
        return report["arms"]
    budgets = report["budgets"]
    key = lambda a: (budgets.index(a["budget_id"]) if a["budget_id"] in budgets else len(budgets),  # noqa: E731
                     a["arm"] != "baseline", a["arm"])
    return sorted(report["arms"] + stubs, key=key)


def _seed_list(entries: list[dict]) -> str:
    return ", ".join(f"{d['arm']} seed {d['seed']} at step {d['step'] if d['step'] is not None else '?'}"
                     for d in entries)


def _diverged_notes(report: dict) -> list[str]:
    lines = []
    for c in report["comparisons"]:
        if c.get("diverged"):
            lines.append(f"WARNING diverged {c['budget_id']}/{c['arm']}: {_seed_list(c['diverged'])}; the verdict "
                         f"covers only the {c['n_pairs']} pair(s) where both arms trained")
    have = {(a["budget_id"], a["arm"]) for a in report["arms"]}
    for (b, arm), entries in _diverged_by_arm(report).items():
        if (b, arm) not in have:
            lines.append(f"WARNING diverged {b}/{arm}: every run of the arm diverged ({_seed_list(entries)}); "
                         "nothing to compare")
    told = {d["run_id"] for u in report["unmatched"] for d in u.get("diverged", [])}
    for d in report.get("diverged", []):
        if d["run_id"] in told:  # its unmatched line already gives the reason
            continue
        what = "diverged (tuning trial)" if d.get("tuning_trial") else "diverged"
        lines.append(f"{what}: {d['name']} ({d['arm']}, budget {d['budget_id']}, seed {d['seed']}): {d['reason']}")
    return lines


def _notes(report: dict) -> list[str]:
    lines = [f"views: LRT rows use the {report['views']['lrt']} bpb (true recurrence, as decoded), baseline rows "
             f"the {report['views']['baseline']}-pass bpb. Δ = LRT - baseline paired by pair_id; 95% CI from the "
             "t-distribution over paired differences. interleave gap = merged - sequential bpb.",
             "compute x = baseline FLOPs needed to reach the LRT loss / LRT FLOPs (* = extrapolated beyond the "
             "baseline's measured FLOPs).",
             f"verdict: lrt_better if the 95% CI of Δ lies below 0, lrt_worse if above, else no_conclusion. "
             f"MDE (80%) = the |Δ| detected with 80% power at this n; {_seeds_label(report)} = paired seeds "
             f"for 80% power at a {_effect_pct(report)} effect (x the baseline mean bpb); both from a "
             f"two-sided paired t-test at alpha {ALPHA:g} with the observed sd of the paired differences "
             "(noncentral t, exact)."]
    for arm, s in report["scaling"].items():
        fit = s["fit"]
        if fit is None:
            lines.append(f"scaling {arm}: {s['note']}")
        else:
            lines.append(f"scaling {arm}: L(C) = {fit['E']:.4f} + {fit['A']:.4g} * C^-{fit['alpha']:.4f} "
                         f"(rmse {fit['rmse']:.2g}, {fit['n_points']} budgets)"
                         + (f"; {fit['note']}" if fit.get("note") else ""))
    for c in report["comparisons"]:
        lines.append(_tuning_line(c))
        r = c.get("regime") or {}
        if r.get("in_paper_regime") is False:
            lines.append(f"WARNING regime {c['budget_id']}/{c['arm']}: the baseline trained on "
                         f"{r['baseline_tokens_per_param']:.2g} tokens per parameter, below the paper's "
                         f"{r['paper_tokens_per_param']:g}; there paying for LRT's ~2x compute with half the tokens "
                         "decides a compute-matched delta more than the method does")
    for c in report["comparisons"]:
        m = c["compute_multiplier"] or {}
        if m.get("note") or m.get("method") == "log_linear":
            lines.append(f"compute x {c['budget_id']}/{c['arm']}: {m.get('method')} {m.get('note', '')}".rstrip())
    lines += [f"note: {n}" for n in report["notes"]]
    for u in report["unmatched"]:
        lines.append(f"unmatched: budget {u['budget_id']} arm {u['arm']} pair {u['pair_id']} "
                     f"(seed {u['seed']}): {u['reason']}")
    lines += _diverged_notes(report)
    for e in report["excluded"]:
        if not e.get("diverged"):  # a diverged run has its own line above
            lines.append(f"excluded: {e['name']} ({e['arm']}, budget {e['budget_id']}, seed {e['seed']}): "
                         f"{e['problem']}")
    s = report.get("search")
    if s:
        if s["best"]:
            lines.append(f"search: best val_bpb {s['best']['val_bpb']:.4f} ({s['best']['name']}) {s['best']['params']}")
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(s["importance"].items())[:5])
        lines.append(f"search importance ({s['importance_method']}): {top or 'n/a'}")
        if s.get("importance_warning"):
            lines.append(f"WARNING: search importance: {s['importance_warning']}")
    lines += [f"plot: {p}" for p in report.get("plots", [])]
    if report.get("ui_url"):
        lines.append(f"MLflow runs table: {report['ui_url']}")
    return lines


def _tuning_line(c: dict) -> str:
    t = c.get("tuning") or {"baseline": "?", "lrt": "?", "equal": False}
    where = f"tuning {c['budget_id']}/{c['arm']}: baseline {t['baseline']}; {c['arm']}"
    if t["equal"]:
        return f"{where} the same (equal)"
    untuned = t["baseline"] == t["lrt"] == UNTUNED
    why = ("neither arm was tuned, so the delta holds at the spec's defaults only" if untuned
           else "unequal tuning, so the delta mixes architecture and tuning effort")
    return f"WARNING {where} {t['lrt']}; {why}"


def _title(report: dict) -> str:
    c = report["counts"]
    return (f"experiment {report['experiment']} | sweep {report['sweep_name']} ({report['sweep_run_id']}, "
            f"{report['sweep_status']}) | {c['trials']} trials, {c['usable']} usable, {c['excluded']} excluded"
            + (f" ({c['diverged']} diverged)" if c.get("diverged") else "") + f", {c['unmatched']} unmatched pairs")


def format_report(report: dict, fmt: str = "table") -> str:
    """Render a report as table | markdown | html | csv | json."""
    if fmt == "json":
        return json.dumps(_json_safe(report), indent=2)
    if fmt == "csv":
        return _csv(report)
    header, rows = table_rows(report)
    if fmt == "markdown":
        lines = [f"**{_title(report)}**", ""] + markdown_table(header, rows)
        return "\n".join(lines + [""] + [f"- {n}" for n in _notes(report)])
    if fmt == "html":
        return _html(report, header, rows)
    if fmt != "table":
        raise ValueError(f"format={fmt!r}; use table, markdown, html, csv or json")
    out = [_title(report)] + text_table(header, rows)
    if not rows:
        out.append("(no usable trials)")
    return "\n".join(out + [""] + _notes(report))


def _html(report: dict, header: list[str], rows: list[list[str]]) -> str:
    """A standalone page (MLflow's artifact view shows .html files): the title, the table, the notes."""
    esc = html.escape
    notes = "".join(f"<li>{esc(n)}</li>" for n in _notes(report))
    style = ("body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse} "
             "th,td{border:1px solid #ccc;padding:3px 6px;text-align:left} th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report['experiment'])}</title>"
            f"<style>{style}</style></head><body><h3>{esc(_title(report))}</h3>"
            f"{html_table(header, rows)}<ul>{notes}</ul></body></html>\n")


def _csv(report: dict) -> str:
    icl = _icl_keys(report)
    cols = ["budget_id", "arm", "strategy", "view", "n", "val_bpb_mean", "val_bpb_std", "n_pairs", "delta_mean",
            "delta_ci_low", "delta_ci_high", "relative_mean", "relative_ci_low", "relative_ci_high", "verdict", "mde",
            "mde_relative", "seeds_needed", "flops",
            "tokens", "params", "tokens_per_param", "interleave_gap_mean", "compute_multiplier",
            "compute_multiplier_method", "compute_multiplier_extrapolated"] + [f"{k}_mean" for k in icl] + [
            "unmatched", "n_diverged", "diverged"]
    comps = {(c["budget_id"], c["arm"]): c for c in report["comparisons"]}
    diverged = _diverged_by_arm(report)
    rows = []
    for a in _arm_rows(report):
        c = comps.get((a["budget_id"], a["arm"]))
        div = diverged.get((a["budget_id"], a["arm"]), [])
        un = [u["reason"] for u in report["unmatched"] if u["budget_id"] == a["budget_id"] and u["arm"] == a["arm"]]
        if a["n"] == 0:  # every run of this arm diverged
            rows.append([a["budget_id"], a["arm"]] + [""] * 2 + [0] + [""] * (len(cols) - 8)
                        + [" | ".join(un), len(div), " | ".join(d["reason"] for d in div)])
            continue
        d, r = (c["delta"], c["relative"]) if c else ({"mean": None, "ci95": None}, {"mean": None, "ci95": None})
        m = (c or {}).get("compute_multiplier") or {}
        rows.append([a["budget_id"], a["arm"], a["strategy"], a["view"], a["n"],
                     a["val_bpb"]["mean"], a["val_bpb"]["std"],
                     c["n_pairs"] if c else "", d["mean"], *(d["ci95"] or ["", ""]), r["mean"], *(r["ci95"] or ["", ""]),
                     *[(c or {}).get(k) for k in ("verdict", "mde", "mde_relative", "seeds_needed")],
                     a["flops"], a["tokens"], a["params"], a["tokens_per_param"],
                     (a["interleave_gap"] or {}).get("mean"), m.get("value"), m.get("method"), m.get("extrapolated"),
                     *[(a["icl"].get(k) or {}).get("mean") for k in icl], " | ".join(un),
                     len(div), " | ".join(d["reason"] for d in div)])
    return csv_text(cols, rows)


def to_json(report: dict) -> dict:
    """The report as `--format json` writes it (NaN/inf -> null), e.g. for `Tracker.log_sweep_summary`."""
    return _json_safe(report)


def _json_safe(x):
    """NaN and inf are not JSON; they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrt_platform.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None,
                   help="a sweep spec: its experiment and tracking URI (instead of --experiment)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (the sweep spec's experiment)")
    p.add_argument("--sweep", default=None, help="sweep (parent) run id; default: the experiment's latest sweep")
    p.add_argument("--format", choices=["table", "markdown", "html", "csv", "json"], default="table")
    p.add_argument("--plots", default=None, help="directory for PNG plots (also logged to the sweep run)")
    p.add_argument("--tracking-uri", default=None,
                   help="default: the spec's tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--effect", type=float, default=DEFAULT_EFFECT,
                   help="relative bpb effect the 'seeds for' column is sized for (default 0.02 = 2%%)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.effect < 1:
        print(f"error: --effect={args.effect:g}: give a relative effect in (0, 1), e.g. 0.02 for 2%", file=sys.stderr)
        return 2
    for name in ("mlflow", "alembic"):  # keep stdout/stderr to the report or one error line
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.spec:
        from .spec import SpecError, load_spec

        try:
            spec = load_spec(args.spec)
        except SpecError as e:
            print(f"error: {e}".splitlines()[0], file=sys.stderr)
            return 2
        args.experiment = args.experiment or spec.experiment_name
        args.tracking_uri = args.tracking_uri or spec.tracking.uri
    if not args.experiment:
        print("error: give a sweep spec (python -m lrt_platform.compare SPEC.yaml) or --experiment NAME",
              file=sys.stderr)
        return 2
    try:
        tracker = Tracker(args.tracking_uri, args.experiment)
        report = build_report(tracker.load_sweep(args.sweep), args.effect)
        if args.plots:
            from .plots import make_plots

            report["plots"] = make_plots(report, args.plots, load_curves(tracker, report))
            try:
                tracker.log_artifacts(report["sweep_run_id"], args.plots, "plots")
            except TrackingError as e:  # the PNGs are on disk; say the upload failed, keep the report
                print(f"warning: plots not logged to the sweep run: {e}".splitlines()[0], file=sys.stderr)
    except TrackingError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    print(format_report(report, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
