"""FLOPs module against torch.utils.flop_counter.FlopCounterMode (forward + backward), per token and,
for passes_schedule runs, summed step by step."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.flops import (baseline_flops_per_token, matmul_params, mean_flops_per_token, run_flops_per_token,
                             training_flops, training_flops_per_token)
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


# ---------------------------------------------------------------------------
# passes_schedule: a run's FLOPs summed step by step at each step's passes

def scheduled(strategy="multi_refine", schedule=((0.0, 1), (0.5, 2), (0.8, 3)), **rec) -> ModelConfig:
    return small(strategy=strategy, passes=schedule[-1][1], passes_schedule=[list(e) for e in schedule], **rec)


def measured_step_flops(cfg: ModelConfig, passes: int, batch: int = 2) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = training_loss(model, idx, idx, passes)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", [scheduled(), scheduled("interleaved", ((0.0, 2), (0.5, 4), (0.8, 8)), refresh_kv=True)],
                         ids=["multi_refine_k1_k2_k3", "interleaved_refresh_s2_s4_s8"])
def test_scheduled_run_flops_match_flop_counter_step_by_step(cfg):
    """A 6-step run: 3 steps at the first value, 2 at the second, 1 at the last, each counted."""
    steps, batch = 6, 2
    rec = cfg.recurrence
    per_step = [rec.passes_at(s, steps) for s in range(steps)]
    assert per_step == [rec.passes_schedule[0][1]] * 3 + [rec.passes_schedule[1][1]] * 2 + [rec.passes]
    cost = {p: measured_step_flops(cfg, p, batch) for p in set(per_step)}
    measured = 0.0
    for s, p in enumerate(per_step):
        measured += cost[p]
        predicted = training_flops(cfg, s + 1, batch * T, total_steps=steps)  # cumulative, as train() reports
        assert predicted == pytest.approx(measured, rel=0.05), (s, predicted, measured)
    assert training_flops(cfg, steps, batch * T) == training_flops(cfg, steps, batch * T, steps)
    assert run_flops_per_token(cfg, steps) * steps * batch * T == pytest.approx(training_flops(cfg, steps, batch * T))


def test_unscheduled_run_flops_are_steps_times_tokens_times_per_token():
    for cfg in (small(), small(strategy="interleaved", passes=2), small(strategy="multi_refine", passes=3)):
        assert training_flops(cfg, 37, 64) == 37 * 64 * training_flops_per_token(cfg)  # bit for bit, as before
        assert run_flops_per_token(cfg, 37) == mean_flops_per_token(cfg) == training_flops_per_token(cfg)
    constant = scheduled(schedule=((0.0, 2),))
    assert training_flops(constant, 37, 64) == pytest.approx(training_flops(small(strategy="multi_refine", passes=2), 37, 64))


def test_interleaved_schedule_without_refresh_costs_what_s2_costs():
    """The subset passes recompute every position once at any S: an S schedule changes fidelity, not FLOPs."""
    s2 = small(strategy="interleaved", passes=2)
    adaptive = scheduled("interleaved", ((0.0, 2), (0.5, 4), (0.8, 8)))
    assert training_flops(adaptive, 100, 64) == pytest.approx(training_flops(s2, 100, 64), rel=1e-12)


def test_segments_follow_passes_at_and_the_long_run_average():
    cfg = scheduled(schedule=((0.0, 1), (0.3, 2), (0.6, 4), (0.9, 3)))
    rec = cfg.recurrence
    for total in range(1, 120):
        expanded = [p for start, end, p in rec.passes_segments(total) for _ in range(start, end)]
        assert expanded == [rec.passes_at(s, total) for s in range(total)], total
    assert run_flops_per_token(cfg, 10_000) == pytest.approx(mean_flops_per_token(cfg), rel=1e-3)
