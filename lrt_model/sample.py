"""Sample text from a trained checkpoint: `python -m lrt_model.sample CHECKPOINT_DIR --prompt "def "`.

Design choices:
- The checkpoint carries its TrainConfig, so the model, its tokenizer (byte,
  or the BPE saved next to the training corpus) and its recurrence are rebuilt
  from it: nothing to repeat on the command line.
- LRT samples with the exact recurrence (`generate`, exact prefill by default),
  the view that `val_bpb` reports. bf16 autocast and a CUDA-graph decode step
  on CUDA, as in the benchmarks.
- The text goes to stdout (one sample per --samples); the decode rate to
  stderr, so `> out.txt` keeps only text. `--json` prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from . import checkpoint as ckpt
from .config import ConfigError
from .data import DataError, resolve_corpus
from .decode import DECODE_MODES, generate
from .model import GPT
from .tokenizer import ByteTokenizer, get_tokenizer
from .train import TrainConfig, _autocast, _device


def load_model(checkpoint_dir: str, device: torch.device, corpus: str | None = None) -> tuple[GPT, object, TrainConfig]:
    """(model in eval mode on `device`, its tokenizer, its TrainConfig) from a training checkpoint.
    `corpus`: where the training corpus (and a BPE tokenizer saved next to it) is now, if moved.
    A one-line ConfigError when there is no checkpoint, DataError when its tokenizer cannot be found."""
    state = ckpt.load(checkpoint_dir)
    if state is None:
        hint = " (pass the directory that holds latest.pt, not the file)" if checkpoint_dir.endswith(".pt") else ""
        raise ConfigError(f"no checkpoint in {checkpoint_dir}{hint}: train with --checkpoint-dir {checkpoint_dir} "
                          "(or pass a sweep trial's checkpoint directory)")
    cfg = TrainConfig.from_dict(state["config"])
    tokenizer = ByteTokenizer()
    if cfg.tokenizer != "byte":  # a BPE is loaded from next to the corpus, never retrained here
        try:
            tokenizer = get_tokenizer(cfg.tokenizer, resolve_corpus(corpus or cfg.corpus), train_if_missing=False)
        except DataError as e:
            raise DataError(f"{e} (trained on --corpus {cfg.corpus}; pass --corpus DIR where it is now)") from None
    model = GPT(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lrt_model.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", help="a training checkpoint directory (local path or s3://)")
    p.add_argument("--prompt", default="", help="text to continue (after a BOS token)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    p.add_argument("--samples", type=int, default=1, help="samples decoded together as one batch")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill", choices=["exact", "parallel"], default="exact",
                   help="LRT prompt prefill: exact recurrence, or parallel multi-refine (an approximation)")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto")
    p.add_argument("--corpus", default=None, help="the training corpus's location, if it moved (BPE tokenizers live there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--json", action="store_true", help="one JSON line: the samples and the decode rate")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.samples < 1:
        p.error("--tokens and --samples must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        p.error("--top-k must be >= 0 (0 = no top-k filter)")
    device = _device(args.device)
    try:
        model, tokenizer, cfg = load_model(args.checkpoint_dir, device, args.corpus)
    except (ConfigError, DataError) as e:
        raise SystemExit(str(e)) from None  # the message on stderr, exit status 1
    ids = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    if len(ids) + args.tokens > cfg.model.seq_len:
        print(f"[sample] note: {len(ids)} prompt + {args.tokens} new tokens exceed the trained sequence length "
              f"{cfg.model.seq_len}; positions beyond it were never trained", file=sys.stderr)
    prompt = torch.tensor([ids] * args.samples, device=device)
    with _autocast(device, args.dtype):
        t0 = time.perf_counter()
        out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k or None,
                       seed=args.seed, prefill_mode=args.prefill, decode=args.decode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(row.tolist()) for row in out]
    rate = args.samples * args.tokens / seconds
    if args.json:
        print(json.dumps({"prompt": args.prompt, "samples": texts, "tokens_per_s": rate,
                          "recurrence": cfg.model.recurrence is not None}))
        return 0
    for i, text in enumerate(texts):
        if args.samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + text)
    print(f"[sample] {args.samples} x {args.tokens} tokens in {seconds:.2f} s ({rate:,.0f} tokens/s, prefill "
          f"and CUDA-graph capture included) on {device}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
