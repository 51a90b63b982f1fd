"""Autoregressive decoding through an ordinary KV cache.

Design choices:
- Baseline: the prompt is prefilled in one causal chunk, then one token per
  step. LRT: every step also carries the source layer's state of the previous
  token into the next step (true recurrence, no re-computation of the prefix).
  The source state is already computed by the step, so LRT adds no decoding
  step, only the small memory projections.
- LRT prefill is exact by default (one step per prompt token, as the
  recurrence demands). `prefill="parallel"` runs `passes` multi-refine
  iterations over the prompt in parallel and fills the cache from the last
  one: faster for long prompts, an approximation (its gap is measured by the
  sequential-vs-merged bpb views, never hidden).
"""

from __future__ import annotations

import torch

from .model import GPT, KVCache, SelfKV, shift_memory


@torch.no_grad()
def prefill(model: GPT, prompt: torch.Tensor, cache: KVCache, mode: str = "exact", passes: int = 3):
    """Fill `cache` with the prompt (B, n). Returns (last logits (B, V), memory for the next token)."""
    B, n = prompt.shape
    device = prompt.device
    if model.rec is None:
        out = model.run(prompt, torch.arange(n, device=device), None, cache)
        return model.logits(out.hidden[:, -1]), None
    if mode == "exact":
        memory, out = None, None
        for t in range(n):
            out = model.run(prompt[:, t : t + 1], torch.tensor([t], device=device), memory, cache)
            memory = out.source
        return model.logits(out.hidden[:, -1]), memory
    if mode != "parallel":
        raise ValueError(f"prefill mode {mode!r} is not known; use 'exact' or 'parallel'")
    memory = None
    for _ in range(passes):
        out = model.run(prompt, None, memory, SelfKV(model.cfg.depth))
        memory = shift_memory(out.source)
    store = SelfKV(model.cfg.depth, capture=True)
    out = model.run(prompt, None, memory, store)
    positions = torch.arange(n, device=device)
    for layer in range(model.cfg.depth):
        cache.write(layer, store.k[layer], store.v[layer], positions)
    return model.logits(out.hidden[:, -1]), out.source[:, -1:]


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, prefill_mode: str = "exact") -> torch.Tensor:
    """Sample `max_new_tokens` after `prompt` (B, n); returns (B, max_new_tokens).
    temperature 0 means greedy."""
    B, n = prompt.shape
    device = prompt.device
    cache = KVCache(model.cfg, B, n + max_new_tokens)
    logits, memory = prefill(model, prompt, cache, prefill_mode)
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    out = []
    for t in range(n, n + max_new_tokens):
        nxt = _sample(logits, temperature, top_k, gen)
        out.append(nxt)
        if t == n + max_new_tokens - 1:
            break
        step = model.run(nxt, torch.tensor([t], device=device), memory, cache)
        logits = model.logits(step.hidden[:, -1])
        memory = step.source
    return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)
