"""Views: how a model turns token ids into next-token predictions, and which one is the headline.

Design choices:
- `full` (one pass, zero memory), `merged` (the training strategy's passes,
  each position from the last pass that computed it) and `sequential` (true
  recurrence through the KV cache: what decoding gives). The baseline has
  only `full`.
- The headline view, reported without a suffix (`val_bpb`, `icl_score`), is
  what decoding delivers: `sequential` for LRT, `full` for the baseline.
  `headline_view` is the one place that rule lives; bpb, ICL, the trainer's
  callers and the benchmarks ask it.
- A view is either a plain `logits_fn(idx) -> (B, T, V)` or an object with
  `stats` (`FullView`, or a `SequentialView` that drives a `Stepper` one
  token at a time); hand-built oracles use the same two interfaces, so they
  go through the real scoring code.
- Every score reduces a view's predictions to two numbers per position: the
  target's loss and whether the target is the *strict* argmax (a tie with
  another token counts as wrong, so all-equal logits are never "correct").
- Candidates share their prompt: in the sequential view the prompt is
  stepped once per question, then the KV cache and memory are copied for
  each candidate; in the full view the prompt runs once as a cached chunk
  (both exactly equal to scoring each candidate alone, tested).

Example:
    >>> headline_view(lrt=True), headline_view(lrt=False), view_names(lrt=False)
    ('sequential', 'full', ('full',))
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import VIEWS, headline_view  # noqa: F401 - re-exported: the rule lives with the config (torch-free)
from ..decode import decode_step, expand_step
from ..model import GPT, KVCache
from ..recurrence import forward_passes

def view_names(lrt: bool) -> tuple:
    """The views a model has: all three for LRT, the full pass alone for the baseline."""
    return VIEWS if lrt else ("full",)


def main_view(views: dict) -> str:
    """The headline view among `views` (name -> view): LRT's when it has a sequential view."""
    return headline_view("sequential" in views)


def select_views(views: dict, names, default) -> dict:
    """`views` restricted to `names` (None: `default`), in that order; names the model lacks are skipped."""
    names = [n for n in (names if names is not None else default) if n in views]
    return {n: views[n] for n in names}


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
        self.decode = decode_step(self.model, batch, max_len, self.model.decode_mode())
        self.memory = None

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        hidden, self.memory = self.decode(tokens[:, None], t, self.memory)
        return self.model.logits(hidden)

    def expand(self, owner: torch.Tensor) -> None:
        self.decode = expand_step(self.decode, owner)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, owner)


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
