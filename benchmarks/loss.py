"""The training loss: chunked soft-capped cross-entropy vs the plain path, side by side.

Times forward + backward of `linear_softcap_cross_entropy` and of
`F.cross_entropy(c * tanh((h @ W^T) / c), y)` in interleaved rounds (median of
each), and on CUDA the peak memory each adds above the resident inputs. Needs
only torch.

    python -m benchmarks.loss                      # CPU: 2048 rows, width 256, vocab 4096 and 32768
    python -m benchmarks.loss --device cuda --rows 32768 --width 768 --vocab 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lrt_model.fused_loss import linear_softcap_cross_entropy


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    torch.manual_seed(0)
    for V in args.vocab:
        h = torch.randn(args.rows, args.width, device=dev, requires_grad=True)
        w = (0.05 * torch.randn(V, args.width, device=dev)).requires_grad_()
        y = torch.randint(0, V, (args.rows,), device=dev)

        def plain():
            with autocast:
                z = (h @ w.t()).float()
                loss = F.cross_entropy(15 * torch.tanh(z / 15), y)
            loss.backward()

        def chunked():
            with autocast:
                loss = linear_softcap_cross_entropy(h, w, y, 15.0)
            loss.backward()

        fns = {"plain": plain, "chunked": chunked}
        times = {k: [] for k in fns}
        peak = {}
        for fn in fns.values():  # warm-up (and compilation on CUDA)
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                h.grad = w.grad = None
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()  # h, w, y: the same for both
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                    peak[name] = torch.cuda.max_memory_allocated() - resident
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        line = (f"rows {args.rows} width {args.width} vocab {V}: plain {1000 * med['plain']:.1f} ms, "
                f"chunked {1000 * med['chunked']:.1f} ms, time ratio chunked/plain {med['chunked'] / med['plain']:.2f}")
        if cuda:
            line += f", peak memory ratio {peak['chunked'] / peak['plain']:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
