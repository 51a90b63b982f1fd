"""LRT recurrence against the exact sequential reference (float64)."""

import dataclasses
import itertools

import pytest
import torch

from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.decode import generate
from lrt_model.model import GPT
from lrt_model.recurrence import (
    forward_passes, interleaved, multi_refine, naive_sequential_logits, sequential_logits, training_loss,
)

T, V = 10, 53


def lrt(dtype=torch.float64, seed=0, **rec) -> GPT:
    rec.setdefault("strategy", "interleaved")
    cfg = ModelConfig(depth=3, vocab_size=V, seq_len=T, head_dim=8, width=32, n_kv_head=2,
                      value_embeds="alternating", recurrence=RecurrenceConfig(**rec))
    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype)
    with torch.no_grad():  # make zero-initialised projections non-zero so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tokens(batch=2, seed=1):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


OPTIONS = list(itertools.product(["kv", "residual", "both"], ["shared", "layerwise"], [-1, 0, 1], [True, False]))


@pytest.mark.parametrize("injection,projection,source,gates", OPTIONS)
def test_exactness_anchor(injection, projection, source, gates):
    model = lrt(injection=injection, projection=projection, source_layer=source, gates=gates)
    idx = tokens()
    with torch.no_grad():
        reference = naive_sequential_logits(model, idx)
        assert (sequential_logits(model, idx) - reference).abs().max() < 1e-12  # cached == recompute-the-prefix
        assert (interleaved(model, idx, S=T).merged() - reference).abs().max() < 1e-12
        assert (interleaved(model, idx, S=T, refresh=True).merged() - reference).abs().max() < 1e-12
        assert (multi_refine(model, idx, K=T - 1).merged() - reference).abs().max() < 1e-12
        # the cheap approximations are not exact at random init: the gap is real and must be measured
        assert (interleaved(model, idx, S=2).merged() - reference).abs().max() > 1e-3


def test_interleaved_larger_than_sequence_is_still_exact():
    model = lrt()
    idx = tokens()
    with torch.no_grad():
        assert (interleaved(model, idx, S=T + 3).merged() - naive_sequential_logits(model, idx)).abs().max() < 1e-12


def test_multi_refine_converges_monotonically_in_passes():
    model = lrt()
    idx = tokens()
    with torch.no_grad():
        ref = naive_sequential_logits(model, idx)
        errors = [(multi_refine(model, idx, K=k).merged() - ref).abs().max().item() for k in range(T)]
    # pass k is exact for the first k+1 positions; by K = T-1 the whole sequence is exact
    assert errors[-1] < 1e-12 and errors[0] > 1e-3


def test_zeroed_memory_paths_equal_the_baseline():
    model = lrt(injection="both", projection="layerwise")
    base_cfg = ModelConfig(**{**model.cfg.to_dict(), "recurrence": None})
    baseline = GPT(base_cfg).double().eval()
    baseline.load_state_dict({k: v for k, v in model.state_dict().items() if k in baseline.state_dict()})
    with torch.no_grad():
        model.gamma.zero_()
        for block in model.blocks:
            block.attn.mem_gate_k.zero_()
            block.attn.mem_gate_v.zero_()
        idx = tokens()
        expected = baseline(idx)
        for logits in (sequential_logits(model, idx), interleaved(model, idx, 2).merged(), multi_refine(model, idx, 2).merged()):
            assert (logits - expected).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["interleaved2", "interleaved3_refresh", "multi_refine2", "sequential", "full"])
def test_every_mode_is_causal(mode):
    model = lrt(injection="both")
    idx = tokens(batch=1)
    run = {
        "interleaved2": lambda x: interleaved(model, x, 2).merged(),
        "interleaved3_refresh": lambda x: interleaved(model, x, 3, refresh=True).merged(),
        "multi_refine2": lambda x: multi_refine(model, x, 2).merged(),
        "sequential": lambda x: sequential_logits(model, x),
        "full": lambda x: model(x),
    }[mode]
    with torch.no_grad():
        before = run(idx)
        for t in range(T - 1):
            changed = idx.clone()
            changed[0, t + 1] = (changed[0, t + 1] + 1) % V
            after = run(changed)
            assert (after[:, : t + 1] - before[:, : t + 1]).abs().max() == 0, f"position {t + 1} leaked into <= {t}"
            assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 0


def test_gradients_reach_pass_zero_through_buffer_and_memory(monkeypatch):
    """Pass 1 recomputes the even positions; pass 0's odd positions reach its loss only
    through the buffered K/V and the memory. Both must carry gradient."""
    import lrt_model.recurrence as recurrence

    model = lrt(injection="both")
    model.train()
    captured = {}

    class RecordingKV(recurrence.SelfKV):
        def write(self, layer, k, v, q_pos):
            k.retain_grad(), v.retain_grad()
            captured.setdefault("k", []).append(k)
            return super().write(layer, k, v, q_pos)

    real_run = model.run

    def recording_run(idx, q_pos, memory, kv, *rest):
        out = real_run(idx, q_pos, memory, kv, *rest)
        if "source" not in captured:  # pass 0
            out.source.retain_grad()
            captured["source"] = out.source
        return out

    monkeypatch.setattr(recurrence, "SelfKV", RecordingKV)
    monkeypatch.setattr(model, "run", recording_run)
    passes = interleaved(model, tokens(), 2)
    passes.logits[1].sum().backward()  # pass 1's loss only
    odd = slice(1, None, 2)
    for k in captured["k"]:  # every layer's pass-0 keys at odd positions get gradient via the buffer
        assert k.grad[:, :, odd].abs().sum() > 0
    # source states at odd positions are the memory of the next even positions
    assert captured["source"].grad[:, odd].abs().sum() > 0


@pytest.mark.parametrize("option", [
    dict(injection="kv"), dict(injection="residual"), dict(projection="layerwise"),
    dict(source_layer=0), dict(source_layer=1), dict(gates=False), dict(gamma_init=0.3),
])
def test_every_option_changes_the_output(option):
    idx = tokens()
    default = lrt(seed=5)
    changed = lrt(seed=5, **option)
    if option.get("gates") is False:  # same weights, gates removed, but perturbed gates differ from 1
        changed.load_state_dict({k: v for k, v in default.state_dict().items() if k in changed.state_dict()})
    if "gamma_init" in option:
        changed.load_state_dict(default.state_dict())
        with torch.no_grad():
            changed.gamma.fill_(0.3)
    with torch.no_grad():
        assert (sequential_logits(default, idx) - sequential_logits(changed, idx)).abs().max() > 1e-6


def test_refresh_and_detach_and_loss_weights_change_training():
    idx = tokens()
    with torch.no_grad():
        a = lrt(seed=2)
        assert (interleaved(a, idx, 3).merged() - interleaved(a, idx, 3, refresh=True).merged()).abs().max() > 1e-6
    m1, m2 = lrt(seed=2, strategy="multi_refine", passes=2), lrt(seed=2, strategy="multi_refine", passes=2, detach=True)
    m1.train(), m2.train()
    training_loss(m1, idx, idx)[0].backward()
    training_loss(m2, idx, idx)[0].backward()
    assert (m1.mem_k.weight.grad - m2.mem_k.weight.grad).abs().max() > 1e-9
    w = lrt(seed=2, loss_weights=[0.0, 0.0, 1.0])
    with torch.no_grad():
        loss_w, passes = training_loss(w, idx, idx)
        last = torch.nn.functional.cross_entropy(passes.logits[2].flatten(0, 1), idx[:, 1::2].flatten())
    assert loss_w.item() == pytest.approx(last.item(), rel=1e-12)


def test_generation_with_recurrence_equals_sequential_scoring_in_fp32():
    model = lrt(dtype=torch.float32)
    prompt = tokens(batch=2)[:, :4]
    out = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        logits = sequential_logits(model, torch.cat([prompt, out], 1))
    assert torch.equal(logits[:, 3:-1].argmax(-1), out)


def test_parallel_prefill_is_exact_with_enough_refinements():
    from lrt_model.decode import prefill
    from lrt_model.model import KVCache

    model = lrt(dtype=torch.float64)
    prompt = tokens(batch=2)[:, :6]
    with torch.no_grad():
        c1 = KVCache(model.cfg, 2, 6)
        c2 = KVCache(model.cfg, 2, 6)
        c3 = KVCache(model.cfg, 2, 6)
        exact, _ = prefill(model, prompt, c1, "exact")
        refined, _ = prefill(model, prompt, c2, "parallel", passes=5)  # K = n-1: exact
        rough, _ = prefill(model, prompt, c3, "parallel", passes=1)
    assert (exact - refined).abs().max() < 1e-12
    assert (exact - rough).abs().max() > 1e-6  # an approximation below n-1 refinements
    for layer in range(model.cfg.depth):
        assert (c1.k[layer] - c2.k[layer]).abs().max() < 1e-12


@pytest.mark.parametrize("strategy", ["interleaved", "multi_refine"])
def test_recompute_mlp_changes_memory_not_the_numbers(strategy):
    """Recomputing the later passes' MLP activations gives the same loss and gradients
    (fp64) and keeps fewer bytes for backward."""
    torch.manual_seed(0)
    models = []
    for recompute in (False, True):
        cfg = ModelConfig(depth=2, width=32, head_dim=16, seq_len=16, vocab_size=50,
                          recurrence=RecurrenceConfig(strategy=strategy, passes=2, recompute_mlp=recompute))
        torch.manual_seed(0)
        m = GPT(cfg).double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        models.append(m)
    idx = torch.randint(0, 50, (2, 16))
    results = []
    for m in models:
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = training_loss(m, idx, idx)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.parameters()], sum(saved.values())))
    (l0, g0, b0), (l1, g1, b1) = results
    assert abs(l0 - l1) < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(g0, g1))
    assert b1 < 0.9 * b0


def test_recompute_mlp_is_refused_for_sequential():
    with pytest.raises(ConfigError, match="recompute_mlp only applies"):
        RecurrenceConfig(strategy="sequential", recompute_mlp=True).validate(4)


# ---------------------------------------------------------------------------
# passes_schedule


def test_schedule_reaching_s_equal_t_is_the_exact_recurrence():
    """The scheduled value, not the config's, drives the passes: S = T (K = T-1) is exact, S = 2 is not."""
    total = 10
    for strategy, cheap, exact in (("interleaved", 2, T), ("multi_refine", 1, T - 1)):
        model = lrt(strategy=strategy, passes=exact, passes_schedule=[[0.0, cheap], [0.5, exact]])
        rec, idx = model.rec, tokens()
        with torch.no_grad():
            reference = naive_sequential_logits(model, idx)
            early = forward_passes(model, idx, rec.passes_at(0, total)).merged()
            late = forward_passes(model, idx, rec.passes_at(total // 2, total)).merged()
        assert (late - reference).abs().max() < 1e-12, strategy
        assert (early - reference).abs().max() > 1e-3, strategy  # the early, cheap passes really ran


def test_schedule_validation_names_the_field_and_the_fix():
    cases = {
        "non-empty list": dict(passes_schedule=[]),
        r"make the first entry \[0.0, passes\]": dict(passes_schedule=[[0.2, 2]]),
        "strictly increasing": dict(passes=4, passes_schedule=[[0.0, 2], [0.5, 8], [0.5, 4]]),
        "0 <= fraction < 1": dict(passes=4, passes_schedule=[[0.0, 2], [1.0, 4]]),
        "integer passes >= 1": dict(passes_schedule=[[0.0, 2.5]]),
        "set passes=8": dict(passes=2, passes_schedule=[[0.0, 2], [0.6, 8]]),
        "loss_weights cannot be combined": dict(passes=4, passes_schedule=[[0.0, 2], [0.6, 4]], loss_weights=[1] * 5),
        "drop it for sequential": dict(strategy="sequential", passes_schedule=[[0.0, 2]]),
    }
    for fragment, fields in cases.items():
        with pytest.raises(ConfigError, match=fragment) as e:
            RecurrenceConfig(**fields).validate(4)
        assert "passes_schedule" in str(e.value) and "\n" not in str(e.value)
    rec = RecurrenceConfig(strategy="multi_refine", passes=3, passes_schedule=[(0.0, 1), (0.25, 3)])
    rec.validate(4)
    assert rec.passes_schedule == [[0.0, 1], [0.25, 3]]  # tuples (YAML) and lists (JSON) are one value
    assert [rec.passes_at(s, 8) for s in range(8)] == [1, 1, 3, 3, 3, 3, 3, 3]


def _scheduled_run(**kw):
    from lrt_model.train import TrainConfig

    rec = RecurrenceConfig(strategy="interleaved", passes=8, passes_schedule=[[0.0, 2], [0.6, 4], [0.9, 8]])
    model = ModelConfig(depth=1, head_dim=16, width=32, seq_len=32, recurrence=rec)
    return TrainConfig(model=model, batch_size=2, tokens=10 * 2 * 32, eval_tokens=2 * 32, eval_every=5, progress=False,
                       icl={"evals": []}, **kw)


def test_training_switches_passes_on_schedule_and_resumes_bit_identically(tmp_path, monkeypatch):
    """10 steps: S=2 for steps 0-5, S=4 for 6-8, S=8 for step 9; FLOPs summed at those S; a run stopped
    mid-schedule (after step 7, inside S=4) resumes into exactly the same numbers."""
    import lrt_model.train as train_mod
    from lrt_model.flops import training_flops

    used = []
    real = train_mod.training_loss

    def spy(model, idx, targets, passes=None):
        used.append(passes)
        return real(model, idx, targets, passes)

    monkeypatch.setattr(train_mod, "training_loss", spy)
    straight = train_mod.train(_scheduled_run())
    assert used == [2] * 6 + [4] * 3 + [8]
    mcfg = dataclasses.replace(_scheduled_run().model, vocab_size=257)
    assert straight["flops"] == training_flops(mcfg, 10, 64)
    assert [e["flops"] for e in straight["evals"]] == [training_flops(mcfg, s, 64, 10) for s in (0, 5, 10)]
    assert straight["flops_per_token"] == pytest.approx(straight["flops"] / straight["tokens"])

    used.clear()
    first = train_mod.train(_scheduled_run(checkpoint_dir=str(tmp_path), stop_after_steps=8))
    resumed = train_mod.train(_scheduled_run(checkpoint_dir=str(tmp_path)))
    assert first["steps"] == 8 and resumed["steps"] == 10
    assert used == [2] * 6 + [4] * 2 + [4] + [8]  # the resumed run picks the schedule up at step 8
    for key in ("train_loss", "val_bpb", "val_bpb_merged", "flops"):
        assert resumed[key] == straight[key], key
