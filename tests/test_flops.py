"""FLOPs module against torch.utils.flop_counter.FlopCounterMode (forward + backward)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.flops import baseline_flops_per_token, matmul_params, training_flops_per_token
from lrt_model.model import GPT
from lrt_model.recurrence import training_loss

T = 32


def measured_flops_per_token(cfg: ModelConfig, batch: int = 2) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, T))
    # the math backend decomposes SDPA into bmm, which FlopCounterMode counts
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = training_loss(model, idx, idx)
        loss.backward()
    return counter.get_total_flops() / (batch * T)


def small(**rec) -> ModelConfig:
    recurrence = RecurrenceConfig(**rec) if rec else None
    return ModelConfig(depth=2, vocab_size=97, seq_len=T, head_dim=16, width=64, n_kv_head=2,
                       value_embeds="alternating", recurrence=recurrence)


CASES = {
    "baseline": {},
    "interleaved_s2": dict(strategy="interleaved", passes=2),
    "interleaved_s4_refresh_layerwise": dict(strategy="interleaved", passes=4, refresh_kv=True, projection="layerwise"),
    "interleaved_s3_residual": dict(strategy="interleaved", passes=3, injection="residual"),
    "multi_refine_k2": dict(strategy="multi_refine", passes=2),
    "multi_refine_k3_layerwise": dict(strategy="multi_refine", passes=3, projection="layerwise"),
    "sequential": dict(strategy="sequential"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_flops_match_flop_counter(name):
    cfg = small(**CASES[name])
    predicted = training_flops_per_token(cfg)
    measured = measured_flops_per_token(cfg)
    assert predicted == pytest.approx(measured, rel=0.05), (name, predicted, measured)


def test_matmul_params_match_the_built_model():
    cfg = small()
    model = GPT(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear


def test_lrt_cost_ratios_follow_the_method():
    base = baseline_flops_per_token(small())
    # the method's multiples plus the (small, strictly positive) memory projections
    assert 2.0 < training_flops_per_token(small(strategy="interleaved", passes=2)) / base < 2.05
    assert 3.0 < training_flops_per_token(small(strategy="multi_refine", passes=2)) / base < 3.1
