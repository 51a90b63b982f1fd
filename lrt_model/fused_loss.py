"""Cross-entropy of the soft-capped LM head without materialising the logits.

Design choices:
- The plain path, `cross_entropy(c * tanh((h @ W^T) / c), y)`, keeps (N, V)
  fp32 logits alive for backward (several copies in eager mode): at a 32k
  vocabulary that is the largest tensor of a training step, and LRT has one
  per pass. Here the rows are processed in chunks, and each chunk's gradients
  with respect to the hidden states and the head's weight are computed in the
  forward itself (the loss is a scalar, so backward only rescales them). What
  stays alive for backward is one (N, d) and one (V, d) tensor.
- Same FLOPs as the plain path (the gradient matmuls move from backward to
  forward), no recomputation.
- Matmuls run in `compute_dtype` (bf16 under autocast), the soft-cap, softmax
  and weight-gradient accumulation in fp32 (float64 stays float64 for
  reference tests): the same precision the autocast path gives.
- Targets < 0 are ignored; the loss is the mean over the other rows (0 when
  every row is ignored, where plain cross-entropy gives NaN).
- Without autograd (evaluation) only the loss is computed, chunk by chunk.
- bf16 or fp32 only: under fp16 autocast the per-row gradients (scaled by
  1/rows before any loss scaler sees them) would underflow.
- On CUDA the chunk's arithmetic is one compiled function (soft-cap, softmax and
  gradient in fused kernels), compiled once and called per chunk. The chunk loop
  itself stays outside any caller's `torch.compile` graph: unrolled there, it
  adds 32 chunk copies to an LRT step's graph at depth 12, seq 2048, batch 16
  (an H100 run did not finish compiling such a step in 250 s). On the CPU the
  chunk runs eagerly (no compiler start-up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Elements per chunk of logits (x 4 bytes, a few temporaries): ~256 MB at fp32.
CHUNK_ELEMENTS = 2**26
COMPILE_CHUNKS_ON = ("cuda",)  # device types whose chunk step is compiled (tests add "cpu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and gradient accumulation: fp32, or fp64 for float64 reference runs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_step(h, w, y, ok, count, softcap: float):
    """One chunk: (summed loss, d loss/d h, d loss/d w) in h's dtype / the accumulation dtype.
    In-place where it can: eagerly (the CPU) every pass over the (rows, vocab) block counts."""
    acc_dtype = _acc_dtype(h.dtype)
    capped = (h @ w.t()).to(acc_dtype).div_(softcap).tanh_()
    logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    rows, y_safe = torch.arange(y.shape[0], device=y.device), y.clamp(min=0)
    loss = ((lse - logits[rows, y_safe]) * ok).sum()
    # d loss / d logits = (softmax - onehot) * ok / count, then through the soft-cap (1 - tanh^2)
    g = logits.sub_(lse[:, None]).exp_()
    g[rows, y_safe] -= 1.0
    g.mul_(capped.square_().neg_().add_(1.0)).mul_((ok / count)[:, None])
    g = g.to(h.dtype)
    return loss, g @ w, (g.t() @ h).to(acc_dtype)


_compiled_chunk_step = None


def _chunk_fn(device_type: str):
    global _compiled_chunk_step
    if device_type not in COMPILE_CHUNKS_ON:
        return _chunk_step
    if _compiled_chunk_step is None:
        # default dynamism: a second row count (S not dividing T, a ragged last chunk)
        # recompiles once with a dynamic row dimension instead of once per shape
        _compiled_chunk_step = torch.compile(_chunk_step)
    return _compiled_chunk_step


class _LinearSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float, compute_dtype, chunk_rows: int):
        acc_dtype = _acc_dtype(hidden.dtype)
        w = weight.to(compute_dtype)
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        valid = targets >= 0
        count = valid.sum().clamp(min=1).to(acc_dtype)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        step = _chunk_fn(hidden.device.type)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(compute_dtype)
            loss, gh, gw = step(h, w, targets[rows], valid[rows].to(acc_dtype), count, softcap)
            total = total + loss
            grad_h[rows] = gh
            if need_w:
                grad_w += gw
        ctx.save_for_backward(grad_h, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    @once_differentiable  # the gradients were made in forward: no double backward through them
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h * grad_loss.to(grad_h.dtype), gw, None, None, None, None


@torch.compiler.disable  # keep the chunk loop out of a caller's compiled graph (see above)
def linear_softcap_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 softcap: float, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of softcap*tanh((hidden @ weight.T)/softcap) against targets
    (rows with target < 0 ignored). hidden (..., d), targets (...) of the same leading shape."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if hidden.dtype == torch.float64:
        compute_dtype = torch.float64
    if compute_dtype == torch.float16:
        raise ValueError("the chunked loss does not support float16 (its gradients would underflow before "
                         "loss scaling); train in bfloat16 or float32")
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _loss_only(hidden, weight, targets, float(softcap), compute_dtype, chunk_rows)
    return _LinearSoftcapCE.apply(hidden, weight, targets, float(softcap), compute_dtype, chunk_rows)


def _loss_only(hidden, weight, targets, softcap: float, compute_dtype, chunk_rows: int) -> torch.Tensor:
    acc_dtype = _acc_dtype(hidden.dtype)
    w = weight.to(compute_dtype)
    total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        z = (hidden[start : start + chunk_rows].to(compute_dtype) @ w.t()).to(acc_dtype)
        logits = softcap * torch.tanh(z / softcap)
        total = total + F.cross_entropy(logits, targets[start : start + chunk_rows], ignore_index=-1, reduction="sum")
    return total / (targets >= 0).sum().clamp(min=1).to(acc_dtype)
