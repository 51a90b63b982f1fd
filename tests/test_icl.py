"""ICL evaluation: generators, scoring through oracles and a uniform model in
every view, the ICL score, the CORE harness on a tiny hand-written bundle."""

import json
import os
import random

import pytest
import torch
import yaml

from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.evaluation import (
    NO_CORE_MESSAGE, FullView, ModelStepper, SequentialView, centered_accuracy, common_prefix, core_question,
    default_windows, encode_item, evaluate_core, evaluate_icl, icl_config, icl_score, load_core_bundle, render_core,
    run_icl, score_questions, task_items, token_stats, view_stats,
)
from lrt_model.evaluation.icl import _said, _threads
from lrt_model.model import GPT
from lrt_model.recurrence import sequential_logits
from lrt_model.tokenizer import BPETokenizer, ByteTokenizer

BUNDLE = os.path.join(os.path.dirname(__file__), "data", "core_tiny")
TOK = ByteTokenizer()
V = TOK.vocab_size
CFG = {"ks": [1, 4, 8], "items": 8, "evals": ["recall", "induction", "copy"]}


# ---------------------------------------------------------------------------
# Oracles: a next-token rule applied to the history, behind both view interfaces


class FullOracle:
    """logits_fn view: at each position, all mass on predict(history) (uniform when None)."""

    def __init__(self, predict, vocab=V):
        self.predict, self.vocab = predict, vocab

    def __call__(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            state = self.predict.start()
            for t, tok in enumerate(row):
                state, nxt = self.predict.feed(state, tok)
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


class StepOracle:
    """Stepper view of the same rule: one token at a time, state copied on expand."""

    def __init__(self, predict, vocab=V):
        self.predict, self.vocab = predict, vocab

    def reset(self, batch, max_len, device):
        self.states = [self.predict.start() for _ in range(batch)]

    def step(self, tokens, t):
        logits = torch.zeros(len(self.states), self.vocab)
        for b, tok in enumerate(tokens.tolist()):
            self.states[b], nxt = self.predict.feed(self.states[b], tok)
            if nxt is not None:
                logits[b, nxt] = 30.0
        return logits

    def expand(self, owner):
        self.states = [self.states[o] for o in owner.tolist()]


class Trie:
    """Memorises the right token rows: predicts the next token of the only row that matches."""

    def __init__(self, seqs):
        self.root = {}
        for s in seqs:
            node = self.root
            for tok in s:
                node = node.setdefault(tok, {})

    def start(self):
        return self.root

    def feed(self, node, tok):
        node = node.get(tok) if node is not None else None
        return node, (next(iter(node)) if node is not None and len(node) == 1 else None)


def _rule_answer(task, prompt):
    """The answer the task's rule implies, parsed from the prompt text alone."""
    lines = prompt.split("\n")
    if task == "recall":
        pairs = dict(p.split(":") for p in lines[0].split())
        return pairs[lines[1].split(" ")[-1].rstrip(":")]
    if task == "induction":
        table = {}
        for line in lines[:-1]:
            x, y = line.split(">")
            table.update(zip(x, y))
        return "".join(table[c] for c in lines[-1].rstrip(">"))
    return lines[-1].rstrip("|")


class Rule:
    """Looks up / copies by the task's rule from the decoded history (byte tokens)."""

    def __init__(self, task):
        self.task = task

    def start(self):
        return []

    def feed(self, hist, tok):
        hist = hist + [tok]
        text = TOK.decode(hist)
        cut = text.rfind({"recall": ":", "induction": ">", "copy": "|"}[self.task])
        if cut < 0 or "\n" in text[cut:] or (self.task == "recall" and "\n" not in text):
            return hist, None
        try:
            answer = _rule_answer(self.task, text[: cut + 1])
        except (KeyError, ValueError, IndexError):
            return hist, None
        done = text[cut + 1 :]
        if self.task == "recall" and " " in done:
            return hist, None
        ok = answer.startswith(done) and len(done) < len(answer)
        return hist, (TOK.encode(answer[len(done)])[0] if ok else None)


class Uniform:
    """All-equal logits, as a logits_fn and as a Stepper."""

    def __init__(self, vocab=V):
        self.vocab = vocab

    def __call__(self, idx):
        return torch.zeros(*idx.shape, self.vocab)

    def reset(self, batch, max_len, device):
        pass

    def step(self, tokens, t):
        return torch.zeros(tokens.shape[0], self.vocab)

    def expand(self, owner):
        pass


def both(predict, vocab=V):
    return {"full": FullOracle(predict, vocab), "sequential": SequentialView(StepOracle(predict, vocab))}


def uniform_views(vocab=V):
    return {"full": Uniform(vocab), "sequential": SequentialView(Uniform(vocab))}


# ---------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("task", ["recall", "induction", "copy"])
def test_generators_are_deterministic_and_their_answers_follow_the_rule(task):
    c = icl_config(CFG)
    for k in (1, 4, 8):
        items = task_items(task, 16, k, c)
        again = task_items(task, 16, k, c)
        assert [(i.prompt, i.choices, i.gold) for i in items] == [(i.prompt, i.choices, i.gold) for i in again]
        other = task_items(task, 16, k, {**c, "seed": 1})
        assert [i.prompt for i in other] != [i.prompt for i in items]
        golds = set()
        for it in items:
            assert _rule_answer(task, it.prompt) == it.answer
            assert len(it.choices) == 4 and len(set(it.choices)) == 4
            assert len({len(ch) for ch in it.choices}) == 1  # same length: no candidate is a prefix of another
            golds.add(it.gold)
            lines = it.prompt.split("\n")
            if task == "recall":
                q = min(4, max(1, k // 2))
                assert len(lines[0].split()) == k and len(lines[1].split()) == q
                once = [v for v in (p.split(":")[1] for p in lines[0].split()) if v not in lines[1]]
                assert it.answer in once  # the gold is shown once; so are the in-context distractors
                assert sum(ch in once for ch in it.choices) == min(4, 1 + k - q)
                assert not any(ch in lines[1] for ch in it.choices)
            else:
                assert len(lines) == k + 1
            if task == "induction":
                shown = [line.split(">")[1] for line in lines[:-1]]
                assert not set(it.choices) & set(shown)
            if task == "copy":  # every candidate is one base span with one character changed
                diffs = [sum(a != b for a, b in zip(x, y)) for x in it.choices for y in it.choices if x < y]
                assert set(diffs) <= {1, 2} and 2 in diffs
        assert len(golds) > 1  # the gold's position varies


def test_induction_query_is_inferable_and_new():
    for it in task_items("induction", 32, 1, icl_config(CFG)):
        *examples, query = it.prompt.split("\n")
        seen = set("".join(e.split(">")[0] for e in examples))
        q = query.rstrip(">")
        assert set(q) <= seen and q not in [e.split(">")[0] for e in examples]


def test_questions_score_the_answer_tokens_even_with_bpe():
    texts = [it.prompt + it.answer for task in ("recall", "induction", "copy")
             for it in task_items(task, 32, 4, icl_config(CFG))]
    bpe = BPETokenizer.train(texts * 3, 320)
    for task in ("recall", "induction", "copy"):
        for it in task_items(task, 16, 4, icl_config(CFG)):
            q = encode_item(it, bpe)
            gold = q.seqs[q.gold]
            s, e = q.spans[q.gold]
            assert 1 <= s < e == len(gold) and gold[0] == bpe.bos_id
            text, scored = it.prompt + it.answer, bpe.decode(gold[s:])
            assert bpe.decode(gold) == text and text.endswith(scored)
            # the scored region starts at or before the first character where the candidates differ
            differ = min(next(i for i, (a, b) in enumerate(zip(it.answer, c)) if a != b)
                         for c in it.choices if c != it.answer)
            assert len(scored) >= len(it.answer) - differ
            assert len({tuple(x[s:]) for x in q.seqs}) == len(q.seqs)
            assert all(x[:s] == gold[:s] for x in q.seqs)


# ---------------------------------------------------------------------------
# Synthetic tasks through the real scorer


def _questions(task, k, tok=TOK, cfg=CFG):
    return [encode_item(it, tok) for it in task_items(task, cfg["items"], k, icl_config(cfg))]


def test_oracles_score_100_percent_and_uniform_scores_chance_in_both_views():
    every = [q for t in ("recall", "induction", "copy") for k in (1, 4, 8) for q in _questions(t, k)]
    trie = Trie([q.seqs[q.gold] for q in every])
    m = run_icl(both(trie), TOK, None, CFG, seq_len=256)
    u = run_icl(uniform_views(), TOK, None, CFG, seq_len=256)
    for task in ("recall", "induction", "copy"):
        assert m[f"icl_{task}_chance"] == 0.25
        for k in (1, 4, 8):
            for suffix in ("", "_full", "_sequential"):
                assert m[f"icl_{task}_acc_k{k}{suffix}"] == 1.0
                assert u[f"icl_{task}_acc_k{k}{suffix}"] == pytest.approx(0.25, abs=1e-12)
        assert m[f"icl_{task}_acc"] == 1.0
        # the rule oracle looks up / copies from the text itself (no stored answers)
        r = run_icl(both(Rule(task)), TOK, None, {**CFG, "evals": [task]}, seq_len=256)
        assert all(r[f"icl_{task}_acc_k{k}{s}"] == 1.0 for k in (1, 4, 8) for s in ("_full", "_sequential"))
    assert not any(key.startswith("icl_score") or key.startswith("icl_core") for key in m)


def test_a_model_that_ignores_the_context_sits_at_chance():
    # random bigram logits: no candidate is special unless the context is used
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    for task in ("recall", "induction", "copy"):
        qs = _questions(task, 4, cfg={**CFG, "items": 256})
        assert abs(score_questions(lambda idx: table[idx], qs).mean() - 0.25) < 0.07, task


def test_bpe_questions_go_through_the_scorer():
    cfg = {**CFG, "ks": [4]}
    texts = [it.prompt + it.answer for t in ("recall", "copy") for it in task_items(t, 32, 4, icl_config(cfg))]
    bpe = BPETokenizer.train(texts * 3, 320)
    qs = _questions("copy", 4, bpe, cfg) + _questions("recall", 4, bpe, cfg)
    trie = Trie([q.seqs[q.gold] for q in qs])
    for view in both(trie, bpe.vocab_size).values():
        assert score_questions(view, qs).tolist() == [1.0] * len(qs)
    for view in uniform_views(bpe.vocab_size).values():
        assert score_questions(view, qs) == pytest.approx([0.25] * len(qs))


def test_prompts_that_do_not_fit_drop_their_k_and_say_so():
    notes = []
    m = run_icl(uniform_views(), TOK, None, {**CFG, "evals": ["copy"], "ks": [1, 8]}, seq_len=64, log=notes.append)
    assert "icl_copy_acc_k1" in m and "icl_copy_acc_k8" not in m
    assert any("copy k=8 skipped" in n and "seq_len 64" in n for n in notes)


# ---------------------------------------------------------------------------
# The sequential view with shared prompts is exactly the recurrence


def _gpt(rec, seed=0):
    cfg = ModelConfig(depth=2, vocab_size=V, seq_len=64, head_dim=8, width=32, n_kv_head=2, value_embeds="alternating",
                      recurrence=rec)
    torch.manual_seed(seed)
    model = GPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("rec", [None, RecurrenceConfig(strategy="interleaved", passes=2)])
@pytest.mark.parametrize("mode", ["eager", "static"])  # static: the CUDA graph's step, uncaptured
def test_branched_sequential_view_equals_stepping_every_row(rec, mode, monkeypatch):
    import lrt_model.decode as decode_mod

    monkeypatch.setattr(decode_mod, "EVAL_DECODE", mode)
    model = _gpt(rec)
    qs = _questions("recall", 4)[:3] + _questions("copy", 1)[:2]
    seqs = [s for q in qs for s in q.seqs]
    owner = torch.tensor([j for j, q in enumerate(qs) for _ in q.seqs])
    L = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = torch.tensor(s)
    idx, tgt = tokens[:, :-1], tokens[:, 1:]
    shared = min(common_prefix(q.seqs) for q in qs)
    assert 10 < shared < L - 1
    with torch.no_grad(), _threads(1):  # tiny steps: one thread is much faster on busy cores
        ref_loss, ref_ok = token_stats(sequential_logits(model, idx, "eager"), tgt)
        loss, ok = view_stats(SequentialView(ModelStepper(model)), idx, tgt, owner, shared)
        plain_loss, _ = view_stats(SequentialView(ModelStepper(model)), idx, tgt)
        full_loss, full_ok = token_stats(model(idx), tgt)
        shared_loss, shared_ok = view_stats(FullView(model), idx, tgt, owner, shared)
    assert (loss - ref_loss).abs().max() < 1e-10 and torch.equal(ok, ref_ok)
    assert (plain_loss - ref_loss).abs().max() < 1e-10
    # the full view with prompts run once as a cached chunk is the full pass
    assert (shared_loss - full_loss).abs().max() < 1e-10 and torch.equal(shared_ok, full_ok)
    if rec is None:  # without memory the recurrence is the full pass
        assert (full_loss - ref_loss).abs().max() < 1e-10
    else:
        assert (full_loss - ref_loss).abs().max() > 1e-4  # zero memory is a different view


def test_evaluate_icl_on_real_models_reports_every_view(monkeypatch):
    monkeypatch.delenv("LRT_CORE_DIR", raising=False)
    rows = torch.randint(0, 256, (6, 65), generator=torch.Generator().manual_seed(0))
    cfg = {"ks": [1, 2], "items": 4}
    notes = []
    for rec in (RecurrenceConfig(strategy="interleaved", passes=2), None):
        torch.manual_seed(0)
        model = GPT(ModelConfig(depth=1, vocab_size=V, seq_len=64, head_dim=16, width=32, recurrence=rec))
        model.train()
        m = evaluate_icl(model, TOK, rows, cfg, "cpu", log=notes.append)
        assert model.training  # restored
        assert all(key.startswith("icl_") for key in m)
        views = ("full", "merged", "sequential") if rec else ("full",)
        for v in views:
            assert f"icl_score_{v}" in m
        main = "sequential" if rec else "full"
        assert m["icl_score"] == m[f"icl_score_{main}"]
        assert m["icl_score"] == pytest.approx(m["icl_loss_late"] - m["icl_loss_early"])
        for task in ("recall", "induction", "copy"):
            assert m[f"icl_{task}_acc_k2"] == m[f"icl_{task}_acc_k2_{main}"]
            assert (f"icl_{task}_acc_k1_sequential" in m) == (rec is not None)
            assert f"icl_{task}_acc_k1_merged" not in m  # merged only on request
            assert 0.0 <= m[f"icl_{task}_acc"] <= 1.0
        assert not any(k.startswith("icl_core") for k in m)
    assert notes.count(NO_CORE_MESSAGE) <= 1  # once per process, however often the trainer evaluates


# ---------------------------------------------------------------------------
# ICL score


def test_default_windows_scale_with_the_sequence():
    assert default_windows(256) == ((25, 41), (240, 256))
    assert default_windows(512) == ((51, 83), (480, 512))  # ~ Olsson's / nanochat's 50 vs 500
    early, late = default_windows(8)
    assert early[0] < early[1] <= late[0] < late[1] == 8


def _successor_rows(N=4, T=64):
    return (torch.arange(T + 1)[None, :] + 7 * torch.arange(N)[:, None]) % 200


def _successor(confidence):
    """Predicts token+1 with a confidence that may depend on the position."""

    def fn(idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, V)
        conf = confidence(torch.arange(T, dtype=torch.float32))
        logits.scatter_(2, ((idx + 1) % V)[..., None], conf[None, :, None].expand(B, T, 1))
        return logits

    return fn


def test_icl_score_is_negative_when_loss_drops_with_position_and_zero_otherwise():
    rows = _successor_rows()
    s = icl_score(None, rows, {"learns": _successor(lambda t: t / 8), "flat": _successor(lambda t: 0 * t + 2.0),
                               "uniform": Uniform()})
    assert s["learns"]["score"] < -1.0 and s["learns"]["late"] < s["learns"]["early"]
    assert s["flat"]["score"] == 0.0 and s["uniform"]["score"] == 0.0
    # the same through the sequential (stepper) path
    seq = icl_score(None, rows, {"u": SequentialView(Uniform())})
    assert seq["u"]["score"] == 0.0 and seq["u"]["early"] == pytest.approx(torch.log(torch.tensor(V * 1.0)).item())
    custom = icl_score(None, rows, {"learns": _successor(lambda t: t / 8)}, early=(0, 4), late=(60, 64))
    assert custom["learns"]["score"] < s["learns"]["score"]
    with pytest.raises(ConfigError, match="window"):
        icl_score(None, rows, {"u": Uniform()}, early=(10, 5))


def test_icl_score_ignores_bos_targets():
    rows = _successor_rows()
    rows[:, 30] = TOK.bos_id  # a document boundary inside the early window

    def knows_all_but_bos(idx):  # confident on every target except BOS, which it cannot foresee
        tgt = rows[:, 1:]
        logits = torch.zeros(*idx.shape, V)
        logits.scatter_(2, tgt[..., None], 2.0)
        logits[tgt == TOK.bos_id] = 0.0
        return logits

    windows = {"early": (25, 35), "late": (54, 64)}
    kept = icl_score(None, rows, {"m": knows_all_but_bos}, ignore_ids=[TOK.bos_id], **windows)
    assert kept["m"]["score"] == 0.0
    assert icl_score(None, rows, {"m": knows_all_but_bos}, **windows)["m"]["score"] < 0


# ---------------------------------------------------------------------------
# CORE harness


CORE_YAML = r"""
# the constructs CORE task lists use: block lists of mappings (an item may open on its own line),
# flow and block lists, double-quoted escapes, single quotes, comments
icl_tasks:
- label: jeopardy   # trailing comment
  dataset_uri: jeopardy.jsonl
  num_fewshot: [10]
  icl_task_type: language_modeling
  continuation_delimiter: "\nAnswer: "
  has_categories: true
-
  label: 'it''s'
  dataset_uri: its.jsonl
  num_fewshot:
    - 0
    - 5
  icl_task_type: schema
  note: a # b
  hash: "a # b"
- label: arc
  dataset_uri: arc.jsonl
  num_fewshot: [3, 25]
  icl_task_type: multiple_choice
  continuation_delimiter: ' '
  prompt_string: ''
  early_stopping_criteria:
  - "\n\n"
  - "Question:"
  post_processing_funcs:
  -
    name: qa_normalization
"""
CORE_CONFIG = {"icl_tasks": [
    {"label": "jeopardy", "dataset_uri": "jeopardy.jsonl", "num_fewshot": [10], "icl_task_type": "language_modeling",
     "continuation_delimiter": "\nAnswer: ", "has_categories": True},
    {"label": "it's", "dataset_uri": "its.jsonl", "num_fewshot": [0, 5], "icl_task_type": "schema", "note": "a",
     "hash": "a # b"},
    {"label": "arc", "dataset_uri": "arc.jsonl", "num_fewshot": [3, 25], "icl_task_type": "multiple_choice",
     "continuation_delimiter": " ", "prompt_string": "", "early_stopping_criteria": ["\n\n", "Question:"],
     "post_processing_funcs": [{"name": "qa_normalization"}]},
]}


def _bundle(root, name, text):
    """A bundle whose task list is `text` in core.yaml or core.json (`name`), with two rows per task."""
    folder = root / f"bundle{len(list(root.iterdir()))}"
    (folder / "eval_data").mkdir(parents=True)
    (folder / name).write_text(text, encoding="utf-8")
    (folder / "eval_meta_data.csv").write_text("Eval Task,Random baseline\njeopardy,0\nit's,50\narc,25\n")
    rows = {"jeopardy.jsonl": {"context": "Q?", "continuation": "A"},
            "its.jsonl": {"context_options": ["x", "y"], "continuation": "z", "gold": 0},
            "arc.jsonl": {"query": "Q?", "choices": ["a", "b"], "gold": 1}}
    for file, row in rows.items():
        (folder / "eval_data" / file).write_text(f"{json.dumps(row)}\n{json.dumps(row)}\n")
    return str(folder)


def test_core_yaml_reads_to_the_same_tasks_as_its_json_twin(tmp_path):
    assert yaml.safe_load(CORE_YAML) == CORE_CONFIG
    from_yaml = load_core_bundle(_bundle(tmp_path, "core.yaml", CORE_YAML))
    assert from_yaml == load_core_bundle(_bundle(tmp_path, "core.json", json.dumps(CORE_CONFIG)))
    assert [(t.label, t.task_type, t.num_fewshot, t.delimiter, t.random_baseline) for t in from_yaml] == [
        ("jeopardy", "language_modeling", 10, "\nAnswer: ", 0.0), ("it's", "schema", 0, " ", 50.0),
        ("arc", "multiple_choice", 3, " ", 25.0)]
    assert load_core_bundle(_bundle(tmp_path, "core.yaml", "# no tasks yet\n")) == []


@pytest.mark.parametrize("text, fragment", [
    ("icl_tasks:\n- label: a\n  bad: [1, 2\n", "is not valid YAML (line "),
    ("- label: a\n", "must be a mapping with an `icl_tasks:` list, not a list"),
])
def test_a_broken_core_yaml_is_one_line_naming_the_file(tmp_path, text, fragment):
    with pytest.raises(ValueError) as e:
        load_core_bundle(_bundle(tmp_path, "core.yaml", text))
    assert fragment in str(e.value) and "core.yaml" in str(e.value) and "\n" not in str(e.value)


def test_core_prompts_are_rendered_as_nanochat_renders_them():
    mc, schema, lm = load_core_bundle(BUNDLE)
    assert (mc.task_type, mc.num_fewshot, mc.delimiter, mc.random_baseline) == ("multiple_choice", 1, " ", 25.0)
    assert (lm.num_fewshot, lm.delimiter) == (2, "\nAnswer: ")
    assert len(load_core_bundle(BUNDLE, max_per_task=2)[0].data) == 2
    shot = mc.data[random.Random(1234 + 0).sample([1, 2], 1)[0]]
    texts, gold = render_core(mc, 0)
    item = mc.data[0]
    head = f"{shot['query']} {shot['choices'][shot['gold']]}\n\n"
    assert texts == [f"{head}{item['query']} {c}" for c in item["choices"]] and gold == item["gold"]
    texts, gold = render_core(schema, 1)
    item = schema.data[1]
    assert texts == [f"{c} {item['continuation']}" for c in item["context_options"]]
    (without, with_), gold = render_core(lm, 3)
    shots = [lm.data[j] for j in random.Random(1234 + 3).sample([0, 1, 2], 2)]
    head = "".join(f"{s['context'].strip()}\nAnswer: {s['continuation']}\n\n" for s in shots)
    assert with_ == f"{head}{lm.data[3]['context'].strip()}\nAnswer: {lm.data[3]['continuation']}"
    assert without == with_[: -len(lm.data[3]["continuation"])].strip() and gold is None
    q = core_question(lm, 3, TOK, 256)
    s, e = q.spans[0]
    assert TOK.decode(q.seqs[0][s:e]) == " " + lm.data[3]["continuation"]  # the space the strip removed is scored
    q = core_question(schema, 1, TOK, 256)
    assert all(TOK.decode(x[s:e]) == " " + schema.data[1]["continuation"] for x, (s, e) in zip(q.seqs, q.spans))


def test_core_left_truncates_long_prompts():
    lm = load_core_bundle(BUNDLE)[2]
    full = core_question(lm, 0, TOK, 256)
    short = core_question(lm, 0, TOK, 20)
    assert len(short.seqs[0]) == 21 and short.seqs[0] == full.seqs[0][-21:]
    assert short.seqs[0][short.spans[0][0]:] == full.seqs[0][full.spans[0][0]:]


def test_centered_accuracy():
    assert centered_accuracy(0.5, 25) == pytest.approx(1 / 3)
    assert centered_accuracy(0.25, 25) == 0.0
    assert centered_accuracy(1.0, 50) == 1.0
    assert centered_accuracy(0.0, 0) == 0.0


def test_core_scores_known_numbers_for_an_oracle_and_a_uniform_model():
    tasks = load_core_bundle(BUNDLE)
    qs = [core_question(t, i, TOK, 256) for t in tasks for i in range(len(t.data))]
    trie = Trie([q.seqs[q.gold or 0] for q in qs])
    oracle = evaluate_core(both(trie), TOK, tasks, 256)
    for view in ("full", "sequential"):
        assert oracle[view]["acc"] == {"tiny_mc": 1.0, "tiny_schema": 1.0, "tiny_lm": 1.0}
        assert oracle[view]["core"] == 1.0
    uniform = evaluate_core(uniform_views(), TOK, tasks, 256)
    for view in ("full", "sequential"):
        r = uniform[view]
        # MC: 4, 2 and 4 choices, all tied -> (1/4 + 1/2 + 1/4) / 3 = 1/3; centred (1/3 - 1/4) / (3/4) = 1/9
        assert r["acc"]["tiny_mc"] == pytest.approx(1 / 3) and r["centered"]["tiny_mc"] == pytest.approx(1 / 9)
        assert r["acc"]["tiny_schema"] == pytest.approx(0.5) and r["centered"]["tiny_schema"] == pytest.approx(0.0)
        assert r["acc"]["tiny_lm"] == 0.0  # exact match needs a strict argmax: ties are wrong
        assert r["core"] == pytest.approx(1 / 27)


def test_core_metrics_and_the_no_bundle_message(monkeypatch):
    monkeypatch.delenv("LRT_CORE_DIR", raising=False)
    _said.discard(NO_CORE_MESSAGE)
    notes = []
    assert run_icl(uniform_views(), TOK, None, {"evals": ["core"]}, 256, log=notes.append).keys() == {"icl_seconds"}
    assert notes == [NO_CORE_MESSAGE] and "LRT_CORE_DIR" in NO_CORE_MESSAGE and "core_dir" in NO_CORE_MESSAGE
    run_icl(uniform_views(), TOK, None, {"evals": ["core"]}, 256, log=notes.append)
    assert notes == [NO_CORE_MESSAGE]  # one message, not one per evaluation
    monkeypatch.setenv("LRT_CORE_DIR", BUNDLE)
    m = run_icl(uniform_views(), TOK, None, {"evals": ["core"], "core_views": ["full", "sequential"]}, 256)
    assert m["icl_core"] == pytest.approx(1 / 27) and m["icl_core_tiny_mc"] == pytest.approx(1 / 9)
    assert m["icl_core_full"] == pytest.approx(1 / 27) and m["icl_core_tiny_lm_full"] == 0.0
    m = run_icl(uniform_views(), TOK, None, {"evals": ["core"], "core_dir": BUNDLE}, 256)
    assert set(m) == {"icl_core", "icl_core_sequential", "icl_core_tiny_mc", "icl_core_tiny_schema",
                      "icl_core_tiny_lm", "icl_seconds"}


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="allowed"):
        icl_config({"kz": [1]})
    with pytest.raises(ConfigError, match="views"):
        icl_config({"task_views": ["fast"]})
    with pytest.raises(ConfigError, match="evals"):
        icl_config({"evals": ["mmlu"]})
