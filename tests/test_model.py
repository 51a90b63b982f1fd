"""Backbone: architecture facts, KV-cache decoding equals the full forward, configs."""

import pytest
import torch

from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.decode import generate, prefill
from lrt_model.model import GPT, KVCache
from lrt_model.recurrence import sequential_logits


def perturbed(cfg: ModelConfig, dtype=torch.float32, seed=0) -> GPT:
    """A model whose zero-initialised projections are made non-zero, so every block matters."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_width_follows_depth_and_head_dim():
    assert ModelConfig(depth=20, head_dim=128).d_model == 1280
    assert ModelConfig(depth=2, head_dim=32).d_model == 128
    assert ModelConfig(depth=3, head_dim=128).d_model == 256  # 192 rounded up to the head dim
    assert ModelConfig(depth=4, head_dim=64).n_head == 4


def test_architecture_facts():
    cfg = ModelConfig(depth=2, vocab_size=61, head_dim=16, width=64, value_embeds="alternating")
    model = GPT(cfg)
    assert all(getattr(m, "bias", None) is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()  # untied
    for block in model.blocks:  # zero-init output projections
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert list(model.value_embeds.keys()) == ["1"]  # alternating includes the last layer
    assert len(GPT(ModelConfig(depth=3, vocab_size=61, head_dim=16, width=64, value_embeds="all")).value_embeds) == 3
    assert not any(n.endswith("norm.weight") for n, _ in model.named_parameters())  # parameter-free norms


def test_logit_softcap_bounds_logits():
    model = perturbed(ModelConfig(depth=1, vocab_size=31, head_dim=16, width=32))
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
        logits = model(torch.randint(0, 31, (1, 8)))
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0


@pytest.mark.parametrize("kv_heads,ve", [(None, "none"), (2, "alternating"), (1, "all")])
def test_cached_decoding_equals_full_forward(kv_heads, ve):
    cfg = ModelConfig(depth=3, vocab_size=61, seq_len=24, head_dim=16, width=64, n_kv_head=kv_heads, value_embeds=ve)
    model = perturbed(cfg)
    idx = torch.randint(0, 61, (3, 24))
    with torch.no_grad():
        full = model(idx)
        stepwise = sequential_logits(model, idx)  # one token at a time through the cache
        cache = KVCache(cfg, 3, 24)
        chunk_logits, _ = prefill(model, idx[:, :10], cache)  # a chunk, then single steps
        rest = []
        for t in range(10, 24):
            out = model.run(idx[:, t : t + 1], torch.tensor([t]), None, cache)
            rest.append(model.logits(out.hidden))
    assert (stepwise - full).abs().max() < 1e-4
    assert (chunk_logits - full[:, 9]).abs().max() < 1e-4
    assert (torch.cat(rest, 1) - full[:, 10:]).abs().max() < 1e-4


@pytest.mark.parametrize("rec", [None, RecurrenceConfig(strategy="interleaved")])
def test_greedy_generation_matches_argmax_of_the_scorer(rec):
    cfg = ModelConfig(depth=2, vocab_size=61, seq_len=32, head_dim=16, width=64, recurrence=rec)
    model = perturbed(cfg)
    prompt = torch.randint(0, 61, (2, 5))
    out = generate(model, prompt, 8, temperature=0)
    # teacher-force the generated text through the exact scorer: greedy choice at every step
    full = torch.cat([prompt, out], 1)
    with torch.no_grad():
        logits = sequential_logits(model, full)
    assert torch.equal(logits[:, 4:-1].argmax(-1), out)


def test_sampling_is_seeded():
    model = perturbed(ModelConfig(depth=1, vocab_size=61, head_dim=16, width=32))
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(depth=0), "depth"),
    (dict(depth=2, head_dim=16, width=60), "multiple of head_dim"),
    (dict(depth=2, head_dim=16, width=64, n_kv_head=3), "n_kv_head"),
    (dict(value_embeds="some"), "value_embeds"),
    (dict(depth=2, recurrence=RecurrenceConfig(source_layer=5)), "source_layer"),
    (dict(recurrence=RecurrenceConfig(injection="both_ways")), "injection"),
    (dict(recurrence=RecurrenceConfig(passes=0)), "passes"),
    (dict(recurrence=RecurrenceConfig(passes=2, loss_weights=[1, 1])), "loss_weights"),
])
def test_bad_configs_name_the_field(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = ModelConfig(depth=2, recurrence=RecurrenceConfig(strategy="multi_refine", passes=3))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_paper_configuration_parameter_overhead_on_meta_device():
    """The paper's 20-layer LRT backbone (vocab 32768, width 1280, 10 heads of 128, value
    embeddings on every layer): ~1.3B parameters; the shared memory adds < 0.4%."""
    def build(projection):
        cfg = ModelConfig(depth=20, head_dim=128, vocab_size=32768, seq_len=2048, value_embeds="all",
                          recurrence=RecurrenceConfig(projection=projection))
        with torch.device("meta"):
            return GPT(cfg)

    shared, layerwise = build("shared"), build("layerwise")
    assert 1.2e9 < shared.num_params() < 1.45e9
    assert shared.param_overhead() < 0.004
    assert 0.04 < layerwise.param_overhead() < 0.06  # one W_k, W_v pair per layer: ~20x the shared pair
