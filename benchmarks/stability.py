"""Training stability: N seeds of one configuration, their spread and the largest eval-to-eval rise.

A comparison can only resolve an effect larger than the seed-to-seed spread of
its arms, and a loss spike between evaluations says the learning rates are too
high for the batch. This benchmark trains each arm with every seed through the
one training loop (`lrt_model.train.train`) and prints, per arm, in the
headline view (sequential bpb for LRT, what decoding delivers; full-pass bpb
for the baseline):

- `final_val_bpb` per seed, `mean_val_bpb` and `std_val_bpb` (sample std, ddof=1);
- `max_eval_rise`: the largest increase of val bpb from one evaluation to the
  next after warm-up (evaluations at or after the last warm-up step), over all
  seeds, with the seed and step where it happened; 0 when bpb only falls;
- the merged and full views' final values and, for LRT, the interleave gap.

Design choices:
- Seeds run as separate processes, `--jobs` at a time, one torch thread each:
  on a 2-core CPU two single-thread runs of a small model finish sooner than
  two runs in turn with two threads. Results are deterministic per seed either
  way (the tests check a resumed run bit for bit).
- The defaults are the issue's reference configuration: depth 2, width 128
  (4 heads of 32), seq 128, batch 8, 1M tokens, byte tokenizer, stdlib corpus,
  3 seeds, arms `baseline` and `lrt_s2` (interleaved S=2, the paper's LRT
  defaults), the trainer's default optimiser settings unless overridden.
- `--json` prints one JSON document on stdout; progress lines go to stderr.

Example:
    python -m benchmarks.stability --json
    python -m benchmarks.stability --depth 4 --width 256 --head-dim 64 --seq-len 256 --tokens 2e6 --json
    python -m benchmarks.stability --arms baseline --seeds 0 1 2 3 --lr-scale 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.evaluation import headline_view
from lrt_model.optim import OptimConfig, warmup_steps
from lrt_model.train import TrainConfig

ARMS = {
    "baseline": None,
    "lrt_s2": RecurrenceConfig(strategy="interleaved", passes=2),
    "lrt_s4": RecurrenceConfig(strategy="interleaved", passes=4),
    "lrt_k3": RecurrenceConfig(strategy="multi_refine", passes=3),
}
TARGETS = {"std_val_bpb": 0.02, "max_eval_rise": 0.02}
OPTIM_FLAGS = ("lr_scale", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "warmup_frac",
               "warmdown_frac", "reference_batch_tokens")


def _run(cfg_dict: dict) -> dict:
    import torch

    from lrt_model.train import train

    torch.set_num_threads(1)
    return train(TrainConfig.from_dict(cfg_dict))


def run_config(args, arm: str, seed: int) -> TrainConfig:
    model = ModelConfig(depth=args.depth, width=args.width, head_dim=args.head_dim, seq_len=args.seq_len,
                        recurrence=ARMS[arm])
    overrides = {k: getattr(args, k) for k in OPTIM_FLAGS if getattr(args, k) is not None}
    return TrainConfig(model=model, optim=OptimConfig(**overrides), corpus=args.corpus, tokenizer="byte",
                       batch_size=args.batch_size, tokens=int(args.tokens), eval_every=args.eval_every,
                       eval_tokens=args.eval_tokens, seed=seed, device="cpu", progress=False,
                       icl={"evals": []})


def max_rise(evals: list[dict], warmup: int) -> tuple[float, int | None]:
    """Largest val_bpb increase between consecutive evaluations taken at or after `warmup` steps."""
    after = [e for e in evals if e["step"] >= max(warmup, 1)]
    rises = [(b["val_bpb"] - a["val_bpb"], b["step"]) for a, b in zip(after, after[1:])]
    worst = max(rises, default=(0.0, None))
    return (max(worst[0], 0.0), worst[1] if worst[0] > 0 else None)


def summarise(arm: str, runs: dict[int, dict], warmup: int) -> dict:
    seeds = sorted(runs)
    finals = [runs[s]["val_bpb"] for s in seeds]
    rises = {s: max_rise(runs[s]["evals"], warmup) for s in seeds}
    worst_seed = max(seeds, key=lambda s: rises[s][0])
    out = {
        "seeds": seeds, "final_val_bpb": finals, "mean_val_bpb": statistics.fmean(finals),
        "std_val_bpb": statistics.stdev(finals) if len(finals) > 1 else None,
        "max_eval_rise": rises[worst_seed][0],
        "max_eval_rise_at": {"seed": worst_seed, "step": rises[worst_seed][1]},
        "histories": {str(s): [round(e["val_bpb"], 4) for e in runs[s]["evals"]] for s in seeds},
        "eval_steps": [e["step"] for e in runs[seeds[0]]["evals"]],
        "tokens": runs[seeds[0]]["tokens"], "steps": runs[seeds[0]]["steps"],
        "tokens_per_param": runs[seeds[0]]["tokens"] / runs[seeds[0]]["params"],
        "wall_s": [round(runs[s]["wall_s"], 1) for s in seeds],
    }
    for view in ("full", "merged", "sequential"):
        key = f"val_bpb_{view}"
        if key in runs[seeds[0]]:
            out[f"final_{key}"] = [runs[s][key] for s in seeds]
    if "interleave_gap" in runs[seeds[0]]:
        out["interleave_gap"] = [runs[s]["interleave_gap"] for s in seeds]
    out["meets_targets"] = all(out[k] is not None and out[k] <= v for k, v in TARGETS.items())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stability", description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=["baseline", "lrt_s2"], choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=float, default=1e6)
    p.add_argument("--eval-every", type=int, default=0, help="steps; 0 = about 8 evaluations per run")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per evaluation (fixed rows, the same for every seed)")
    p.add_argument("--corpus", default="stdlib")
    for name in OPTIM_FLAGS:
        kind = int if name == "reference_batch_tokens" else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"OptimConfig.{name} (default {getattr(OptimConfig, name)})")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("give at least two --seeds: a spread needs two runs")

    configs = {(arm, s): run_config(args, arm, s) for arm in args.arms for s in args.seeds}
    from lrt_model.data import resolve_corpus
    from lrt_model.tokenizer import get_tokenizer

    get_tokenizer("byte", resolve_corpus(args.corpus))  # build the corpus once, before the workers race for it
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run, c.to_dict()): key for key, c in configs.items()}
        for n, fut in enumerate(as_completed(futures), 1):
            arm, seed = futures[fut]
            m = fut.result()
            results[arm][seed] = m
            print(f"[stability] {n}/{len(futures)} {arm} seed {seed}: val_bpb {m['val_bpb']:.4f} "
                  f"({m['steps']} steps, {m['wall_s']:.0f}s; {time.time() - t0:.0f}s elapsed)", file=sys.stderr,
                  flush=True)
    any_cfg = next(iter(configs.values()))
    total_steps = next(iter(results[args.arms[0]].values()))["total_steps"]
    report = {
        "config": {"depth": args.depth, "width": any_cfg.model.d_model, "head_dim": args.head_dim,
                   "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens": int(args.tokens),
                   "optim": dataclasses.asdict(any_cfg.optim), "corpus": args.corpus},
        "targets": TARGETS,
        "arms": {arm: summarise(arm, results[arm], warmup_steps(total_steps, any_cfg.optim)) for arm in args.arms},
        "views": {"baseline": headline_view(lrt=False), "lrt": headline_view(lrt=True)},
        "wall_s": round(time.time() - t0, 1),
    }
    report["meets_targets"] = all(a["meets_targets"] for a in report["arms"].values())
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for arm, a in report["arms"].items():
            print(f"{arm:10s} val_bpb {a['mean_val_bpb']:.4f} ± {a['std_val_bpb']:.4f} over seeds {a['seeds']}; "
                  f"max eval-to-eval rise {a['max_eval_rise']:.4f} {a['max_eval_rise_at']}; "
                  f"{'meets' if a['meets_targets'] else 'MISSES'} the targets {TARGETS}")
    return 0 if report["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
