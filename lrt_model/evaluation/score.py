"""The ICL score (Olsson et al. 2022): late-position loss minus early-position loss.

Design choices:
- Mean loss at late positions minus mean loss at early positions of
  validation rows; negative = the model uses its context. Olsson/nanochat
  compare token 500 with token 50 of 512+; we average windows of
  w = max(1, T // 16) positions: early = [T//10, T//10 + w), late =
  [T - w, T) (T = 256: 25-40 vs 240-255). Windows are configurable.
- Positions are row positions (rows start at a document, as bpb's position
  buckets); BOS targets are left out.

Example:
    >>> default_windows(256)
    ((25, 41), (240, 256))
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .views import VIEWS, model_views, select_views, view_stats


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
        views = select_views(model_views(model), views, VIEWS)
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
