"""Muon's optimiser step: `BatchedMuon` vs `torch.optim.Muon`, side by side.

Both step matrices shaped as one GPT's Muon parameters (every hidden
matrix, memory projections included) with the same random gradients, in interleaved rounds
(median of each). The update is the same (tests/test_optim.py); only the
Newton-Schulz scheduling differs: one batched iteration per matrix shape
against one per matrix. Needs only torch.

    python -m benchmarks.muon                                # CPU: depth 4 and 12 at width 64*depth
    python -m benchmarks.muon --device cuda --depth 12 20 --width 768 1280
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrt_model.config import ModelConfig, RecurrenceConfig
from lrt_model.model import GPT
from lrt_model.optim import BatchedMuon, param_groups


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.muon", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, nargs="+", default=[4, 12])
    p.add_argument("--width", type=int, nargs="+", default=None, help="one per depth (default 64*depth)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    widths = args.width or [64 * d for d in args.depth]
    if len(widths) != len(args.depth):
        p.error(f"--width needs one value per --depth ({len(args.depth)}), got {len(widths)}")
    dev = torch.device(args.device)
    for depth, width in zip(args.depth, widths):
        cfg = ModelConfig(depth=depth, width=width, head_dim=64, vocab_size=256, seq_len=64,
                          recurrence=RecurrenceConfig(strategy="interleaved", passes=2))
        with torch.device("meta"):  # only the Muon parameters' shapes are needed: no model in memory
            shapes_of = [tuple(q.shape) for q in param_groups(GPT(cfg))[0]]
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, device=dev) / shape[1] ** 0.5) for shape in shapes_of]
        shapes = sorted(set(shapes_of))
        opts = {"torch": torch.optim.Muon(params, lr=0.02, weight_decay=0.0),
                "batched": BatchedMuon(params, lr=0.02, weight_decay=0.0)}
        for q in params:
            q.grad = torch.randn_like(q)
        times = {k: [] for k in opts}
        for opt in opts.values():  # warm-up: momentum buffers, kernels
            opt.step()
        for _ in range(args.rounds):
            for name, opt in opts.items():
                _sync(dev)
                t0 = time.perf_counter()
                opt.step()
                _sync(dev)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"depth {depth} width {width}: {len(params)} matrices in {len(shapes)} shapes; "
              f"torch.optim.Muon {1000 * med['torch']:.2f} ms, BatchedMuon {1000 * med['batched']:.2f} ms, "
              f"time ratio batched/torch {med['batched'] / med['torch']:.2f}", flush=True)


if __name__ == "__main__":
    main()
