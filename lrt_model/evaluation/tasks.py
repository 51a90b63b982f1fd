"""Synthetic few-shot tasks: questions generated from a seed as text, then encoded with the model's tokenizer.

Design choices:
- A numpy Generator per (seed, task, k), so every run sees the same questions:
    recall     k key:value pairs ("ab:37 cd:05"), then min(4, k//2) queries
               of distinct keys, the earlier ones answered; the last is asked;
               distractors are values shown once like the gold, then fresh.
    induction  k examples of a random letter substitution ("cab>qzr"), then a
               new word made of letters seen in the examples.
    copy       k examples of "span|span" (8 random characters), then a new
               "span|" to repeat.
  k = pairs for recall (harder as k grows), demonstrations for induction and
  copy (easier as k grows).
- Scored as multiple choice (`choice.py`). Distractors are plausible and
  drawn from the answer's own distribution: recall's are other values shown
  once (like the gold), then fresh values; induction's are other strings of
  the mapped letters the context shows; copy's candidates are one random
  span with one character changed each, the gold being one of them
  (distractors made by perturbing the gold would let the gold beat all of
  them only ~1/2^(choices-1) of the time under a random scorer: chance would
  not be 1/choices). So a model that ignores the context scores 1/choices in
  expectation.

Example:
    >>> item = recall_items(1, k=2, seed=0)[0]
    >>> len(item.choices), item.prompt.endswith(":"), item.answer in item.prompt
    (4, True, True)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .choice import Question, mc_question

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


@dataclass
class Item:
    prompt: str
    choices: list
    gold: int

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


def _rng(seed: int, task: str, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), k])


def _with_distractors(rng, gold: str, distractors: list, prompt: str) -> Item:
    choices = [gold, *distractors]
    order = rng.permutation(len(choices))  # the gold lands at a random position
    return Item(prompt, [choices[i] for i in order], int(np.argmax(order == 0)))


def _draw_unique(rng, draw: Callable[[], str], n: int, avoid: set) -> list:
    out, seen = [], set(avoid)
    while len(out) < n:
        s = draw()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def recall_items(n: int, k: int, seed: int = 0, choices: int = 4, queries: int = 4) -> list:
    """Multi-query associative recall: "ab:37 cd:05 ef:61\\ncd:05 ab:" -> "37"."""
    if k > 100:
        raise ValueError(f"recall k={k}: at most 100 distinct two-digit values")
    rng, items = _rng(seed, "recall", k), []
    q = min(queries, max(1, k // 2))  # at most half the keys: "the one not asked yet" is never a shortcut
    for _ in range(n):
        keys = [LETTERS[i // 26] + LETTERS[i % 26] for i in rng.choice(26 * 26, k, replace=False)]
        vals = [f"{i:02d}" for i in rng.choice(100, k, replace=False)]
        asked = rng.choice(k, q, replace=False)
        prompt = " ".join(f"{a}:{b}" for a, b in zip(keys, vals)) + "\n"
        prompt += "".join(f"{keys[i]}:{vals[i]} " for i in asked[:-1]) + f"{keys[asked[-1]]}:"
        gold = vals[asked[-1]]
        # distractors: values shown once, like the gold (not re-stated by a query), then fresh ones
        others = [vals[i] for i in range(k) if i not in asked]
        picked = [others[i] for i in rng.choice(len(others), min(choices - 1, len(others)), replace=False)]
        picked += _draw_unique(rng, lambda: f"{rng.integers(100):02d}", choices - 1 - len(picked), set(vals))
        items.append(_with_distractors(rng, gold, picked, prompt))
    return items


def induction_items(n: int, k: int, seed: int = 0, choices: int = 4, length: int = 3) -> list:
    """Few-shot letter substitution: "cab>qzr\\nbca>zrq\\nacb>" -> "qrz"."""
    rng, items = _rng(seed, "induction", k), []
    for _ in range(n):
        sub = dict(zip(LETTERS, (LETTERS[i] for i in rng.permutation(26))))
        inputs = _draw_unique(rng, lambda: "".join(LETTERS[i] for i in rng.choice(26, length, replace=False)), k, set())
        seen = sorted(set("".join(inputs)))  # the query only uses letters whose image was shown
        query = _draw_unique(rng, lambda: "".join(rng.choice(seen, length)), 1, set(inputs))[0]
        mapped = [sub[c] for c in seen]
        gold = "".join(sub[c] for c in query)
        shown = {"".join(sub[c] for c in x) for x in inputs}  # the gold is never one of them: neither are distractors
        distractors = _draw_unique(rng, lambda: "".join(rng.choice(mapped, length)), choices - 1, shown | {gold})
        prompt = "".join(f"{x}>{''.join(sub[c] for c in x)}\n" for x in inputs) + f"{query}>"
        items.append(_with_distractors(rng, gold, distractors, prompt))
    return items


def copy_items(n: int, k: int, seed: int = 0, choices: int = 4, length: int = 8) -> list:
    """Copy a random span: "x7k2|x7k2\nq9ab|" -> "q9ab". The candidates are one
    random base span with one character changed each (at different places
    when the span is long enough) and the gold is one of them, so no
    candidate is special to a model that ignores the context."""
    alphabet = LETTERS + DIGITS
    rng, items = _rng(seed, "copy", k), []

    def span():
        return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=length))

    def changed(s, p):  # s with the character at p replaced by another
        c = alphabet[(alphabet.index(s[p]) + 1 + int(rng.integers(len(alphabet) - 1))) % len(alphabet)]
        return s[:p] + c + s[p + 1 :]

    for _ in range(n):
        demos, base = [span() for _ in range(k)], span()
        places = iter(rng.choice(length, length, replace=False).tolist() * choices)
        cands = _draw_unique(rng, lambda: changed(base, next(places)), choices, {base})
        prompt = "".join(f"{s}|{s}\n" for s in demos) + f"{cands[0]}|"
        items.append(_with_distractors(rng, cands[0], cands[1:], prompt))
    return items


GENERATORS = {"recall": recall_items, "induction": induction_items, "copy": copy_items}
TASKS = tuple(GENERATORS)


def task_items(task: str, n: int, k: int, cfg: dict) -> list:
    """n questions of `task` with k examples each, under the ICL settings `cfg` (seed, choices, lengths)."""
    extra = {"recall": {"queries": cfg["recall_queries"]}, "induction": {"length": cfg["induction_len"]},
             "copy": {"length": cfg["copy_len"]}}[task]
    return GENERATORS[task](n, k, cfg["seed"], cfg["choices"], **extra)


def encode_item(item: Item, tokenizer) -> Question:
    """BOS + prompt + candidate, tokenized as one text per candidate."""
    return mc_question([[tokenizer.bos_id, *tokenizer.encode(item.prompt + c)] for c in item.choices], item.gold)
