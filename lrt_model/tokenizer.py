"""Tokenizers: raw bytes, or a byte-level BPE trained locally on the corpus.

Design choices:
- Both tokenizers share one small interface: `name`, `vocab_size`, `bos_id`,
  `encode`, `encode_batch` (numpy int32 arrays, what the packer consumes),
  `decode`, `token_bytes`. Neither adds BOS when encoding: the packer puts
  one in front of every document.
- `ByteTokenizer` needs no training and no files: ids 0..255 are bytes and
  256 is BOS. It is the default for tiny CPU runs.
- `BPETokenizer` is byte-level BPE from HF `tokenizers` (Rust, seconds to
  train on ~20 MB), with the ByteLevel pre-tokenizer/decoder and no prefix
  space, so decode(encode(text)) == text for any text.
- `token_bytes()` gives how many UTF-8 bytes each token stands for (0 for
  specials), so evaluation can report bits per byte, which compares models
  across tokenizers. ByteLevel stores each byte as one printable unicode
  character, so the byte count is NOT len(token.encode("utf-8")): we map
  the characters back to the bytes they stand for.
- `get_tokenizer("bpe:N", corpus)` trains once per corpus and caches
  `tokenizer.json` inside the corpus directory (atomic write), so every
  run and every rank on the corpus sees the same vocabulary.
- `name` round-trips: get_tokenizer(tok.name, corpus) rebuilds tok.

Example:
    >>> from lrt_model.tokenizer import get_tokenizer
    >>> tok = get_tokenizer("byte")
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import pyarrow.fs as pafs

from lrt_model.fs import resolve, write_atomic
from lrt_model.data import DataError, iter_texts, resolve_corpus

BOS = "<|bos|>"
BPE_TRAIN_CHARS = 20_000_000  # cap on training text: enough for a 4-32k vocab, trains in seconds


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is BOS."""

    name = "byte"
    bos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        # frombuffer views the bytes without a Python-level loop; int32 matches the BPE tokenizer
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        counts = np.ones(self.vocab_size, dtype=np.int32)
        counts[self.bos_id] = 0
        return counts


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, the table that ByteLevel uses.

    Printable bytes map to themselves; the other 68 map to chr(256 + k) in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class BPETokenizer:
    """Byte-level BPE (HF `tokenizers`) with one special token, <|bos|>."""

    def __init__(self, tokenizer, name: str | None = None):
        self._tok = tokenizer
        self.bos_id = tokenizer.token_to_id(BOS)
        if self.bos_id is None:
            raise DataError(f"tokenizer has no {BOS} token: train it with BPETokenizer.train")
        self.vocab_size = tokenizer.get_vocab_size()
        # the requested size, not the reached one (tiny corpora run out of merges): get_tokenizer(name) finds the cache
        self.name = name or f"bpe:{self.vocab_size}"

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise DataError(f"bpe vocab_size={vocab_size} must be >= 258 (256 bytes + {BOS} + at least one merge)")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space would break decode(encode(text)) == text
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, name=f"bpe:{vocab_size}")

    @classmethod
    def load(cls, directory: str) -> "BPETokenizer":
        from tokenizers import Tokenizer

        directory = directory.rstrip("/")
        match = re.fullmatch(r"tokenizer-bpe-(\d+)", directory.rsplit("/", 1)[-1])
        return cls(Tokenizer.from_str(_read_text(directory + "/tokenizer.json")),
                   name=f"bpe:{match.group(1)}" if match else None)

    def save(self, directory: str) -> None:
        _write_text_atomic(directory.rstrip("/") + "/tokenizer.json", self._tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        # encode_batch_fast skips offset tracking; both run on Rust threads
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.int32) for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        table = _unicode_to_byte()
        special = {self.bos_id}
        counts = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if i in special or token is None:
                continue
            counts[i] = len(bytes(table[c] for c in token))  # one ByteLevel char = one real byte
        return counts


# ---------------------------------------------------------------------------
# Files: local paths or URIs, through pyarrow.fs like the corpus itself


def _read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def _write_text_atomic(uri: str, text: str, replace: bool = True) -> None:
    """Readers never see a half-written file (`fs.write_atomic`). replace=False publishes only if the file
    is absent, so racing trainers agree on the first file written."""
    fs, path = resolve(uri)
    write_atomic(fs, path, text.encode("utf-8"), replace=replace)


def _exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def _capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    total = 0
    for t in texts:
        yield t
        total += len(t)
        if total >= max_chars:
            return


def get_tokenizer(kind: str, corpus_dir: str | None = None, train_if_missing: bool = True):
    """"byte" -> ByteTokenizer; "bpe:N" -> BPE with N tokens, trained on the corpus's train split once and
    cached next to it. `train_if_missing=False` (a trained model's tokenizer) only loads it."""
    if kind == "byte":
        return ByteTokenizer()
    match = re.fullmatch(r"bpe:(\d+)", kind)
    if not match:
        raise DataError(f"tokenizer {kind!r} is not known; use 'byte' or 'bpe:N' (e.g. 'bpe:4096')")
    if corpus_dir is None:
        raise DataError(f"tokenizer {kind!r} is trained on a corpus: pass corpus_dir (e.g. the --corpus value)")
    corpus = resolve_corpus(corpus_dir)
    directory = corpus.rstrip("/") + f"/tokenizer-bpe-{match.group(1)}"
    if _exists(directory + "/tokenizer.json"):
        return BPETokenizer.load(directory)
    if not train_if_missing:
        raise DataError(f"tokenizer {kind!r} is not at {directory}/tokenizer.json: point at the corpus the model "
                        "was trained on (its tokenizer is saved next to its shards)")
    tok = BPETokenizer.train(_capped(iter_texts(corpus, "train"), BPE_TRAIN_CHARS), int(match.group(1)))
    # first writer wins and everyone loads the file, so racing ranks never hold different vocabularies
    _write_text_atomic(directory + "/tokenizer.json", tok._tok.to_str(), replace=False)
    return BPETokenizer.load(directory)
