"""Multiple choice by likelihood: token rows scored by their candidates' mean loss or by exact match.

Design choices:
- CORE's rule: a question is the prompt followed by each candidate, every
  candidate tokenized together with the prompt (so BPE merges across the
  boundary are scored correctly); the scored continuation is the tokens
  after the candidates' common prefix, and the candidate with the lowest
  mean loss wins. Language-modelling questions (`gold` None) are right only
  when every continuation token is the strict argmax.
- Ties split the credit (1/#tied if the gold is among them), so all-equal
  logits score exactly chance = 1/choices; nanochat takes the first tied
  choice instead, which differs only on exact ties.
- Speed: questions are sorted by length and batched under a row and a token
  budget (right padding: causal views never look at it); the rows of one
  question are consecutive, so a view can run their shared prompt once.

Example:
    >>> q = mc_question([[0, 5, 6], [0, 5, 7]], gold=1)
    >>> q.spans, credit(q, [2.0, 1.0], [False, True]), credit(q, [1.0, 1.0], [False, False])
    ([(2, 3), (2, 3)], 1.0, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .views import view_stats

TIE_TOL = 1e-6  # nats: mean losses this close count as a tie


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
