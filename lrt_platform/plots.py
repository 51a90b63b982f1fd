"""PNG plots of a compare report (matplotlib, Agg backend).

Design choices:
- Input is the report dict from `compare.build_report`, so plots show exactly
  the numbers the table shows (same views, same pairs, same fits).
- Object-oriented matplotlib (`Figure` + Agg canvas), never `pyplot`: no global
  figure state, no GUI backend, safe in Ray workers and threads.
- Which plots: paired_difference.png always (per budget and LRT arm, each
  seed's paired delta, their mean and 95% CI, and the zero line: the verdict's
  evidence, readable with one budget); scaling.png (bpb vs training FLOPs per
  arm, log x, each LRT mean labelled with its effective compute multiplier
  when there is one; a fitted power law only where the report has a fit, i.e.
  >= 3 budgets) and delta_vs_tokens_per_param.png (paired delta with its 95%
  CI per LRT arm) only with >= 2 budgets: through one budget they would
  suggest a trend that was never measured; loss_curves.png when the caller
  passes the runs' eval histories (`curves`, from `compare.load_curves`):
  val bpb in each run's headline view against training FLOPs and against
  tokens, baseline and LRT overlaid; search sweeps add search_history.png
  (val bpb in trial order with the best-so-far line) and
  search_importance.png (parameter importances; the title names the method).
  A plot with nothing to draw says so in the image instead of going missing.
- Log x axes label decades only (minor ticks unlabelled) and span at least
  1.2 decades, so one budget, or budgets close together, get one or two
  readable labels instead of crowded minor ones. Axis labels promise only what
  is drawn (the multiplier legend only when a multiplier is drawn).
- `*_figure` functions return the Figure, so tests can inspect artists and
  tick labels; the plot_* functions save them.

Example:
    from lrt_platform.compare import compare
    from lrt_platform.plots import make_plots
    paths = make_plots(compare(None, "quickstart"), "plots/")
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # headless machines and Ray workers have no display
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402

from .scaling import power_law  # noqa: E402


def _figure(w: float = 7.0, h: float = 4.5):
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


MIN_DECADES = 1.2  # any interval this wide holds a power of 10: at least one labelled tick


def _log_x(ax, xs) -> None:
    """Log x axis with decade labels only and at least MIN_DECADES of range (see the module docstring)."""
    ax.set_xscale("log")
    xs = [x for x in xs if x and x > 0]
    if xs:
        lo, hi = min(xs), max(xs)
        span = math.log10(hi / lo)
        if span < MIN_DECADES:
            pad = 10 ** ((MIN_DECADES - span) / 2)
            ax.set_xlim(lo / pad, hi * pad)
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_x_axes(ax, drawn: bool, xs, xlabel: str, ylabel: str, empty: str) -> None:
    """A drawn plot's log x axis (`_log_x`), axis labels and legend; otherwise the `empty` note."""
    if not drawn:
        _no_data(ax, empty)
        return
    _log_x(ax, xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def make_plots(report: dict, out_dir: str, curves: dict | None = None) -> list[str]:
    """Write the report's PNGs into out_dir (which ones: the module docstring); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [_save(paired_figure(report), out_dir, "paired_difference.png")]
    if len(_budgets_with_means(report)) >= 2:
        paths += [plot_scaling(report, out_dir), plot_delta(report, out_dir)]
    if curves is not None:
        paths.append(_save(curves_figure(report, curves), out_dir, "loss_curves.png"))
    if report.get("search"):
        paths += [plot_search_history(report, out_dir), plot_importance(report, out_dir)]
    return paths


def _delta_label(report: dict) -> str:
    return f"Δ bpb (LRT {report['views']['lrt']} - baseline {report['views']['baseline']})"


def _budgets_with_means(report: dict) -> set:
    return {p["budget_id"] for s in report["scaling"].values() for p in s["points"]}


def paired_figure(report: dict) -> Figure:
    """Per (budget, LRT arm): each seed's paired delta (dots), their mean (diamond) with its 95% CI, zero line."""
    comps = [c for c in report["comparisons"] if c["n_pairs"]]
    fig, ax = _figure(max(4.5, 1.2 * len(comps) + 2.5), 4.5)
    if not comps:
        _no_data(ax, "no matched baseline/LRT pairs")
        ax.set_title("paired difference per seed", fontsize=9)
        return fig
    colors = {"lrt_better": "C2", "lrt_worse": "C3"}
    for i, c in enumerate(comps):
        ds = [p["delta"] for p in c["pairs"]]
        jitter = np.linspace(-0.12, 0.12, len(ds)) if len(ds) > 1 else [0.0]
        ax.scatter([i + j for j in jitter], ds, color="grey", s=16, alpha=0.7, zorder=3)
        mean, ci = c["delta"]["mean"], c["delta"]["ci95"]
        color = colors.get(c["verdict"], "C0")
        if ci:
            ax.errorbar([i + 0.3], [mean], yerr=[[mean - ci[0]], [ci[1] - mean]], fmt="D", color=color, capsize=4)
        else:
            ax.plot([i + 0.3], [mean], "D", color=color)
        ax.annotate(c["verdict"], (i + 0.3, mean), textcoords="offset points", xytext=(6, 0), fontsize=7,
                    va="center", color=color)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(comps)))
    ax.set_xticklabels([f"{c['arm']}\n{c['budget_id']}" for c in comps], fontsize=7)
    ax.set_xlim(-0.6, len(comps) - 0.1)
    ax.set_xlabel("LRT arm and budget")
    ax.set_ylabel(_delta_label(report))
    ax.set_title("paired difference per seed (dots), mean and 95% CI (diamond)\nbelow 0: LRT better", fontsize=9)
    return fig


def run_curve_figure(trial: dict, curve: dict) -> Figure:
    """One run's val bpb (its headline view) against the optimiser step, tokens on a top axis: the
    child run's own loss_curve.png."""
    fig, ax = _figure(6.0, 3.8)
    if curve["step"]:
        ax.plot(curve["step"], curve["val_bpb"], "o-", ms=3)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"validation bpb ({trial['view']})")
        if curve["step"][-1] and curve["tokens"][-1]:
            per_step = curve["tokens"][-1] / curve["step"][-1]
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
            top.set_xlabel("training tokens")
    else:
        _no_data(ax, "no evaluations")
    ax.set_title(f"{trial['name']} ({trial['arm']}, seed {trial['seed']})", fontsize=9)
    return fig


def plot_run_curve(trial: dict, curve: dict, out_dir: str) -> str:
    return _save(run_curve_figure(trial, curve), out_dir, "loss_curve.png")


def curves_figure(report: dict, curves: dict) -> Figure:
    """Val bpb in each run's headline view against training FLOPs (left) and tokens (right), one line per
    usable run, one colour per arm, so the arms' learning curves overlay at equal compute and equal data."""
    fig = Figure(figsize=(10.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, i) for i in (1, 2)]
    colors = matplotlib.colormaps["tab10"]
    arms = sorted({t["arm"] for t in report["trials"] if t["run_id"] in curves})
    for ax, x_key, label in ((axes[0], "flops", "training FLOPs"), (axes[1], "tokens", "training tokens")):
        xs = []
        for i, arm in enumerate(arms):
            runs = [t for t in report["trials"] if t["arm"] == arm and t["run_id"] in curves]
            for j, t in enumerate(runs):
                c = curves[t["run_id"]]
                pts = [(x, y) for x, y in zip(c[x_key], c["val_bpb"]) if x and x > 0]
                if pts:
                    xs += [x for x, _ in pts]
                    ax.plot(*zip(*pts), "-", color=colors(i % 10), lw=1, alpha=0.8,
                            label=f"{arm} ({t['view']})" if j == 0 else None)
        _log_x_axes(ax, bool(xs), xs, label, "validation bpb (headline view)", "no eval histories")
    fig.suptitle(f"{report['experiment']}: validation bpb during training (one line per run)", fontsize=9)
    return fig


def plot_scaling(report: dict, out_dir: str) -> str:
    return _save(scaling_figure(report), out_dir, "scaling.png")


def scaling_figure(report: dict) -> Figure:
    fig, ax = _figure()
    colors = matplotlib.colormaps["tab10"]
    xs = []  # non-empty once an arm's means are drawn
    for i, (arm, s) in enumerate(sorted(report["scaling"].items())):
        color = colors(i % 10)
        seeds = [t for t in report["trials"] if t["arm"] == arm and t["problem"] is None and t["flops"]]
        ax.scatter([t["flops"] for t in seeds], [t["val_bpb"] for t in seeds], color=color, alpha=0.35, s=14)
        pts = s["points"]
        if not pts:
            continue
        xs += [p["flops"] for p in pts] + [t["flops"] for t in seeds]
        view = next((t["view"] for t in seeds), "")
        ax.plot([p["flops"] for p in pts], [p["val_bpb"] for p in pts], "o", color=color, label=f"{arm} ({view})")
        fit = s["fit"]
        if fit is not None and fit["ok"]:  # a fit exists only with >= 3 budgets
            c = np.geomspace(min(p["flops"] for p in pts), max(p["flops"] for p in pts), 100)
            ax.plot(c, power_law(fit, c), "--", color=color,
                    label=f"{arm} fit: {fit['E']:.3f} + A·C^-{fit['alpha']:.3f}")
    mults = [(c, c["compute_multiplier"]) for c in report["comparisons"]
             if (c.get("compute_multiplier") or {}).get("value") is not None]
    for c, m in mults:  # the effective compute multiplier next to each LRT mean
        ax.annotate(f"{m['value']:.2g}x" + ("*" if m.get("extrapolated") else ""),
                    (c["lrt"]["flops"], c["lrt"]["val_bpb"]["mean"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    star = ", * extrapolated" if any(m.get("extrapolated") for _, m in mults) else ""
    xlabel = "training FLOPs" + (f" (LRT labels: baseline compute multiplier{star})" if mults else "")
    _log_x_axes(ax, bool(xs), xs, xlabel, "validation bpb", "no finished trials with FLOPs")
    ax.set_title(f"{report['experiment']}: bpb vs compute (dots: seeds, markers: means)", fontsize=9)
    return fig


def plot_delta(report: dict, out_dir: str) -> str:
    return _save(delta_figure(report), out_dir, "delta_vs_tokens_per_param.png")


def delta_figure(report: dict) -> Figure:
    fig, ax = _figure()
    colors = matplotlib.colormaps["tab10"]
    arms = sorted({c["arm"] for c in report["comparisons"] if c["n_pairs"]})
    xs = []
    for i, arm in enumerate(arms):
        cs = [c for c in report["comparisons"] if c["arm"] == arm and c["n_pairs"] and c["lrt"]["tokens_per_param"]]
        x = np.array([c["lrt"]["tokens_per_param"] for c in cs])
        xs += list(x)
        y = np.array([c["delta"]["mean"] for c in cs])
        err = np.array([[y[j] - c["delta"]["ci95"][0], c["delta"]["ci95"][1] - y[j]] if c["delta"]["ci95"] else [0, 0]
                        for j, c in enumerate(cs)]).T.reshape(2, -1)
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, color=colors(i % 10), label=arm)
    if arms:
        ax.axhline(0.0, color="grey", lw=0.8)
    _log_x_axes(ax, bool(arms), xs, "LRT tokens per parameter", _delta_label(report), "no matched baseline/LRT pairs")
    ax.set_title("paired delta vs tokens per parameter (bars: 95% CI; none for n=1)", fontsize=9)
    return fig


def plot_search_history(report: dict, out_dir: str) -> str:
    return _save(search_history_figure(report), out_dir, "search_history.png")


def search_history_figure(report: dict) -> Figure:
    fig, ax = _figure()
    hist = report["search"]["history"]
    ok = [h for h in hist if h["val_bpb"] is not None]
    if ok:
        ax.plot([h["order"] for h in ok], [h["val_bpb"] for h in ok], "o", alpha=0.7, label="trial")
        best = [h for h in hist if h["best_so_far"] is not None]
        ax.step([h["order"] for h in best], [h["best_so_far"] for h in best], where="post", color="C3",
                label="best so far")
        failed = [h["order"] for h in hist if h["val_bpb"] is None]
        if failed:
            ax.plot(failed, [max(h["val_bpb"] for h in ok)] * len(failed), "x", color="grey", label="failed/incomplete")
        ax.set_xlabel("trial (in order)")
        ax.set_ylabel("validation bpb")
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no finished search trials")
    ax.set_title("optimisation history", fontsize=9)
    return fig


def plot_importance(report: dict, out_dir: str) -> str:
    return _save(importance_figure(report), out_dir, "search_importance.png")


def importance_figure(report: dict) -> Figure:
    s = report["search"]
    items = sorted(s["importance"].items(), key=lambda kv: kv[1])
    fig, ax = _figure(7.0, max(2.5, 0.35 * len(items) + 1.5))
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items], color="C0")
        ax.set_xlabel("importance (sums to 1)")
    else:
        _no_data(ax, s["importance_method"])
    ax.set_title(f"parameter importance: {s['importance_method'].split(';')[0]}", fontsize=8)
    return fig
