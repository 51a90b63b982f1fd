"""LRT vs baseline: training step time, memory and decode speed, side by side.

Design choices:
- Every variant is timed in the same process, in interleaved rounds (one
  iteration of each variant per round), and the median per variant is kept:
  machine noise hits all variants alike, so the *ratios* are trustworthy even
  on a busy 2-core box. Absolute times are printed for context only.
- step = forward + backward + optimiser step (Muon + AdamW as in training);
  fwd_bwd = forward + backward only.
- Memory: on CUDA the peak allocated bytes of one training step (the variant's
  own weights and optimiser states plus the step's rise); on the CPU
  (no allocator statistics) the bytes of tensors saved for backward, the
  activation memory that dominates a step's footprint.
- Decode: steady-state greedy tokens/s of `generate`'s decode step (exact
  recurrence for LRT) after a short prompt, prefill and graph capture
  excluded, at batch 1 and 8 (and 32 on CUDA), for each `--decode-modes`
  entry (auto: a CUDA graph on CUDA, eager on CPU).
- `--eval-modes`: the sequential-view evaluation (exact recurrence over 512
  positions of the batch) timed per decode mode, e.g. eager vs CUDA graph.
- Needs only torch: runs on a GPU box without ray/mlflow/optuna.

Example:
    python -m benchmarks.lrt            # CPU defaults: depth 4, width 256, seq 256, batch 8, vocab 4096
    python -m benchmarks.lrt --json --device cuda --depth 12 --seq-len 2048 --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.decode import DECODE_MODES, decode_step, prefill
from lrt_model.model import KVCache
from lrt_model.flops import training_flops_per_token
from lrt_model.model import GPT
from lrt_model.optim import OptimConfig, build_optimizers
from lrt_model.recurrence import sequential_logits, training_loss
from lrt_model.flops import peak_flops

VARIANTS = {
    "baseline": None,
    "interleaved_s2": dict(strategy="interleaved", passes=2),
    "interleaved_s4": dict(strategy="interleaved", passes=4),
    "multi_refine_k2": dict(strategy="multi_refine", passes=2),
    "interleaved_s2_recompute": dict(strategy="interleaved", passes=2, recompute_mlp=True),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, rec: dict | None, device) -> GPT:
    cfg = ModelConfig(depth=args.depth, width=args.width, head_dim=args.head_dim, seq_len=args.seq_len,
                      vocab_size=args.vocab, recurrence=RecurrenceConfig(**rec) if rec else None)
    torch.manual_seed(0)
    return GPT(cfg).to(device)


class Trainee:
    """One variant's model, optimisers and (optionally compiled) loss function."""

    def __init__(self, args, rec, device):
        self.model = build(args, rec, device)
        self.opts = build_optimizers(self.model, OptimConfig(muon=args.muon), args.batch * args.seq_len)
        self.loss_fn = lambda x, y: training_loss(self.model, x, y)[0]
        if args.compile:
            self.loss_fn = torch.compile(self.loss_fn)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd_bwd(self, x, y):
        with self.autocast:
            loss = self.loss_fn(x, y)
        loss.backward()

    def step(self, x, y):
        self.fwd_bwd(x, y)
        for o in self.opts:
            o.step()
        self.model.zero_grad(set_to_none=True)


def progress(msg: str) -> None:
    """Progress on stderr, so a run cut short by a time limit still tells how far it got."""
    print(f"[benchmarks.lrt] {msg}", file=sys.stderr, flush=True)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def saved_activation_bytes(trainee: Trainee, x, y) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainee.autocast:
        loss = training_loss(trainee.model, x, y)[0]
    loss.backward()
    trainee.model.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_step_bytes(trainee: Trainee, x, y) -> int:
    """One training step's peak device memory for this variant alone: the step's rise
    above what was allocated before it (activations, gradients, temporaries) plus the
    variant's own resident weights and optimiser states. The other variants' models,
    also resident in this process, are left out, so they cannot dilute the ratios."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainee.step(x, y)
    torch.cuda.synchronize()
    own = sum(p.nbytes for p in trainee.model.parameters()) + sum(
        t.nbytes for o in trainee.opts for state in o.state.values() for t in state.values() if torch.is_tensor(t))
    own += sum(b.nbytes for b in trainee.model.buffers())
    return torch.cuda.max_memory_allocated() - before + own


@torch.no_grad()
def decode_tokens_per_s(model: GPT, batch: int, prompt_len: int, new_tokens: int, device, mode: str) -> float:
    """Steady-state greedy decoding through `generate`'s step (`decode_step`): the step (and a
    CUDA graph's capture) is built and the prompt prefilled first, then `new_tokens` steps
    are timed."""
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        step = decode_step(model, batch, prompt_len + 2 + new_tokens, mode)
        logits, memory = prefill(model, prompt, step.cache, "exact", step=step)
        tokens = logits.argmax(-1, keepdim=True)
        state = {"t": prompt_len, "tokens": tokens, "memory": memory}

        def steps(n: int) -> None:
            for _ in range(n):
                hidden, state["memory"] = step(state["tokens"], state["t"], state["memory"])
                state["tokens"] = model.logits(hidden).argmax(-1, keepdim=True)
                state["t"] += 1

        steps(2)  # warm-up
        seconds = timed(lambda: steps(new_tokens), device)
    return batch * new_tokens / seconds


@torch.no_grad()
def sequential_eval_ms(model: GPT, x: torch.Tensor, modes: list, device, max_len: int = 512) -> dict:
    """The sequential-view evaluation's exact recurrence (`sequential_logits`) over the
    batch's first `max_len` positions, per decode mode: the cost of val bpb's main view."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = x[:, :max_len]
    out = {}
    with autocast:
        for mode in modes:
            sequential_logits(model, rows[:, :8], mode)  # warm-up
            out[mode] = 1000 * timed(lambda: sequential_logits(model, rows, mode), device)
    return out


@torch.no_grad()
def prefill_comparison(model: GPT, batch: int, device, passes: int = 2) -> dict:
    """Exact (sequential) vs parallel (multi-refine) prefill of a seq_len prompt:
    speed ratio and how far the parallel cache's next-token logits are from exact."""
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.seq_len), device=device)
    out = {}
    for mode in ("exact", "parallel"):
        cache = KVCache(model.cfg, batch, model.cfg.seq_len)
        logits = []
        seconds = timed(lambda: logits.append(prefill(model, prompt, cache, mode, passes)[0]), device)
        out[mode] = (seconds, logits[0].float())
    exact, parallel = out["exact"][1], out["parallel"][1]
    return {
        "speedup": out["exact"][0] / out["parallel"][0],
        "max_abs_logit_gap": float((exact - parallel).abs().max()),
        "next_token_agreement": float((exact.argmax(-1) == parallel.argmax(-1)).float().mean()),
        "passes": passes,
    }


def write_profile(trainees: dict, x, y, device, path: str) -> None:
    """torch.profiler's table (top ops by device time) for one step of each variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        for name, t in trainees.items():
            with profile(activities=activities) as prof:
                t.step(x, y)
                _sync(device)
            f.write(f"=== {name}: one step\n{prof.key_averages().table(sort_by=sort, row_limit=25)}\n")


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    names = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    trainees = {name: Trainee(args, VARIANTS[name], device) for name in names}
    for name, t in trainees.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            t.step(x, y)
        warm = time.perf_counter() - t0  # then one timed step: a figure even if a later variant's compile runs out of time
        progress(f"{name}: warm-up (compilation included) {warm:.1f}s, then one step {1000 * timed(lambda: t.step(x, y), device):.1f} ms")
    times = {name: {"step": [], "fwd_bwd": []} for name in trainees}
    for _ in range(args.rounds):
        for name, t in trainees.items():
            times[name]["fwd_bwd"].append(timed(lambda: t.fwd_bwd(x, y), device))
            t.model.zero_grad(set_to_none=True)
            times[name]["step"].append(timed(lambda: t.step(x, y), device))
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    progress("median step ms: " + ", ".join(f"{n} {1000 * m['step']:.1f}" for n, m in med.items()))
    if device.type == "cuda":
        memory = {n: peak_step_bytes(t, x, y) for n, t in trainees.items()}
        progress("peak GiB: " + ", ".join(f"{n} {b / 2**30:.2f}" for n, b in memory.items()))
    else:
        memory = {n: saved_activation_bytes(t, x, y) for n, t in trainees.items()}
    base = med["baseline"]
    lrt_names = [n for n in trainees if n != "baseline"]
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in ("depth", "width", "head_dim", "seq_len", "batch", "vocab", "compile",
                                                 "muon")},
        "step_ratio": {n: med[n]["step"] / base["step"] for n in lrt_names},
        "fwd_bwd_ratio": {n: med[n]["fwd_bwd"] / base["fwd_bwd"] for n in lrt_names},
        "flops_ratio": {n: training_flops_per_token(trainees[n].model.cfg) / training_flops_per_token(trainees["baseline"].model.cfg) for n in lrt_names},
        "memory_ratio": {n: memory[n] / memory["baseline"] for n in lrt_names},
        "memory_kind": "peak allocated (CUDA)" if device.type == "cuda" else "saved-for-backward bytes (CPU)",
        "step_ms": {n: 1000 * med[n]["step"] for n in trainees},
        "fwd_bwd_ms": {n: 1000 * med[n]["fwd_bwd"] for n in trainees},
    }
    tokens = args.batch * args.seq_len
    fpt = training_flops_per_token(trainees["baseline"].model.cfg)
    out["baseline_tokens_per_s"] = tokens / base["step"]
    peak = peak_flops(out["device"]) if device.type == "cuda" else None
    if peak:  # per full step (optimiser included, no accumulation) and per forward+backward
        out["baseline_mfu"] = fpt * out["baseline_tokens_per_s"] / peak
        out["baseline_mfu_fwd_bwd"] = fpt * tokens / base["fwd_bwd"] / peak
    if args.profile:
        write_profile(trainees, x, y, device, args.profile)
    if not args.no_decode and "interleaved_s2" in trainees:
        base_model, lrt_model = trainees["baseline"].model.eval(), trainees["interleaved_s2"].model.eval()
        out["decode_tokens_per_s"], out["decode_ratio"] = {}, {}
        batches = (1, 8, 32) if device.type == "cuda" else (1, 8)
        for mode in args.decode_modes.split(","):
            for b in batches:
                rates = {"baseline": [], "lrt": []}
                for _ in range(args.decode_rounds):  # interleaved rounds, median
                    rates["baseline"].append(decode_tokens_per_s(base_model, b, 16, args.decode_tokens, device, mode))
                    rates["lrt"].append(decode_tokens_per_s(lrt_model, b, 16, args.decode_tokens, device, mode))
                r = {k: statistics.median(v) for k, v in rates.items()}
                out["decode_tokens_per_s"][f"{mode}_b{b}"] = r
                out["decode_ratio"][f"{mode}_b{b}"] = r["lrt"] / r["baseline"]
                progress(f"decode {mode} b{b}: {r}")
        out["prefill_parallel_vs_exact"] = prefill_comparison(lrt_model, 8, device)
    if args.eval_modes and "interleaved_s2" in trainees:
        out["sequential_eval_ms"] = sequential_eval_ms(trainees["interleaved_s2"].model.eval(), x, args.eval_modes.split(","),
                                                       device)
        progress(f"sequential-view evaluation ms: {out['sequential_eval_ms']}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lrt", description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=None, help="default depth*64 rounded up to the head dim")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-rounds", type=int, default=3)
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--decode-modes", default="auto", help="comma-separated generate(decode=...) modes: "
                   "auto, eager, static, cuda_graph")
    p.add_argument("--variants", default="interleaved_s2,interleaved_s4,multi_refine_k2",
                   help="comma-separated LRT variants to compare with the baseline")
    p.add_argument("--profile", default=None, metavar="PATH", help="write a profiler table per variant to PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--muon", choices=["auto", "batched", "torch"], default="auto", help="OptimConfig.muon")
    p.add_argument("--eval-modes", default="", help="comma-separated decode modes to time the sequential-view "
                   "evaluation of the S=2 model in (e.g. eager,cuda_graph); empty: skip")
    args = p.parse_args(argv)
    bad = [m for m in args.decode_modes.split(",") if m not in DECODE_MODES]
    if bad:  # checked before any timing, so a typo costs nothing
        p.error(f"--decode-modes: {bad} not known; choose from {', '.join(DECODE_MODES)}")
    bad = [m for m in args.eval_modes.split(",") if m and m not in DECODE_MODES]
    if bad:
        p.error(f"--eval-modes: {bad} not known; choose from {', '.join(DECODE_MODES)}")
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if "cuda_graph" in args.decode_modes.split(",") + args.eval_modes.split(",") and not on_cuda:
        p.error("cuda_graph decoding needs --device cuda; use static or eager on the CPU")
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"device {out['device']}, torch {out['torch']}, config {out['config']}")
    print(f"{'variant':<26}{'step ratio':>12}{'fwd+bwd ratio':>15}{'FLOPs ratio':>13}{'memory ratio':>14}")
    for n in out["step_ratio"]:
        print(f"{n:<26}{out['step_ratio'][n]:>12.3f}{out['fwd_bwd_ratio'][n]:>15.3f}{out['flops_ratio'][n]:>13.3f}"
              f"{out['memory_ratio'][n]:>14.3f}")
    print(f"baseline step {out['step_ms']['baseline']:.1f} ms, {out['baseline_tokens_per_s']:,.0f} tok/s"
          + (f", MFU {100 * out['baseline_mfu']:.1f}% per step, {100 * out['baseline_mfu_fwd_bwd']:.1f}% "
             "forward+backward" if "baseline_mfu" in out else ""))
    print(f"memory = {out['memory_kind']}")
    for b, r in out.get("decode_ratio", {}).items():
        tps = out["decode_tokens_per_s"][b]
        print(f"decode {b}: baseline {tps['baseline']:,.0f} tok/s, LRT {tps['lrt']:,.0f} tok/s, ratio {r:.3f}")
    if "prefill_parallel_vs_exact" in out:
        p = out["prefill_parallel_vs_exact"]
        print(f"LRT prefill of {args.seq_len} tokens, parallel (K={p['passes']}) vs exact: {p['speedup']:.1f}x faster, "
              f"max |logit gap| {p['max_abs_logit_gap']:.3g}, next-token agreement {100 * p['next_token_agreement']:.0f}% "
              "(random init: the gap after training is what val_bpb_merged vs val_bpb_sequential reports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
