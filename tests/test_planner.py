"""The planner: budgets -> tokens/steps/FLOPs, matched pairs, dry runs that launch nothing."""

import json
import math
import os
import time

import pytest

from lrt_model.flops import baseline_flops_per_token, training_flops_per_token
from lrt_model.model import GPT
from lrt_platform import planner, sweep
from lrt_platform.planner import PlanError, check_search_budget, count_params, plan, plan_search_trial, plan_summary
from lrt_platform.spec import load_spec, parse_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = """
experiment: p
backbone: {depth: 2, head_dim: 32, seq_len: 64, batch_size: 4}
arms:
  - {name: baseline, baseline: true}
  - {name: s2, strategy: interleaved, passes: 2}
  - {name: k3, strategy: multi_refine, passes: 3}
budgets: {flops: [2.0e+11]}
seeds: [0, 1]
"""


def _spec(text=BASE, **replace):
    for old, new in replace.items():
        text = text.replace(old, new)
    return parse_spec(text)


def test_trials_ids_and_pairs():
    trials = plan(_spec(), root="/tmp/x")
    assert len(trials) == 6 and len({t.trial_id for t in trials}) == 6
    t = trials[0]
    assert (t.trial_id, t.pair_id, t.budget_id, t.arm) == ("d2-flops2e11-s0-baseline", "d2-flops2e11-s0", "d2-flops2e11", "baseline")
    pairs = {}
    for t in trials:
        pairs.setdefault(t.pair_id, set()).add(t.arm)
    assert pairs == {"d2-flops2e11-s0": {"baseline", "s2", "k3"}, "d2-flops2e11-s1": {"baseline", "s2", "k3"}}
    assert [t.trial_id for t in plan(_spec(), root="/tmp/x")] == [t.trial_id for t in trials]  # stable
    assert t.config["checkpoint_dir"] == f"/tmp/x/trials/{t.trial_id}/ckpt"


def test_compute_matching_equal_flops_fewer_lrt_tokens():
    trials = plan(_spec(), root="/tmp/x")
    by_arm = {t.arm: t for t in trials if t.seed == 0}
    base, s2, k3 = by_arm["baseline"], by_arm["s2"], by_arm["k3"]
    assert plan_summary(trials)["max_pair_mismatch"] < 0.01
    for t in (s2, k3):
        assert abs(t.flops - base.flops) / base.flops < 0.01
        assert t.tokens % t.batch_tokens == 0 and t.tokens == t.steps * t.batch_tokens
        assert t.flops == t.steps * t.batch_tokens * training_flops_per_token(planner.ModelConfig.from_dict(t.config["model"]))
    assert 0.4 < s2.tokens / base.tokens < 0.55  # ~2x FLOPs per token -> about half the tokens
    assert 0.2 < k3.tokens / base.tokens < 0.3  # K=3: 4 passes
    assert abs(base.flops - 2e11) / 2e11 < 0.02  # the budget itself, to whole steps


def test_tokens_matching_same_tokens():
    trials = plan(_spec(**{"seeds: [0, 1]": "seeds: [0, 1]\nmatching: tokens"}), root="/tmp/x")
    assert len({t.tokens for t in trials}) == 1
    assert len({round(t.flops) for t in trials}) == 3  # FLOPs differ by design


def test_tokens_per_param_uses_the_baseline():
    spec = _spec(**{"flops: [2.0e+11]": "tokens_per_param: [10]"})
    trials = plan(spec, root="/tmp/x")
    base_cfg = spec.model_config_for(2, None)
    n_params = GPT(base_cfg).num_params()
    assert count_params(base_cfg) == n_params
    base = next(t for t in trials if t.arm == "baseline")
    assert abs(base.tokens - 10 * n_params) <= 3 * base.batch_tokens
    assert base.params == n_params
    lrt = next(t for t in trials if t.arm == "s2" and t.seed == 0)
    assert abs(lrt.flops - base.flops) / base.flops < 0.01
    assert base.flops == base.tokens * baseline_flops_per_token(base_cfg)


def test_per_depth_budgets_and_every_seed():
    spec = _spec(**{"depth: 2,": "depth: [1, 2],", "flops: [2.0e+11]": "tokens_per_param: {1: [5], 2: [5, 10]}"})
    ids = {t.budget_id for t in plan(spec, root="/tmp/x")}
    assert ids == {"d1-tpp5", "d2-tpp5", "d2-tpp10"}
    assert len(plan(spec, root="/tmp/x")) == 3 * 3 * 2


def test_a_budget_too_small_to_match_is_an_error():
    with pytest.raises(PlanError, match="raise the budget or lower the batch"):
        plan(_spec(**{"[2.0e+11]": "[2.0e+9]"}), root="/tmp/x")


def test_resolved_train_config():
    spec = _spec(**{"seeds: [0, 1]": "seeds: [0, 1]\noptim: {matrix_lr: 0.03}\neval: {eval_tokens: 1024}"})
    t = plan(spec, root="/tmp/x")[1]
    c = t.config
    assert c["tokens"] == t.tokens and c["flops"] is None and c["tokens_per_param"] is None
    assert c["optim"]["matrix_lr"] == 0.03 and c["eval_tokens"] == 1024 and c["seed"] == t.seed
    assert c["total_batch_tokens"] == 4 * 64 and c["device"] == "cpu" and c["progress"] is False
    assert c["checkpoint_every"] == c["eval_every"] == math.ceil(t.steps / 8)
    assert c["model"]["recurrence"]["passes"] == 2


def test_search_trials_are_held_to_the_budget():
    spec = load_spec(f"{ROOT}/sweep_specs/tiny/schedule_search.yaml")
    check_search_budget(spec)
    grid = plan(spec, root="/tmp/x")
    assert [t.arm for t in grid] == ["baseline"]
    for params in ({"recurrence.strategy": "multi_refine", "recurrence.passes": 3, "recurrence.detach": True,
                    "recurrence.final_weight": 2.0},
                   {"recurrence.strategy": "interleaved", "recurrence.passes": 1, "recurrence.refresh_kv": True,
                    "recurrence.final_weight": 0.5}):
        t = plan_search_trial(spec, params, 7, root="/tmp/x")
        assert t.arm == "lrt-t007" and t.pair_id == grid[0].pair_id and t.trial_number == 7
        assert abs(t.flops - grid[0].flops) / grid[0].flops < 0.01
        rec = t.config["model"]["recurrence"]
        assert rec["strategy"] == params["recurrence.strategy"] and rec["passes"] == params["recurrence.passes"]
        assert rec["loss_weights"] == [1.0] * rec["passes"] + [params["recurrence.final_weight"]]


def test_search_budget_checked_at_the_costliest_corner():
    spec = load_spec(f"{ROOT}/sweep_specs/tiny/schedule_search.yaml")
    small = spec.model_copy(update={"budgets": spec.budgets.model_copy(update={"flops": {0: [2.0e9]}})})
    with pytest.raises(PlanError, match="searched arm at .*recurrence.strategy=multi_refine"):
        check_search_budget(small)


def test_tuning_trials_are_held_to_their_arms_grid_budget():
    spec = load_spec(f"{ROOT}/sweep_specs/tiny/tuned.yaml")
    grid = plan(spec, root="/tmp/x")
    templates = planner.tuning_templates(spec, grid)
    assert [name for name, _ in templates] == ["tune-d1-flops8e9-baseline", "tune-d1-flops8e9-lrt_s2"]
    params = {"optim.lr_scale": 0.5, "optim.warmup_frac": 0.1}
    for _, template in templates:
        t = planner.plan_tuning_trial(spec, template, params, 3, root="/tmp/x")
        assert t.trial_id == f"d1-flops8e9-tune-{template.arm}-t003" and t.arm == template.arm
        assert t.pair_id is None and t.tuning_trial and t.seed == t.config["seed"] == 1000
        assert (t.steps, t.flops, t.config["model"]) == (template.steps, template.flops, template.config["model"])
        assert t.config["optim"]["lr_scale"] == 0.5 and t.config["optim"]["warmup_frac"] == 0.1
        assert t.config["checkpoint_dir"] == f"/tmp/x/trials/{t.trial_id}/ckpt"
    tuned = planner.apply_tuning(spec, grid[1], params, 2.5)
    assert (tuned.trial_id, tuned.pair_id, tuned.steps, tuned.seed) == (grid[1].trial_id, grid[1].pair_id,
                                                                         grid[1].steps, grid[1].seed)
    assert tuned.config["optim"]["lr_scale"] == 0.5 and grid[1].config["optim"]["lr_scale"] == 1.0
    assert tuned.tuning == {"sampler": "random", "trials": 2, "space": list(params), "seed": 0, "train_seed": 1000,
                            "best": params, "best_value": 2.5}


def test_dry_run_shows_the_tuning_phases(tmp_path, capsys):
    spec_path = f"{ROOT}/sweep_specs/tiny/tuned.yaml"
    assert sweep.main([spec_path, "--dry-run", "--json", "--storage", str(tmp_path / "runs")]) == 0
    data = json.loads(capsys.readouterr().out)
    tuning = data["tuning"]
    assert [p["phase"] for p in tuning["phases"]] == ["tune-d1-flops8e9-baseline", "tune-d1-flops8e9-lrt_s2"]
    assert all(p["trials"] == 2 for p in tuning["phases"]) and tuning["trials"] == 4
    assert list(tuning["space"]) == ["optim.lr_scale", "optim.warmup_frac"] and tuning["train_seed"] == 1000
    grid = {t["arm"]: t for t in data["trials"] if t["seed"] == 0}
    for p in tuning["phases"]:  # a tuning trial costs what its arm's grid trial costs
        assert p["steps"] == grid[p["arm"]]["steps"] and p["first_trial"].endswith("-t000")
        assert p["est_wall_s"] == pytest.approx(2 * grid[p["arm"]]["est_wall_s"])
    grid_wall = sum(t["est_wall_s"] for t in data["trials"])
    assert data["summary"]["est_wall_s"] == pytest.approx(grid_wall + tuning["est_wall_s"])
    assert len(data["trials"]) == 4 and data["summary"]["max_pair_mismatch"] < 0.01
    assert not (tmp_path / "runs").exists()
    assert sweep.main([spec_path, "--dry-run", "--no-probe", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "tuning: 2 trials per arm and budget" in out and "tune-d1-flops8e9-lrt_s2" in out
    assert "optim.lr_scale loguniform [0.25, 2]" in out and "plan for tuned_tiny" in out


def test_scaling_spec_pairs_match():
    trials = plan(load_spec(f"{ROOT}/sweep_specs/scaling.yaml"), corpus_check=False)  # its corpus is on S3
    assert len(trials) == 3 * 3 * 3 and plan_summary(trials)["max_pair_mismatch"] < 0.01
    assert all(t.config["corpus"].startswith("s3://") and t.config["checkpoint_dir"].startswith("s3://") for t in trials)


def test_dry_run_json_and_table_launch_nothing(tmp_path, capsys):
    spec_path = f"{ROOT}/sweep_specs/quickstart.yaml"
    t0 = time.time()
    assert sweep.main([spec_path, "--dry-run", "--json", "--storage", str(tmp_path / "runs")]) == 0
    probe_s = time.time() - t0
    data = json.loads(capsys.readouterr().out)
    assert data["experiment"] == "quickstart" and len(data["trials"]) == 4
    assert data["summary"]["max_pair_mismatch"] < 0.01
    assert all(t["est_wall_s"] > 0 for t in data["trials"])
    assert probe_s < 20  # a couple of seconds on an idle 2-core box; generous for a busy one
    assert not (tmp_path / "runs").exists()  # nothing launched, nothing written
    assert sweep.main([spec_path, "--dry-run", "--no-probe", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    for col in ("trial", "arm", "depth", "budget", "seed", "pair", "params", "tokens", "steps", "FLOPs", "est. wall", "total"):
        assert col in out
    assert "max FLOPs mismatch within a pair" in out


def test_probe_estimates_are_positive_and_cached():
    spec = load_spec(f"{ROOT}/sweep_specs/tiny/quickstart.yaml")
    trials = plan(spec, root="/tmp/x")
    planner.estimate_wall(trials, spec)
    t0 = time.time()
    planner.estimate_wall(trials, spec)  # every distinct config probed once
    assert time.time() - t0 < 0.5
    assert all(t.est_wall_s > 0 for t in trials)


def test_fidelity_spec_matches_every_arm_within_one_percent():
    """Every arm of fidelity_cpu.yaml, the adaptive-S (passes_schedule) arm included, gets the baseline's
    exact whole-run training FLOPs within 1% at every budget and seed."""
    from lrt_model.flops import training_flops

    data = planner.dry_run(load_spec(f"{ROOT}/sweep_specs/fidelity_cpu.yaml"), probe=False, root="/tmp/x")
    trials = data["trials"]
    assert {t["arm"] for t in trials} == {"baseline", "lrt_s2", "lrt_adaptive", "lrt_s2_refresh"}
    assert len(trials) == 4 * 3 and data["summary"]["max_pair_mismatch"] < 0.01
    base = {t["pair_id"]: t["flops"] for t in trials if t["arm"] == "baseline"}
    for t in trials:
        model = planner.ModelConfig.from_dict(t["config"]["model"])
        assert t["flops"] == training_flops(model, t["steps"], t["batch_tokens"])  # exact, step by step
        assert abs(t["flops"] - base[t["pair_id"]]) / base[t["pair_id"]] < 0.01, t["trial_id"]
    adaptive = next(t for t in trials if t["arm"] == "lrt_adaptive")
    rec = adaptive["config"]["model"]["recurrence"]
    assert rec["passes_schedule"] == [[0.0, 2], [0.5, 4], [0.8, 8]] and rec["passes"] == 8


def test_plan_states_the_tokens_per_parameter_regime(tmp_path, capsys):
    """Every trial carries tokens/param; a budget whose baseline is below the paper's 10 is warned about
    (quickstart: ~0.3), one in the regime (fidelity_cpu: ~10) is not."""
    quick = planner.dry_run(load_spec(f"{ROOT}/sweep_specs/quickstart.yaml"), probe=False, root="/tmp/x")
    base = next(t for t in quick["trials"] if t["arm"] == "baseline")
    assert base["tokens_per_param"] == pytest.approx(base["tokens"] / base["params"])
    [warning] = quick["summary"]["regime_warnings"]
    assert "below the paper's regime (>= 10)" in warning and base["budget_id"] in warning
    fidelity = planner.dry_run(load_spec(f"{ROOT}/sweep_specs/fidelity_cpu.yaml"), probe=False, root="/tmp/x")
    assert fidelity["summary"]["regime_warnings"] == []
    assert min(t["tokens_per_param"] for t in fidelity["trials"] if t["arm"] == "baseline") >= 10
    assert sweep.main([f"{ROOT}/sweep_specs/quickstart.yaml", "--dry-run", "--no-probe",
                       "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "tok/param" in out and "warning: budget" in out


SCHEDULES = [None, [[0.0, 2]], [[0.0, 2], [0.6, 4]], [[0.0, 1], [0.5, 3]]]


def test_passes_schedule_is_a_search_dimension():
    """Lists travel through Optuna as JSON strings; a sampled schedule sets passes to its last value and is
    held to the baseline's FLOPs like any searched arm (a K schedule changes FLOPs per token)."""
    from lrt_platform.execution import decode_choice, encode_choice
    from lrt_platform.spec import SpecError, default_point, spec_hash

    text = BASE.replace("  - {name: k3, strategy: multi_refine, passes: 3}\n", "").replace("seeds: [0, 1]", "seeds: [0]")
    search = ("search:\n  space:\n    recurrence.strategy: {type: categorical, choices: [interleaved, multi_refine]}\n"
              f"    recurrence.passes_schedule: {{type: categorical, choices: {json.dumps(SCHEDULES)}}}\n")
    spec = _spec(text + search)
    assert default_point(spec)["recurrence.passes_schedule"] is None
    assert "recurrence.passes_schedule" in planner.FLOPS_FIELDS
    check_search_budget(spec)
    base = plan(spec, root="/tmp/x")[0]
    for schedule in SCHEDULES:
        encoded = encode_choice(schedule)
        assert schedule is None or isinstance(encoded, str)
        for strategy in ("interleaved", "multi_refine"):
            params = {"recurrence.strategy": strategy, "recurrence.passes_schedule": decode_choice(encoded)}
            t = plan_search_trial(spec, params, 1, root="/tmp/x")
            rec = t.config["model"]["recurrence"]
            assert rec["passes_schedule"] == schedule
            assert rec["passes"] == (schedule[-1][1] if schedule else 2)
            assert abs(t.flops - base.flops) / base.flops < 0.01
    # an arm's own schedule is a spec field: passes follows it, and specs without it keep their hash
    arm = _spec(BASE.replace("{name: s2, strategy: interleaved, passes: 2}",
                             "{name: s2, strategy: interleaved, passes_schedule: [[0, 2], [0.5, 4]]}"))
    assert arm.lrt_arms[0].recurrence().passes == 4
    assert spec_hash(arm) != spec_hash(_spec())
    with pytest.raises(SpecError, match=r"arms\[1\] \(s2\), depth 2: passes=2 must equal .* set passes=4"):
        _spec(BASE.replace("passes: 2}", "passes: 2, passes_schedule: [[0, 2], [0.5, 4]]}"))


def _one_lrt_arm_one_seed() -> str:
    return BASE.replace("  - {name: k3, strategy: multi_refine, passes: 3}\n", "").replace("seeds: [0, 1]", "seeds: [0]")


def test_long_int_ranges_are_counted_not_built():
    """A search over a long int range: its ends stand for it (the range is never materialised), whatever its step."""
    from lrt_platform.spec import Dist

    text = _one_lrt_arm_one_seed()
    spec = _spec(text + "search:\n  enqueue_defaults: false\n  space:\n"
                        "    model.width: {type: int, low: 32, high: 128, step: 32}\n")
    corners = planner._search_corners(spec)
    assert [c["model.width"] for c, _ in corners[1:]] == [32, 64, 96, 128]
    huge = Dist(type="int", low=64, high=64 * 10**15, step=64)  # past the spec's bounds: the planner alone
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"space": {"model.width": huge}})})
    t0 = time.perf_counter()
    assert [c["model.width"] for c, _ in planner._search_corners(spec)[1:]] == [64, 64 * 10**15]
    assert time.perf_counter() - t0 < 1


def test_search_budget_check_is_linear_in_the_corners():
    """192 FLOPs-changing corners used to mean 192 full trial plans, each re-planning every corner: ~20 s."""
    text = _one_lrt_arm_one_seed()
    spec = _spec(text.replace("[2.0e+11]", "[1.0e+13]") + (
        "search:\n  space:\n    recurrence.passes: {type: int, low: 1, high: 16}\n"
        "    recurrence.strategy: {type: categorical, choices: [interleaved, multi_refine]}\n"
        "    recurrence.injection: {type: categorical, choices: [kv, residual, both]}\n"
        "    recurrence.projection: {type: categorical, choices: [shared, layerwise]}\n"))
    assert len(planner._search_corners(spec)) == 1 + 16 * 2 * 3 * 2
    t0 = time.perf_counter()
    check_search_budget(spec)
    assert time.perf_counter() - t0 < 5
    small = spec.model_copy(update={"budgets": spec.budgets.model_copy(update={"flops": {0: [2.0e9]}})})
    with pytest.raises(PlanError, match="searched arm at .*recurrence.strategy=multi_refine"):
        check_search_budget(small)


def test_fuzzed_dry_runs_fail_in_one_line(tmp_path, capsys):
    """The issue's dry-run reproducers through the CLI: exit code 2 and one line on stderr."""
    cases = {
        "budget_key.yaml": BASE.replace("flops: [2.0e+11]", "flops: {null: [2.0e+11]}"),
        "int_step.yaml": BASE + ("search:\n  arm: s2\n  space:\n"
                                 "    recurrence.passes: {type: int, low: 1, high: 4, step: 0.5}\n"),
        "binary.yaml": "\udcff\udcfe binary",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        assert sweep.main([str(path), "--dry-run", "--no-probe"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------
# GPU pools: a spec pins the sweep (or one arm) to a pool; Ray custom resources pool-<P> / accelerator_type:<A>

GPU = ("resources: {workers_per_trial: 8, cpus_per_worker: 8, gpus_per_worker: 1, pool: h100-spot, "
       "accelerator_type: H100}\n")
H100 = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0, "pool-h100": 8.0}
SPOT = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0, "pool-h100-spot": 8.0}
HEAD = {"CPU": 0.0}
BIG = BASE.replace("[2.0e+11]", "[2.0e+12]")  # 8 workers per trial: a larger batch


def _cluster(*nodes):
    """(ray.cluster_resources(), ray.nodes()) of a fake cluster, as check_resources takes them."""
    total = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    return total, [{"Alive": True, "Resources": dict(n)} for n in nodes] + [{"Alive": False, "Resources": dict(SPOT)}]


def test_pool_maps_to_its_ray_resources():
    spec = _spec(BIG + GPU)
    assert planner.placement(spec, "s2") == ("h100-spot", "H100")
    # one pool unit per GPU, Ray's own 0.001 of accelerator_type:<type>
    assert planner.worker_request(spec, "h100-spot", "H100") == \
        {"CPU": 8.0, "GPU": 1.0, "pool-h100-spot": 1.0, "accelerator_type:H100": 0.001}
    cpu = _spec(BASE + "resources: {cpus_per_worker: 2, pool: cpu}\n")
    assert planner.worker_request(cpu, *planner.placement(cpu)) == {"CPU": 2.0, "pool-cpu": 1.0}  # 1 per CPU worker
    assert planner.worker_request(_spec(), *planner.placement(_spec())) == {"CPU": 1.0}  # unpinned: as before
    from lrt_platform import execution

    assert execution.trial_request(cpu) == {"CPU": 2.0, "pool-cpu": 1.0}  # the fast path's Tune request
    assert execution.trial_request(spec) == {"CPU": execution.DRIVER_CPU}  # a TorchTrainer's workers hold their own


def test_an_arm_overrides_the_sweeps_pool_and_trials_carry_it():
    spec = _spec(BIG.replace("passes: 3}", "passes: 3, resources: {pool: h100}}") + GPU)
    trials = plan(spec, root="/tmp/x")
    where = {t.arm: (t.pool, t.accelerator_type) for t in trials}
    assert where == {"baseline": ("h100-spot", "H100"), "s2": ("h100-spot", "H100"), "k3": ("h100", "H100")}
    assert planner.placements(spec) == {("h100-spot", "H100"): ("resources.pool", "resources.accelerator_type"),
                                        ("h100", "H100"): ("arms[2].resources.pool", "resources.accelerator_type")}
    from lrt_platform import execution

    ctx = execution.SweepContext(spec, "h", "/tmp/x", {t.trial_id: t.to_dict() for t in trials})
    per_trial = execution.TrialResources(spec, ctx.trials)  # Tune asks per trial when arms differ
    k3 = next(t for t in trials if t.arm == "k3")
    assert per_trial({"trial_id": k3.trial_id}).required_resources == {"CPU": execution.DRIVER_CPU}
    one = _spec(BASE.replace("passes: 3}", "passes: 3, resources: {pool: h100}}")
                + "resources: {cpus_per_worker: 1, pool: h100-spot}\n")
    one_trials = {t.trial_id: t.to_dict() for t in plan(one, root="/tmp/x")}
    k3 = next(t for t in one_trials.values() if t["arm"] == "k3")
    assert execution.TrialResources(one, one_trials)({"trial_id": k3["trial_id"]}).required_resources == \
        {"CPU": 1.0, "pool-h100": 1.0}
    assert execution.TrialResources(one, one_trials)({execution.TUNE_BASE: k3["trial_id"]}).required_resources == \
        {"CPU": 1.0, "pool-h100": 1.0}  # a tuning trial runs where its template does


def test_search_trials_run_where_the_searched_arm_does():
    spec = _spec(BASE.replace("passes: 2}", "passes: 2, resources: {pool: h100-spot}}")
                 .replace("seeds: [0, 1]", "seeds: [0]")
                 + "search:\n  arm: s2\n  space:\n    optim.lr_scale: {type: loguniform, low: 0.5, high: 2}\n")
    t = plan_search_trial(spec, {"optim.lr_scale": 1.0}, 3, root="/tmp/x")
    assert (t.arm, t.pool) == ("s2-t003", "h100-spot")
    assert plan(spec, root="/tmp/x")[0].pool is None  # the baseline: any node


def test_a_pool_the_cluster_lacks_is_refused_at_plan_time():
    spec = _spec(BIG + GPU)
    planner.check_pools(spec, _cluster(HEAD, H100, SPOT)[1])  # there: no error
    with pytest.raises(PlanError) as e:
        planner.check_pools(spec, _cluster(HEAD, H100)[1])  # the spot node is dead, the pool is not there
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("resources.pool=h100-spot: the connected Ray cluster has no node with "
                                              "resource pool-h100-spot (pools it has: h100); fix the name or start "
                                              "that pool")
    assert "ray.autoscaler.sdk.request_resources(bundles=[{'CPU': 8, 'GPU': 1, 'pool-h100-spot': 1, " in msg
    with pytest.raises(PlanError, match=r"pools it has: none\).*scaled to zero"):
        planner.check_pools(spec, _cluster(HEAD)[1])  # an autoscaling cluster scaled to zero
    with pytest.raises(PlanError, match=r"^arms\[1\].resources.pool=h10: .*pools it has: h100, h100-spot"):
        planner.check_pools(_spec(BASE.replace("passes: 2}", "passes: 2, resources: {pool: h10}}")),
                            _cluster(HEAD, H100, SPOT)[1])
    a100 = _spec(BIG + GPU.replace("H100}", "A100}"))
    with pytest.raises(PlanError, match="^resources.accelerator_type=A100: no node of pool h100-spot has resource "
                                        r"accelerator_type:A100 \(its nodes have: H100\)"):
        planner.check_pools(a100, _cluster(HEAD, H100, SPOT)[1])
    with pytest.raises(PlanError, match=r"^resources.accelerator_type=L4: .*accelerator types it has: H100\)"):
        planner.check_pools(_spec(BASE + "resources: {accelerator_type: L4}\n"), _cluster(HEAD, H100)[1])
    planner.check_pools(_spec(), _cluster(HEAD)[1])  # an unpinned spec asks for no pool


def test_capacity_counts_only_the_pools_nodes():
    from lrt_platform import execution

    spec = _spec(BIG + GPU)  # one trial = one 8-GPU node
    assert execution.check_resources(spec, *_cluster(HEAD, H100, H100, H100, SPOT)) == 1  # one spot node
    assert execution.check_resources(spec, *_cluster(HEAD, H100, SPOT, SPOT)) == 2
    with pytest.raises(execution.ResourceError,
                       match="max_concurrent_trials=2 .* only 1 fit on the nodes of their pools"):
        execution.check_resources(_spec(BIG + GPU.replace("pool:", "max_concurrent_trials: 2, pool:")),
                                  *_cluster(HEAD, H100, H100, SPOT))
    with pytest.raises(PlanError, match="pool-h100-spot"):  # through the sweep's own check, before anything starts
        execution.check_resources(spec, *_cluster(HEAD, H100))
    big = _spec(BIG + GPU.replace("workers_per_trial: 8", "workers_per_trial: 16"))
    with pytest.raises(execution.ResourceError, match="the nodes with pool-h100-spot and accelerator_type:H100 have "
                                                      "192 CPU, 8 GPU"):
        execution.check_resources(big, *_cluster(HEAD, H100, H100, SPOT))
    # arms on two pools: their trials run side by side
    two = _spec(BIG.replace("passes: 3}", "passes: 3, resources: {pool: h100}}") + GPU)
    assert execution.check_resources(two, *_cluster(HEAD, H100, SPOT)) == 2
    assert execution.check_resources(_spec(), {"CPU": 2.0}, [{"Resources": {"CPU": 2.0}}]) == 2  # unpinned: as before


def test_dry_run_shows_the_pool_column_only_when_pinned(tmp_path, capsys):
    path = tmp_path / "pinned.yaml"
    path.write_text(BIG.replace("passes: 3}", "passes: 3, resources: {pool: h100}}")
                    + GPU.replace(", accelerator_type: H100", ""))
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("trial "))
    assert header.split()[:7] == ["trial", "arm", "depth", "budget", "seed", "pair", "pool"]
    rows = {line.split()[0]: line.split()[6] for line in out.splitlines() if line.startswith("d2-")}
    assert rows == {"d2-flops2e12-s0-baseline": "h100-spot", "d2-flops2e12-s0-s2": "h100-spot",
                    "d2-flops2e12-s0-k3": "h100", "d2-flops2e12-s1-baseline": "h100-spot",
                    "d2-flops2e12-s1-s2": "h100-spot", "d2-flops2e12-s1-k3": "h100"}
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["arm"]: t["pool"] for t in data["trials"]} == {"baseline": "h100-spot", "s2": "h100-spot", "k3": "h100"}
    unpinned = tmp_path / "unpinned.yaml"
    unpinned.write_text(BASE)
    assert sweep.main([str(unpinned), "--dry-run", "--no-probe"]) == 0
    assert " pool " not in capsys.readouterr().out
    accel = tmp_path / "accel.yaml"
    accel.write_text(BASE + "resources: {accelerator_type: H100}\n")
    assert sweep.main([str(accel), "--dry-run", "--no-probe"]) == 0
    assert "any (H100)" in capsys.readouterr().out


def test_dry_run_against_a_cluster_shows_free_capacity_per_pool(tmp_path, capsys, monkeypatch):
    import ray

    path = tmp_path / "pinned.yaml"
    path.write_text(BIG + GPU.replace(", accelerator_type: H100", ""))
    assert sweep.main([str(path), "--dry-run", "--no-probe"]) == 0  # no --address: no Ray started, and it says so
    assert capsys.readouterr().out.splitlines()[-1] == ("pools: give --address to see the connected cluster's free "
                                                        "capacity per pool")
    total, nodes = _cluster(HEAD, H100, H100, SPOT)
    busy = {**total, "pool-h100": 10.0, "pool-h100-spot": 0.0}  # 6 of the 16 h100 units and the spot node in use
    monkeypatch.setattr(sweep, "_connect", lambda address: None)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(ray, "available_resources", lambda: busy)
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--address", "auto"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "pools (free / total units): h100 10 / 16, h100-spot 0 / 8"
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--address", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pools"] == {"h100": {"free": 10.0, "total": 16.0},
                                                            "h100-spot": {"free": 0.0, "total": 8.0}}
    monkeypatch.setattr(ray, "nodes", lambda: _cluster(HEAD, H100)[1])  # the spot pool is gone: refused, one line
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--address", "auto"]) == 2
    assert "pool-h100-spot" in capsys.readouterr().err


def test_spot_pools_warn_without_checkpoint_every(tmp_path, capsys):
    spec = _spec(BIG + GPU)
    trials = plan(spec, root="/tmp/x")
    (line,) = planner.spot_warnings(spec, trials)
    every = max(t.config["checkpoint_every"] for t in trials)
    assert line.startswith("warning: resources.pool=h100-spot: a spot pool, and failure.checkpoint_every is unset")
    assert f"every {every} steps here" in line and "\n" not in line
    path = tmp_path / "spot.yaml"
    path.write_text(BIG + GPU)
    assert sweep.main([str(path), "--dry-run", "--no-probe"]) == 0
    assert line in capsys.readouterr().out
    # checkpoint_every set: honoured by every trial whatever its pool, and no warning
    mixed = _spec(BIG.replace("passes: 3}", "passes: 3, resources: {pool: h100}}") + GPU
                  + "failure: {checkpoint_every: 5}\n")
    trials = plan(mixed, root="/tmp/x")
    assert {t.pool for t in trials} == {"h100", "h100-spot"}
    assert all(t.config["checkpoint_every"] == 5 for t in trials)
    assert planner.spot_warnings(mixed, trials) == []
    on_demand = _spec(BIG + GPU.replace("h100-spot", "h100"))
    assert planner.spot_warnings(on_demand, plan(on_demand, root="/tmp/x")) == []


def test_a_wrong_core_dir_fails_at_plan_time_in_one_line(tmp_path, capsys, monkeypatch):
    """A trial reads the CORE bundle only when it ends: the planner checks it before anything runs."""
    from lrt_model.config import ConfigError

    monkeypatch.delenv("LRT_CORE_DIR", raising=False)
    bad = str(tmp_path / "no_such_bundle")
    text = BASE + f"eval: {{icl: {{core_dir: '{bad}'}}}}\n"
    with pytest.raises(ConfigError, match=r"^eval\.icl\.core_dir=.*: no such folder; point eval\.icl\.core_dir"):
        plan(_spec(text), root="/tmp/x")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.icl.core_dir=" in err[0] and "no such folder" in err[0], err
    # a good bundle, given relative to the driver's directory, reaches the trials as an absolute path
    monkeypatch.chdir(ROOT)
    t = plan(_spec(BASE + "eval: {icl: {core_dir: tests/data/core_tiny}}\n"), root="/tmp/x")[0]
    assert t.config["icl"]["core_dir"] == os.path.join(ROOT, "tests", "data", "core_tiny")


def test_an_uploaded_corpus_that_fails_its_manifest_is_refused_at_plan_time(tmp_path, capsys):
    """Sizes, shard list, row counts and schema (parquet footers) are checked before anything runs; a
    corpus without a manifest (here the source folder) is planned as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lrt_model.data import DataError, upload_corpus

    src, dest = tmp_path / "src", str(tmp_path / "uploaded")
    src.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"document {i}.{j} " * 30 for j in range(20)]}), str(src / f"s{i}.parquet"))
    upload_corpus(str(src), dest)
    with open(f"{ROOT}/sweep_specs/tiny/quickstart.yaml") as f:
        text = f.read()
    assert "corpus: stdlib" in text

    def spec_at(corpus: str):
        return parse_spec(text.replace("corpus: stdlib", f"corpus: '{corpus}'"))

    assert len(plan(spec_at(dest), root="/tmp/x")) == 4 and len(plan(spec_at(str(src)), root="/tmp/x")) == 4
    with open(os.path.join(dest, "s1.parquet"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"^corpus .*/uploaded: shard s1.parquet is 100 bytes, the manifest says \d+: "
                                        r"upload the corpus again \(python -m lrt_model.data upload DIR .*\)$"):
        plan(spec_at(dest), root="/tmp/x")
    assert len(plan(spec_at(dest), root="/tmp/x", corpus_check=False)) == 4
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("corpus: stdlib", f"corpus: '{dest}'"))
    assert sweep.main([str(path), "--dry-run", "--no-probe", "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard s1.parquet is 100 bytes" in err[0], err
