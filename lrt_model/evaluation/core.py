"""The CORE harness: a local DCLM/nanochat eval bundle, rendered and scored as nanochat does.

Design choices:
- A bundle is a folder with core.yaml or core.json, eval_meta_data.csv and
  eval_data/*.jsonl, given by the `core_dir` ICL setting or $LRT_CORE_DIR;
  nothing is ever downloaded. core.yaml is read with `yaml.safe_load`.
- Prompts are rendered as nanochat renders them (few-shot examples end with
  a blank line; data shuffled with Random(1337), capped at
  `core_max_per_task`, few-shot drawn with Random(1234 + i));
  multiple_choice and schema pick the lowest mean loss of the continuation,
  language_modeling needs every continuation token to be the strict argmax
  (`choice.py`). Too-long prompts are left-truncated to seq_len as nanochat
  does.
- `check_core_bundle` runs every check of `load_core_bundle` except reading
  the tasks' data, in milliseconds: the trainer (`TrainConfig.validate`,
  `train`) and the sweep planner call it before any training, so a mistyped
  bundle fails in one line up front instead of after the run.
- Centred accuracy = (acc - 0.01 b) / (1 - 0.01 b) with b the task's
  `Random baseline` percentage; the CORE score is the mean centred accuracy
  over tasks.

Example:
    >>> centered_accuracy(0.5, random_baseline=25)
    0.3333333333333333
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import yaml

from ..config import ConfigError
from .choice import Question, common_prefix, common_suffix, score_questions

CORE_ENV = "LRT_CORE_DIR"
NO_CORE_MESSAGE = (
    "icl: CORE skipped: no bundle configured. Point the `core_dir` ICL setting or the "
    f"{CORE_ENV} environment variable at a local DCLM/nanochat eval bundle (a folder with core.yaml "
    "or core.json, eval_meta_data.csv and eval_data/); nothing is downloaded."
)
CORE_TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def resolve_core_dir(core_dir: str | None) -> str | None:
    """The configured bundle (setting, else $LRT_CORE_DIR), or None. Accepts the
    bundle itself or a folder holding `eval_bundle/` (nanochat's base dir)."""
    core_dir = core_dir or os.environ.get(CORE_ENV) or None
    if core_dir is None:
        return None
    if not any(os.path.exists(os.path.join(core_dir, f)) for f in ("core.yaml", "core.json")):
        nested = os.path.join(core_dir, "eval_bundle")
        if os.path.isdir(nested):
            return nested
    return core_dir


@dataclass
class CoreTask:
    label: str
    task_type: str  # multiple_choice | schema | language_modeling
    num_fewshot: int
    delimiter: str
    data: list  # rows of the jsonl, shuffled and capped
    random_baseline: float  # percent


def _read_config(path: str) -> dict:
    """core.yaml (`yaml.safe_load`) or core.json as a dict; a file that is neither says where it breaks."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        config = json.loads(text)
    else:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"CORE bundle file {path!r} is not valid YAML ({where}{problem}); "
                             "fix it or write core.json instead") from e
    if config is None:  # an empty file: no tasks
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"CORE bundle file {path!r} must be a mapping with an `icl_tasks:` list, "
                         f"not a {type(config).__name__}")
    return config


def _bundle_index(core_dir: str) -> list[tuple[dict, str, float]]:
    """(task entry, data file, random baseline) per task of a bundle: everything `load_core_bundle` checks
    before it reads the tasks' data; errors say which file is missing or wrong."""
    names = [f for f in ("core.yaml", "core.json") if os.path.exists(os.path.join(core_dir, f))]
    if not names:
        raise FileNotFoundError(f"CORE bundle {core_dir!r} has neither core.yaml nor core.json")
    config = _read_config(os.path.join(core_dir, names[0]))
    baselines = {}
    meta = os.path.join(core_dir, "eval_meta_data.csv")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"CORE bundle {core_dir!r} has no eval_meta_data.csv (each task's random baseline)")
    with open(meta, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    index = []
    for spec in config.get("icl_tasks") or []:
        label, kind = spec["label"], spec["icl_task_type"]
        if kind not in CORE_TASK_TYPES:
            raise ValueError(f"CORE task {label!r}: icl_task_type {kind!r} is not supported "
                             f"({', '.join(CORE_TASK_TYPES)})")
        if label not in baselines:
            raise ValueError(f"CORE task {label!r} has no row in eval_meta_data.csv")
        index.append((spec, os.path.join(core_dir, "eval_data", spec["dataset_uri"]), baselines[label]))
    return index


def check_core_bundle(core_dir: str | None, field: str = "icl.core_dir") -> None:
    """Check the bundle that `core_dir` (else $LRT_CORE_DIR) names without reading the tasks' data:
    its config and eval_meta_data.csv parse, every task is supported and has a baseline and a data file.
    No bundle configured is fine (CORE is skipped with a note). Raises a one-line ConfigError naming
    `field` (the setting's name where the caller reads it) and the fix."""
    path = resolve_core_dir(core_dir)
    if path is None:
        return
    where = f"{field}={core_dir!r}" if core_dir else f"${CORE_ENV}={os.environ.get(CORE_ENV)!r} ({field} unset)"
    fix = (f"point {field} (or ${CORE_ENV}) at a local DCLM/nanochat eval bundle (a folder with core.yaml or "
           "core.json, eval_meta_data.csv and eval_data/), or leave \"core\" out of the icl evals")
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: no such folder; {fix}")
    try:
        index = _bundle_index(path)
    except KeyError as e:
        raise ConfigError(f"{where}: a task in its core.yaml/core.json, or its eval_meta_data.csv, has no {e} "
                          f"key; {fix}") from None
    except (OSError, ValueError, TypeError, AttributeError, csv.Error) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}; {fix}") from None
    for spec, data, _ in index:
        if not os.path.isfile(data):
            raise ConfigError(f"{where}: CORE task {spec['label']!r} has no data file {data}; {fix}")


def load_core_bundle(core_dir: str, max_per_task: int = -1) -> list:
    """CoreTasks of a local bundle; errors say which file is missing or wrong."""
    tasks = []
    for spec, path, baseline in _bundle_index(core_dir):
        label, kind = spec["label"], spec["icl_task_type"]
        with open(path, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(data)  # as nanochat: the files are often ordered
        if max_per_task > 0:
            data = data[:max_per_task]
        shots = spec.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        tasks.append(CoreTask(label, kind, int(shots), spec.get("continuation_delimiter", " "), data, baseline))
    return tasks


def render_core(task: CoreTask, i: int) -> tuple[list, int | None]:
    """nanochat's prompts for example i: (texts, gold). MC: one text per
    choice; schema: one per context option; LM: [without, with] continuation."""
    item, d = task.data[i], task.delimiter
    shots = []
    if task.num_fewshot > 0:
        others = [j for j in range(len(task.data)) if j != i]
        shots = [task.data[j] for j in random.Random(1234 + i).sample(others, task.num_fewshot)]
    if task.task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]], item["gold"]
    if task.task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]], item["gold"]
    head = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    stem = f"{head}{item['context'].strip()}{d}"
    return [stem.strip(), stem + item["continuation"]], None


def core_question(task: CoreTask, i: int, tokenizer, seq_len: int) -> Question:
    """Example i as token rows with the scored span of each, left-truncated to fit seq_len."""
    texts, gold = render_core(task, i)
    seqs = [[tokenizer.bos_id, *tokenizer.encode(t)] for t in texts]
    if task.task_type == "multiple_choice":  # (a choice that is a prefix of another keeps its last token)
        spans = [(min(common_prefix(seqs), len(s) - 1), len(s)) for s in seqs]
    elif task.task_type == "schema":  # contexts differ, the continuation is shared
        n = common_suffix(seqs)
        spans = [(len(s) - n, len(s)) for s in seqs]
    else:  # the continuation is what `with` adds to `without` (common prefix: robust to BPE merges)
        seqs, spans = [seqs[1]], [(common_prefix(seqs), len(seqs[1]))]
    for r, (s, (a, b)) in enumerate(zip(seqs, spans)):
        cut = max(0, len(s) - 1 - seq_len)  # left-truncate: the model reads at most seq_len tokens
        seqs[r], spans[r] = s[cut:], (max(1, a - cut), b - cut)
    return Question(seqs, spans, gold)


def centered_accuracy(acc: float, random_baseline: float) -> float:
    """CORE's centring: 0 at the random baseline (a percentage), 1 at perfect."""
    return (acc - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(views: dict, tokenizer, tasks: list, seq_len: int, device="cpu", batch_rows: int = 128,
                  batch_tokens: int = 65536) -> dict:
    """{view: {"core": mean centred accuracy, "acc": {label: acc}, "centered": {label: centred}}}."""
    questions, owners = [], []
    for t, task in enumerate(tasks):
        for i in range(len(task.data)):
            questions.append(core_question(task, i, tokenizer, seq_len))
            owners.append(t)
    owners = np.asarray(owners)
    out = {}
    for name, view in views.items():
        credits = score_questions(view, questions, device, batch_rows, batch_tokens)
        acc = {task.label: float(credits[owners == t].mean()) for t, task in enumerate(tasks) if len(task.data)}
        cen = {task.label: centered_accuracy(acc[task.label], task.random_baseline) for task in tasks
               if task.label in acc}
        out[name] = {"core": float(np.mean(list(cen.values()))) if cen else float("nan"), "acc": acc,
                     "centered": cen}
    return out
