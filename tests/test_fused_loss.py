"""The chunked linear + soft-cap + cross-entropy against the plain float64 path."""

import pytest
import torch
import torch.nn.functional as F

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.fused_loss import linear_softcap_cross_entropy
from lrt_model.model import GPT
from lrt_model.recurrence import forward_passes, pass_weights, training_loss


def plain_loss(hidden, weight, targets, softcap):
    z = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(softcap * torch.tanh(z / softcap), targets.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("chunk_elements", [10**9, 7 * 50, 1])  # one chunk, ragged chunks, one row per chunk
def test_loss_and_gradients_equal_the_plain_path(chunk_elements):
    torch.manual_seed(0)
    N, d, V = 37, 16, 50
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    w = (3 * torch.randn(V, d, dtype=torch.float64)).requires_grad_()  # large logits: the cap matters
    y = torch.randint(0, V, (N,))
    y[[3, 10, 11]] = -1  # ignored rows
    ref = plain_loss(h, w, y, 15.0)
    ref_gh, ref_gw = torch.autograd.grad(3.0 * ref, (h, w))
    got = linear_softcap_cross_entropy(h, w, y, 15.0, chunk_elements=chunk_elements)
    gh, gw = torch.autograd.grad(3.0 * got, (h, w))  # a non-unit upstream gradient
    assert abs(got.item() - ref.item()) < 1e-12
    assert (gh - ref_gh).abs().max() < 1e-12 and (gw - ref_gw).abs().max() < 1e-12
    assert gh[[3, 10, 11]].abs().max() == 0  # ignored rows get no gradient


def test_frozen_head_gets_no_weight_gradient():
    h = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 4, dtype=torch.float64)
    loss = linear_softcap_cross_entropy(h, w, torch.randint(0, 10, (8,)), 15.0)
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_mismatched_rows_name_both_counts():
    with pytest.raises(ValueError, match="6 hidden rows but 5 targets"):
        linear_softcap_cross_entropy(torch.randn(6, 4), torch.randn(10, 4), torch.zeros(5, dtype=torch.long), 15.0)


@pytest.mark.parametrize("rec", [None, dict(strategy="interleaved", passes=2), dict(strategy="multi_refine", passes=2)])
def test_training_loss_equals_cross_entropy_of_each_pass_logits(rec):
    """The model's training loss (fused) against the per-pass logits' plain cross-entropy, with grads."""
    torch.manual_seed(1)
    cfg = ModelConfig(depth=2, width=32, head_dim=16, seq_len=12, vocab_size=40,
                      recurrence=RecurrenceConfig(**rec) if rec else None)
    model = GPT(cfg).double()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    idx = torch.randint(0, 40, (3, 12))
    y = torch.randint(0, 40, (3, 12))
    y[0, :4] = -1
    loss, _ = training_loss(model, idx, y)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    passes = forward_passes(model, idx)
    ref = 0.0
    for w, pos, logits in zip(pass_weights(model, len(passes.hidden)), passes.positions, passes.logits):
        tgt = y if pos is None else y[:, pos]
        ref = ref + w * F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-1)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert abs(loss.item() - ref.item()) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert (g - r).abs().max() < 1e-10


def test_compiled_chunk_step_equals_eager(monkeypatch):
    """The compiled chunk step (what CUDA runs) computes the same loss and gradients,
    ragged last chunk included."""
    import lrt_model.fused_loss as fl

    torch.manual_seed(2)
    h = torch.randn(45, 16, dtype=torch.float64, requires_grad=True)
    w = (3 * torch.randn(50, 16, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 50, (45,))
    y[7] = -1
    eager = linear_softcap_cross_entropy(h, w, y, 15.0, chunk_elements=20 * 50)
    ref = torch.autograd.grad(eager, (h, w))
    monkeypatch.setattr(fl, "COMPILE_CHUNKS_ON", ("cuda", "cpu"))
    monkeypatch.setattr(fl, "_compiled_chunk_step", None)
    compiled = linear_softcap_cross_entropy(h, w, y, 15.0, chunk_elements=20 * 50)
    got = torch.autograd.grad(compiled, (h, w))
    assert fl._compiled_chunk_step is not None  # the compiled path really ran
    assert abs(compiled.item() - eager.item()) < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(got, ref))


def test_bf16_autocast_matches_the_plain_path():
    """Under bf16 autocast the matmuls run in bf16 (as the plain autocast path does): same
    loss and gradients to bf16 accuracy, against the fp64 reference."""
    torch.manual_seed(3)
    h = torch.randn(64, 32, requires_grad=True)
    w = (0.3 * torch.randn(100, 32)).requires_grad_()
    y = torch.randint(0, 100, (64,))
    ref = plain_loss(h.double(), w.double(), y, 15.0)
    ref_g = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_softcap_cross_entropy(h, w, y, 15.0, chunk_elements=16 * 100)
    got_g = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) / ref.item() < 1e-2
    for g, r in zip(got_g, ref_g):
        assert g.dtype == torch.float32
        assert (g.double() - r).norm() / r.norm() < 2e-2


def test_without_autograd_only_the_loss_is_computed():
    torch.manual_seed(4)
    h, w = torch.randn(30, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    y = torch.randint(0, 20, (30,))
    y[0] = -1
    with torch.no_grad():
        got = linear_softcap_cross_entropy(h, w, y, 15.0, chunk_elements=7 * 20)
    assert abs(got.item() - plain_loss(h, w, y, 15.0).item()) < 1e-12 and not got.requires_grad


def test_float16_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        linear_softcap_cross_entropy(torch.randn(4, 8, dtype=torch.float16), torch.randn(10, 8, dtype=torch.float16),
                                     torch.zeros(4, dtype=torch.long), 15.0)
