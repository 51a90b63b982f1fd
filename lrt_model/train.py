"""The single-run trainer: one training loop for the CLI, the tests and every
Ray Train worker.

Design choices:
- `train(config, callback)` is the only loop. Reporting goes through the
  callback (a function of one dict), never through a tracking library, so
  this package runs on a GPU box with only torch installed.
- Budget: exactly one of a token count, a FLOPs budget (divided by the
  strategy's FLOPs per token from `flops.py`) or a tokens-per-parameter ratio.
- Gradient accumulation reaches `total_batch_tokens` from micro-batches of
  `batch_size` rows per rank. Under torch.distributed (Ray Train) the loss
  module is wrapped in DDP and each rank reads its own rows.
- Checkpoints hold model, optimisers, step, data position, evaluation history
  and RNG, written atomically; a run resumes from its checkpoint directory
  and continues exactly as if never stopped.
- Validation bpb before the first step, every `eval_every` steps and at the
  end; LRT runs report the full, merged and sequential views.

Example:
    python -m lrt_model.train --depth 2 --tokens 1000000 --json
    python -m lrt_model.train --depth 4 --strategy interleaved --passes 2 --tokens 2000000
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint as ckpt
from .config import (FRACTION_FIELDS, LR_FIELDS, MAX_BATCH, MAX_BUDGET, MAX_SEED, MAX_SEQ_LEN, MAX_VOCAB, ConfigError,
                     ModelConfig, RecurrenceConfig, add_config_arguments, check_bool, check_icl, check_int,
                     check_number, check_optim, config_arguments, from_mapping, short_repr)
from .data import DataError, TokenLoader, resolve_corpus, validation_rows
from .evaluation import VIEWS, check_inputs, evaluate_bpb, evaluate_icl, icl_config
from .flops import mean_flops_per_token, peak_flops, run_flops_per_token, training_flops
from .decode import DECODE_MODES
from .model import GPT
from .optim import OptimConfig, build_optimizers, set_schedule
from .recurrence import training_loss
from .tokenizer import get_tokenizer


# a field that says how a run executes or what it reports, not what it computes: a checkpoint resumes under
# any value of it (`_check_same_run`)
_HOW = {"run_independent": True}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    corpus: str = "stdlib"  # "stdlib", a directory of parquet shards, or an s3:// URI
    tokenizer: str = "byte"  # "byte" or "bpe:N"
    batch_size: int = 8  # rows per micro-batch per rank
    total_batch_tokens: int | None = None  # target batch (gradient accumulation); default one micro-batch per rank
    tokens: int | None = None  # budget: exactly one of tokens, flops, tokens_per_param
    flops: float | None = None
    tokens_per_param: float | None = None
    eval_every: int = 0  # steps; 0 = about 8 evaluations per run
    eval_tokens: int = 32768  # validation tokens per evaluation
    seed: int = 0
    device: str = field(default="auto", metadata=_HOW)  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = field(default=False, metadata=_HOW)
    checkpoint_dir: str | None = field(default=None, metadata=_HOW)  # local or s3://; resumes from a checkpoint there
    checkpoint_every: int = field(default=0, metadata=_HOW)  # steps; 0 = only at the end
    stop_after_steps: int | None = field(default=None, metadata=_HOW)  # stop (as if interrupted) after this many steps
    progress: bool = field(default=True, metadata=_HOW)
    # FlexAttention's block masks for the interleaved passes on CUDA (False: dense masks); None: on, unless
    # LRT_FLEX=0. The environment variable, when set, overrides the config (a note says so).
    flex_attention: bool | None = field(default=None, metadata=_HOW)
    # the decode step of the sequential-view evaluations: auto (a CUDA graph on CUDA) | eager | static |
    # cuda_graph; None: LRT_EVAL_DECODE, else auto. The environment variable, when set, overrides the config.
    eval_decode: str | None = field(default=None, metadata=_HOW)
    # in-context-learning evaluation at the end (lrt_model.evaluation); {"evals": []} turns it off
    icl: dict | None = field(default=None, metadata=_HOW)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.optim, dict):
            self.optim = from_mapping(OptimConfig, self.optim, "optim")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_mapping(cls, d, "config")

    def validate(self) -> "TrainConfig":
        """Every field's type and range, before anything is built: a JSON config can hold any type, and a
        flag any number (inf, nan); and the files only the end of the run reads (the ICL evaluation's CORE
        bundle), so a wrong path fails now, not after training. Raises a one-line ConfigError naming the field."""
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model={short_repr(self.model)} must be a mapping of model settings")
        self.model.validate()
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError(f"optim={short_repr(self.optim)} must be a mapping of optimiser settings")
        check_optim(self.optim)
        for name in ("corpus", "tokenizer", "device", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}={short_repr(getattr(self, name))} must be a non-empty string")
        bpe = re.fullmatch(r"bpe:([0-9]{1,9})", self.tokenizer)
        if self.tokenizer != "byte" and not (bpe and 258 <= int(bpe.group(1)) <= MAX_VOCAB):
            raise ConfigError(f"tokenizer={short_repr(self.tokenizer)} is not allowed; use 'byte' or 'bpe:N' with "
                              f"258 <= N <= {MAX_VOCAB} (e.g. 'bpe:32768')")
        check_int("batch_size", self.batch_size, 1, MAX_SEQ_LEN)
        if self.total_batch_tokens is not None:
            check_int("total_batch_tokens", self.total_batch_tokens, 1, MAX_BATCH)
        budgets = {k: getattr(self, k) for k in MAX_BUDGET if getattr(self, k) is not None}
        if len(budgets) != 1:
            raise ConfigError("give exactly one budget: tokens, flops or tokens_per_param")
        for name, value in budgets.items():
            check_number(name, value, low=0, low_open=True, high=MAX_BUDGET[name])
        check_int("eval_every", self.eval_every, 0, MAX_BATCH)
        check_int("eval_tokens", self.eval_tokens, 1, MAX_BATCH)
        check_int("seed", self.seed, 0, MAX_SEED)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError, TypeError):
                raise ConfigError(f"device={short_repr(self.device)} is not a device; use auto, cpu, cuda or "
                                  "cuda:N") from None
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype={short_repr(self.dtype)} is not allowed; choose one of auto, float32, bfloat16")
        check_bool("compile", self.compile)
        if self.flex_attention is not None:
            check_bool("flex_attention", self.flex_attention)
        if self.eval_decode is not None and self.eval_decode not in DECODE_MODES:
            raise ConfigError(f"eval_decode={short_repr(self.eval_decode)} is not known; choose one of "
                              f"{', '.join(DECODE_MODES)} (or leave it unset)")
        check_bool("progress", self.progress)
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ConfigError(f"checkpoint_dir={short_repr(self.checkpoint_dir)} must be a path (a string) or null")
        check_int("checkpoint_every", self.checkpoint_every, 0, MAX_BATCH)
        if self.stop_after_steps is not None:
            check_int("stop_after_steps", self.stop_after_steps, 0, MAX_BATCH)
        check_icl(self.icl)
        check_inputs(self.icl)  # the CORE bundle evaluate_icl reads at the end
        return self


Callback = Callable[[dict], None]


class LossModule(nn.Module):
    """Wraps the model so DDP sees a forward() that returns the training loss."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, passes=None):
        return training_loss(self.model, idx, targets, passes)[0]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def plan_tokens(cfg: TrainConfig, n_params: int) -> int:
    budgets = [b for b in (cfg.tokens, cfg.flops, cfg.tokens_per_param) if b is not None]
    if len(budgets) != 1:
        raise ConfigError("give exactly one budget: tokens, flops or tokens_per_param")
    if any(b <= 0 for b in budgets):
        raise ConfigError(f"the budget must be positive, got {budgets[0]}")
    if cfg.tokens is not None:
        return int(cfg.tokens)
    if cfg.flops is not None:
        return int(cfg.flops / mean_flops_per_token(cfg.model))  # a passes_schedule's long-run average
    return int(cfg.tokens_per_param * n_params)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Progress:
    """One self-overwriting line on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, enabled: bool, total_steps: int):
        self.enabled = enabled and (sys.stderr.isatty() or os.environ.get("LRT_PROGRESS") == "1")
        self.total = total_steps
        self.tokens_per_step = 0
        self.last = 0.0

    def update(self, step: int, loss: float, tok_s: float):
        now = time.time()
        if not self.enabled or (now - self.last < 0.5 and step < self.total):
            return
        self.last = now
        eta = (self.total - step) * (self._step_time(tok_s))
        sys.stderr.write(f"\rstep {step}/{self.total} | loss {loss:.4f} | {tok_s:,.0f} tok/s | ETA {eta:,.0f}s   ")
        sys.stderr.flush()

    def _step_time(self, tok_s):
        return self.tokens_per_step / tok_s if tok_s > 0 else 0.0

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


class Diverged(RuntimeError):
    """The training loss became non-finite. `str(exc)` is one line: the step, the loss and the likely
    cause. Deterministic (same config, seed and data diverge the same way), so not worth a retry."""

    def __init__(self, step: int, reason: str, cause: str = "unknown"):
        super().__init__(reason)
        self.step = step  # the optimiser step whose loss was non-finite (0 = before any update)
        self.reason = reason
        self.cause = cause  # loss_weights | learning_rate | setting | data


def _not_finite(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v) for v in values)


def divergence_cause(cfg: TrainConfig, mcfg: ModelConfig, step: int, first: tuple[int, float] | None,
                     last: tuple[int, float] | None) -> tuple[str, str]:
    """(cause key, "likely cause: ..." text) for a non-finite loss at `step`, from what can be checked
    without the parameters (the diverging update has already been applied to them): the settings, whether
    any update has happened yet, and the losses before (`first`, `last`: (step, loss) seen in this run)."""
    rec = mcfg.recurrence
    if rec is not None and _not_finite(rec.loss_weights):
        return "loss_weights", (f"likely cause: the loss weights: recurrence.loss_weights={rec.loss_weights} "
                                "has a non-finite entry; give finite weights >= 0")
    o = cfg.optim
    for name in LR_FIELDS + FRACTION_FIELDS:
        if _not_finite(getattr(o, name)):
            return "learning_rate", (f"likely cause: the learning rates: optim.{name}={getattr(o, name)} is not "
                                     "finite; give a finite value")
    settings = [(f"optim.{k}", getattr(o, k)) for k in ("adam_betas", "weight_decay")]
    settings += [(f"model.{k}", getattr(mcfg, k)) for k in ("softcap", "rope_base")]
    settings += [("recurrence.gamma_init", rec.gamma_init)] if rec is not None else []
    for name, value in settings:
        if _not_finite(value):
            return "setting", f"likely cause: a setting: {name}={value} is not finite; give a finite value"
    if step == 0:  # no update yet: the learning rates cannot have done it
        return "data", ("likely cause: the data or the model settings, not the learning rates (no update has "
                        f"been applied and every setting is finite): check the corpus {cfg.corpus!r} and tokenizer "
                        f"{cfg.tokenizer!r}, then the model and recurrence settings")
    lrs = ", ".join(f"{k}={getattr(o, k):g}" for k in LR_FIELDS)
    seen = [p for p in dict.fromkeys((first, last)) if p is not None]
    trend = "; train loss " + ", ".join(f"{loss:.4g} at step {s}" for s, loss in seen) if seen else ""
    return "learning_rate", (f"likely cause: the learning rates (optim.{lrs}): lower them (optim.lr_scale) "
                             f"or lengthen warm-up (optim.warmup_frac={o.warmup_frac:g}){trend}")


@dataclasses.dataclass
class TrainState:
    """What a run carries from one step to the next, and so what a checkpoint holds besides its config:
    the keys are listed once, in `state_dict`, for saving and for resuming (`load_state_dict`)."""

    model: nn.Module
    optimizers: list
    loader: TokenLoader
    step: int = 0
    evals: list = dataclasses.field(default_factory=list)  # every evaluation point so far
    train_seconds: float = 0.0  # time in training steps only (not evaluation, not checkpoints)
    train_loss: float = float("nan")  # the last step's loss

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "loader": self.loader.state_dict(), "rng": torch.get_rng_state(), "step": self.step,
                "evals": self.evals, "train_seconds": self.train_seconds, "train_loss": self.train_loss}

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        for opt, s in zip(self.optimizers, saved["optimizers"]):
            opt.load_state_dict(s)
        self.loader.load_state_dict(saved["loader"])
        torch.set_rng_state(saved["rng"])
        self.step, self.evals = saved["step"], saved["evals"]
        self.train_seconds, self.train_loss = saved["train_seconds"], saved["train_loss"]


def run_switches(cfg: TrainConfig) -> tuple[bool | None, str | None]:
    """(flex_attention, eval_decode) for the model: the config's, unless LRT_FLEX / LRT_EVAL_DECODE is set
    in the environment, which overrides it (one note on stderr when they disagree)."""
    flex, decode = cfg.flex_attention, cfg.eval_decode
    env_flex, env_decode = os.environ.get("LRT_FLEX"), os.environ.get("LRT_EVAL_DECODE")
    if env_flex:
        if flex is not None and flex != (env_flex != "0"):
            print(f"note: LRT_FLEX={env_flex} overrides flex_attention={flex}", file=sys.stderr)
        flex = env_flex != "0"
    if env_decode:
        if decode is not None and decode != env_decode:
            print(f"note: LRT_EVAL_DECODE={env_decode} overrides eval_decode={decode}", file=sys.stderr)
        decode = env_decode
    return flex, decode


def train(cfg: TrainConfig, callback: Callback | None = None) -> dict:
    """Train one model; returns the final metrics (also passed to the callback
    as {"event": "done", ...}). Events: "eval", "checkpoint", "done", and
    "diverged" (step, tokens, reason, cause) just before `Diverged` is raised."""
    emit = callback or (lambda event: None)
    t_start = time.time()
    rank, world = _rank_world()
    device = _device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    autocast = _autocast(device, cfg.dtype)

    # a bad ICL setting, or a CORE bundle that is missing or broken, fails now, not after hours of training;
    # only rank 0 evaluates, so only rank 0 needs the bundle
    (check_inputs if rank == 0 else icl_config)(cfg.icl)
    corpus = resolve_corpus(cfg.corpus)
    tokenizer = get_tokenizer(cfg.tokenizer, corpus)
    mcfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    T = mcfg.seq_len

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    model.flex_attention, model.eval_decode = run_switches(cfg)
    n_params = model.num_params()
    micro_tokens = cfg.batch_size * T
    total_batch = cfg.total_batch_tokens or micro_tokens * world
    if total_batch % (micro_tokens * world):
        raise ConfigError(
            f"total_batch_tokens={total_batch} must be a multiple of batch_size*seq_len*world = {micro_tokens * world}"
        )
    grad_accum = total_batch // (micro_tokens * world)
    tokens_budget = plan_tokens(cfg, n_params)
    total_steps = max(1, math.ceil(tokens_budget / total_batch))
    flops_per_token = run_flops_per_token(mcfg, total_steps)  # the run's average under a passes_schedule
    eval_every = cfg.eval_every or max(1, math.ceil(total_steps / 8))

    optimizers = build_optimizers(model, cfg.optim, total_batch)
    loss_module = LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(loss_module) if cfg.compile else loss_module

    loader = TokenLoader(corpus, tokenizer, "train", T, cfg.batch_size, rank=rank, world_size=world, seed=cfg.seed)
    val_rows = validation_rows(corpus, tokenizer, T, max(1, cfg.eval_tokens // T))
    token_bytes = torch.as_tensor(tokenizer.token_bytes(), dtype=torch.int64)

    state = TrainState(model, optimizers, loader)
    if cfg.checkpoint_dir:
        saved = ckpt.load(cfg.checkpoint_dir)
        if saved is not None:
            _check_same_run(saved["config"], cfg)
            state.load_state_dict(saved)

    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def evaluate() -> dict:
        metrics = evaluate_bpb(model, val_rows, token_bytes, cfg.batch_size * 4, device, autocast)
        point = {"step": state.step, "tokens": state.step * total_batch, "flops": flops_done(), **metrics}
        state.evals.append(point)
        speed = {"tokens_per_s": _tok_s()}
        if peak:  # model FLOPs utilisation, from the FLOPs module and the card's bf16 peak
            busy = state.train_seconds * peak * world  # all ranks
            speed["mfu"] = flops_done() / busy if busy > 0 else 0.0
        emit({"event": "eval", "train_loss": state.train_loss, **speed, **point})
        return point

    def _tok_s() -> float:
        return (state.step * total_batch) / state.train_seconds if state.train_seconds > 0 else 0.0

    def flops_done() -> float:  # exact and cumulative: each step at its scheduled passes
        return training_flops(mcfg, state.step, total_batch, total_steps)

    def save_checkpoint() -> None:
        if not cfg.checkpoint_dir or rank != 0:
            return
        path = ckpt.save({**state.state_dict(), "config": cfg.to_dict()}, cfg.checkpoint_dir)
        emit({"event": "checkpoint", "step": state.step, "path": path, "checkpoint_dir": cfg.checkpoint_dir})

    if state.step == 0 and not state.evals:
        evaluate()
    progress = Progress(cfg.progress and rank == 0, total_steps)
    progress.tokens_per_step = total_batch
    model.train()
    stop_at = min(total_steps, cfg.stop_after_steps) if cfg.stop_after_steps is not None else total_steps
    first_loss = None  # (step, loss) of this process's first step: the trend a divergence reports
    while state.step < stop_at:
        t0 = time.time()
        set_schedule(optimizers, state.step, total_steps, cfg.optim)
        passes = mcfg.recurrence.passes_at(state.step, total_steps) if mcfg.recurrence else None  # a function of step alone
        loss_sum = 0.0
        for micro in range(grad_accum):
            inputs, targets = (t.to(device) for t in loader.next_batch())
            sync = world == 1 or micro == grad_accum - 1
            ctx = loss_module.no_sync() if (world > 1 and not sync) else _null()
            with ctx, autocast:
                loss = step_fn(inputs, targets, passes)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        # the step's one host sync, as before; checked after the update so the optimiser's launches still
        # overlap backward: the diverging update is applied, but nothing is saved after it
        loss_now = float(loss_sum) / grad_accum
        seen = loss_now
        if world > 1:  # every rank stops at the same step: a rank left in the next all-reduce would wait forever
            flag = torch.tensor([loss_now], dtype=torch.float64, device=device)
            dist.all_reduce(flag)
            seen = flag.item()
        if not math.isfinite(seen):
            progress.close()
            last = (state.step - 1, state.train_loss) if math.isfinite(state.train_loss) else None
            cause, why = divergence_cause(cfg, mcfg, state.step, first_loss, last)
            where = "" if math.isfinite(loss_now) == math.isfinite(seen) or world == 1 else " on another rank"
            reason = f"diverged at step {state.step}: train loss is {seen}{where}; {why}"
            emit({"event": "diverged", "step": state.step, "tokens": state.step * total_batch, "reason": reason,
                  "cause": cause})
            raise Diverged(state.step, reason, cause)
        state.train_loss = loss_now
        first_loss = first_loss or (state.step, loss_now)
        if device.type == "cuda":
            torch.cuda.synchronize()
        state.train_seconds += time.time() - t0
        state.step += 1
        progress.update(state.step, state.train_loss, _tok_s())
        if state.step % eval_every == 0 or state.step == total_steps:
            evaluate()
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < stop_at:
            save_checkpoint()
    progress.close()
    save_checkpoint()
    icl, notes = {}, []
    if rank == 0 and state.step >= total_steps:
        def note(text: str) -> None:  # shown live with progress; always returned (a sweep summarises them once)
            notes.append(text)
            if cfg.progress:
                print(text, file=sys.stderr)

        icl = evaluate_icl(model, tokenizer, val_rows, cfg.icl, device, autocast, log=note)

    final = dict(state.evals[-1])
    for key in ("step", "tokens", "flops"):
        final.pop(key, None)
    metrics = {
        "params": n_params,
        "param_overhead": model.param_overhead(),
        "tokens": state.step * total_batch,
        "flops": flops_done(),
        "flops_per_token": flops_per_token,
        "steps": state.step,
        "total_steps": total_steps,
        "finished": state.step >= total_steps,
        "train_loss": state.train_loss,
        "tokens_per_s": _tok_s(),
        "wall_s": time.time() - t_start,
        "flex_attention": model.uses_flex(),
        "eval_decode": model.decode_mode(),
        **final,
        **icl,
        **({"notes": "\n".join(notes)} if notes else {}),
        "evals": [{k: v for k, v in e.items() if k != "val_bpb_by_position"} for e in state.evals],
    }
    emit({"event": "done", **metrics})
    return metrics


_RUN_INDEPENDENT = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("run_independent"))


_RUN_INDEPENDENT_OPTIM = ("muon",)  # how Muon runs: its state loads into either implementation
# fields added after checkpoints were written, with the value those runs trained with
_ADDED_LATER = {("optim", "lr_scale"): 1.0, ("model", "recurrence", "passes_schedule"): None}


def _check_same_run(saved: dict, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint written by a different run."""

    def what_it_computes(config: dict) -> dict:
        config = copy.deepcopy(config)
        for path, value in _ADDED_LATER.items():
            parent = config
            for key in path[:-1]:
                parent = parent.get(key) if isinstance(parent, dict) else None
            if isinstance(parent, dict):  # a baseline has no recurrence to fill in
                parent.setdefault(path[-1], value)
        optim = {k: v for k, v in (config.get("optim") or {}).items() if k not in _RUN_INDEPENDENT_OPTIM}
        return {**{k: v for k, v in config.items() if k not in _RUN_INDEPENDENT}, "optim": optim}

    saved, now = what_it_computes(saved), what_it_computes(cfg.to_dict())
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(
            f"the checkpoint in {cfg.checkpoint_dir} belongs to a run with different {', '.join(diff)}; "
            "use a new --checkpoint-dir or the original settings"
        )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """A bad flag is a one-line ConfigError (main prints it, exit code 2), not argparse's usage and SystemExit."""

    def error(self, message: str):
        raise ConfigError(f"{' '.join(message.split())} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lrt_model.train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file with a whole TrainConfig; then only --json and --quiet may be given")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=4)
    m.add_argument("--width", type=int, default=None, help="default depth*64 rounded up to head_dim")
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--n-kv-head", type=int, default=None, help="grouped-query attention")
    m.add_argument("--seq-len", type=int, default=256)
    m.add_argument("--value-embeds", choices=["none", "alternating", "all"], default="none")
    r = p.add_argument_group("recurrence (no --strategy: baseline)")
    add_config_arguments(r, RecurrenceConfig, defaults={"strategy": None})  # flags derived from the dataclass
    t = p.add_argument_group("training")
    t.add_argument("--corpus", default="stdlib")
    t.add_argument("--tokenizer", default="byte")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--total-batch-tokens", type=int, default=None)
    b = t.add_mutually_exclusive_group()
    b.add_argument("--tokens", type=float, default=None)
    b.add_argument("--flops", type=float, default=None)
    b.add_argument("--tokens-per-param", type=float, default=None)
    t.add_argument("--matrix-lr", type=float, default=OptimConfig.matrix_lr)
    t.add_argument("--embedding-lr", type=float, default=OptimConfig.embedding_lr)
    t.add_argument("--unembedding-lr", type=float, default=OptimConfig.unembedding_lr)
    t.add_argument("--lr-scale", type=float, default=OptimConfig.lr_scale, help="multiplies every learning rate")
    t.add_argument("--warmdown-frac", type=float, default=OptimConfig.warmdown_frac)
    t.add_argument("--muon", choices=["auto", "batched", "torch"], default=OptimConfig.muon,
                   help="Muon's Newton-Schulz: all same-shape matrices at once (batched), torch.optim.Muon's per-matrix loop (torch), or auto: batched on CUDA")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--eval-tokens", type=int, default=32768)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--no-flex-attention", dest="flex_attention", action="store_const", const=False, default=None,
                   help="dense masks instead of FlexAttention's block masks on CUDA (default: on, or $LRT_FLEX)")
    t.add_argument("--eval-decode", choices=DECODE_MODES, default=None,
                   help="decode step of the sequential-view evaluations (default: $LRT_EVAL_DECODE, else auto)")
    t.add_argument("--checkpoint-dir", default=None)
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--stop-after-steps", type=int, default=None)
    t.add_argument("--no-icl", action="store_true", help="skip the final in-context-learning evaluation")
    t.add_argument("--icl-items", type=int, default=None, help="questions per ICL task and k (default 64)")
    t.add_argument("--core-dir", default=None, help="a local DCLM/nanochat CORE bundle to score (or $LRT_CORE_DIR)")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON line on stdout")
    p.add_argument("--quiet", action="store_true")
    return p


MAX_CONFIG_BYTES = 1 << 20


def read_config(path: str) -> TrainConfig:
    """A TrainConfig from a JSON file (`--config`), validated; every problem is one ConfigError naming the file."""
    shown = short_repr(path) if not path.isprintable() else path  # a newline in the name stays on one line
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--config {shown}: cannot read it ({e.strerror})") from None
    except ValueError:  # a NUL byte in the name
        raise ConfigError(f"--config {shown}: not a valid file name (it holds a NUL byte)") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {shown}: more than {MAX_CONFIG_BYTES} bytes; a config is a small JSON file")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSON syntax, not UTF-8, nested too deeply
        raise ConfigError(f"--config {shown}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    try:
        return TrainConfig.from_dict(data).validate()
    except ConfigError as e:
        raise ConfigError(f"--config {shown}: {e}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated TrainConfig the command line asks for (ConfigError: one line naming the field)."""
    if args.config:  # the file is the whole config: a flag beside it would be silently lost, so it is refused
        parser = build_parser()
        defaults, flags = vars(parser.parse_args([])), {a.dest: a.option_strings[0] for a in parser._actions}
        extra = sorted(flags[k] for k, v in vars(args).items()
                       if k not in ("config", "json", "quiet") and v != defaults[k])
        if extra:
            raise ConfigError(f"--config takes the whole TrainConfig from its file; drop the other flags "
                              f"({', '.join(extra)}) or put them in the file")
        return read_config(args.config)
    rec = None
    if args.strategy:
        rec = RecurrenceConfig(**config_arguments(args, RecurrenceConfig))
    model = ModelConfig(depth=args.depth, width=args.width, head_dim=args.head_dim, n_kv_head=args.n_kv_head,
                        seq_len=args.seq_len, value_embeds=args.value_embeds, recurrence=rec)
    optim = OptimConfig(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                        unembedding_lr=args.unembedding_lr, warmdown_frac=args.warmdown_frac, muon=args.muon,
                        lr_scale=args.lr_scale)
    tokens = args.tokens
    if tokens is not None and math.isfinite(tokens):  # inf and nan stay floats, for validate() to name
        tokens = int(tokens)
    budget = {"tokens": tokens, "flops": args.flops, "tokens_per_param": args.tokens_per_param}
    if all(v is None for v in budget.values()):
        budget["tokens_per_param"] = 10.0
    icl = {"evals": []} if args.no_icl else {}
    if args.icl_items is not None:
        icl["items"] = args.icl_items
    if args.core_dir:
        icl["core_dir"] = args.core_dir
    return TrainConfig(
        icl=icl or None, model=model, optim=optim, corpus=args.corpus, tokenizer=args.tokenizer, batch_size=args.batch_size,
        total_batch_tokens=args.total_batch_tokens, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
        seed=args.seed, device=args.device, dtype=args.dtype, compile=args.compile,
        flex_attention=args.flex_attention, eval_decode=args.eval_decode,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        stop_after_steps=args.stop_after_steps, progress=not args.quiet, **budget,
    ).validate()


def _print_eval(event: dict) -> None:
    if event["event"] == "eval":
        views = " ".join(f"{v}={event[f'val_bpb_{v}']:.4f}" for v in VIEWS if f"val_bpb_{v}" in event)
        print(f"\n[eval] step {event['step']} tokens {event['tokens']:,} val_bpb {event['val_bpb']:.4f} ({views})",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        cfg = config_from_args(args)
        metrics = train(cfg, callback=None if args.quiet else _print_eval)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:  # its own code: a rerun with the same settings diverges again
        print(f"error: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"done: {metrics['steps']} steps, {metrics['tokens']:,} tokens, val_bpb {metrics['val_bpb']:.4f}, "
              f"{metrics['tokens_per_s']:,.0f} tok/s, {metrics['wall_s']:.1f}s")
        icl = {k: round(v, 4) for k, v in metrics.items() if k.startswith("icl_") and isinstance(v, float)}
        if icl:
            print("icl: " + ", ".join(f"{k[4:]}={v}" for k, v in icl.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
