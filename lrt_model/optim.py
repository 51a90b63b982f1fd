"""Optimisers and the learning-rate schedule (nanochat's recipe).

Design choices:
- Muon for every 2-D matrix that maps hidden states (block matrices and the
  memory projections); AdamW for the token and value embeddings, the LM head
  and all scalars/gates.
- `BatchedMuon` is `torch.optim.Muon` (same arguments and state, so
  checkpoints move between the two; the same update up to bf16 rounding in
  Newton-Schulz, bit-identical on the CPU) with the iteration run on all
  same-shape matrices at once (`baddbmm`), not one matrix at a time: a
  depth-12 model has 72 matrices in 3 shapes, so about 70 kernel launches
  replace about 1,700 (counted from the code: ~24 per matrix or per shape).
  `OptimConfig.muon`: "auto" (default) takes it on CUDA, where the library's
  loop is launch-bound (an H100 profile at depth 12: 23 of 75 ms of a step),
  and the library's loop on the CPU, where batching measured 0.75-0.91x at
  depth 4 but 1.14x at depth 12 (`python -m benchmarks.muon`).
- LR scaling: the embedding and LM-head AdamW learning rates scale with
  width as (d_model / 768)^-0.5 (nanochat); the scalars' (residual lambdas,
  gammas, gates) do not: a scalar's Adam step is about its learning rate
  whatever the width, and at width 128 the width rule made it 1.22, the
  largest source of seed-to-seed spread measured (`python -m
  benchmarks.stability`: baseline std 0.039 -> ~0.018 bpb at a scalar
  learning rate of 0.1, depth 2, 1M tokens). All learning rates scale with
  the batch as sqrt(batch_tokens / reference_batch_tokens) when a reference
  is given (None: no batch scaling, the default for the small CPU batches),
  and with `lr_scale`, the one dial a tuning search moves for every arm.
- Schedule: linear warm-up, constant, linear warm-down to `final_lr_frac`
  over the last `warmdown_frac` of the steps. Muon momentum warms from 0.85
  to 0.95 over the first 300 steps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .model import GPT


@dataclass
class OptimConfig:
    matrix_lr: float = 0.02  # Muon
    embedding_lr: float = 0.2  # AdamW, token and value embeddings
    unembedding_lr: float = 0.004  # AdamW, LM head
    scalar_lr: float = 0.1  # AdamW, residual scalars, gammas, gates (not width-scaled)
    weight_decay: float = 0.0  # Muon's decoupled weight decay
    adam_betas: tuple[float, float] = (0.8, 0.95)
    reference_batch_tokens: int | None = None  # sqrt batch scaling against this batch
    warmup_frac: float = 0.01
    warmdown_frac: float = 0.5
    final_lr_frac: float = 0.0
    muon: str = "auto"  # "batched" (BatchedMuon), "torch" (torch.optim.Muon's loop), "auto": batched on CUDA
    lr_scale: float = 1.0  # multiplies every learning rate: one dial a tuning search moves for every arm alike


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon with one batched Newton-Schulz iteration per parameter shape."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            by_shape = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[tuple(p.shape)].append(i)
            lr, wd = float(group["lr"]), group["weight_decay"]
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            for shape, idx in by_shape.items():  # per shape: no fp32 copy of all Nesterov updates at once
                g, b = [grads[i] for i in idx], [bufs[i] for i in idx]
                updates = torch._foreach_lerp(g, b, momentum) if group["nesterov"] else b
                ortho = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                group_params = [params[i] for i in idx]
                # bf16 -> the parameters' dtype is exact, and one dtype keeps the foreach add one fused kernel
                ortho = ortho.to(group_params[0].dtype)
                alpha = -_adjusted_lr(lr, group["adjust_lr_fn"], shape)
                torch._foreach_add_(group_params, list(ortho.unbind(0)), alpha=alpha)
        return loss


def orthogonalize(matrices: list, ns_coefficients, ns_steps: int, eps: float, dtype=torch.bfloat16) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration applied to same-shape matrices at once, in
    `dtype` (bf16, as torch.optim.Muon). Returns the stack (N, rows, cols)."""
    a, b, c = ns_coefficients
    x = torch.stack(matrices).to(dtype)
    tall = x.size(1) > x.size(2)
    if tall:  # iterate on the wide orientation: the Gram matrix is the small one
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple) -> float:
    """torch.optim.Muon's shape adjustment of the learning rate."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


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
    batch_scale = cfg.lr_scale
    if cfg.reference_batch_tokens:
        batch_scale *= (batch_tokens / cfg.reference_batch_tokens) ** 0.5
    width_scale = (model.cfg.d_model / 768) ** -0.5
    muon_params, adam_sets = param_groups(model)
    adam_lrs = {"embedding": cfg.embedding_lr, "unembedding": cfg.unembedding_lr, "scalar": cfg.scalar_lr}
    groups = []
    for params, kind in adam_sets:
        if params:
            lr = adam_lrs[kind] * (width_scale if kind != "scalar" else 1.0) * batch_scale
            groups.append({"params": params, "lr": lr, "initial_lr": lr, "kind": kind})
    on_cuda = next(model.parameters()).is_cuda  # one fused kernel for all AdamW tensors there
    adamw = torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=1e-10, weight_decay=0.0, fused=on_cuda or None)
    optimizers = [adamw]
    if muon_params:
        lr = cfg.matrix_lr * batch_scale
        choice = cfg.muon if cfg.muon != "auto" else ("batched" if on_cuda else "torch")
        if choice not in MUON_IMPLEMENTATIONS:
            raise ValueError(f"optim.muon {cfg.muon!r} is not known; use 'auto' or one of {sorted(MUON_IMPLEMENTATIONS)}")
        muon = MUON_IMPLEMENTATIONS[choice](
            [{"params": muon_params, "lr": lr, "initial_lr": lr, "kind": "matrix"}],
            lr=lr, momentum=0.95, weight_decay=cfg.weight_decay,
        )
        optimizers.append(muon)
    return optimizers


MUON_IMPLEMENTATIONS = {"batched": BatchedMuon, "torch": torch.optim.Muon}


def warmup_steps(total_steps: int, cfg: OptimConfig) -> int:
    return round(cfg.warmup_frac * total_steps)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    warmup = warmup_steps(total_steps, cfg)
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
