"""BatchedMuon against torch.optim.Muon, and its Newton-Schulz against the plain polynomial in float64."""

import copy

import pytest
import torch

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.model import GPT
from lrt_model.optim import BatchedMuon, OptimConfig, build_optimizers, orthogonalize

SHAPES = [(48, 48), (96, 48), (48, 96), (48, 48), (96, 48), (32, 80)]


def _params(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.02, weight_decay=0.1),
    dict(lr=0.05, weight_decay=0.0, nesterov=False, momentum=0.9, adjust_lr_fn="match_rms_adamw", ns_steps=3),
])
def test_batched_muon_equals_torch_muon(kwargs):
    ref, ours = _params(), _params()
    opt_ref, opt_ours = torch.optim.Muon(ref, **kwargs), BatchedMuon(ours, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        for p, q, grad in zip(ref, ours, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        if step == 2:  # a parameter without a gradient is skipped by both
            ref[3].grad = ours[3].grad = None
        opt_ref.step()
        opt_ours.step()
        for p, q in zip(ref, ours):
            # Both orthogonalise in bf16; only the batching differs, so at most a bf16 rounding
            # of the unit-scale update (times the learning rate) may separate them.
            torch.testing.assert_close(q, p, rtol=0, atol=kwargs["lr"] * 2**-7)
    assert all(p.abs().max() > 0 for p in ours)
    state_ours = opt_ours.state_dict()["state"]
    for i, s in opt_ref.state_dict()["state"].items():
        torch.testing.assert_close(state_ours[i]["momentum_buffer"], s["momentum_buffer"], rtol=0, atol=0)


def test_checkpoint_moves_between_the_two():
    ref, ours = _params(), _params()
    opt_ref = torch.optim.Muon(ref, lr=0.02)
    g = torch.Generator().manual_seed(5)
    for p in ref:
        p.grad = torch.randn(p.shape, generator=g)
    opt_ref.step()
    with torch.no_grad():
        for p, q in zip(ref, ours):
            q.copy_(p)
    opt_ours = BatchedMuon(ours, lr=0.02)
    opt_ours.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as from a checkpoint: no shared buffers
    for p, q in zip(ref, ours):  # the next step continues from the loaded momentum, as the library's does
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opt_ref.step()
    opt_ours.step()
    for p, q in zip(ref, ours):
        torch.testing.assert_close(q, p, rtol=0, atol=0.02 * 2**-7)
        assert opt_ours.state[q]["momentum_buffer"].abs().sum() > 0


def test_newton_schulz_is_the_quintic_polynomial_in_float64():
    a, b, c = 3.4445, -4.7750, 2.0315
    g = torch.Generator().manual_seed(2)
    for shape in [(40, 40), (90, 30), (30, 90)]:
        mats = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
        got = orthogonalize(mats, (a, b, c), 5, 1e-7, dtype=torch.float64)
        for m, o in zip(mats, got):
            x = m.T if shape[0] > shape[1] else m
            x = x / x.norm()
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            ref = x.T if shape[0] > shape[1] else x
            torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)
            s = torch.linalg.svdvals(o)  # what Muon relies on: singular values pushed towards 1
            assert s.median() > 0.6 and s.max() < 1.3, s


def test_build_optimizers_picks_the_implementation():
    model = GPT(ModelConfig(depth=2, vocab_size=64, seq_len=16, recurrence=RecurrenceConfig(strategy="interleaved")))

    def muon_of(cfg):
        return build_optimizers(model, cfg, 128)[-1]

    assert type(muon_of(OptimConfig())) is torch.optim.Muon  # auto on the CPU: the library's loop
    assert type(muon_of(OptimConfig(muon="batched"))) is BatchedMuon
    with pytest.raises(ValueError, match="optim.muon 'fast' is not known; use 'auto' or one of"):
        muon_of(OptimConfig(muon="fast"))
