"""The fixed-shape decode step (what a CUDA graph replays) against the eager cached step,
in float64, for both arms; the capture itself is tested in test_gpu.py."""

import pytest
import torch

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.decode import DecodeStep, StaticDecodeStep, generate, prefill
from lrt_model.model import GPT, KVCache, StaticKVCache

V = 61


def model_for(rec: RecurrenceConfig | None, kv_heads=2, ve="alternating") -> GPT:
    cfg = ModelConfig(depth=3, vocab_size=V, seq_len=16, head_dim=8, width=32, n_kv_head=kv_heads,
                      value_embeds=ve, recurrence=rec)
    torch.manual_seed(0)
    model = GPT(cfg).double()
    with torch.no_grad():  # non-zero output projections and gates, so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


ARMS = {
    "baseline": None,
    "lrt_shared_gated": RecurrenceConfig(strategy="interleaved"),
    "lrt_layerwise_residual": RecurrenceConfig(strategy="interleaved", projection="layerwise", injection="both",
                                               gates=False),
}


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("prefill_mode", ["exact", "parallel"])
def test_static_step_equals_the_eager_step_in_float64(arm, prefill_mode):
    model = model_for(ARMS[arm])
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    follow = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    results = []
    with torch.no_grad():
        for static in (False, True):
            if static:  # a max_len beyond what is written: unwritten slots must stay invisible
                cache = StaticKVCache(model.cfg, 2, 16)
                step = StaticDecodeStep(model, cache, 2, cuda_graph=False)
            else:
                cache = KVCache(model.cfg, 2, 11)
                step = DecodeStep(model, cache)
            logits, memory = prefill(model, prompt, cache, prefill_mode, step=step)
            outs = [logits]
            for j in range(follow.shape[1]):  # teacher-forced steps
                hidden, memory = step(follow[:, j : j + 1], 5 + j, memory)
                outs.append(model.logits(hidden))
            results.append(torch.stack(outs))
    eager, static = results
    assert (static - eager).abs().max() < 1e-12
    assert eager.std() > 0.1  # the model is not trivially constant


@pytest.mark.parametrize("arm", ARMS)
def test_generate_static_equals_eager(arm):
    model = model_for(ARMS[arm], kv_heads=None, ve="none")
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(3))
    eager = generate(model, prompt, 9, temperature=0, decode="eager")
    static = generate(model, prompt, 9, temperature=0, decode="static")
    assert torch.equal(eager, static)
    sampled = [generate(model, prompt, 9, temperature=1.0, top_k=7, seed=4, decode=m) for m in ("eager", "static")]
    assert torch.equal(*sampled)


def test_decode_mode_errors_name_the_fix():
    model = model_for(None)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="decode mode 'graph' is not known; use one of auto, eager, static, cuda_graph"):
        generate(model, prompt, 2, decode="graph")
    with pytest.raises(ValueError, match="needs the model and prompt on a CUDA device, not cpu; use decode='static'"):
        generate(model, prompt, 2, decode="cuda_graph")


@pytest.mark.parametrize("arm", ["baseline", "lrt_shared_gated"])
@pytest.mark.parametrize("n_prompt,n_tail", [(4, 3), (10, 6)])  # 10 + 6 = 16: the real steps reach the warm-up slot
def test_expanded_static_step_equals_expanded_eager_step(arm, n_prompt, n_tail):
    """Candidates branching from a shared prompt (the ICL sequential view): the expanded
    fixed-shape step, built (and warmed up at the last slot) after the prompt is cached,
    continues each row exactly as the expanded eager step does."""
    from lrt_model.decode import decode_step, expand_step

    model = model_for(ARMS[arm])
    prompt = torch.randint(0, V, (2, n_prompt), generator=torch.Generator().manual_seed(5))
    owner = torch.tensor([0, 0, 1, 1, 1])
    tails = torch.randint(0, V, (5, n_tail), generator=torch.Generator().manual_seed(6))
    results = []
    with torch.no_grad():
        for mode in ("eager", "static"):
            step, memory = decode_step(model, 2, n_prompt + n_tail, mode), None
            for t in range(n_prompt):
                hidden, memory = step(prompt[:, t : t + 1], t, memory)
            step = expand_step(step, owner)
            memory = memory.index_select(0, owner) if memory is not None else None
            outs = []
            for j in range(n_tail):
                hidden, memory = step(tails[:, j : j + 1], n_prompt + j, memory)
                outs.append(model.logits(hidden))
            results.append(torch.stack(outs))
    eager, static = results
    assert eager.shape == (n_tail, 5, V)
    assert (static - eager).abs().max() < 1e-12
    assert (eager[:, 0] - eager[:, 1]).abs().max() > 1e-3  # the branches did diverge


def test_sequential_view_is_the_same_in_every_decode_mode():
    from lrt_model.recurrence import sequential_logits

    model = model_for(ARMS["lrt_shared_gated"])
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eager, static = sequential_logits(model, idx, "eager"), sequential_logits(model, idx, "static")
    assert (eager - static).abs().max() < 1e-12


def test_a_bad_eval_decode_setting_fails_at_import_with_the_fix():
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import lrt_model.decode"], capture_output=True, text=True,
                       env={**os.environ, "LRT_EVAL_DECODE": "graphs"})
    assert r.returncode != 0 and "LRT_EVAL_DECODE='graphs' is not known; use one of auto, eager" in r.stderr
