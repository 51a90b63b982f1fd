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
- A decode step at small batch is bound by kernel launches (about 30 per
  layer), not arithmetic. On CUDA (`decode="auto"`) the step is captured once
  as a CUDA graph over a `StaticKVCache` (fixed shapes, the position a device
  tensor) and replayed per token, for both arms alike. `decode="static"` runs
  the same fixed-shape step without capture (for tests and debugging);
  `decode="eager"` (the CPU default) uses the growing `KVCache`. The
  sequential-view evaluation (`recurrence.sequential_hidden`) runs the same step.
"""

from __future__ import annotations

import os

import torch

from .model import GPT, KVCache, SelfKV, StaticKVCache, shift_memory

DECODE_MODES = ("auto", "eager", "static", "cuda_graph")
# The decode step of the sequential-view evaluations (val bpb, ICL); LRT_EVAL_DECODE=eager
# turns the CUDA graph off there, e.g. to compare (benchmarks.lrt times both).
EVAL_DECODE = os.environ.get("LRT_EVAL_DECODE", "auto")
if EVAL_DECODE not in DECODE_MODES:
    raise ValueError(f"LRT_EVAL_DECODE={EVAL_DECODE!r} is not known; use one of {', '.join(DECODE_MODES)}")


class DecodeStep:
    """One token per sequence through `cache`: `step(tokens (B, 1), position, memory (B, 1, d)
    or None)` returns (final hidden (B, d), source state (B, 1, d) = the next token's memory)."""

    def __init__(self, model: GPT, cache):
        self.model, self.cache = model, cache

    def __call__(self, tokens: torch.Tensor, pos: int, memory: torch.Tensor | None):
        out = self.model.run(tokens, torch.tensor([pos], device=tokens.device), memory, self.cache)
        return out.hidden[:, -1], out.source


class StaticDecodeStep:
    """The same step with fixed input buffers over a `StaticKVCache`, captured as a CUDA graph
    when `cuda_graph` (one launch per token instead of one per kernel) and replayed per call.
    Zero memory stands for None (the projections of zero add exactly zero).

    Constraints of the captured graph, all met inside one `generate` call:
    - its outputs (hidden, source) are the graph's own buffers, overwritten by the next call,
      so use them (or copy them) before calling again; passing the returned source back in
      as the next memory is fine (it is copied in before the replay);
    - under autocast the graph reads autocast's cached bf16 weight copies, which live until
      the outermost autocast region exits: build and use the step inside one region."""

    @torch.no_grad()
    def __init__(self, model: GPT, cache: StaticKVCache, batch: int, cuda_graph: bool):
        device, dtype = model.wte.weight.device, model.wte.weight.dtype
        self.model, self.cache, self.graph = model, cache, None
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.memory = torch.zeros(batch, 1, model.cfg.d_model, dtype=dtype, device=device) if model.rec else None
        # Warm-up writes K/V at the last slot: masked from every earlier position, and written
        # again by the real step there before it is read. So the step may be built after a
        # prompt is cached, as long as the last slot is still free (always, for a cache made
        # for prompt + new tokens). The first run, on the current stream, also allocates the
        # cache there, the stream that will use it; "static" runs it too, so the CPU tests it.
        self.pos.fill_(cache.max_len - 1)
        self._run()
        if cuda_graph:
            with torch.cuda.device(device):  # the capture stream belongs to the current device
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside the graph on a side stream, as capture needs
                    for _ in range(2):
                        self._run()
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: other threads' CUDA calls (e.g. a DDP process group's watchdog
                # polling its events) must not invalidate this thread's capture
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.outputs = self._run()

    def _run(self):
        out = self.model.run(self.tokens, self.pos, self.memory, self.cache)
        return out.hidden[:, -1], out.source

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, pos: int, memory: torch.Tensor | None):
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        if self.memory is not None:
            self.memory.zero_() if memory is None else self.memory.copy_(memory)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.outputs


def decode_step(model: GPT, batch: int, max_len: int, mode: str = "auto"):
    """A fresh cache for `max_len` positions and the decode step over it (`step.cache`)."""
    device = model.wte.weight.device
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r} is not known; use one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        mode = "cuda_graph" if device.type == "cuda" else "eager"
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode='cuda_graph' needs the model and prompt on a CUDA device, not {device}; "
                         "use decode='static' or 'eager' there")
    if mode == "eager":
        return DecodeStep(model, KVCache(model.cfg, batch, max_len))
    cache = StaticKVCache(model.cfg, batch, -(-max_len // 16) * 16)  # a mask width fused kernels accept
    return StaticDecodeStep(model, cache, batch, cuda_graph=mode == "cuda_graph")


def expand_step(step, owner: torch.Tensor):
    """A decode step of the same kind whose row r continues `step`'s row owner[r]
    (a new graph is captured for the new batch size)."""
    cache = step.cache.select_rows(owner)
    if isinstance(step, StaticDecodeStep):
        return StaticDecodeStep(step.model, cache, owner.numel(), cuda_graph=step.graph is not None)
    return DecodeStep(step.model, cache)


@torch.no_grad()
def prefill(model: GPT, prompt: torch.Tensor, cache, mode: str = "exact", passes: int = 3, step=None):
    """Fill `cache` with the prompt (B, n). Returns (last logits (B, V), memory for the next token).
    `step`: the decode step that exact LRT prefill runs per token (default: an eager one)."""
    B, n = prompt.shape
    device = prompt.device
    if model.rec is None:
        out = model.run(prompt, torch.arange(n, device=device), None, cache)
        return model.logits(out.hidden[:, -1]), None
    if mode == "exact":
        step = step or DecodeStep(model, cache)
        memory = hidden = None
        for t in range(n):
            hidden, memory = step(prompt[:, t : t + 1], t, memory)
        return model.logits(hidden), memory
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
             top_k: int | None = None, seed: int | None = None, prefill_mode: str = "exact",
             decode: str = "auto") -> torch.Tensor:
    """Sample `max_new_tokens` after `prompt` (B, n); returns (B, max_new_tokens).
    temperature 0 means greedy. `decode`: "auto" (a CUDA graph on CUDA, eager elsewhere),
    "eager", "static" or "cuda_graph" (see the module's notes)."""
    B, n = prompt.shape
    device = prompt.device
    step = decode_step(model, B, n + max_new_tokens, decode)
    logits, memory = prefill(model, prompt, step.cache, prefill_mode, step=step)
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    out = []
    for t in range(n, n + max_new_tokens):
        nxt = _sample(logits, temperature, top_k, gen)
        out.append(nxt)
        if t == n + max_new_tokens - 1:
            break
        hidden, memory = step(nxt, t, memory)
        logits = model.logits(hidden)
    return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)
