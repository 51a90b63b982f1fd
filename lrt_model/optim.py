"""Optimisers and the learning-rate schedule (nanochat's recipe).

Design choices:
- Muon (`torch.optim.Muon`) for every 2-D matrix that maps hidden states
  (block matrices and the memory projections); AdamW for the token and value
  embeddings, the LM head and all scalars/gates.
- LR scaling: AdamW learning rates scale with width as (d_model / 768)^-0.5
  (nanochat); all learning rates scale with the batch as
  sqrt(batch_tokens / reference_batch_tokens) when a reference is given
  (None: no batch scaling, the default for the small CPU batches).
- Schedule: linear warm-up, constant, linear warm-down to `final_lr_frac`
  over the last `warmdown_frac` of the steps. Muon momentum warms from 0.85
  to 0.95 over the first 300 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import GPT


@dataclass
class OptimConfig:
    matrix_lr: float = 0.02  # Muon
    embedding_lr: float = 0.2  # AdamW, token and value embeddings
    unembedding_lr: float = 0.004  # AdamW, LM head
    scalar_lr: float = 0.5  # AdamW, residual scalars, gammas, gates
    weight_decay: float = 0.0  # Muon's decoupled weight decay
    adam_betas: tuple[float, float] = (0.8, 0.95)
    reference_batch_tokens: int | None = None  # sqrt batch scaling against this batch
    warmup_frac: float = 0.01
    warmdown_frac: float = 0.5
    final_lr_frac: float = 0.0


def param_groups(model: GPT) -> tuple[list, list]:
    """(muon params, adamw param groups as (params, kind))."""
    muon, embed, head, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("wte.") or name.startswith("value_embeds."):
            embed.append(p)
        elif name.startswith("lm_head."):
            head.append(p)
        elif p.ndim == 2:
            muon.append(p)
        else:
            scalars.append(p)
    return muon, [(embed, "embedding"), (head, "unembedding"), (scalars, "scalar")]


def build_optimizers(model: GPT, cfg: OptimConfig, batch_tokens: int) -> list[torch.optim.Optimizer]:
    batch_scale = 1.0
    if cfg.reference_batch_tokens:
        batch_scale = (batch_tokens / cfg.reference_batch_tokens) ** 0.5
    width_scale = (model.cfg.d_model / 768) ** -0.5
    muon_params, adam_sets = param_groups(model)
    adam_lrs = {"embedding": cfg.embedding_lr, "unembedding": cfg.unembedding_lr, "scalar": cfg.scalar_lr}
    groups = []
    for params, kind in adam_sets:
        if params:
            lr = adam_lrs[kind] * width_scale * batch_scale
            groups.append({"params": params, "lr": lr, "initial_lr": lr, "kind": kind})
    on_cuda = next(model.parameters()).is_cuda  # one fused kernel for all AdamW tensors there
    adamw = torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-10, weight_decay=0.0, fused=on_cuda or None)
    optimizers = [adamw]
    if muon_params:
        lr = cfg.matrix_lr * batch_scale
        muon = torch.optim.Muon(
            [{"params": muon_params, "lr": lr, "initial_lr": lr, "kind": "matrix"}],
            lr=lr, momentum=0.95, weight_decay=cfg.weight_decay,
        )
        optimizers.append(muon)
    return optimizers


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    warmup = round(cfg.warmup_frac * total_steps)
    warmdown = round(cfg.warmdown_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / max(1, warmdown)
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedule(optimizers: list, step: int, total_steps: int, cfg: OptimConfig) -> float:
    mult = lr_multiplier(step, total_steps, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
            if isinstance(opt, torch.optim.Muon):
                group["momentum"] = muon_momentum(step)
    return mult
