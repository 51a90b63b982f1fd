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


def training_flops_per_token(cfg: ModelConfig) -> float:
    """Forward+backward FLOPs per training token for the config's strategy."""
    rec = cfg.recurrence
    base = baseline_flops_per_token(cfg)
    if rec is None:
        return base
    mem = 6 * memory_projection_params(cfg)
    T = cfg.seq_len
    if rec.strategy == "interleaved":
        S = min(rec.passes, T)
        refreshes = max(0, S - 1) if rec.refresh_kv and rec.uses_kv else 0
        return 2 * base + mem * (1 + refreshes)
    if rec.strategy == "multi_refine":
        return (rec.passes + 1) * base + mem * rec.passes
    # sequential
    return 6 * matmul_params(cfg) + attention_flops_per_token(cfg, (T + 1) / 2) + mem


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
