"""nanochat-style GPT backbone with an optional latent recurrent memory (LRT).

Design choices:
- Backbone: rotary positions, QK-norm, parameter-free RMSNorm (after the
  embedding, before attention and MLP, at the end), no biases, ReLU^2 MLP of
  width 4d, untied embedding and head, fp32 logit soft-cap 15*tanh(z/15),
  optional GQA, per-layer residual scalars x = a_i*x + b_i*x0, zero-init output
  projections, optional value embeddings (ResFormer-style, gated into V).
- One primitive, `run`, computes hidden states for a set of *query positions*
  against a key/value store. A full causal pass, an interleaved subset pass
  over the pass-0 K/V buffer, and a decode step through a KV cache are all
  `run` with a different store, so the three paths cannot drift apart.
- Memory m_t (the source layer's normed state at t-1) enters two ways:
  KVProjection (k += W_k m, v += W_v m before QK-norm/RoPE, optional per-head
  gates starting at 1) and ResidualInjection (x += gamma_i m before block i).
  The shared projection is computed once per pass and reused by every layer.
- Memory `None` means zero memory and skips the projections entirely.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .fused_loss import linear_softcap_cross_entropy

VE_GATE_CHANNELS = 32  # nanochat: the value-embedding gate reads the first 32 channels

try:  # FlexAttention: block-sparse masks for the interleaved subset passes on CUDA
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: dense boolean masks everywhere
    BlockMask = create_block_mask = flex_attention = None

# On CUDA the subset passes use FlexAttention, which skips key blocks that the
# position-aware causal mask hides entirely (about half of them); SDPA with a
# dense mask computes every block. Set LRT_FLEX=0 to compare or to debug.
USE_FLEX = os.environ.get("LRT_FLEX", "1") != "0"
_compiled_flex = None


def _flex_attention(q, k, v, block_mask, gqa: bool):
    global _compiled_flex
    if _compiled_flex is None:  # flex_attention is only fast when compiled
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


_BLOCK_MASKS: dict = {}


def subset_block_mask(offset: int, stride: int, n: int, kv_len: int, device):
    """Block mask for the queries at positions offset + stride*j (j < n) against
    keys 0..kv_len-1. Cached: every step of a run reuses the same S masks."""
    key = (offset, stride, n, kv_len, str(device))
    if key not in _BLOCK_MASKS:

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx * stride + offset

        _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, n, kv_len, device=device)
    return _BLOCK_MASKS[key]


def attention(q, k, v, mask, gqa: bool):
    """mask: "causal", None (attend to all keys), a boolean (n, L) tensor or a flex BlockMask."""
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _flex_attention(q, k, v, mask, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n, H, D); cos/sin: (n, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


# ---------------------------------------------------------------------------
# Key/value stores: where a pass writes its fresh K/V and what it attends over.


class SelfKV:
    """A self-contained causal pass over positions 0..n-1 (no outside keys).

    `capture=True` keeps every layer's K/V (after norm/RoPE) for an
    interleaved buffer; `keep_raw=True` also keeps the pre-norm, memory-free
    projections so that unvisited positions can be re-projected later.
    """

    def __init__(self, depth: int, capture: bool = False, keep_raw: bool = False):
        self.capture, self.keep_raw = capture, keep_raw
        self.k: list = [None] * depth
        self.v: list = [None] * depth
        self.raw_k: list = [None] * depth
        self.raw_v: list = [None] * depth

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_pos):
        if self.capture:
            self.k[layer], self.v[layer] = k, v
        return k, v, "causal"


class BufferKV:
    """Interleaved subset pass: fresh K/V are written into the layer's buffer
    (out of place, so autograd keeps every version it needs) and the queries
    attend over the whole buffer under a position-aware causal mask."""

    def __init__(self, k: list, v: list, pattern: tuple[int, int] | None = None, *, flex: bool):
        self.k, self.v = list(k), list(v)
        self.flex = flex  # FlexAttention's block mask on CUDA (the model's `uses_flex()`)
        self.pattern = pattern  # (offset, stride) when the query positions are offset::stride
        self.mask = None
        self.max_positions = self.k[0].shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_pos):
        self.k[layer] = self.k[layer].index_copy(2, q_pos, k)
        self.v[layer] = self.v[layer].index_copy(2, q_pos, v)
        if self.mask is None:  # one mask per pass, shared by all layers
            T = self.k[layer].shape[2]
            if k.is_cuda and self.flex and create_block_mask is not None and self.pattern is not None:
                self.mask = subset_block_mask(*self.pattern, k.shape[2], T, k.device)
            else:
                self.mask = torch.arange(T, device=q_pos.device)[None, :] <= q_pos[:, None]
        return self.k[layer], self.v[layer], self.mask


class _DecodeCache:
    """What both decoding caches share: per-layer K/V for `max_len` positions, and branching rows."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        self.depth, self.max_len = cfg.depth, max_len
        self.max_positions = max_len
        self.shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k: list = [None] * cfg.depth  # allocated on first write, in the dtype the model computes in
        self.v: list = [None] * cfg.depth

    def select_rows(self, owner: torch.Tensor):
        """A cache whose row r is a copy of this cache's row owner[r] (e.g. the candidate
        answers of a question branching from their shared prompt)."""
        new = copy.copy(self)
        new.shape = (owner.numel(), *self.shape[1:])
        new.k = [None if k is None else k.index_select(0, owner) for k in self.k]
        new.v = [None if v is None else v.index_select(0, owner) for v in self.v]
        return new


class KVCache(_DecodeCache):
    """Decoding cache. Queries are consecutive positions [start, start+n).
    `write` with n > 1 fills a whole chunk (a prompt) at once.

    Without autograd the cache is preallocated and written in place; with
    autograd (sequential training on tiny models) it grows by concatenation.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        super().__init__(cfg, batch, max_len)
        self.inplace = not torch.is_grad_enabled()
        self.length = 0  # positions written so far (all layers)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_pos):
        start, n = self.length, k.shape[2]
        end = start + n
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; generation needs {end}")
        if self.inplace:
            if self.k[layer] is None:
                self.k[layer] = k.new_empty(self.shape)
                self.v[layer] = v.new_empty(self.shape)
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
            keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        else:
            self.k[layer] = k if start == 0 else torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = v if start == 0 else torch.cat([self.v[layer], v], dim=2)
            keys, values = self.k[layer], self.v[layer]
        mask = None
        if n > 1:  # a chunk: causal within it, everything before it visible
            mask = torch.arange(end, device=k.device)[None, :] <= q_pos[:, None]
        if layer == self.depth - 1:
            self.length = end
        return keys, values, mask


class StaticKVCache(_DecodeCache):
    """Decoding cache with shapes that never change, for CUDA-graph decoding: K/V are
    written at the query positions (a device tensor, so a captured step can be replayed
    at any position) and every query attends over all `max_len` slots under the mask
    slot <= position. Slots not yet written are zeros, masked out, so never read.
    Costs attention over the whole buffer each step, cheap next to reading the weights
    while the buffer is short, and the price of launching one graph instead of ~30
    kernels a layer. (With GQA and a mask, SDPA on CUDA takes its math path, which
    expands K/V per step: fine for short generations, slow for long ones.)"""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        super().__init__(cfg, batch, max_len)
        self._mask = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, q_pos):
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        self.k[layer].index_copy_(2, q_pos, k)
        self.v[layer].index_copy_(2, q_pos, v)
        if layer == 0:  # one mask per run, shared by all layers (and made inside a captured graph)
            self._mask = torch.arange(self.max_len, device=k.device)[None, :] <= q_pos[:, None]
        return self.k[layer], self.v[layer], self._mask


# ---------------------------------------------------------------------------
# Modules


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, hd
        self.c_q = nn.Linear(d, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, self.n_kv * hd, bias=False)
        self.c_v = nn.Linear(d, self.n_kv * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv, bias=False) if cfg.has_value_embed(layer) else None
        rec = cfg.recurrence
        self.mem_k = self.mem_v = self.mem_gate_k = self.mem_gate_v = None
        if rec is not None and rec.uses_kv:
            if rec.projection == "layerwise":
                self.mem_k = nn.Linear(d, self.n_kv * hd, bias=False)
                self.mem_v = nn.Linear(d, self.n_kv * hd, bias=False)
            if rec.gates:
                self.mem_gate_k = nn.Parameter(torch.ones(self.n_kv))
                self.mem_gate_v = nn.Parameter(torch.ones(self.n_kv))

    def memory_kv(self, memory: torch.Tensor, shared_kv):
        """The memory's (k, v) contribution, each (B, n, H_kv, D), gates applied."""
        if self.mem_k is not None:
            B, n, _ = memory.shape
            mk = self.mem_k(memory).view(B, n, self.n_kv, self.head_dim)
            mv = self.mem_v(memory).view(B, n, self.n_kv, self.head_dim)
        else:
            mk, mv = shared_kv
        if self.mem_gate_k is not None:
            mk = mk * self.mem_gate_k[:, None]
            mv = mv * self.mem_gate_v[:, None]
        return mk, mv

    def raw_kv(self, x: torch.Tensor, ve, mem_kv=None):
        """Pre-norm K and V, each (B, n, H_kv, D), plus the memory's (k, v) when given
        (added by the projection's own matmul: one kernel, not two)."""
        B, n, _ = x.shape
        k = _linear_plus(self.c_k, x, None if mem_kv is None else mem_kv[0]).view(B, n, self.n_kv, self.head_dim)
        v = _linear_plus(self.c_v, x, None if mem_kv is None else mem_kv[1]).view(B, n, self.n_kv, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, n, self.n_kv, self.head_dim)
        return k, v

    def forward(self, x, ve, cos, sin, mem_kv, kv, layer: int, q_pos):
        B, n, _ = x.shape
        q = self.c_q(x).view(B, n, self.n_head, self.head_dim)
        k, v = self.raw_kv(x, ve, mem_kv)
        if isinstance(kv, SelfKV) and kv.keep_raw:
            assert mem_kv is None, "raw (memory-free) K/V are kept by pass 0, which has no memory"
            kv.raw_k[layer], kv.raw_v[layer] = k, v
        dt = q.dtype  # the matmul dtype (bf16 under autocast): fp32 gates/embeddings must not promote K/V
        q = apply_rotary(rms_norm(q), cos, sin).to(dt).transpose(1, 2)
        k = apply_rotary(rms_norm(k), cos, sin).to(dt).transpose(1, 2)
        v = v.to(dt).transpose(1, 2)
        keys, values, mask = kv.write(layer, k, v, q_pos)
        y = attention(q, keys, values, mask, self.n_head != self.n_kv)
        return self.c_proj(y.transpose(1, 2).reshape(B, n, -1))


def _linear_plus(lin: nn.Linear, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """lin(x) + extra (any shape with the same elements as lin's output) as one addmm."""
    if extra is None:
        return lin(x)
    assert lin.bias is None, "the backbone's projections have no bias"
    B, n, _ = x.shape
    return torch.addmm(extra.reshape(B * n, -1), x.reshape(B * n, -1), lin.weight.t()).view(B, n, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, ve, cos, sin, mem_kv, kv, q_pos, recompute_mlp: bool = False):
        x = x + self.attn(rms_norm(x), ve, cos, sin, mem_kv, kv, self.layer, q_pos)
        if recompute_mlp and torch.is_grad_enabled():
            return x + checkpoint(self._norm_mlp, x, use_reentrant=False)
        return x + self._norm_mlp(x)

    def _norm_mlp(self, x):
        return self.mlp(rms_norm(x))


@dataclass
class RunOutput:
    hidden: torch.Tensor  # final normed hidden states at the query positions (B, n, d)
    source: torch.Tensor | None  # source-layer normed states at the query positions


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # how it runs, not what it computes (TrainConfig.flex_attention / eval_decode set them; None: the
        # environment's LRT_FLEX / LRT_EVAL_DECODE, else FlexAttention on and the "auto" decode step)
        self.flex_attention: bool | None = None
        self.eval_decode: str | None = None
        d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.depth))
        self.x0_lambdas = nn.Parameter(torch.full((cfg.depth,), 0.1))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(cfg.vocab_size, kv_dim) for i in range(cfg.depth) if cfg.has_value_embed(i)}
        )
        rec = self.rec = cfg.recurrence
        self.source_index = rec.source_index(cfg.depth) if rec else None
        self.mem_k = self.mem_v = self.gamma = None
        if rec is not None and rec.uses_kv and rec.projection == "shared":
            self.mem_k = nn.Linear(d, kv_dim, bias=False)
            self.mem_v = nn.Linear(d, kv_dim, bias=False)
        if rec is not None and rec.uses_residual:
            self.gamma = nn.Parameter(torch.full((cfg.depth,), float(rec.gamma_init)))
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._rotary_tables(2 * cfg.seq_len)  # made once here, so compiled code never builds them
        self.init_weights()

    # -- set-up ---------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: N(0,1) embeddings, tiny head, uniform matrices with
        std 1/sqrt(d), zero output projections (each block starts as identity)."""
        d = self.cfg.d_model
        bound = math.sqrt(3) * d**-0.5
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            a = block.attn
            for lin in (a.c_q, a.c_k, a.c_v, block.mlp.c_fc, a.mem_k, a.mem_v):
                if lin is not None:
                    nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(a.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if a.ve_gate is not None:
                nn.init.zeros_(a.ve_gate.weight)  # gate = 2*sigmoid(0) = 1
            for g in (a.mem_gate_k, a.mem_gate_v):
                if g is not None:
                    g.fill_(1.0)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -bound, bound)
        for lin in (self.mem_k, self.mem_v):
            if lin is not None:
                nn.init.uniform_(lin.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        if self.gamma is not None:
            self.gamma.fill_(float(self.rec.gamma_init))

    def _rotary_tables(self, length: int):
        """cos/sin tables covering positions < length (extended on demand, e.g. long generations)."""
        if length > self.rope_cos.shape[0]:
            hd = self.cfg.head_dim
            inv_freq = 1.0 / (self.cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            freqs = torch.outer(torch.arange(max(length, 2 * self.cfg.seq_len), dtype=torch.float32), inv_freq)
            self.rope_cos, self.rope_sin = freqs.cos().to(self.wte.weight.device), freqs.sin().to(self.wte.weight.device)
        dtype = self.wte.weight.dtype
        return self.rope_cos.to(dtype), self.rope_sin.to(dtype)

    def _rotary(self, n: int, q_pos: torch.Tensor | None, kv):
        if q_pos is None:
            cos, sin = self._rotary_tables(n)
            return cos[:n], sin[:n]
        cos, sin = self._rotary_tables(kv.max_positions)
        return cos[q_pos], sin[q_pos]

    # -- the one primitive ----------------------------------------------------

    def run(self, idx: torch.Tensor, q_pos: torch.Tensor | None, memory: torch.Tensor | None, kv,
            recompute_mlp: bool = False) -> RunOutput:
        """Hidden states for tokens `idx` (B, n) at positions `q_pos` (None:
        0..n-1), with memory (B, n, d) at those positions (None: zero memory),
        writing K/V into and attending over the store `kv`. `recompute_mlp`:
        keep no MLP activations for backward (recomputed there)."""
        B, n = idx.shape
        cos, sin = self._rotary(n, q_pos, kv)
        x = x0 = rms_norm(self.wte(idx))
        shared_kv = self.shared_memory_kv(memory) if memory is not None else None
        # A decode step is bound by per-op overhead, not arithmetic: there, every layer's
        # x0 term (with the residual memory folded in) and gated-K/V memory terms are made
        # in one op each, up front, and each layer's residual mix is a single addcmul.
        one_token_step = n == 1 and not torch.is_grad_enabled()
        x0_terms = kv_all = None
        if one_token_step:
            x0_terms = self.x0_lambdas.view(-1, 1, 1, 1) * x0
            if memory is not None and self.gamma is not None:
                x0_terms = torch.addcmul(x0_terms, self.gamma.view(-1, 1, 1, 1), memory)
        if one_token_step and shared_kv is not None and self.blocks[0].attn.mem_gate_k is not None:
            gk = torch.stack([b.attn.mem_gate_k for b in self.blocks]).view(-1, 1, 1, self.cfg.kv_heads, 1)
            gv = torch.stack([b.attn.mem_gate_v for b in self.blocks]).view(-1, 1, 1, self.cfg.kv_heads, 1)
            kv_all = (shared_kv[0] * gk, shared_kv[1] * gv)
        source = None
        for i, block in enumerate(self.blocks):
            if x0_terms is not None:
                x = torch.addcmul(x0_terms[i], x, self.resid_lambdas[i])
            else:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                if memory is not None and self.gamma is not None:
                    x = x + self.gamma[i] * memory
            mem_kv = None
            if memory is not None:
                if kv_all is not None:
                    mem_kv = (kv_all[0][i], kv_all[1][i])
                elif self.rec.uses_kv:
                    mem_kv = block.attn.memory_kv(memory, shared_kv)
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, mem_kv, kv, q_pos, recompute_mlp)
            if i == self.source_index and i != self.cfg.depth - 1:
                source = rms_norm(x)
        x = rms_norm(x)
        if self.source_index == self.cfg.depth - 1:
            source = x  # the final layer's normed output
        return RunOutput(x, source)

    def shared_memory_kv(self, memory: torch.Tensor):
        """The shared projection's (k, v) of memory (B, n, d), each (B, n, H_kv, D), computed once
        per pass and reused by every layer; None for the layerwise variant or without KV injection."""
        if self.mem_k is None:
            return None
        B, n, _ = memory.shape
        shape = (B, n, self.cfg.kv_heads, self.cfg.head_dim)
        return self.mem_k(memory).view(shape), self.mem_v(memory).view(shape)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.lm_head(hidden)
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # soft-cap in fp32 (float64 stays float64 for reference runs)
        c = self.cfg.softcap
        return c * torch.tanh(z / c)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Token-mean cross-entropy of `logits(hidden)` (targets < 0 ignored), computed
        chunk by chunk so the (N, vocab) logits are never kept for backward."""
        return linear_softcap_cross_entropy(hidden, self.lm_head.weight, targets, self.cfg.softcap)

    def forward(self, idx: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """One full causal pass (the baseline, or LRT with a given memory)."""
        return self.logits(self.run(idx, None, memory, SelfKV(self.cfg.depth)).hidden)

    # -- bookkeeping ----------------------------------------------------------

    def memory_parameter_names(self) -> list[str]:
        """Parameters that exist only because of the recurrence."""
        keys = ("mem_k", "mem_v", "mem_gate_k", "mem_gate_v", "gamma")
        return [n for n, _ in self.named_parameters() if any(part in keys for part in n.split("."))]

    def uses_flex(self) -> bool:
        """FlexAttention's block masks for the interleaved passes (on CUDA): `flex_attention`, else LRT_FLEX."""
        return USE_FLEX if self.flex_attention is None else self.flex_attention

    def decode_mode(self) -> str:
        """The decode step of the sequential-view evaluations: `eval_decode`, else LRT_EVAL_DECODE or auto."""
        from . import decode  # decode imports this module

        return self.eval_decode or decode.EVAL_DECODE

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_overhead(self) -> float:
        """Fraction of parameters added by the recurrent memory."""
        names = set(self.memory_parameter_names())
        extra = sum(p.numel() for n, p in self.named_parameters() if n in names)
        return extra / (self.num_params() - extra)


def shift_memory(source: torch.Tensor) -> torch.Tensor:
    """m_t = source_{t-1}, m_0 = 0, for source states (B, T, d)."""
    return F.pad(source[:, :-1], (0, 0, 1, 0))
