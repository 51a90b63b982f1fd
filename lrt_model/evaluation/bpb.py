"""Validation bits per byte in every view of the model.

Design choices:
- bpb = sum of target-token losses (nats) / (ln 2 * bytes of those targets);
  targets that stand for no bytes (BOS) are left out of both sums, so the
  figure is tokenizer-independent (nanochat's definition).
- Views as in `views.py`: `val_bpb` is the headline view (sequential for
  LRT, full for the baseline), `val_bpb_<view>` each view, and for LRT
  `interleave_gap` = merged - sequential says how far the parallel training
  view is from what a user gets at decode time.
- The headline view's bpb is also reported per position bucket (quarters of
  the sequence), showing how much the memory helps as context grows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import GPT
from ..recurrence import forward_passes, sequential_logits
from .views import headline_view, view_names

N_BUCKETS = 4


class _Tally:
    def __init__(self, T: int, device):
        self.nats = torch.zeros(T, dtype=torch.float64, device=device)
        self.bytes = torch.zeros(T, dtype=torch.float64, device=device)

    def add(self, logits, targets, token_bytes):
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        nbytes = token_bytes[targets].to(torch.float64).flatten()
        counted = (nbytes > 0).to(torch.float64)
        T = targets.shape[1]
        self.nats += (loss.double() * counted).view(-1, T).sum(0)
        self.bytes += nbytes.view(-1, T).sum(0)

    def bpb(self, sl=slice(None)) -> float:
        return float(self.nats[sl].sum() / (math.log(2) * self.bytes[sl].sum().clamp_min(1)))


@torch.no_grad()
def evaluate_bpb(model: GPT, rows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int,
                 device, autocast=None) -> dict:
    """rows: (N, T+1) token rows; token_bytes: (V,) bytes per token id."""
    was_training = model.training
    model.eval()
    T = rows.shape[1] - 1
    lrt = model.rec is not None
    views = view_names(lrt)
    tallies = {v: _Tally(T, device) for v in views}
    token_bytes = token_bytes.to(device)
    ctx = autocast if autocast is not None else torch.autocast(device.type if hasattr(device, "type") else "cpu", enabled=False)
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with ctx:
            tallies["full"].add(model(inputs), targets, token_bytes)
            if lrt:
                sequential = sequential_logits(model, inputs)
                # the sequential strategy's training view is the recurrence itself: score it once
                merged = sequential if model.rec.strategy == "sequential" else forward_passes(model, inputs).merged()
                tallies["merged"].add(merged, targets, token_bytes)
                tallies["sequential"].add(sequential, targets, token_bytes)
    model.train(was_training)
    out = {f"val_bpb_{v}": tallies[v].bpb() for v in views}
    main = headline_view(lrt)
    out["val_bpb"] = out[f"val_bpb_{main}"]
    if lrt:
        out["interleave_gap"] = out["val_bpb_merged"] - out["val_bpb_sequential"]
    edges = [round(i * T / N_BUCKETS) for i in range(N_BUCKETS + 1)]
    out["val_bpb_by_position"] = {
        f"{edges[i]}-{edges[i + 1] - 1}": tallies[main].bpb(slice(edges[i], edges[i + 1])) for i in range(N_BUCKETS)
    }
    return out
