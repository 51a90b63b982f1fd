"""In-context learning (ICL) evaluation: the ICL score, the synthetic tasks and CORE, in every view, as flat metrics.

Design choices:
- `evaluate_icl` runs on a model's views (`views.py`); `run_icl` on any
  views (oracles in the tests go through the same code).
- Questions of all synthetic tasks and k are pooled, sorted by length and
  batched (`choice.py`). Prompts must fit the model's context (input = all
  but the last token <= seq_len): a k whose longest question does not fit
  is dropped (logged), so a key is either measured at its k or absent,
  never silently changed.
- On CPU the evaluation runs on `cpu_threads` (default 1) threads: a decode
  step of a small model is ~100 tiny ops, and on 2 busy cores one thread
  stepped 5-50x faster than two. A depth-2 LRT (width 128, seq_len 256)
  evaluates everything in ~8 s.
- Metrics (flat, all `icl_`; "main" = the headline view, or the first view
  asked for when the settings leave it out): icl_score, icl_score_<view>,
  icl_loss_early/late; icl_<task>_acc_k<k> (main), icl_<task>_acc_k<k>_<view>,
  icl_<task>_acc (mean over k), icl_<task>_chance; with a bundle icl_core,
  icl_core_<label> (centred, main view), icl_core_<view>; icl_seconds.
- Notes (no CORE bundle, a k dropped) go to `log` once per process, so
  periodic evaluations do not repeat them.

Example:
    >>> import torch
    >>> from lrt_model.config import ModelConfig, RecurrenceConfig
    >>> from lrt_model.model import GPT
    >>> from lrt_model.tokenizer import ByteTokenizer
    >>> from lrt_model.evaluation import evaluate_icl
    >>> model = GPT(ModelConfig(depth=1, head_dim=32, width=64, seq_len=64, recurrence=RecurrenceConfig()))
    >>> rows = torch.randint(0, 256, (4, 65))
    >>> cfg = {"ks": [1, 2], "items": 4, "evals": ["score", "recall", "induction", "copy"]}
    >>> m = evaluate_icl(model, ByteTokenizer(), rows, cfg, "cpu")
    >>> m["icl_recall_chance"], "icl_recall_acc_k2_full" in m, "icl_score_merged" in m
    (0.25, True, True)
    >>> m["icl_score"] == m["icl_score_sequential"]  # LRT's main view is the true recurrence
    True
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from typing import Callable

import numpy as np
import torch

from ..model import GPT
from .choice import score_questions
from .core import NO_CORE_MESSAGE, evaluate_core, load_core_bundle, resolve_core_dir
from .score import icl_score
from .settings import icl_config
from .tasks import TASKS, encode_item, task_items
from .views import VIEWS, main_view, model_views, select_views

_said: set = set()


def _say(log, message: str) -> None:
    """Each message once per process: periodic evaluations do not repeat it."""
    if message not in _said:
        _said.add(message)
        (log or (lambda m: print(m, file=sys.stderr)))(message)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", label)


@contextlib.contextmanager
def _threads(n: int | None):
    """Temporarily cap torch's CPU threads (restored afterwards)."""
    before = torch.get_num_threads()
    if n is not None and n < before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def evaluate_icl(model: GPT, tokenizer, val_rows: torch.Tensor | None, cfg: dict | None = None, device="cpu",
                 autocast=None, log: Callable[[str], None] | None = None) -> dict:
    """All ICL metrics of a model (flat, every key starts with `icl_`).

    val_rows: (N, T+1) validation rows for the ICL score (None: skipped).
    cfg: ICL settings (see `settings.DEFAULTS`). log: where notes go (default
    stderr), e.g. the no-bundle message or a k dropped because its prompts do not fit.
    """
    was_training = model.training
    model.eval()
    try:
        ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            return run_icl(model_views(model), tokenizer, val_rows, cfg, model.cfg.seq_len, device, log)
    finally:
        model.train(was_training)


@torch.no_grad()
def run_icl(views: dict, tokenizer, val_rows, cfg: dict | None, seq_len: int, device="cpu", log=None) -> dict:
    """evaluate_icl for any views (name -> view): models, or oracles in the tests."""
    t0 = time.time()
    c = icl_config(cfg)
    device = torch.device(device)
    with _threads(c["cpu_threads"] if device.type == "cpu" else None):
        out = _run(views, tokenizer, val_rows, c, seq_len, device, log)
    out["icl_seconds"] = time.time() - t0
    return out


def _run(views, tokenizer, val_rows, c, seq_len, device, log) -> dict:
    main = main_view(views)
    budget = c["batch_tokens"] or max(1024, 2**28 // tokenizer.vocab_size)
    batching = {"batch_rows": c["batch_rows"], "batch_tokens": budget}
    out = {}
    if "score" in c["evals"] and val_rows is not None:
        rows = val_rows[: c["score_rows"]]
        per_batch = max(1, min(c["batch_rows"], budget // rows.shape[1]))
        scores = icl_score(None, rows, select_views(views, c["score_views"], VIEWS), c["early"], c["late"],
                           [tokenizer.bos_id], per_batch, device)
        for name, s in scores.items():
            out[f"icl_score_{name}"] = s["score"]
        if main in scores:
            out["icl_score"] = scores[main]["score"]
            out["icl_loss_early"], out["icl_loss_late"] = scores[main]["early"], scores[main]["late"]
    tasks = [t for t in TASKS if t in c["evals"]]
    if tasks:
        out.update(_synthetic(views, main, tokenizer, tasks, c, seq_len, device, batching, log))
    if "core" in c["evals"]:
        out.update(_core(views, main, tokenizer, c, seq_len, device, batching, log))
    return out


def _synthetic(views, main, tokenizer, tasks, c, seq_len, device, batching, log) -> dict:
    questions, where = [], []  # pooled over tasks and k: fewer, fuller batches
    for task in tasks:
        for k in c["ks"]:
            qs = [encode_item(it, tokenizer) for it in task_items(task, c["items"], k, c)]
            need = max(q.length for q in qs) - 1
            if need > seq_len:
                _say(log, f"icl: {task} k={k} skipped: its prompts need {need} tokens > seq_len {seq_len} "
                          f"(lower k or the item length)")
                continue
            questions += qs
            where += [(task, k)] * len(qs)
    task_views = select_views(views, c["task_views"], ("full", "sequential"))
    main = main if main in task_views else next(iter(task_views), main)  # unsuffixed keys: the first view asked
    out = {f"icl_{t}_chance": 1.0 / c["choices"] for t in tasks}
    for name, view in task_views.items():
        credits = score_questions(view, questions, device, **batching) if questions else np.zeros(0)
        for task in tasks:
            accs = []
            for k in c["ks"]:
                sel = [i for i, (t, kk) in enumerate(where) if t == task and kk == k]
                if sel:
                    acc = float(credits[sel].mean())
                    out[f"icl_{task}_acc_k{k}_{name}"] = acc
                    accs.append(acc)
                    if name == main:
                        out[f"icl_{task}_acc_k{k}"] = acc
            if name == main and accs:
                out[f"icl_{task}_acc"] = float(np.mean(accs))
    return out


def _core(views, main, tokenizer, c, seq_len, device, batching, log) -> dict:
    core_dir = resolve_core_dir(c["core_dir"])
    if core_dir is None:
        _say(log, NO_CORE_MESSAGE)
        return {}
    tasks = load_core_bundle(core_dir, c["core_max_per_task"])
    core_views = select_views(views, c["core_views"], (main,))
    main = main if main in core_views else next(iter(core_views), main)
    results = evaluate_core(core_views, tokenizer, tasks, seq_len, device, **batching)
    out = {}
    for name, r in results.items():
        out[f"icl_core_{name}"] = r["core"]
        if name == main:
            out["icl_core"] = r["core"]
            out.update({f"icl_core_{_safe(label)}": v for label, v in r["centered"].items()})
        else:
            out.update({f"icl_core_{_safe(label)}_{name}": v for label, v in r["centered"].items()})
    return out
