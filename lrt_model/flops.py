"""Training FLOPs per token: the only place FLOPs are counted.

Design choices:
- nanochat's estimate: 6 * (matmul parameters, embeddings excluded, LM head
  included) + 12 * n_layer * n_head * head_dim * seq_len for attention. The
  attention term counts the full T x T score matrix (no causal halving), the
  same convention as `torch.utils.flop_counter.FlopCounterMode`, which the
  tests hold this module to (within 5%, in practice exact).
- Everything is computed from the config, without building the model, so the
  planner can price trials of any size for free.
- LRT strategies (T = seq_len, S/K = passes):
  interleaved S: pass 0 plus S subset passes that together recompute every
  position once -> 2x the baseline's matmuls and attention, plus one memory
  projection per token (and one per token per K/V refresh).
  multi_refine K: K+1 full passes -> (K+1)x, plus K memory projections.
  sequential: baseline matmuls, attention over the growing prefix
  (average (T+1)/2 keys), one memory projection per token.
- A run's FLOPs (`training_flops`) sum each step's FLOPs at that step's
  passes (`RecurrenceConfig.passes_segments`), so a `passes_schedule` is
  counted exactly, step by step. Interleaved S without K/V refresh costs the
  same at every S (the subset passes together recompute each position once);
  a K schedule or a refreshed S schedule changes the cost per step.
"""

from __future__ import annotations

from .config import ModelConfig


def block_matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights inside one transformer block (memory projections excluded), summed over blocks."""
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    q_out = cfg.n_head * cfg.head_dim
    per_block = d * q_out + 2 * d * kv + q_out * d + 8 * d * d  # q, k, v, proj, MLP in/out
    gates = sum(32 * cfg.kv_heads for i in range(cfg.depth) if cfg.has_value_embed(i))
    return cfg.depth * per_block + gates


def memory_projection_params(cfg: ModelConfig) -> int:
    """Weights of one memory projection of a token (W_k and W_v; per layer if layerwise)."""
    rec = cfg.recurrence
    if rec is None or not rec.uses_kv:
        return 0
    pair = 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim
    return pair * (cfg.depth if rec.projection == "layerwise" else 1)


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that cost a multiply-add per token in one full pass (embeddings excluded)."""
    return block_matmul_params(cfg) + cfg.d_model * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, keys: float) -> float:
    """Forward+backward attention FLOPs per query token attending `keys` keys."""
    return 12 * cfg.depth * cfg.n_head * cfg.head_dim * keys


def baseline_flops_per_token(cfg: ModelConfig) -> float:
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, cfg.seq_len)


def training_flops_per_token(cfg: ModelConfig, passes: int | None = None) -> float:
    """Forward+backward FLOPs per training token for the config's strategy at `passes`
    S or K (default the config's `passes`)."""
    rec = cfg.recurrence
    base = baseline_flops_per_token(cfg)
    if rec is None:
        return base
    passes = rec.passes if passes is None else passes
    mem = 6 * memory_projection_params(cfg)
    T = cfg.seq_len
    if rec.strategy == "interleaved":
        S = min(passes, T)
        refreshes = max(0, S - 1) if rec.refresh_kv and rec.uses_kv else 0
        return 2 * base + mem * (1 + refreshes)
    if rec.strategy == "multi_refine":
        return (passes + 1) * base + mem * passes
    # sequential
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, (T + 1) / 2) + mem


def _scheduled(cfg: ModelConfig) -> bool:
    return cfg.recurrence is not None and cfg.recurrence.passes_schedule is not None


def training_flops(cfg: ModelConfig, steps: int, batch_tokens: int, total_steps: int | None = None) -> float:
    """Exact training FLOPs of the first `steps` optimiser steps of a `total_steps`-step run (default:
    the whole run of `steps`) with `batch_tokens` tokens per step, each step at its scheduled passes."""
    if not _scheduled(cfg):  # same arithmetic, in the same order, as before schedules existed
        return steps * batch_tokens * training_flops_per_token(cfg)
    segments = cfg.recurrence.passes_segments(total_steps or steps)
    return sum(max(0, min(end, steps) - start) * batch_tokens * training_flops_per_token(cfg, passes)
               for start, end, passes in segments)


def run_flops_per_token(cfg: ModelConfig, total_steps: int) -> float:
    """A `total_steps`-step run's average training FLOPs per token (its only value without a schedule)."""
    if not _scheduled(cfg):
        return training_flops_per_token(cfg)
    return training_flops(cfg, total_steps, 1) / total_steps


def mean_flops_per_token(cfg: ModelConfig) -> float:
    """The average FLOPs per token of a long run: each scheduled value weighted by its fraction of the
    steps. For turning a FLOPs budget into a first step count; `training_flops` is the exact count."""
    if not _scheduled(cfg):
        return training_flops_per_token(cfg)
    sched = cfg.recurrence.passes_schedule
    ends = [f for f, _ in sched[1:]] + [1.0]
    return sum((end - f) * training_flops_per_token(cfg, p) for (f, p), end in zip(sched, ends))


def baseline_equivalent(cfg: ModelConfig) -> float:
    """How many baseline tokens one training token of this config costs."""
    return training_flops_per_token(cfg) / baseline_flops_per_token(cfg)


# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


def peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None when it is not in the table (no MFU then)."""
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None
