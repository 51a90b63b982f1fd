"""Evaluation of a model in every view: validation bpb and in-context learning.

One concern per module:
    views.py     the views (full, merged, sequential) and `headline_view`, the one rule
                 for which view a metric without a suffix reports
    bpb.py       validation bits per byte per view, the interleave gap, per-position buckets
    score.py     the ICL score: late minus early loss
    choice.py    multiple choice by likelihood (CORE's rule), batched over questions
    tasks.py     the synthetic recall / induction / copy generators
    core.py      the local CORE-bundle harness (nanochat's prompts and centring)
    settings.py  the ICL settings, their defaults and checks
    icl.py       all ICL metrics of a model, flat (`evaluate_icl`)

Example:
    >>> from lrt_model.evaluation import headline_view
    >>> headline_view(lrt=True)
    'sequential'
"""

from .bpb import evaluate_bpb
from .choice import Question, common_prefix, common_suffix, credit, mc_question, score_questions
from .core import (CORE_ENV, NO_CORE_MESSAGE, CoreTask, centered_accuracy, check_core_bundle, core_question,
                   evaluate_core, load_core_bundle, render_core, resolve_core_dir)
from .icl import evaluate_icl, run_icl
from .score import default_windows, icl_score
from .settings import DEFAULTS, EVALS, check_inputs, icl_config
from .tasks import (GENERATORS, TASKS, Item, copy_items, encode_item, induction_items, recall_items,
                    task_items)
from .views import (VIEWS, FullView, ModelStepper, SequentialView, Stepper, headline_view, main_view,
                    model_views, select_views, token_stats, view_names, view_stats)

__all__ = [
    "CORE_ENV", "DEFAULTS", "EVALS", "GENERATORS", "NO_CORE_MESSAGE", "TASKS", "VIEWS", "CoreTask", "FullView",
    "Item", "ModelStepper", "Question", "SequentialView", "Stepper", "centered_accuracy", "check_core_bundle",
    "check_inputs", "common_prefix",
    "common_suffix", "copy_items", "core_question", "credit", "default_windows", "encode_item", "evaluate_bpb",
    "evaluate_core", "evaluate_icl", "headline_view", "icl_config", "icl_score", "induction_items",
    "load_core_bundle", "main_view", "mc_question", "model_views", "recall_items", "render_core",
    "resolve_core_dir", "run_icl", "score_questions", "select_views", "task_items", "token_stats",
    "view_names", "view_stats",
]
