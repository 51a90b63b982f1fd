"""In-context learning (ICL) evaluation: the ICL score, synthetic few-shot
tasks and a CORE-format harness, each in every view of the model.

Design choices:
- Views. A view turns token ids into next-token predictions: `full` (one
  pass, zero memory), `merged` (the training strategy's passes, each position
  from the last pass that computed it) and `sequential` (true recurrence
  through the KV cache: what decoding gives). The baseline has only `full`.
  The main view, reported without a suffix, is `sequential` for LRT and
  `full` for the baseline (as in evaluate.py). A view is either a plain
  `logits_fn(idx) -> (B, T, V)` or a `SequentialView` that drives a `Stepper`
  one token at a time; hand-built oracles use the same two interfaces, so
  they go through the real scoring code.
- Every score reduces a view's predictions to two numbers per position: the
  target's loss and whether the target is the *strict* argmax (a tie with
  another token counts as wrong, so all-equal logits are never "correct").
- ICL score (Olsson et al. 2022): mean loss at late positions minus mean loss
  at early positions of validation rows; negative = the model uses its
  context. Olsson/nanochat compare token 500 with token 50 of 512+; we average
  windows of w = max(1, T // 16) positions: early = [T//10, T//10 + w), late =
  [T - w, T) (T = 256: 25-40 vs 240-255). Positions are row positions (rows
  start at a document, as evaluate.py's position buckets), BOS targets are
  left out. Windows are configurable.
- Synthetic tasks, generated from a seed (numpy Generator per seed, task and
  k, so every run sees the same questions) as text and encoded with the
  model's own tokenizer:
    recall     k key:value pairs ("ab:37 cd:05"), then min(4, k//2) queries
               of distinct keys, the earlier ones answered; the last is asked;
               distractors are values shown once like the gold, then fresh.
    induction  k examples of a random letter substitution ("cab>qzr"), then a
               new word made of letters seen in the examples.
    copy       k examples of "span|span" (8 random characters), then a new
               "span|" to repeat.
  k = pairs for recall (harder as k grows), demonstrations for induction and
  copy (easier as k grows).
- Scoring = multiple choice by likelihood, exactly CORE's rule: each question
  is the prompt followed by each of `choices` (default 4) candidates, every
  candidate tokenized together with the prompt (so BPE merges across the
  boundary are scored correctly), and the continuation is the tokens after
  the candidates' common prefix; the candidate with the lowest mean loss
  wins. Distractors are plausible and drawn from the answer's own
  distribution: recall's are other values shown once (like the gold), then
  fresh values; induction's are other strings of the mapped letters the
  context shows; copy's candidates are one random span with one character
  changed each, the gold being one of them (distractors made by perturbing
  the gold would let the gold beat all of them only ~1/2^(choices-1) of the
  time under a random scorer: chance would not be 1/choices). So a model
  that ignores the context scores 1/choices in expectation, and ties split
  the credit (1/#tied if the gold is among them), so all-equal logits score
  exactly chance = 1/choices (`icl_<task>_chance`); nanochat takes the first
  tied choice instead, which differs only on exact ties.
- Prompts must fit the model's context (input = all but the last token <=
  seq_len): a k whose longest question does not fit is dropped (logged), so
  a key is either measured at its k or absent, never silently changed.
- CORE harness: a local DCLM/nanochat bundle (core.yaml or core.json,
  eval_meta_data.csv, eval_data/*.jsonl) from the `core_dir` setting or
  LRT_CORE_DIR; nothing is ever downloaded. Prompts are rendered as nanochat
  renders them (few-shot examples end with a blank line; data shuffled with
  Random(1337), capped at `core_max_per_task`, few-shot drawn with
  Random(1234 + i)); multiple_choice and schema pick the lowest mean loss of
  the continuation, language_modeling needs every continuation token to be
  the strict argmax. Too-long prompts are left-truncated to seq_len as
  nanochat does. Centred accuracy = (acc - 0.01 b) / (1 - 0.01 b) with b the
  `Random baseline` percentage; icl_core = mean centred accuracy over tasks.
  core.yaml is read with a tiny parser of the subset the bundle uses (block
  mappings and lists, quoted/plain scalars, [flow, lists], # comments):
  lrt_model depends on no YAML library. Anything fancier: write core.json.
- Speed: questions of all tasks are pooled, sorted by length and batched
  (right padding: causal views never look at it). Candidates share their
  prompt: in the sequential view the prompt is stepped once per question,
  then the KV cache and memory are copied for each candidate; in the full
  view the prompt runs once as a cached chunk (both exactly equal to
  scoring each candidate alone, tested). On CPU the evaluation runs on
  `cpu_threads` (default 1) threads: a decode step of a small model is ~100
  tiny ops, and on 2 busy cores one thread stepped 5-50x faster than two.
  A depth-2 LRT (width 128, seq_len 256) evaluates everything in ~8 s.
- Metrics (flat, all `icl_`; "main" = the main view, or the first view
  asked for when the settings leave it out): icl_score, icl_score_<view>,
  icl_loss_early/late; icl_<task>_acc_k<k> (main), icl_<task>_acc_k<k>_<view>,
  icl_<task>_acc (mean over k), icl_<task>_chance; with a bundle icl_core,
  icl_core_<label> (centred, main view), icl_core_<view>; icl_seconds.

Example:
    >>> import torch
    >>> from lrt_model.config import ModelConfig, RecurrenceConfig
    >>> from lrt_model.model import GPT
    >>> from lrt_model.tokenizer import ByteTokenizer
    >>> from lrt_model.icl import evaluate_icl
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
import csv
import json
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from . import decode as decode_mod
from .decode import decode_step, expand_step
from .model import GPT, KVCache
from .recurrence import forward_passes

CORE_ENV = "LRT_CORE_DIR"
NO_CORE_MESSAGE = (
    "icl: CORE skipped: no bundle configured. Point the `core_dir` ICL setting or the "
    f"{CORE_ENV} environment variable at a local DCLM/nanochat eval bundle (a folder with core.yaml "
    "or core.json, eval_meta_data.csv and eval_data/); nothing is downloaded."
)
TASKS = ("recall", "induction", "copy")
EVALS = ("score", *TASKS, "core")
VIEWS = ("full", "merged", "sequential")
TIE_TOL = 1e-6  # nats: mean losses this close count as a tie

DEFAULTS = {
    "evals": list(EVALS),  # which evaluations run ("core" only when a bundle is configured)
    "ks": [1, 4, 8],  # in-context examples per question
    "items": 64,  # questions per task and k (binomial std <= 0.06)
    "choices": 4,  # candidates per question: chance = 1/choices
    "seed": 0,
    "score_rows": 64,  # validation rows for the ICL score (the sequential view costs one step per token)
    "early": None,  # [a, b) positions; None: scaled to the sequence length
    "late": None,
    "score_views": None,  # None: every view the model has
    "task_views": None,  # None: full (+ sequential for LRT); merged on request
    "core_views": None,  # None: the main view only
    "recall_queries": 4,
    "induction_len": 3,
    "copy_len": 8,
    "core_dir": None,  # None: $LRT_CORE_DIR
    "core_max_per_task": 500,  # nanochat's in-training setting; -1 = all
    "batch_rows": 128,  # rows per batch (candidates included)
    "batch_tokens": None,  # and at most this many tokens; None: 2**28 // vocab (1 GiB of fp32 logits)
    "cpu_threads": 1,  # torch threads on CPU while evaluating (restored after); None: leave as is
}


def icl_config(cfg: dict | None) -> dict:
    """Defaults merged with `cfg`; unknown keys and values are named in the error."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown ICL setting(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    for name in out["evals"]:
        if name not in EVALS:
            raise ConfigError(f"icl evals: {name!r} is not known; choose from {', '.join(EVALS)}")
    for key in ("score_views", "task_views", "core_views"):
        for name in out[key] or []:
            if name not in VIEWS:
                raise ConfigError(f"icl {key}: {name!r} is not a view; choose from {', '.join(VIEWS)}")
    if not out["ks"] or min(out["ks"]) < 1:
        raise ConfigError(f"icl ks={out['ks']} must be a non-empty list of integers >= 1")
    if out["choices"] < 2 or out["items"] < 1:
        raise ConfigError("icl choices must be >= 2 and items >= 1")
    if out["cpu_threads"] is not None and out["cpu_threads"] < 1:
        raise ConfigError(f"icl cpu_threads={out['cpu_threads']} must be >= 1 (or None to keep torch's setting)")
    return out


# ---------------------------------------------------------------------------
# Views: token ids -> per-position (loss, strict-argmax-correct)


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of each target and whether it is the unique argmax; logits (..., V), targets (...)."""
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    top = logits.topk(2, dim=-1)
    correct = (top.indices[..., 0] == targets) & (top.values[..., 0] > top.values[..., 1])
    return loss, correct


class Stepper(Protocol):
    """One-token-at-a-time predictor (the sequential view's engine)."""

    def reset(self, batch: int, max_len: int, device) -> None: ...

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor: ...  # tokens (B,) at position t -> logits (B, V)

    def expand(self, owner: torch.Tensor) -> None: ...  # row r of the new batch continues old row owner[r]


def _heads(owner: torch.Tensor) -> torch.Tensor:
    """Each question's first row (rows of a question are consecutive)."""
    heads = torch.ones(owner.numel(), dtype=torch.bool, device=owner.device)
    heads[1:] = owner[1:] != owner[:-1]
    return heads


class FullView:
    """The full pass with zero memory. As a logits_fn it is `model(idx)`;
    given shared prompts, each prompt runs once as a chunk through a KV cache
    and its candidates' remaining tokens attend to it: the same causal
    computation on about `choices` times fewer tokens."""

    def __init__(self, model: GPT):
        self.model = model

    def __call__(self, idx):
        return self.model(idx)

    def stats(self, idx, targets, owner=None, shared: int = 0):
        R, L = idx.shape
        P = min(shared, L) if owner is not None else 0
        if P == 0:
            return token_stats(self.model(idx), targets)
        heads = _heads(owner)
        cache = KVCache(self.model.cfg, int(heads.sum()), L)
        out = self.model.run(idx[heads, :P], torch.arange(P, device=idx.device), None, cache)
        loss, correct = token_stats(self.model.logits(out.hidden)[owner], targets[:, :P])
        if P < L:
            cache = cache.select_rows(owner)
            out = self.model.run(idx[:, P:], torch.arange(P, L, device=idx.device), None, cache)
            rest = token_stats(self.model.logits(out.hidden), targets[:, P:])
            loss, correct = torch.cat([loss, rest[0]], 1), torch.cat([correct, rest[1]], 1)
        return loss, correct


class ModelStepper:
    """Exact recurrence through `generate`'s decode step (a CUDA graph on CUDA), as
    `sequential_logits`: one step per token, the source state carried to the next token;
    `expand` lets candidates share their prompt's cache and memory."""

    def __init__(self, model: GPT):
        self.model = model

    def reset(self, batch: int, max_len: int, device) -> None:
        self.decode = decode_step(self.model, batch, max_len, decode_mod.EVAL_DECODE)
        self.memory = None

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        hidden, self.memory = self.decode(tokens[:, None], t, self.memory)
        return self.model.logits(hidden)

    def expand(self, owner: torch.Tensor) -> None:
        self.decode = expand_step(self.decode, owner)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, owner)


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


class SequentialView:
    """Scores rows one token at a time through a Stepper. Rows that belong to
    the same question (`owner`) and agree on their first `shared` tokens are
    stepped once over those tokens, then branched."""

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    def stats(self, idx, targets, owner=None, shared: int = 0):
        R, L = idx.shape
        if owner is None:
            owner, shared = torch.arange(R, device=idx.device), L  # independent rows: nothing to branch
        heads, P = _heads(owner), min(shared, L)
        loss = torch.empty(R, L, device=idx.device)
        correct = torch.empty(R, L, dtype=torch.bool, device=idx.device)
        self.stepper.reset(int(heads.sum()) if P > 0 else R, L, idx.device)
        for t in range(P):  # the shared prompt: one row per question, predictions copied to its candidates
            logits = self.stepper.step(idx[heads, t], t)
            loss[:, t], correct[:, t] = token_stats(logits[owner], targets[:, t])
        if P < L:
            if P > 0:
                self.stepper.expand(owner)
            for t in range(P, L):
                loss[:, t], correct[:, t] = token_stats(self.stepper.step(idx[:, t], t), targets[:, t])
        return loss, correct


def view_stats(view, idx, targets, owner=None, shared: int = 0):
    """(loss, correct), each (B, T), of `targets` under `view` given inputs `idx`."""
    if hasattr(view, "stats"):
        return view.stats(idx, targets, owner, shared)
    return token_stats(view(idx), targets)


def model_views(model: GPT) -> dict:
    """Every view the model has, name -> view (a logits_fn or a SequentialView)."""
    views = {"full": FullView(model)}
    if model.rec is not None:
        views["merged"] = lambda idx: forward_passes(model, idx).merged()
        views["sequential"] = SequentialView(ModelStepper(model))
    return views


def main_view(views: dict) -> str:
    return "sequential" if "sequential" in views else "full"


def _pick(views: dict, names, default) -> dict:
    names = [n for n in (names if names is not None else default) if n in views]
    return {n: views[n] for n in names}


# ---------------------------------------------------------------------------
# ICL score


def default_windows(T: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Early and late [a, b) position windows for sequence length T."""
    w = max(1, T // 16)
    early = (T // 10, min(T, T // 10 + w))
    return early, (T - w, T)


@torch.no_grad()
def icl_score(model, rows: torch.Tensor, views=None, early=None, late=None, ignore_ids=(),
              batch_rows: int = 32, device="cpu") -> dict:
    """Olsson et al.'s ICL score per view: mean loss over the late window minus
    the early window, over validation rows (N, T+1). `views`: names of the
    model's views, or a dict name -> view (then `model` may be None).
    Returns {view: {"score", "early", "late"}} (losses in nats)."""
    T = rows.shape[1] - 1
    d_early, d_late = default_windows(T)
    early, late = tuple(early or d_early), tuple(late or d_late)
    for a, b in (early, late):
        if not 0 <= a < b <= T:
            raise ConfigError(f"ICL score window [{a}, {b}) must lie inside the {T} positions and be non-empty")
    if not isinstance(views, dict):
        views = _pick(model_views(model), views, VIEWS)
    out = {}
    for name, view in views.items():
        sums = torch.zeros(2, dtype=torch.float64)
        counts = torch.zeros(2, dtype=torch.float64)
        for start in range(0, rows.shape[0], batch_rows):
            batch = rows[start : start + batch_rows].to(device)
            loss, _ = view_stats(view, batch[:, :-1], batch[:, 1:])
            keep = torch.ones_like(loss, dtype=torch.bool)
            for i in ignore_ids:  # BOS targets stand for no text
                keep &= batch[:, 1:] != i
            for j, (a, b) in enumerate((early, late)):
                sums[j] += float((loss[:, a:b] * keep[:, a:b]).double().sum())
                counts[j] += float(keep[:, a:b].sum())
        e, l = (sums / counts.clamp_min(1)).tolist()
        out[name] = {"score": l - e, "early": e, "late": l}
    return out


# ---------------------------------------------------------------------------
# Questions: token rows scored by the candidates' mean loss or by exact match


@dataclass
class Question:
    seqs: list  # token rows (lists of ids), one per candidate
    spans: list  # per row: [start, end) of the scored tokens seqs[i][start:end]
    gold: int | None  # the right row; None: exact match of row 0 (language modelling)

    @property
    def length(self) -> int:
        return max(len(s) for s in self.seqs)


def common_prefix(seqs) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def common_suffix(seqs) -> int:
    return common_prefix([s[::-1] for s in seqs])


def mc_question(seqs, gold: int) -> Question:
    """Same prompt, different continuations: score what follows the common prefix."""
    start = common_prefix(seqs)
    if any(len(s) <= start for s in seqs):
        raise ValueError("a candidate's tokens are a prefix of another's: nothing left to score")
    return Question(seqs, [(start, len(s)) for s in seqs], gold)


def credit(q: Question, mean_loss: list, exact: list) -> float:
    """1 for right, 0 for wrong, 1/n when the gold ties with n-1 others."""
    if q.gold is None:
        return float(exact[0])
    best = min(mean_loss)
    tied = [i for i, m in enumerate(mean_loss) if m <= best + TIE_TOL]
    return 1.0 / len(tied) if q.gold in tied else 0.0


def _batches(questions, batch_rows: int, batch_tokens: int):
    """Questions sorted by length, grouped under a row and a token budget."""
    order = sorted(range(len(questions)), key=lambda i: questions[i].length)
    batch, rows, longest = [], 0, 0
    for i in order:
        n, L = len(questions[i].seqs), max(longest, questions[i].length)
        if batch and (rows + n > batch_rows or (rows + n) * L > batch_tokens):
            yield batch
            batch, rows, L = [], 0, questions[i].length
        batch.append(i)
        rows, longest = rows + n, L
    if batch:
        yield batch


@torch.no_grad()
def score_questions(view, questions: list, device="cpu", batch_rows: int = 128, batch_tokens: int = 65536,
                    pad_id: int = 0) -> np.ndarray:
    """Credit in [0, 1] per question under one view."""
    out = np.zeros(len(questions))
    for batch in _batches(questions, batch_rows, batch_tokens):
        qs = [questions[i] for i in batch]
        seqs = [s for q in qs for s in q.seqs]
        owner = torch.tensor([j for j, q in enumerate(qs) for _ in q.seqs], device=device)
        L = max(len(s) for s in seqs) - 1
        tokens = torch.full((len(seqs), L + 1), pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):  # right padding: causal views never look at it
            tokens[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        tokens = tokens.to(device)
        shared = min(common_prefix(q.seqs) for q in qs)
        loss, correct = view_stats(view, tokens[:, :-1], tokens[:, 1:], owner, shared)
        loss, correct = loss.double().cpu(), correct.cpu()
        r = 0
        for i, q in zip(batch, qs):
            means, exact = [], []
            for s, e in q.spans:  # logits at t predict token t + 1
                means.append(float(loss[r, s - 1 : e - 1].mean()))
                exact.append(bool(correct[r, s - 1 : e - 1].all()))
                r += 1
            out[i] = credit(q, means, exact)
    return out


# ---------------------------------------------------------------------------
# Synthetic tasks (text), then tokens


LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


@dataclass
class Item:
    prompt: str
    choices: list
    gold: int

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


def _rng(seed: int, task: str, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), k])


def _with_distractors(rng, gold: str, distractors: list, prompt: str) -> Item:
    choices = [gold, *distractors]
    order = rng.permutation(len(choices))  # the gold lands at a random position
    return Item(prompt, [choices[i] for i in order], int(np.argmax(order == 0)))


def _draw_unique(rng, draw: Callable[[], str], n: int, avoid: set) -> list:
    out, seen = [], set(avoid)
    while len(out) < n:
        s = draw()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def recall_items(n: int, k: int, seed: int = 0, choices: int = 4, queries: int = 4) -> list:
    """Multi-query associative recall: "ab:37 cd:05 ef:61\\ncd:05 ab:" -> "37"."""
    if k > 100:
        raise ValueError(f"recall k={k}: at most 100 distinct two-digit values")
    rng, items = _rng(seed, "recall", k), []
    q = min(queries, max(1, k // 2))  # at most half the keys: "the one not asked yet" is never a shortcut
    for _ in range(n):
        keys = [LETTERS[i // 26] + LETTERS[i % 26] for i in rng.choice(26 * 26, k, replace=False)]
        vals = [f"{i:02d}" for i in rng.choice(100, k, replace=False)]
        asked = rng.choice(k, q, replace=False)
        prompt = " ".join(f"{a}:{b}" for a, b in zip(keys, vals)) + "\n"
        prompt += "".join(f"{keys[i]}:{vals[i]} " for i in asked[:-1]) + f"{keys[asked[-1]]}:"
        gold = vals[asked[-1]]
        # distractors: values shown once, like the gold (not re-stated by a query), then fresh ones
        others = [vals[i] for i in range(k) if i not in asked]
        picked = [others[i] for i in rng.choice(len(others), min(choices - 1, len(others)), replace=False)]
        picked += _draw_unique(rng, lambda: f"{rng.integers(100):02d}", choices - 1 - len(picked), set(vals))
        items.append(_with_distractors(rng, gold, picked, prompt))
    return items


def induction_items(n: int, k: int, seed: int = 0, choices: int = 4, length: int = 3) -> list:
    """Few-shot letter substitution: "cab>qzr\\nbca>zrq\\nacb>" -> "qrz"."""
    rng, items = _rng(seed, "induction", k), []
    for _ in range(n):
        sub = dict(zip(LETTERS, (LETTERS[i] for i in rng.permutation(26))))
        inputs = _draw_unique(rng, lambda: "".join(LETTERS[i] for i in rng.choice(26, length, replace=False)), k, set())
        seen = sorted(set("".join(inputs)))  # the query only uses letters whose image was shown
        query = _draw_unique(rng, lambda: "".join(rng.choice(seen, length)), 1, set(inputs))[0]
        mapped = [sub[c] for c in seen]
        gold = "".join(sub[c] for c in query)
        shown = {"".join(sub[c] for c in x) for x in inputs}  # the gold is never one of them: neither are distractors
        distractors = _draw_unique(rng, lambda: "".join(rng.choice(mapped, length)), choices - 1, shown | {gold})
        prompt = "".join(f"{x}>{''.join(sub[c] for c in x)}\n" for x in inputs) + f"{query}>"
        items.append(_with_distractors(rng, gold, distractors, prompt))
    return items


def copy_items(n: int, k: int, seed: int = 0, choices: int = 4, length: int = 8) -> list:
    """Copy a random span: "x7k2|x7k2\nq9ab|" -> "q9ab". The candidates are one
    random base span with one character changed each (at different places
    when the span is long enough) and the gold is one of them, so no
    candidate is special to a model that ignores the context."""
    alphabet = LETTERS + DIGITS
    rng, items = _rng(seed, "copy", k), []

    def span():
        return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=length))

    def changed(s, p):  # s with the character at p replaced by another
        c = alphabet[(alphabet.index(s[p]) + 1 + int(rng.integers(len(alphabet) - 1))) % len(alphabet)]
        return s[:p] + c + s[p + 1 :]

    for _ in range(n):
        demos, base = [span() for _ in range(k)], span()
        places = iter(rng.choice(length, length, replace=False).tolist() * choices)
        cands = _draw_unique(rng, lambda: changed(base, next(places)), choices, {base})
        prompt = "".join(f"{s}|{s}\n" for s in demos) + f"{cands[0]}|"
        items.append(_with_distractors(rng, cands[0], cands[1:], prompt))
    return items


GENERATORS = {"recall": recall_items, "induction": induction_items, "copy": copy_items}


def task_items(task: str, n: int, k: int, cfg: dict) -> list:
    extra = {"recall": {"queries": cfg["recall_queries"]}, "induction": {"length": cfg["induction_len"]},
             "copy": {"length": cfg["copy_len"]}}[task]
    return GENERATORS[task](n, k, cfg["seed"], cfg["choices"], **extra)


def encode_item(item: Item, tokenizer) -> Question:
    """BOS + prompt + candidate, tokenized as one text per candidate."""
    return mc_question([[tokenizer.bos_id, *tokenizer.encode(item.prompt + c)] for c in item.choices], item.gold)


# ---------------------------------------------------------------------------
# CORE bundles


def resolve_core_dir(core_dir: str | None) -> str | None:
    """The configured bundle (setting, else $LRT_CORE_DIR), or None. Accepts the
    bundle itself or a folder holding `eval_bundle/` (nanochat's base dir)."""
    core_dir = core_dir or os.environ.get(CORE_ENV) or None
    if core_dir is None:
        return None
    if not any(os.path.exists(os.path.join(core_dir, f)) for f in ("core.yaml", "core.json")):
        nested = os.path.join(core_dir, "eval_bundle")
        if os.path.isdir(nested):
            return nested
    return core_dir


@dataclass
class CoreTask:
    label: str
    task_type: str  # multiple_choice | schema | language_modeling
    num_fewshot: int
    delimiter: str
    data: list  # rows of the jsonl, shuffled and capped
    random_baseline: float  # percent


def load_core_bundle(core_dir: str, max_per_task: int = -1) -> list:
    """CoreTasks of a local bundle; errors say which file is missing or wrong."""
    names = [f for f in ("core.yaml", "core.json") if os.path.exists(os.path.join(core_dir, f))]
    if not names:
        raise FileNotFoundError(f"CORE bundle {core_dir!r} has neither core.yaml nor core.json")
    with open(os.path.join(core_dir, names[0]), encoding="utf-8") as f:
        text = f.read()
    config = parse_simple_yaml(text) if names[0].endswith(".yaml") else json.loads(text)
    baselines = {}
    meta = os.path.join(core_dir, "eval_meta_data.csv")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"CORE bundle {core_dir!r} has no eval_meta_data.csv (each task's random baseline)")
    with open(meta, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    for spec in config.get("icl_tasks") or []:
        label, kind = spec["label"], spec["icl_task_type"]
        if kind not in ("multiple_choice", "schema", "language_modeling"):
            raise ValueError(f"CORE task {label!r}: icl_task_type {kind!r} is not supported "
                             "(multiple_choice, schema, language_modeling)")
        if label not in baselines:
            raise ValueError(f"CORE task {label!r} has no row in eval_meta_data.csv")
        with open(os.path.join(core_dir, "eval_data", spec["dataset_uri"]), encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(data)  # as nanochat: the files are often ordered
        if max_per_task > 0:
            data = data[:max_per_task]
        shots = spec.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        tasks.append(CoreTask(label, kind, int(shots), spec.get("continuation_delimiter", " "), data,
                              baselines[label]))
    return tasks


def render_core(task: CoreTask, i: int) -> tuple[list, int | None]:
    """nanochat's prompts for example i: (texts, gold). MC: one text per
    choice; schema: one per context option; LM: [without, with] continuation."""
    item, d = task.data[i], task.delimiter
    shots = []
    if task.num_fewshot > 0:
        others = [j for j in range(len(task.data)) if j != i]
        shots = [task.data[j] for j in random.Random(1234 + i).sample(others, task.num_fewshot)]
    if task.task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]], item["gold"]
    if task.task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]], item["gold"]
    head = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    stem = f"{head}{item['context'].strip()}{d}"
    return [stem.strip(), stem + item["continuation"]], None


def core_question(task: CoreTask, i: int, tokenizer, seq_len: int) -> Question:
    texts, gold = render_core(task, i)
    seqs = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    if task.task_type == "multiple_choice":  # (a choice that is a prefix of another keeps its last token)
        spans = [(min(common_prefix(seqs), len(s) - 1), len(s)) for s in seqs]
    elif task.task_type == "schema":  # contexts differ, the continuation is shared
        n = common_suffix(seqs)
        spans = [(len(s) - n, len(s)) for s in seqs]
    else:  # the continuation is what `with` adds to `without` (common prefix: robust to BPE merges)
        seqs, spans = [seqs[1]], [(common_prefix(seqs), len(seqs[1]))]
    for r, (s, (a, b)) in enumerate(zip(seqs, spans)):
        cut = max(0, len(s) - 1 - seq_len)  # left-truncate: the model reads at most seq_len tokens
        seqs[r], spans[r] = s[cut:], (max(1, a - cut), b - cut)
    return Question(seqs, spans, gold)


def centered_accuracy(acc: float, random_baseline: float) -> float:
    """CORE's centring: 0 at the random baseline (a percentage), 1 at perfect."""
    return (acc - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(views: dict, tokenizer, tasks: list, seq_len: int, device="cpu", batch_rows: int = 128,
                  batch_tokens: int = 65536) -> dict:
    """{view: {"core": mean centred accuracy, "acc": {label: acc}, "centered": {label: centred}}}."""
    questions, owners = [], []
    for t, task in enumerate(tasks):
        for i in range(len(task.data)):
            questions.append(core_question(task, i, tokenizer, seq_len))
            owners.append(t)
    owners = np.asarray(owners)
    out = {}
    for name, view in views.items():
        credits = score_questions(view, questions, device, batch_rows, batch_tokens)
        acc = {task.label: float(credits[owners == t].mean()) for t, task in enumerate(tasks) if len(task.data)}
        cen = {task.label: centered_accuracy(acc[task.label], task.random_baseline) for task in tasks
               if task.label in acc}
        out[name] = {"core": float(np.mean(list(cen.values()))) if cen else float("nan"), "acc": acc,
                     "centered": cen}
    return out


# -- the YAML subset of core.yaml ---------------------------------------------


def _quoted_end(text: str, i: int) -> int:
    """Index just past the quoted string that starts at text[i]."""
    q, j = text[i], i + 1
    while j < len(text):
        if q == '"' and text[j] == "\\":
            j += 2
            continue
        if text[j] == q:
            if q == "'" and text[j + 1 : j + 2] == "'":  # '' is a quote inside single quotes
                j += 2
                continue
            return j + 1
        j += 1
    raise ValueError(f"unterminated quoted value in {text!r}")


def _strip_comment(line: str) -> str:
    i = 0
    while i < len(line):
        c = line[i]
        if c in "\"'" and (i == 0 or line[i - 1] in " \t:[,-"):
            try:
                i = _quoted_end(line, i)
            except ValueError:  # not a quote after all (a plain value with an apostrophe)
                return line
            continue
        if c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
        i += 1
    return line


_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")


def _scalar(text: str):
    text = text.strip()
    if text.startswith('"'):
        try:
            return json.loads(text)  # YAML's common double-quoted escapes (\n \t \" \\ \uXXXX) are JSON's
        except json.JSONDecodeError as e:
            raise ValueError(f"quoted value {text!r} is beyond core.yaml's subset; write core.json instead") from e
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ValueError(f"unterminated quoted value {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"flow list {text!r} must close on its line")
        inner = text[1:-1].strip()
        return [_scalar(p) for p in _split_flow(inner)] if inner else []
    if text[:1] in "{|>&*!":
        raise ValueError(f"value {text!r} uses YAML beyond core.yaml's subset; write core.json instead")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~", ""):
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _split_flow(inner: str) -> list:
    parts, start, i = [], 0, 0
    while i < len(inner):
        if inner[i] in "\"'":
            i = _quoted_end(inner, i)
            continue
        if inner[i] == ",":
            parts.append(inner[start:i])
            start = i + 1
        i += 1
    return parts + [inner[start:]]


_KEY = re.compile(r"^([A-Za-z_][\w\-. ]*?)\s*:(?:\s+(.*))?$")


def parse_simple_yaml(text: str):
    """The YAML subset of core.yaml: block mappings and sequences (a list may
    sit at its key's indentation), plain or quoted scalars, one-line [flow,
    lists], # comments. Anything else raises and suggests core.json."""
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {n}: tabs in indentation are not YAML")
        line = _strip_comment(raw).rstrip()
        if line.strip() and line.strip() not in ("---", "..."):
            lines.append([len(line) - len(line.lstrip(" ")), line.strip(), n])
    if not lines:
        return {}
    value, i = _block(lines, 0, lines[0][0])
    if i != len(lines):
        raise ValueError(f"line {lines[i][2]}: unexpected indentation")
    return value


def _is_item(content: str) -> bool:
    return content == "-" or content.startswith("- ")


def _block(lines, i, indent):
    return _seq(lines, i, indent) if _is_item(lines[i][1]) else _map(lines, i, indent)


def _seq(lines, i, indent):
    items = []
    while i < len(lines) and lines[i][0] == indent and _is_item(lines[i][1]):
        rest = lines[i][1][1:].lstrip()
        if not rest:  # the item's value is the indented block below
            if i + 1 >= len(lines) or lines[i + 1][0] <= indent:
                items.append(None)
                i += 1
                continue
            value, i = _block(lines, i + 1, lines[i + 1][0])
        elif _KEY.match(rest) and not rest.startswith(("'", '"', "[")):
            lines[i] = [indent + len(lines[i][1]) - len(rest), rest, lines[i][2]]  # "- a: 1" opens a mapping
            value, i = _map(lines, i, lines[i][0])
        else:
            value, i = _scalar(rest), i + 1
        items.append(value)
    return items, i


def _map(lines, i, indent):
    out = {}
    while i < len(lines) and lines[i][0] == indent and not _is_item(lines[i][1]):
        m = _KEY.match(lines[i][1])
        if not m:
            raise ValueError(f"line {lines[i][2]}: expected `key: value`, got {lines[i][1]!r}")
        key, rest = m.group(1), (m.group(2) or "").strip()
        i += 1
        if rest:
            out[key] = _scalar(rest)
        elif i < len(lines) and (lines[i][0] > indent or (lines[i][0] == indent and _is_item(lines[i][1]))):
            out[key], i = _block(lines, i, lines[i][0])
        else:
            out[key] = None
    if i < len(lines) and lines[i][0] > indent:
        raise ValueError(f"line {lines[i][2]}: unexpected indentation")
    return out, i


# ---------------------------------------------------------------------------
# Everything, as flat metrics


_said: set = set()


def _say(log, message: str) -> None:
    """Each message once per process: periodic evaluations do not repeat it."""
    if message not in _said:
        _said.add(message)
        (log or (lambda m: print(m, file=sys.stderr)))(message)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", label)


@torch.no_grad()
def evaluate_icl(model: GPT, tokenizer, val_rows: torch.Tensor | None, cfg: dict | None = None, device="cpu",
                 autocast=None, log: Callable[[str], None] | None = None) -> dict:
    """All ICL metrics of a model (flat, every key starts with `icl_`).

    val_rows: (N, T+1) validation rows for the ICL score (None: skipped).
    cfg: ICL settings (see DEFAULTS). log: where notes go (default stderr),
    e.g. the no-bundle message or a k dropped because its prompts do not fit.
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
        scores = icl_score(None, rows, _pick(views, c["score_views"], VIEWS), c["early"], c["late"],
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
    task_views = _pick(views, c["task_views"], ("full", "sequential"))
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
    core_views = _pick(views, c["core_views"], (main,))
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
