"""ICL settings: the defaults and the check that names a bad key or value.

Design choices:
- One flat dict (`DEFAULTS`), as the trainer's `icl` field and a sweep spec's
  `eval: {icl: ...}` carry it; `icl_config` merges a partial dict over it and
  fails on the first wrong key or value, before any training starts.
  (`lrt_model.config.check_icl` checks each value's type and range first.)
- `check_inputs` adds the files the evaluation reads at the end of a run
  (the CORE bundle), so the trainer and the sweep planner check them before
  training, not after it.
"""

from __future__ import annotations

from ..config import ConfigError
from .core import check_core_bundle
from .tasks import TASKS
from .views import VIEWS

EVALS = ("score", *TASKS, "core")

DEFAULTS = {
    "evals": list(EVALS),  # which evaluations run ("core" only when a bundle is configured)
    "ks": [1, 4, 8],  # in-context examples per question
    "items": 64,  # questions per task and k (binomial std <= 0.06)
    "choices": 4,  # candidates per question: chance = 1/choices
    "seed": 0,
    "score_rows": 64,  # validation rows for the ICL score (the sequential view costs one step per token)
    "early": None,  # [a, b) positions; None: scaled to the sequence length
    "late": None,
    "score_views": None,  # None: every view the model has
    "task_views": None,  # None: full (+ sequential for LRT); merged on request
    "core_views": None,  # None: the main view only
    "recall_queries": 4,
    "induction_len": 3,
    "copy_len": 8,
    "core_dir": None,  # None: $LRT_CORE_DIR
    "core_max_per_task": 500,  # nanochat's in-training setting; -1 = all
    "batch_rows": 128,  # rows per batch (candidates included)
    "batch_tokens": None,  # and at most this many tokens; None: 2**28 // vocab (1 GiB of fp32 logits)
    "cpu_threads": 1,  # torch threads on CPU while evaluating (restored after); None: leave as is
}


def icl_config(cfg: dict | None) -> dict:
    """Defaults merged with `cfg`; unknown keys and values are named in the error."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown ICL setting(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    for name in out["evals"]:
        if name not in EVALS:
            raise ConfigError(f"icl evals: {name!r} is not known; choose from {', '.join(EVALS)}")
    for key in ("score_views", "task_views", "core_views"):
        for name in out[key] or []:
            if name not in VIEWS:
                raise ConfigError(f"icl {key}: {name!r} is not a view; choose from {', '.join(VIEWS)}")
    if not out["ks"] or min(out["ks"]) < 1:
        raise ConfigError(f"icl ks={out['ks']} must be a non-empty list of integers >= 1")
    if out["choices"] < 2 or out["items"] < 1:
        raise ConfigError("icl choices must be >= 2 and items >= 1")
    if out["cpu_threads"] is not None and out["cpu_threads"] < 1:
        raise ConfigError(f"icl cpu_threads={out['cpu_threads']} must be >= 1 (or None to keep torch's setting)")
    return out


def check_inputs(cfg: dict | None, field: str = "icl") -> dict:
    """`icl_config(cfg)`, and every file the end-of-run evaluation will read exists and parses: the CORE
    bundle when "core" is evaluated and one is configured (the `core_dir` setting, else $LRT_CORE_DIR).
    `field`: where the settings sit, for the error (the trainer's `icl`, a spec's `eval.icl`)."""
    out = icl_config(cfg)
    if "core" in out["evals"]:
        check_core_bundle(out["core_dir"], f"{field}.core_dir")
    return out
