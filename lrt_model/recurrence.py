"""Training and scoring strategies for the latent recurrent memory.

Design choices:
- Every strategy returns `Passes`: the logits of each pass at the positions
  that pass computed. The training loss is the weighted mean of the per-pass
  token-mean losses; evaluation reads `merged()` (each position from the last
  pass that computed it).
- interleaved(S): pass 0 is a full causal pass with zero memory that keeps
  every layer's K/V (after norm/RoPE) and the source states, graph attached.
  Pass i recomputes positions p % S == i-1 with memory from the latest source
  states shifted by one, attending over the buffer under a position-aware
  causal mask; its fresh K/V and source states are written back, so later
  passes see refined memory. With S = T this is the exact recurrence.
- multi_refine(K): K+1 full passes, each with the previous pass's source
  states as memory (a Jacobi iteration; exact after T-1 refinements).
- sequential: the exact recurrence token by token through a KV cache; this is
  what decoding delivers and what `sequential` bpb measures.
- `forward_passes`/`training_loss` take an explicit `passes` (the trainer's
  scheduled S or K for the step, from `RecurrenceConfig.passes_at`) rather
  than a mutated config; None means the config's `passes` (evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decode import decode_step
from .model import GPT, BufferKV, SelfKV, apply_rotary, rms_norm, shift_memory


@dataclass
class Passes:
    model: GPT = field(repr=False)
    hidden: list  # per pass: final normed hidden states (B, n_i, d)
    positions: list  # per pass: LongTensor (n_i,) or None for all positions

    @property
    def logits(self) -> list:
        """Per pass: (B, n_i, V). Made on demand: training never needs them whole."""
        return [self.model.logits(h) for h in self.hidden]

    def merged(self) -> torch.Tensor:
        """(B, T, V): each position's logits from the last pass that computed it."""
        all_logits = self.logits
        out = all_logits[0]
        assert self.positions[0] is None, "pass 0 covers every position"
        for pos, logits in zip(self.positions[1:], all_logits[1:]):
            out = logits if pos is None else out.index_copy(1, pos, logits)
        return out


def forward_passes(model: GPT, idx: torch.Tensor, passes: int | None = None) -> Passes:
    """The training-time forward of the model's configured strategy, with `passes` S or K
    (default the config's `passes`)."""
    rec = model.rec
    if rec is None:
        return Passes(model, [model.run(idx, None, None, SelfKV(model.cfg.depth)).hidden], [None])
    passes = rec.passes if passes is None else passes
    if rec.strategy == "interleaved":
        return interleaved(model, idx, passes, rec.refresh_kv)
    if rec.strategy == "multi_refine":
        return multi_refine(model, idx, passes, rec.detach)
    return Passes(model, [sequential_hidden(model, idx)], [None])


def pass_weights(model: GPT, n_passes: int) -> list[float]:
    rec = model.rec
    if rec is not None and rec.loss_weights is not None and n_passes == len(rec.loss_weights):
        w = list(rec.loss_weights)
    else:
        w = [1.0] * n_passes
    total = sum(w)
    return [x / total for x in w]


def training_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor,
                  passes: int | None = None) -> tuple[torch.Tensor, Passes]:
    """Weighted mean over passes of each pass's token-mean cross-entropy
    (targets < 0 are ignored); `passes` is this step's S or K (default the config's)."""
    out = forward_passes(model, idx, passes)
    weights = pass_weights(model, len(out.hidden))
    loss = 0.0
    for w, pos, hidden in zip(weights, out.positions, out.hidden):
        tgt = targets if pos is None else targets[:, pos]
        loss = loss + w * model.loss(hidden, tgt)
    return loss, out


# ---------------------------------------------------------------------------


def interleaved(model: GPT, idx: torch.Tensor, S: int, refresh: bool = False) -> Passes:
    B, T = idx.shape
    depth = model.cfg.depth
    refresh = refresh and model.rec.uses_kv
    store = SelfKV(depth, capture=True, keep_raw=refresh)
    out = model.run(idx, None, None, store)
    hidden, positions = [out.hidden], [None]
    keys, values, source = store.k, store.v, out.source
    for i in range(1, S + 1):
        pos = torch.arange(i - 1, T, S, device=idx.device)
        if pos.numel() == 0:  # S > T: nothing left to recompute
            break
        memory = shift_memory(source)
        if refresh and i < S:
            # positions of residues >= i are still as pass 0 left them
            unvisited = torch.arange(T, device=idx.device) % S >= i
            keys, values = _refresh_kv(model, store, keys, values, memory, unvisited)
        buf = BufferKV(keys, values, pattern=(i - 1, S), flex=model.uses_flex())
        step = model.run(idx[:, pos], pos, memory[:, pos], buf, model.rec.recompute_mlp)
        keys, values = buf.k, buf.v
        source = source.index_copy(1, pos, step.source)
        hidden.append(step.hidden)
        positions.append(pos)
    return Passes(model, hidden, positions)


def _refresh_kv(model: GPT, store: SelfKV, keys, values, memory, unvisited):
    """Re-project the buffered K/V of not-yet-visited positions with the latest
    memory: the pass-0 projections plus the memory's K/V, re-normed and rotated."""
    B, T, _ = memory.shape
    cos, sin = model._rotary(T, None, None)
    shared_kv = model.shared_memory_kv(memory)
    sel = unvisited[None, None, :, None]
    new_k, new_v = [], []
    for layer, block in enumerate(model.blocks):
        mk, mv = block.attn.memory_kv(memory, shared_kv)
        dt = keys[layer].dtype
        k = apply_rotary(rms_norm(store.raw_k[layer] + mk), cos, sin).to(dt).transpose(1, 2)
        v = (store.raw_v[layer] + mv).to(dt).transpose(1, 2)
        new_k.append(torch.where(sel, k, keys[layer]))
        new_v.append(torch.where(sel, v, values[layer]))
    return new_k, new_v


def multi_refine(model: GPT, idx: torch.Tensor, K: int, detach: bool = False) -> Passes:
    hidden, positions, memory = [], [], None
    for k in range(K + 1):
        out = model.run(idx, None, memory, SelfKV(model.cfg.depth), k > 0 and model.rec.recompute_mlp)
        hidden.append(out.hidden)
        positions.append(None)
        source = out.source.detach() if detach else out.source
        memory = shift_memory(source)
    return Passes(model, hidden, positions)


def sequential_logits(model: GPT, idx: torch.Tensor, decode: str | None = None) -> torch.Tensor:
    """Exact recurrence: one token at a time through a KV cache, carrying the
    source state from each token to the next. Returns (B, T, V)."""
    return model.logits(sequential_hidden(model, idx, decode))


def sequential_hidden(model: GPT, idx: torch.Tensor, decode: str | None = None) -> torch.Tensor:
    """The exact recurrence's final hidden states (B, T, d). Without autograd (evaluation)
    each token runs through `generate`'s decode step, in mode `decode` (default
    the model's `decode_mode()`: a CUDA graph on CUDA, so T launch-bound steps become T replays).
    With autograd (the sequential strategy's training) the cache grows by concatenation,
    so every step stays in the graph of the loss."""
    B, T = idx.shape
    step = decode_step(model, B, T, (decode or model.decode_mode()) if not torch.is_grad_enabled() else "eager")
    memory, outs = None, []
    for t in range(T):
        hidden, memory = step(idx[:, t : t + 1], t, memory)
        outs.append(hidden.clone())  # a graph's output buffer is overwritten by the next step
    return torch.stack(outs, dim=1)


@torch.no_grad()
def naive_sequential_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Reference recurrence that recomputes the whole prefix for every token
    (no cache): position t is a full pass over tokens 0..t with memory built
    from the source states found for earlier positions. O(T^2) passes; tests only."""
    B, T = idx.shape
    d = model.cfg.d_model
    sources = torch.zeros(B, T, d, dtype=model.wte.weight.dtype, device=idx.device)
    outs = []
    for t in range(T):
        memory = shift_memory(sources[:, : t + 1]) if model.rec is not None else None
        run = model.run(idx[:, : t + 1], None, memory, SelfKV(model.cfg.depth))
        outs.append(model.logits(run.hidden[:, t : t + 1]))
        if model.rec is not None:
            sources[:, t] = run.source[:, t]
    return torch.cat(outs, dim=1)
