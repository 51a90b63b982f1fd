"""CUDA-only checks (skipped without a GPU): the FlexAttention subset passes,
bf16 training, compiled training and cached decoding on the device.
`benchmarks/gpu_check.sh` runs these on a lent GPU."""

import dataclasses

import pytest
import torch

import lrt_model.model as model_mod
from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.model import GPT, attention, subset_block_mask
from lrt_model.recurrence import interleaved, sequential_logits, training_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lrt(T=64, **rec):
    rec.setdefault("strategy", "interleaved")
    cfg = ModelConfig(depth=3, vocab_size=101, seq_len=T, head_dim=32, width=128, n_kv_head=2,
                      value_embeds="alternating", recurrence=RecurrenceConfig(**rec))
    torch.manual_seed(0)
    m = GPT(cfg).cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_flex_subset_mask_equals_the_dense_mask_on_cpu():
    """The block mask encodes the same position-aware causal mask (forward only:
    FlexAttention has no CPU backward)."""
    torch.manual_seed(0)
    T, S = 256, 2
    for r in range(S):
        q_pos = torch.arange(r, T, S)
        q, k, v = torch.randn(2, 4, q_pos.numel(), 32), torch.randn(2, 2, T, 32), torch.randn(2, 2, T, 32)
        with torch.no_grad():
            flex = attention(q, k, v, subset_block_mask(r, S, q_pos.numel(), T, q.device), True)
        dense = attention(q, k, v, torch.arange(T)[None, :] <= q_pos[:, None], True)
        assert (flex - dense).abs().max() < 1e-5


@cuda
def test_flex_and_dense_subset_passes_agree_with_gradients(monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    m = lrt(T=256)
    idx = torch.randint(0, 101, (2, 256), device="cuda")
    results = []
    for flex in (True, False):
        monkeypatch.setattr(model_mod, "USE_FLEX", flex)
        m.zero_grad()
        loss, passes = training_loss(m, idx, idx)
        loss.backward()
        results.append((passes.merged().detach(), m.mem_k.weight.grad.clone(), m.blocks[0].attn.c_q.weight.grad.clone()))
    for a, b in zip(*results):
        assert (a - b).abs().max() / b.abs().max() < 1e-4


@cuda
def test_exactness_anchor_on_cuda_with_flex():
    torch.backends.cuda.matmul.allow_tf32 = False
    T = 48
    m = lrt(T=T)
    idx = torch.randint(0, 101, (2, T), device="cuda")
    with torch.no_grad():
        exact = sequential_logits(m, idx)
        merged = interleaved(m, idx, S=T).merged()
    assert (merged - exact).abs().max() < 1e-4


@cuda
@pytest.mark.parametrize("strategy", [None, "interleaved", "multi_refine"])
def test_bf16_compiled_training_matches_eager(strategy):
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(depth=2, vocab_size=101, seq_len=128, head_dim=32, width=128,
                      recurrence=RecurrenceConfig(strategy=strategy) if strategy else None)
    torch.manual_seed(0)
    m = GPT(cfg).cuda()
    idx = torch.randint(0, 101, (4, 128), device="cuda")
    fn = lambda x: training_loss(m, x, x)[0]  # noqa: E731
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = fn(idx)
        compiled = torch.compile(fn)(idx)
    assert torch.isfinite(eager) and abs(eager.item() - compiled.item()) < 2e-2


@cuda
def test_cached_decoding_equals_full_forward_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(depth=2, vocab_size=101, seq_len=64, head_dim=32, width=128, n_kv_head=2)
    torch.manual_seed(0)
    m = GPT(cfg).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        idx = torch.randint(0, 101, (2, 64), device="cuda")
        assert (sequential_logits(m, idx) - m(idx)).abs().max() < 1e-4


@cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunked_loss_on_cuda_equals_the_plain_path(dtype):
    """The compiled CUDA chunk step against plain cross-entropy (ragged chunks included)."""
    from lrt_model.fused_loss import linear_softcap_cross_entropy

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    h = torch.randn(1000, 64, device="cuda", requires_grad=True)
    w = (0.3 * torch.randn(3000, 64, device="cuda")).requires_grad_()
    y = torch.randint(0, 3000, (1000,), device="cuda")
    y[:10] = -1
    z = h.double() @ w.double().t()
    ref = torch.nn.functional.cross_entropy(15 * torch.tanh(z / 15), y, ignore_index=-1)
    ref_g = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        got = linear_softcap_cross_entropy(h, w, y, 15.0, chunk_elements=256 * 3000)
    got_g = torch.autograd.grad(got, (h, w))
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert abs(got.item() - ref.item()) / ref.item() < tol
    for g, r in zip(got_g, ref_g):
        assert (g.double() - r).norm() / r.norm() < tol


@cuda
def test_batched_muon_equals_torch_muon_on_cuda():
    from lrt_model.optim import BatchedMuon

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(256, 256)] * 4 + [(1024, 256)] * 2 + [(256, 1024)] * 2
    ref = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opts = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1), BatchedMuon(ours, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(ref, ours):
            p.grad = torch.randn(p.shape, device="cuda", generator=g)
            q.grad = p.grad.clone()
        for o in opts:
            o.step()
    for p, q in zip(ref, ours):  # bf16 batched vs per-matrix matmuls: a few bf16 roundings of the update apart
        torch.testing.assert_close(q, p, rtol=0, atol=3 * 0.02 * 2**-7)


@cuda
@pytest.mark.parametrize("arm", ["baseline", "lrt"])
@pytest.mark.parametrize("prefill_mode", ["exact", "parallel"])
def test_cuda_graph_decoding_equals_the_eager_step(arm, prefill_mode):
    from lrt_model.decode import DecodeStep, StaticDecodeStep, generate, prefill
    from lrt_model.model import KVCache, StaticKVCache

    model = lrt(T=32, strategy="interleaved")
    if arm == "baseline":  # the same backbone without recurrence, perturbed alike
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(model.cfg, recurrence=None)).cuda()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    prompt = torch.randint(0, 101, (4, 6), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    follow = torch.randint(0, 101, (4, 10), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))

    def decode(mode):
        if mode == "eager":
            cache = KVCache(model.cfg, 4, 16)
            step = DecodeStep(model, cache)
        else:
            cache = StaticKVCache(model.cfg, 4, 32)
            step = StaticDecodeStep(model, cache, 4, cuda_graph=mode == "cuda_graph")
        logits, memory = prefill(model, prompt, cache, prefill_mode, step=step)
        outs = [logits]
        for j in range(follow.shape[1]):
            hidden, memory = step(follow[:, j : j + 1], 6 + j, memory)
            outs.append(model.logits(hidden))
        return torch.stack(outs)

    with torch.no_grad():
        fp32 = {mode: decode(mode) for mode in ("eager", "static", "cuda_graph")}
        with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16 decoding, as benchmarks.lrt runs it
            bf16 = {mode: decode(mode) for mode in ("eager", "cuda_graph")}
            a = generate(model, prompt, 12, temperature=0, decode="static", prefill_mode=prefill_mode)
            b = generate(model, prompt, 12, temperature=0, decode="cuda_graph", prefill_mode=prefill_mode)
    assert (fp32["cuda_graph"] - fp32["static"]).abs().max() < 1e-5  # the same kernels, replayed
    assert (fp32["cuda_graph"] - fp32["eager"]).abs().max() < 1e-3
    assert (bf16["cuda_graph"] - bf16["eager"]).abs().max() < 0.1  # bf16 roundings, different attention kernels
    assert (bf16["cuda_graph"] - fp32["eager"]).abs().max() < 0.25
    assert torch.equal(a, b)


@cuda
def test_expanded_cuda_graph_step_equals_the_eager_one():
    """A graph captured after the prompt is in the cache (ICL candidates branching from it):
    its warm-up must not disturb the cached prompt."""
    from lrt_model.decode import decode_step, expand_step

    model = lrt(T=32, strategy="interleaved").eval()
    prompt = torch.randint(0, 101, (2, 5), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    owner = torch.tensor([0, 0, 1, 1, 1], device="cuda")
    tails = torch.randint(0, 101, (5, 4), device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    results = {}
    with torch.no_grad():
        for mode in ("eager", "cuda_graph"):
            step, memory = decode_step(model, 2, 9, mode), None
            for t in range(5):
                hidden, memory = step(prompt[:, t : t + 1], t, memory)
            step = expand_step(step, owner)
            memory = memory.index_select(0, owner)
            outs = []
            for j in range(4):
                hidden, memory = step(tails[:, j : j + 1], 5 + j, memory)
                outs.append(model.logits(hidden))
            results[mode] = torch.stack(outs)
    assert (results["cuda_graph"] - results["eager"]).abs().max() < 1e-3


@cuda
@pytest.mark.parametrize("strategy", ["interleaved", "sequential"])
def test_evaluation_through_the_cuda_graph_equals_eager_under_bf16(strategy, monkeypatch):
    """val bpb's sequential view through the captured step (one capture per batch, inside each
    batch's autocast region) against the eager step."""
    import lrt_model.decode as decode_mod
    from lrt_model.evaluation import evaluate_bpb

    model = lrt(T=32, strategy=strategy)
    rows = torch.randint(0, 101, (6, 33), generator=torch.Generator().manual_seed(0))
    token_bytes = torch.ones(101, dtype=torch.int64)
    got = {}
    for mode in ("eager", "cuda_graph"):
        monkeypatch.setattr(decode_mod, "EVAL_DECODE", mode)
        got[mode] = evaluate_bpb(model, rows, token_bytes, 4, torch.device("cuda"),
                                 torch.autocast("cuda", dtype=torch.bfloat16))
    assert got["cuda_graph"]["val_bpb_sequential"] == pytest.approx(got["eager"]["val_bpb_sequential"], rel=2e-3)
    assert got["cuda_graph"]["val_bpb_full"] == got["eager"]["val_bpb_full"]
