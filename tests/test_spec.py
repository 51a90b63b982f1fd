"""Sweep specs: every shipped spec validates; bad specs fail with one clear line."""

import glob
import os

import pytest

from lrt_platform.spec import SpecError, load_spec, parse_spec, spec_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = """
experiment: t
backbone: {depth: 2, head_dim: 32, seq_len: 64, batch_size: 4}
arms:
  - {name: baseline, baseline: true}
  - {name: lrt, strategy: interleaved, passes: 2}
budgets: {flops: [1.0e+11]}
seeds: [0, 1]
"""


def _error(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(text, "bad.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad.yaml: ")
    return msg


@pytest.mark.parametrize("path", sorted(glob.glob(f"{ROOT}/sweep_specs/**/*.yaml", recursive=True)))
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert len(spec_hash(spec)) == 12 and spec.baseline_arm and spec.lrt_arms


def test_shipped_specs_cover_the_issue():
    names = {os.path.relpath(p, f"{ROOT}/sweep_specs") for p in glob.glob(f"{ROOT}/sweep_specs/**/*.yaml", recursive=True)}
    assert {"quickstart.yaml", "scaling.yaml", "schedule_search.yaml", "injection_search.yaml",
            "tiny/quickstart.yaml", "tiny/schedule_search.yaml", "tiny/injection_search.yaml",
            "tuned_cpu.yaml", "tiny/tuned.yaml"} <= names


def test_defaults_and_views():
    spec = parse_spec(BASE)
    assert spec.depths == [2] and spec.matching == "compute" and spec.budgets.kind == "flops"
    assert spec.budgets.values(2) == [1e11]
    rec = spec.lrt_arms[0].recurrence()
    assert (rec.strategy, rec.passes, rec.injection, rec.projection, rec.gamma_init) == ("interleaved", 2, "both", "shared", 0.1)
    assert spec.baseline_arm.recurrence() is None
    assert spec.storage == "./runs" and spec.tracking.uri is None and spec.experiment_name == "t"
    assert spec.failure.max_failures == 2


def test_unknown_key_names_the_place_and_the_allowed_keys():
    msg = _error(BASE.replace("passes: 2}", "pases: 2}"))
    assert "arms[1]" in msg and "'pases'" in msg and "passes" in msg and "strategy" in msg
    msg = _error(BASE + "bogus: 1\n")
    assert "unknown key 'bogus'" in msg and "experiment" in msg


def test_negative_and_zero_budgets():
    assert "budgets.flops" in _error(BASE.replace("[1.0e+11]", "[-1.0e+11]"))
    assert "must be positive" in _error(BASE.replace("[1.0e+11]", "[0]"))
    assert "budgets.tokens_per_param" in _error(BASE.replace("flops: [1.0e+11]", "tokens_per_param: [10, -5]"))


def test_bad_values_list_the_allowed_ones():
    msg = _error(BASE + "matching: flopz\n")
    assert "matching" in msg and "'compute'" in msg and "'tokens'" in msg and "flopz" in msg
    msg = _error(BASE.replace("interleaved", "sideways"))
    assert "arms[1].strategy" in msg and "multi_refine" in msg and "sideways" in msg
    assert "backbone.seq_len" in _error(BASE.replace("seq_len: 64", "seq_len: -3"))
    assert "bpe:N" in _error(BASE + "data: {tokenizer: words}\n")
    assert "resources.cpus_per_worker" in _error(BASE + "resources: {cpus_per_worker: 0}\n")


def test_arm_rules():
    assert "exactly one arm with 'baseline: true'" in _error(BASE.replace("  - {name: baseline, baseline: true}\n", ""))
    assert "at least one LRT arm" in _error(BASE.replace("  - {name: lrt, strategy: interleaved, passes: 2}\n", ""))
    assert "takes no recurrence settings" in _error(BASE.replace("baseline: true}", "baseline: true, passes: 3}"))
    assert "used twice" in _error(BASE.replace("name: lrt", "name: baseline"))
    msg = _error(BASE.replace("passes: 2}", "passes: 2, source_layer: 7}"))
    assert "source_layer=7" in msg and "depth 2" in msg
    assert "loss_weights" in _error(BASE.replace("passes: 2}", "passes: 2, loss_weights: [1, 1]}"))


def test_budget_per_depth():
    spec = parse_spec(BASE.replace("depth: 2,", "depth: [2, 4],").replace(
        "flops: [1.0e+11]", "tokens_per_param: {2: [5, 10], 4: [10]}"))
    assert spec.budgets.values(2) == [5, 10] and spec.budgets.values(4) == [10]
    assert "depth 3 is not in" in _error(BASE.replace("flops: [1.0e+11]", "flops: {3: [1.0e+11]}"))
    assert "no budget for depth 4" in _error(BASE.replace("depth: 2,", "depth: [2, 4],").replace(
        "flops: [1.0e+11]", "flops: {2: [1.0e+11]}"))
    assert "exactly one of" in _error(BASE.replace("flops: [1.0e+11]", "flops: [1.0e+11], tokens: [1000]"))


def test_batch_must_divide():
    assert "multiple of" in _error(BASE.replace("batch_size: 4}", "batch_size: 4, total_batch_tokens: 300}"))


def test_search_block_validation():
    search = "search:\n  space:\n    recurrence.passes: {type: int, low: 1, high: 4}\n"
    spec = parse_spec(BASE.replace("seeds: [0, 1]", "seeds: [0]") + search)
    assert spec.search.sampler == "tpe" and spec.search.metric == "val_bpb" and spec.search_arm.name == "lrt"
    assert "cannot be searched" in _error(BASE + search.replace("recurrence.passes", "recurrence.pases"))
    assert "lies outside the space" in _error(BASE + search.replace("low: 1", "low: 3"))
    assert "needs 'low' and 'high'" in _error(BASE + "search:\n  space:\n    optim.matrix_lr: {type: float}\n")
    assert "low > 0" in _error(BASE + "search:\n  space:\n    optim.matrix_lr: {type: loguniform, low: 0, high: 1}\n")
    assert "asha" in _error(BASE + search + "  multi_objective: true\n  asha: {enabled: true}\n")
    assert "one fixed budget" in _error(BASE.replace("[1.0e+11]", "[1.0e+11, 2.0e+11]") + search)
    msg = _error(BASE + search + "  metric: val_bpb_merged\n")  # fidelity-aware: never the training view
    assert "search.metric" in msg and "decoding does not deliver" in msg and "use val_bpb" in msg


TUNING = """tuning:
  space:
    optim.lr_scale: {type: loguniform, low: 0.25, high: 2.0}
    optim.warmup_frac: {type: float, low: 0.0, high: 0.2}
"""


def test_tuning_block_validation():
    spec = parse_spec(BASE + TUNING)
    t = spec.tuning
    assert (t.trials, t.sampler, t.seed, t.train_seed, t.metric) == (6, "tpe", 0, 1000, "val_bpb")
    msg = _error(BASE + TUNING.replace("optim.warmup_frac", "recurrence.passes"))
    assert msg.startswith("bad.yaml: tuning.space: ") and "only optim.* fields" in msg and "FLOPs per token" in msg
    assert "tuning.trials" in _error(BASE + TUNING + "  trials: 0\n") and "at least 1 trial" in _error(
        BASE + TUNING + "  trials: 0\n")
    msg = _error(BASE + TUNING + "  train_seed: 1\n")
    assert "tuning.train_seed=1" in msg and "seeds [0, 1]" in msg
    search = "search:\n  space:\n    optim.lr_scale: {type: float, low: 0.5, high: 2}\n"
    msg = _error(BASE.replace("seeds: [0, 1]", "seeds: [0]") + TUNING + search)
    assert "`tuning` or `search`, not both" in msg and "only one LRT arm" in msg
    assert "lies outside the space" in _error(BASE + TUNING.replace("low: 0.25", "low: 1.5"))  # lr_scale 1.0 = trial 0
    assert "unconditional" in _error(BASE + TUNING.replace("high: 0.2}", "high: 0.2, when: {optim.lr_scale: 1}}"))
    assert "tuning space is empty" in _error(BASE + "tuning: {space: {}}\n")
    assert "decoding does not deliver" in _error(BASE + TUNING + "  metric: val_bpb_full\n")


def test_spec_hash_is_stable_and_ignores_where_it_runs():
    a = parse_spec(BASE)
    reordered = parse_spec("seeds: [0, 1]\n" + BASE.replace("seeds: [0, 1]\n", "") + "storage: s3://b/x\n"
                           "tracking: {uri: 'http://h:5000'}\nresources: {max_concurrent_trials: 1}\n")
    assert spec_hash(a) == spec_hash(reordered) == spec_hash(parse_spec(BASE))
    assert spec_hash(a) != spec_hash(parse_spec(BASE.replace("[0, 1]", "[0, 2]")))
    assert spec_hash(a) != spec_hash(parse_spec(BASE.replace("passes: 2", "passes: 3")))
    assert spec_hash(a) == spec_hash(parse_spec(BASE + "optim: {muon: batched}\n"))  # how Muon runs, not what


def test_existing_sweeps_keep_their_hash():
    """The hash names a sweep's storage, so `--resume` of a running sweep depends on it:
    a new spec field must leave it unchanged unless the field is set (add it to UNHASHED
    or exclude its default), or every running sweep restarts from nothing. The one deliberate
    exception is a change of the trainer's defaults (`DEFAULTS_VERSION`): an unchanged spec then
    computes something else, and resuming would mix runs under old and new defaults."""
    from pathlib import Path

    from lrt_platform import spec as spec_module

    spec = load_spec(str(Path(__file__).resolve().parents[1] / "sweep_specs" / "quickstart.yaml"))
    assert spec_hash(spec) == "c5495d8dca5e"  # DEFAULTS_VERSION 2 (was 022b64ca79c2 under version 1)
    old = spec_module.DEFAULTS_VERSION
    try:
        spec_module.DEFAULTS_VERSION = old + 1
        assert spec_hash(spec) != "c5495d8dca5e"  # new defaults: a new sweep folder
    finally:
        spec_module.DEFAULTS_VERSION = old
    assert spec_hash(parse_spec(BASE + TUNING)) != spec_hash(parse_spec(BASE))  # a tuned spec is a new sweep


def test_pools_leave_the_hash_of_existing_specs_alone():
    """Pools and accelerator types say where trials run, not what they compute: unset they leave every
    existing spec's hash as it was, set they change nothing either (a sweep moved to another pool resumes)."""
    from pathlib import Path

    spec = load_spec(str(Path(__file__).resolve().parents[1] / "sweep_specs" / "quickstart.yaml"))
    assert spec.resources.pool is None and spec.resources.accelerator_type is None
    assert all(a.resources is None for a in spec.arms)
    assert spec_hash(spec) == "c5495d8dca5e"
    pinned = parse_spec(BASE.replace("passes: 2}", "passes: 2, resources: {pool: h100}}")
                        + "resources: {pool: h100-spot, accelerator_type: H100}\n")
    assert (pinned.resources.pool, pinned.resources.accelerator_type, pinned.arms[1].resources.pool) == \
        ("h100-spot", "H100", "h100")
    assert spec_hash(pinned) == spec_hash(parse_spec(BASE))


def test_pool_and_accelerator_values_fail_in_one_line():
    msg = _error(BASE + "resources: {pool: pool-h100}\n")
    assert "resources.pool: 'pool-h100' is the pool's Ray resource" in msg and "(pool: h100)" in msg
    assert "resources.pool: 'a b' is not a pool name" in _error(BASE + "resources: {pool: 'a b'}\n")
    msg = _error(BASE + "resources: {accelerator_type: 'accelerator_type:H100'}\n")
    assert "resources.accelerator_type" in msg and "(accelerator_type: H100)" in msg
    assert "not an accelerator type" in _error(BASE + "resources: {accelerator_type: 'H 100'}\n")
    msg = _error(BASE.replace("passes: 2}", "passes: 2, resources: {pool: pool-x}}"))
    assert "arms[1].resources.pool" in msg and "(pool: x)" in msg
    msg = _error(BASE.replace("passes: 2}", "passes: 2, resources: {gpus_per_worker: 1}}"))
    assert "arms[1].resources: unknown key 'gpus_per_worker'; allowed keys: pool, accelerator_type" in msg
    assert parse_spec(BASE.replace("baseline: true}", "baseline: true, resources: {pool: h100}}"))  # not recurrence


def test_storage_falls_back_to_lrt_storage(monkeypatch):
    monkeypatch.delenv("LRT_STORAGE", raising=False)
    assert parse_spec(BASE).storage == "./runs"  # the default as before
    monkeypatch.setenv("LRT_STORAGE", "")
    assert parse_spec(BASE).storage == "./runs"  # set but empty: unset
    monkeypatch.setenv("LRT_STORAGE", "s3://lrt-sweeps/runs")
    spec = parse_spec(BASE)
    assert spec.storage == "s3://lrt-sweeps/runs"
    assert parse_spec(BASE + "storage: /data/runs\n").storage == "/data/runs"  # the spec's own wins
    assert spec_hash(spec) == spec_hash(parse_spec(BASE + "storage: ./runs\n"))  # where, not what


def test_not_yaml_and_not_a_mapping():
    assert "not valid YAML" in _error("a: [1, 2")
    assert "a YAML mapping" in _error("- 1\n- 2\n")
    assert "experiment: this field is required" in _error(BASE.replace("experiment: t\n", ""))


# ---------------------------------------------------------------------------
# Reproducers from the spec fuzzing issue: each was a traceback (or a hang), now one line naming the field


SEARCH_BASE = BASE.replace("seeds: [0, 1]", "seeds: [0]") + "search:\n  space:\n"


@pytest.mark.parametrize("text, fragments", [
    (BASE.replace("flops: [1.0e+11]", "flops: {null: [1.0e+11]}"), ["budgets.flops", "key None is not a depth"]),
    (BASE + "eval: {icl: {ks: [a, 1]}}\n", ["eval.icl", "icl.ks='a' must be an integer"]),
    (BASE + "eval: {icl: {items: .inf}}\n", ["eval.icl", "icl.items=inf must be an integer"]),
    (SEARCH_BASE + "    recurrence.passes: {type: int, low: 1, high: 4, step: 0.5}\n",
     ["search.space.recurrence.passes", "step=0.5", "integer step"]),
    (SEARCH_BASE + "    recurrence.passes: {type: categorical, choices: [2, three]}\n",
     ["recurrence.passes.choices[1]='three'", "not an int"]),
    (SEARCH_BASE + "    recurrence.passes: {type: int, low: 1, high: 1000000000000}\n",
     ["recurrence.passes.high=1000000000000", "less than or equal to 1024"]),
    (SEARCH_BASE + "    model.softcap: {type: categorical, choices: [15.0, 0x" + "f" * 400 + "]}\n",
     ["model.softcap.choices[1]", "must be a finite number > 0"]),
    (SEARCH_BASE + "    recurrence.passes: {type: float, low: 1, high: 4}\n", ["use type: int"]),
    (SEARCH_BASE + "    optim.lr_scale: {type: loguniform, low: 0.5, high: 2, step: 0.5}\n", ["takes no step"]),
    (BASE.replace("depth: 2,", "depth: 1000000000,"), ["backbone.depth[0]", "less than or equal to 128"]),
    (BASE.replace("[1.0e+11]", "[1.0e+307]"), ["budgets.flops", "1e+307 (entry 0) is too large"]),
    (BASE.replace("flops: [1.0e+11]", "tokens_per_param: [1.0e+307]"), ["budgets.tokens_per_param", "too large"]),
    (BASE.replace("flops: [1.0e+11]", "tokens: [.inf]"), ["budgets.tokens", "inf (entry 0) is not allowed"]),
    (BASE + "optim: {matrix_lr: .inf}\n", ["optim.matrix_lr", "finite number"]),
    (BASE + "optim: {lr_scale: .nan}\n", ["optim.lr_scale", "finite number"]),
    (BASE.replace("passes: 2}", "passes: 2, gamma_init: .nan}"), ["arms[1].gamma_init", "finite number"]),
    (BASE.replace("passes: 2}", "passes: 2, loss_weights: [1, 1, .inf]}"), ["arms[1].loss_weights[2]", "finite"]),
    (SEARCH_BASE + "    recurrence.final_weight: {type: float, low: 0.5, high: .inf}\n",
     ["search.space.recurrence.final_weight.high", "finite number"]),
    (BASE + "optim: {adam_betas: [5, -3]}\n", ["optim.adam_betas[0]", "less than 1"]),
    (BASE + "optim: {adam_betas: [0.9, -3]}\n", ["optim.adam_betas[1]", "greater than or equal to 0"]),
    (BASE + "optim: {weight_decay: -1}\n", ["optim.weight_decay"]),
    (BASE.replace("experiment: t", 'experiment: "t\\n"'), ["experiment", "'t\\n' is not a valid experiment name"]),
    (BASE.replace("experiment: t", "experiment: " + "t" * 65), ["experiment", "1 to 64 letters"]),
    (BASE.replace("name: lrt,", 'name: "lrt\\n",'), ["arms[1].name", "not a valid arm name"]),
    (BASE.replace("seeds: [0, 1]", "seeds: [-1]"), ["seeds[0]", "greater than or equal to 0"]),
    (BASE.replace("seeds: [0, 1]", "seeds: [" + ", ".join(map(str, range(6000))) + "]"), ["plans", "at most 10000"]),
    (BASE + "data: {tokenizer: 'bpe:" + "9" * 5000 + "'}\n", ["data.tokenizer", "is not a tokenizer"]),
    (BASE + "resources: {cpus_per_worker: .inf}\n", ["resources.cpus_per_worker", "finite number"]),
    ("a: !!timestamp x\n", ["not valid YAML"]),
    ("a: " + "1" * 5000 + "\n", ["not valid YAML"]),
    ("a: " + "[" * 5000 + "\n", ["nested more than 64 levels deep at line 1"]),
    ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 200)), ["nested more than 32 levels deep"]),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     ["more than 100000 values"]),
])
def test_fuzzing_reproducers_fail_with_one_line(text, fragments):
    msg = _error(text)
    for fragment in fragments:
        assert fragment in msg, msg


def test_binary_and_oversized_spec_files(tmp_path):
    for name, content, fragment in [("binary.yaml", b"\xff\xfe\x00\x01\x89PNG", "not UTF-8 text (byte 0)"),
                                    ("big.yaml", b"# " + b"x" * (1 << 20) + b"\n", "a spec is a small YAML file")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SpecError) as e:
            load_spec(str(path))
        assert str(e.value).startswith(str(path)) and fragment in str(e.value) and "\n" not in str(e.value)


def test_bounds_keep_valid_specs_valid():
    """The new bounds and checks accept what they should: quoted depth keys, big but sane numbers."""
    spec = parse_spec(BASE.replace("depth: 2,", "depth: [2, 4],").replace(
        "flops: [1.0e+11]", "flops: {'2': [1.0e+11], 4: [1.0e+30]}") + "optim: {adam_betas: [0, 0.999]}\n")
    assert spec.budgets.values(2) == [1e11] and spec.budgets.values(4) == [1e30]
    search = SEARCH_BASE + ("    recurrence.passes: {type: int, low: 1, high: 8, step: 1}\n"
                            "    model.width: {type: categorical, choices: [null, 64, 128]}\n"
                            "    recurrence.passes_schedule: "
                            "{type: categorical, choices: [null, [[0.0, 2], [0.5, 4]]]}\n"
                            "    optim.lr_scale: {type: loguniform, low: 0.25, high: 4}\n")
    assert len(parse_spec(search).search.space) == 4


def test_every_searchable_field_accepts_its_default():
    """The per-field check of search values knows every searchable field, and its own defaults pass it."""
    from lrt_platform.spec import _field_default, _value_error, search_fields

    for key in search_fields():
        assert _value_error(key, _field_default(key)) is None, key
    assert _value_error("recurrence.passes", 0) and _value_error("optim.lr_scale", -1.0)
    assert _value_error("recurrence.strategy", 2) and _value_error("model.softcap", 10**400)


def test_recurrence_fields_are_defined_once_and_the_cli_and_spec_derive_from_them(capsys):
    """Adding a field to the recurrence dataclass is the only edit a new setting needs: the trainer's flags
    and the spec's arm fields both come from the dataclass (type, choices, bounds, default)."""
    import argparse
    import dataclasses

    from pydantic import ValidationError, create_model

    from lrt_model.config import RecurrenceConfig, add_config_arguments, config_arguments, config_field
    from lrt_model.train import build_parser
    from lrt_platform.spec import RECURRENCE_FIELDS, ArmSpec, config_schema

    flags = {a.dest for a in build_parser()._actions}
    assert set(RECURRENCE_FIELDS) <= flags and set(RECURRENCE_FIELDS) <= set(ArmSpec.model_fields)

    extended = dataclasses.make_dataclass("Extended", [
        ("memory_slots", int, config_field(4, "memory slots per layer", ge=1, le=64)),
        ("mode", str, config_field("a", "how", choices=("a", "b")))], bases=(RecurrenceConfig,))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, extended)
    got = config_arguments(parser.parse_args(["--memory-slots", "8", "--mode", "b", "--passes", "3"]), extended)
    assert (got["memory_slots"], got["mode"], got["passes"]) == (8, "b", 3)
    assert config_arguments(parser.parse_args([]), extended)["memory_slots"] == 4  # the dataclass default
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    arm = create_model("Arm", **config_schema(extended))
    assert arm(memory_slots=8, mode="b").memory_slots == 8 and arm().memory_slots is None  # unset: default
    for bad in ({"memory_slots": 0}, {"memory_slots": 65}, {"mode": "c"}, {"passes": 0}):
        with pytest.raises(ValidationError):
            arm(**bad)


def test_run_time_switches_are_spec_fields_that_leave_the_hash_alone():
    from lrt_platform.planner import plan

    spec = parse_spec(BASE + "resources: {flex_attention: false, eval_decode: eager}\n")
    assert spec_hash(spec) == spec_hash(parse_spec(BASE))  # how trials run, not what they compute
    assert {(t.config["flex_attention"], t.config["eval_decode"]) for t in plan(spec)} == {(False, "eager")}
    assert "eval_decode" in _error(BASE + "resources: {eval_decode: graphs}\n")
