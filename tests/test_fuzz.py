"""Fuzzing: bad input is accepted or refused with one line, never a traceback or a hang.

Hypothesis (derandomized: the same cases on every run) mutates the committed specs under
sweep_specs/ structurally (drop, replace, retype and rename keys; extreme numbers, inf/nan, huge
ints, wrong types, unicode, bytes) and textually (broken YAML, aliases, tags, invalid UTF-8,
binary), and builds trainer command lines and JSON configs. Every case runs in-process: the
loader and planner exactly as `--dry-run` runs them (no Ray, no throughput probe), and the
trainer's argument parser and config validation with `train()` replaced by a stub. A case passes
when it is accepted, or refused with the project's typed error in one line; each case must
finish within CASE_SECONDS and raise the process's peak memory by less than CASE_BYTES.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import glob
import io
import json
import math
import os
import random
import resource
import signal
import sys
import time
from functools import lru_cache
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrt_model import train as trainer
from lrt_model.config import ConfigError
from lrt_model.data import DataError
from lrt_platform import planner, storage, sweep
from lrt_platform.planner import PlanError, check_search_budget, plan
from lrt_platform.spec import SpecError, spec_from_data, spec_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_PATHS = sorted(glob.glob(f"{ROOT}/sweep_specs/**/*.yaml", recursive=True))
TYPED = (SpecError, PlanError, ConfigError, DataError)
CASE_SECONDS = 5.0
CASE_BYTES = 1 << 30
# cases per test; 11,000 in all
N_SPECS, N_SPEC_FILES, N_ARGV, N_CONFIGS = 7000, 1000, 2000, 1000


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------
# Limits: time and memory per case


class Hang(Exception):
    """A case ran past CASE_SECONDS."""


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@contextlib.contextmanager
def limited(what: str):
    """Fail a case that runs past CASE_SECONDS (a SIGALRM interrupts it) or whose peak memory grows by
    CASE_BYTES or more over the memory in use when it started."""
    def alarm(*_):
        raise Hang(f"{what}: still running after {CASE_SECONDS:g} s")

    start = _rss() if LINUX else 0
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < CASE_SECONDS, f"{what}: took {time.perf_counter() - t0:.1f} s"
    if LINUX:
        grew = _peak() - start
        assert grew < CASE_BYTES, f"{what}: peak memory grew by {grew / 2**20:.0f} MiB"


LINUX = sys.platform.startswith("linux")


@pytest.fixture(autouse=True)
def _memory_backstop():
    """A runaway allocation fails as MemoryError instead of exhausting the machine."""
    if not LINUX:
        yield
        return
    with open("/proc/self/status") as f:
        data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    old = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data + 4 * CASE_BYTES
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old)


@pytest.fixture(autouse=True)
def _no_corpus_checks_over_the_network(monkeypatch):
    """plan() checks an uploaded corpus against its manifest, and the shipped cluster specs name
    s3://lrt-data: every such case would ask S3 (seconds each; an error offline). Local corpus strings are
    still checked (a stat); the check itself is tested in tests/test_data.py and tests/test_s3.py."""
    real = planner.check_corpus
    monkeypatch.setattr(planner, "check_corpus", lambda spec: None if "://" in spec.data.corpus else real(spec))


def outcome(fn) -> str:
    """'accepted', or 'refused' with a typed one-line error; anything else propagates (a failure)."""
    try:
        fn()
    except TYPED as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, f"error is not one line: {msg!r}"
        return "refused"
    return "accepted"


# ---------------------------------------------------------------------------
# Mutations: values a YAML file can hold


def _load(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


BASES = [_load(p) for p in SPEC_PATHS]
TEXTS = [open(p, "rb").read() for p in SPEC_PATHS]


def _subtrees(x, out: list) -> list:
    out.append(x)
    for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()):
        _subtrees(v, out)
    return out


POOL = [t for b in BASES for t in _subtrees(b, [])]  # values from every spec: valid elsewhere, maybe not here
KEYS = sorted({k for t in POOL if isinstance(t, dict) for k in t}, key=str)
NASTY = [
    None, True, False, 0, 1, -1, 2, 7, 0.5, -0.5, 1e-320, 1e307, -1e307, math.inf, -math.inf, math.nan,
    10**9, 10**18, 2**63, 2**64, 10**100, -(10**100), int("f" * 600, 16), "", " ", "x", "é", "日本", "\x00", "a\nb",
    "\u202e\u2028", "x" * 5000, "1e10", "nan", ".inf", "bpe:4096", "bpe:99999999999999999999", "bpe:٣٠٠",
    "s3://", "../..", "/", "baseline", "interleaved", "val_bpb_merged", "optim.lr_scale", "recurrence.passes",
    [], {}, [[]], [None], [1, "a"], [math.nan], [5, -3], [0.5, 0.5], [1e307] * 3, [[0.0, 2]],
    [[0.0, 2], [0.5, 10**9]], [[0.5, 2]], {"a": 1}, {None: 1}, {1: [1.0]}, {0: [1e12]}, {"x": {"y": {"z": []}}},
    b"\xff\xfe", datetime.date(2020, 1, 1), datetime.datetime(2020, 1, 1, 12), {1, 2},
    {"type": "int", "low": 0, "high": 10**12}, {"type": "int", "low": 1, "high": 4, "step": 0.5},
    {"type": "int", "low": -(10**15), "high": 10**15, "step": 7}, {"type": "categorical", "choices": [1, "a", None]},
    {"type": "categorical", "choices": list(range(40))}, {"type": "float", "low": -1, "high": 1e300},
    {"type": "loguniform", "low": 1e-300, "high": 1e300, "step": 1}, {"type": "float", "low": 0, "high": 1, "step": 0},
    {"type": "categorical", "choices": [[[0.0, 2]], [[0.0, 1], [0.5, 1024]], None]},
    list(range(200)), [[[[[[[[1]]]]]]]],
]


def nasty(rnd: random.Random):
    return copy.deepcopy(rnd.choice(POOL) if rnd.random() < 0.35 else rnd.choice(NASTY))


def tweak(v, rnd: random.Random):
    """A value of about the same kind, often still valid: the planner gets to see it."""
    if isinstance(v, bool):
        return rnd.choice([not v, None, 0, 1, "true", "yes"])
    if isinstance(v, (int, float)):
        ops = [lambda: v + 1, lambda: v - 1, lambda: v * 2, lambda: v // 2 if isinstance(v, int) else v / 2,
               lambda: 0, lambda: -v, lambda: v * 10**6, lambda: v * 10**30, lambda: float(v), lambda: str(v),
               lambda: math.inf, lambda: -math.inf, lambda: math.nan, lambda: 2**63, lambda: 10**40,
               lambda: 1e300, lambda: v + 0.5]
        try:
            return rnd.choice(ops)()
        except (OverflowError, ValueError):  # an int too large for a float (or for str)
            return math.inf
    if isinstance(v, str):
        return rnd.choice([v + "\n", v * 70, v.upper(), " " + v, v + "\x00", v[:1], "", v + "é", [v], 0])
    if isinstance(v, list):
        return rnd.choice([[], v * 40, v[::-1], v + v, [v], v[:1], v[1:]])
    if isinstance(v, dict):
        return rnd.choice([{}, list(v.values()), list(v), {str(k).upper(): w for k, w in v.items()}])
    return nasty(rnd)


def _paths(x, path=()):
    yield path
    if isinstance(x, dict):
        for k, v in list(x.items()):
            yield from _paths(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, path + (i,))


def mutate(base, rnd: random.Random):
    data = copy.deepcopy(base)
    for _ in range(rnd.choice([1, 1, 1, 2, 2, 3, 5])):
        path = rnd.choice(list(_paths(data)))
        if not path:
            data[rnd.choice(KEYS + [None, 1, "é"])] = nasty(rnd)
            continue
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        op = rnd.choice(["tweak", "tweak", "tweak", "replace", "replace", "drop", "add", "rename", "wrap"])
        if op == "tweak":
            parent[key] = tweak(parent[key], rnd)
        elif op == "replace":
            parent[key] = nasty(rnd)
        elif op == "drop":
            del parent[key]
        elif op == "add":
            target = parent[key]
            if isinstance(target, dict):
                target[rnd.choice(KEYS + [None, 0, 1.5, True, "", "é", "x\ny"])] = nasty(rnd)
            elif isinstance(target, list):
                target.insert(rnd.randint(0, len(target)), nasty(rnd))
            else:
                parent[key] = nasty(rnd)
        elif op == "rename" and isinstance(parent, dict):
            parent[rnd.choice(KEYS + [None, 0, 2, 2.5, True, "", "é", str(key).upper()])] = parent.pop(key)
        elif op == "wrap":
            parent[key] = [parent[key]] if rnd.random() < 0.5 else {"x": parent[key]}
    return data


YAML_BITS = ["&a ", "*a", "!!binary ", "!!python/object/apply:os.system ", "!!float ", "!!int ", "!!set ",
             "!!timestamp ", "!!str ", "{", "}", "[", "]", ": ", "- ", "? ", "\t", "\x00", "\ufeff", "%YAML 1.1\n",
             "---\n", "...\n", "'", '"', "\\", "#", "|", ">", "0x" + "f" * 900, "1" * 5000, "1e400", ".nan", ".inf",
             "~", "yes", "2020-01-01", "é", "\u2028", "[" * 3000, "a: &a [1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a]\n"]


def mutate_text(raw: bytes, rnd: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(6)
        at = rnd.randint(0, len(data))
        if op == 0:
            data[at:at] = rnd.choice(YAML_BITS).encode("utf-8")
        elif op == 1 and data:
            data[min(at, len(data) - 1)] = rnd.randrange(256)
        elif op == 2:
            del data[at:at + rnd.randint(1, 40)]
        elif op == 3:
            data = data[:at]
        elif op == 4:
            data[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
        else:
            lines = bytes(data).split(b"\n")
            i = rnd.randrange(len(lines))
            lines.insert(rnd.randrange(len(lines) + 1), lines[i])
            data = bytearray(b"\n".join(lines))
    return bytes(data)


# ---------------------------------------------------------------------------
# What --dry-run runs, in-process


def dry_run(data, as_json: bool) -> None:
    """sweep.run's --dry-run branch on already-parsed YAML: validate, hash, plan, check the search budget,
    print the plan (no throughput probe)."""
    spec = spec_from_data(data, "fuzz.yaml")
    root = storage.sweep_root(spec.storage, spec.experiment, spec_hash(spec))
    plan(spec, root)
    if spec.search is not None:
        check_search_budget(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        assert sweep._print_dry_run(spec, root, argparse.Namespace(json=as_json, no_probe=True, address=None)) == 0


def sweep_cli(path: str, extra: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = sweep.main([path, "--dry-run", "--no-probe", *extra])
    return rc, err.getvalue()


def _fake_train(cfg, callback=None):
    assert isinstance(cfg, trainer.TrainConfig)
    return {"steps": 1, "tokens": 1, "val_bpb": 1.0, "tokens_per_s": 1.0, "wall_s": 0.0}


def trainer_cli(argv: list[str]) -> tuple[int, str]:
    """`python -m lrt_model.train ARGV` in-process, with train() a stub: parsing and validation only."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(trainer, "train", _fake_train), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            rc = trainer.main(argv)
        except SystemExit as e:  # --help (or an abbreviation of it) prints the help and exits 0
            assert e.code == 0 and any(a == "-h" or (len(a) > 2 and "--help".startswith(a)) for a in argv), argv
            return 0, ""
    return rc, err.getvalue()


def assert_cli_outcome(rc: int, err: str, what) -> None:
    assert rc in (0, 2), (rc, err, what)
    if rc == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), (err, what)


# ---------------------------------------------------------------------------
# The fuzz tests


def test_mutated_specs_are_planned_or_refused_in_one_line():
    seen = {"accepted": 0, "refused": 0}

    @fuzz_settings(N_SPECS)
    @given(st.randoms(use_true_random=False), st.integers(0, len(BASES) - 1), st.booleans())
    def case(rnd, which, as_json):
        data = mutate(BASES[which], rnd)
        with limited(f"spec {data!r:.2000}"):
            seen[outcome(lambda: dry_run(data, as_json))] += 1

    case()
    assert sum(seen.values()) >= N_SPECS
    assert seen["accepted"] >= N_SPECS // 20, seen  # the planner really ran on many of them


def test_mutated_spec_files_through_the_dry_run_cli(tmp_path):
    path = str(tmp_path / "spec.yaml")
    seen = {0: 0, 2: 0}

    @fuzz_settings(N_SPEC_FILES)
    @given(st.randoms(use_true_random=False), st.integers(0, len(TEXTS) - 1), st.sampled_from([[], ["--json"]]))
    def case(rnd, which, extra):
        raw = mutate_text(TEXTS[which], rnd) if rnd.random() < 0.9 else rnd.randbytes(rnd.randint(0, 3000))
        with open(path, "wb") as f:
            f.write(raw)
        with limited(f"spec file {raw!r:.2000}"):
            rc, err = sweep_cli(path, extra)
        assert_cli_outcome(rc, err, raw[:2000])
        seen[rc] += 1

    case()
    assert sum(seen.values()) >= N_SPEC_FILES and seen[0] > 0 and seen[2] > 0, seen


def _flags() -> list[str]:
    return [s for a in trainer.build_parser()._actions for s in a.option_strings if s not in ("-h", "--help")]


VALUES = ["0", "1", "2", "-1", "3", "16", "32", "64", "0.5", "1e-3", "1e6", "1e999", "-1e999", "inf", "-inf", "nan",
          "NaN", "9" * 30, "9" * 5000, "0x10", "1_000", "", " ", "abc", "é", "\x00", "a\nb", "-", "--", "--x",
          "interleaved", "multi_refine", "sequential", "kv", "shared", "layerwise", "byte", "bpe:300",
          "bpe:99999999999", "stdlib", "cpu", "cuda", "cuda:0", "meta", "tpu", "float32", "[[0.0, 2], [0.6, 4]]",
          "[[0.0, 2], [0.6, 2000]]", "[[0.5, 2]]", "[[0.0, 2.5]]", "[1, 2]", "{}", "null", "[" * 5000, '"x"',
          "[[NaN, 2]]", "[[0.0, 2], [Infinity, 4]]"]


def random_argv(rnd: random.Random, flags: list[str]) -> list[str]:
    argv = []
    for _ in range(rnd.randint(0, 8)):
        r = rnd.random()
        flag = rnd.choice(flags)
        if r < 0.1:
            flag = flag[:rnd.randint(3, len(flag))]  # an abbreviation, maybe ambiguous
        if r < 0.7:
            argv += [flag] + [rnd.choice(VALUES) for _ in range(rnd.choice([1, 1, 1, 0, 2]))]
        elif r < 0.85:
            argv.append(f"{flag}={rnd.choice(VALUES)}")
        else:
            argv.append(rnd.choice(VALUES + flags))
    return argv


def test_trainer_command_lines_are_accepted_or_refused_in_one_line():
    flags = _flags()
    assert "--depth" in flags and "--passes-schedule" in flags
    seen = {0: 0, 2: 0}

    @fuzz_settings(N_ARGV)
    @given(st.randoms(use_true_random=False))
    def case(rnd):
        argv = random_argv(rnd, flags)
        with limited(f"argv {argv!r:.2000}"):
            rc, err = trainer_cli(argv)
        assert_cli_outcome(rc, err, argv)
        seen[rc] += 1

    case()
    assert sum(seen.values()) >= N_ARGV and seen[0] > 0 and seen[2] > 0, seen


@lru_cache(maxsize=1)
def _train_configs() -> list[dict]:
    """The TrainConfigs the committed (tiny) specs plan: what a `--config` file realistically holds."""
    out = []
    for path in glob.glob(f"{ROOT}/sweep_specs/tiny/*.yaml"):
        from lrt_platform.spec import load_spec

        spec = load_spec(path)
        out += [t.config for t in plan(spec, root="/tmp/fuzz-root")[:2]]
    return out


def test_trainer_config_files_are_accepted_or_refused_in_one_line(tmp_path):
    configs = _train_configs()
    path = str(tmp_path / "config.json")
    seen = {0: 0, 2: 0}

    @fuzz_settings(N_CONFIGS)
    @given(st.randoms(use_true_random=False), st.integers(0, len(configs) - 1))
    def case(rnd, which):
        data = mutate(configs[which], rnd)
        text = json.dumps(data, default=str) if rnd.random() < 0.95 else rnd.randbytes(64).decode("latin-1")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        with limited(f"config {text!r:.2000}"):
            rc, err = trainer_cli(["--config", path])
        assert_cli_outcome(rc, err, text[:2000])
        seen[rc] += 1

    case()
    assert sum(seen.values()) >= N_CONFIGS and seen[0] > 0 and seen[2] > 0, seen


# ---------------------------------------------------------------------------
# The trainer reproducers (the spec and data ones live in test_spec, test_planner, test_data)


@pytest.mark.parametrize("argv, fragment", [
    (["--depth", "1000000000"], "depth=1000000000 must be an integer in [1, 128]"),
    (["--tokens", "inf"], "tokens=inf must be a finite number"),
    (["--tokens", "nan"], "tokens=nan must be a finite number"),
    (["--matrix-lr", "nan"], "optim.matrix_lr=nan must be a finite number > 0"),
    (["--strategy", "interleaved", "--gamma-init", "inf"], "gamma_init=inf must be a finite number"),
    (["--strategy", "interleaved", "--loss-weights", "1", "1", "inf"], "loss_weights"),
    (["--strategy", "interleaved", "--passes-schedule", "[" * 5000], "--passes-schedule"),
    (["--strategy", "interleaved", "--passes", "100000"], "passes=100000 must be an integer in [1, 1024]"),
    (["--depth", "x"], "argument --depth: invalid int value: 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--tokenizer", "bpe:99999999999"], "tokenizer='bpe:99999999999' is not allowed"),
    (["--device", "nonsense"], "device='nonsense' is not a device"),
    (["--seed", "-1"], "seed=-1 must be an integer in [0, "),
    (["--icl-items", "0"], "icl.items=0 must be an integer in [1, "),
])
def test_trainer_refuses_bad_flags_in_one_line(argv, fragment):
    rc, err = trainer_cli(argv)
    assert rc == 2 and fragment in err and err.count("\n") == 1, err


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe\x00binary", "not valid JSON"),
    (b"[1, 2]", "must be a mapping of TrainConfig fields"),
    (b'{"bogus": 1}', "unknown key 'bogus'"),
    (b'{"model": {"depth": "4"}}', "depth='4' must be an integer"),
    (b'{"model": {"recurrence": {"passes": 2, "gates": "yes"}}}', "gates='yes' must be true or false"),
    (b'{"optim": {"adam_betas": [5, -3]}}', "optim.adam_betas=[5, -3] must be two numbers in [0, 1)"),
    (b'{"optim": {"matrix_lr": NaN}}', "optim.matrix_lr=nan must be a finite number > 0"),
    (b'{"tokens": 1e999}', "tokens=inf must be a finite number"),
    (b'{"tokens": 1000, "icl": {"ks": ["a"]}}', "icl.ks='a' must be an integer"),
    (b'{"tokens": 1000, "seed": 1e3}', "seed=1000.0 must be an integer"),
])
def test_trainer_refuses_bad_config_files_in_one_line(tmp_path, content, fragment):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    rc, err = trainer_cli(["--config", str(path)])
    assert rc == 2 and fragment in err and str(path) in err and err.count("\n") == 1, err


def test_trainer_accepts_its_own_configs(tmp_path):
    for cfg in _train_configs():
        path = tmp_path / "c.json"
        path.write_text(json.dumps(cfg))
        assert trainer_cli(["--config", str(path)])[0] == 0
    assert trainer_cli(["--depth", "2", "--strategy", "interleaved", "--passes-schedule", "[[0.0, 2], [0.6, 4]]",
                        "--passes", "4", "--tokens", "1e6"])[0] == 0


def test_icl_rules_cover_every_setting():
    """The type table that guards icl_config has one rule per ICL setting, and accepts the defaults."""
    from lrt_model.config import ICL_RULES, check_icl
    from lrt_model.evaluation import DEFAULTS, icl_config

    assert set(ICL_RULES) == set(DEFAULTS)
    assert check_icl(dict(DEFAULTS)) == icl_config(None)


@pytest.mark.parametrize("name", ["a\nb", "a\x00b"])
def test_a_config_path_with_a_newline_or_nul_is_one_line(name):
    """Found by the fuzzer: a newline in the name split the message, a NUL byte raised ValueError."""
    rc, err = trainer_cli(["--config", name])
    assert rc == 2 and err.startswith("error: --config ") and err.count("\n") == 1, err
