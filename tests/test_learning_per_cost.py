"""benchmarks/learning_per_cost.py's pure pieces: accuracy at equal CPU-seconds, first reach, the ½ target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learning_per_cost as lpc  # noqa: E402

CURVE = [(0.0, 0.2), (10.0, 0.3), (30.0, 0.5), (40.0, 0.45)]


def test_accuracy_at_interpolates_linearly_between_points():
    assert lpc.accuracy_at(CURVE, 0.0) == pytest.approx(0.2)
    assert lpc.accuracy_at(CURVE, 5.0) == pytest.approx(0.25)
    assert lpc.accuracy_at(CURVE, 20.0) == pytest.approx(0.4)
    assert lpc.accuracy_at(CURVE, 30.0) == pytest.approx(0.5)  # a measured point exactly
    assert lpc.accuracy_at(CURVE, 35.0) == pytest.approx(0.475)
    assert lpc.accuracy_at(CURVE, 40.0) == pytest.approx(0.45)


def test_accuracy_at_does_not_extrapolate():
    assert lpc.accuracy_at(CURVE, 40.01) is None
    assert lpc.accuracy_at(CURVE, -1.0) is None
    assert lpc.accuracy_at([], 0.0) is None
    assert lpc.accuracy_at([(0.0, 0.7)], 0.0) == 0.7


def test_first_reach_is_the_first_measured_point_at_or_above():
    assert lpc.first_reach(CURVE, 0.3) == 10.0  # equal counts as reached
    assert lpc.first_reach(CURVE, 0.45) == 30.0  # not interpolated between 10 and 30
    assert lpc.first_reach(CURVE, 0.2) == 0.0
    assert lpc.first_reach(CURVE, 0.51) is None


def test_compare_ratio_and_target_met():
    curves = {"leantune_router": CURVE, "leantune_plain": [(0.0, 0.2), (50.0, 0.25), (100.0, 0.45)],
              "trl": [(0.0, 0.2), (40.0, 0.3), (100.0, 0.45)]}
    c = lpc.compare(curves, n_grid=5)
    assert c["cpu_s_grid"] == [0.0, 25.0, 50.0, 75.0, 100.0]
    router = c["accuracy_at_cpu_s"]["leantune_router"]
    assert router[:2] == pytest.approx([0.2, 0.45]) and router[2:] == [None, None, None]  # its curve ends at 40
    assert c["accuracy_at_cpu_s"]["trl"][1] == pytest.approx(0.2 + 0.1 * 25 / 40)
    reach = c["reach_trl_final_accuracy"]
    assert reach["leantune_router"] == {"cpu_s": 30.0, "ratio_to_trl_total": 0.3}
    assert reach["leantune_plain"] == {"cpu_s": 100.0, "ratio_to_trl_total": 1.0}
    assert c["target"]["met"] is True and c["target"]["best_ratio"] == 0.3
    assert c["accuracy_at_trl_total_cpu_s"]["leantune_router"] is None  # its curve ended at 40 CPU-s


def test_compare_target_missed_when_only_later_than_half():
    curves = {"leantune_router": [(0.0, 0.2), (60.0, 0.5)], "trl": [(0.0, 0.2), (100.0, 0.45)]}
    c = lpc.compare(curves)
    assert c["reach_trl_final_accuracy"]["leantune_router"]["ratio_to_trl_total"] == 0.6
    assert c["target"]["met"] is False


def test_compare_never_reached_and_no_improvement():
    never = lpc.compare({"leantune_plain": [(0.0, 0.2), (50.0, 0.3)], "trl": [(0.0, 0.2), (100.0, 0.45)]})
    assert never["reach_trl_final_accuracy"]["leantune_plain"] == {"cpu_s": None, "ratio_to_trl_total": None}
    assert never["target"]["met"] is False and never["target"]["best_ratio"] is None
    # TRL did not move past the start (the quick mode's tiny random model): the target says nothing
    flat = lpc.compare({"leantune_plain": [(0.0, 0.0), (5.0, 0.0)], "trl": [(0.0, 0.0), (8.0, 0.0)]})
    assert flat["target"]["met"] is None and "start" in flat["target"]["why"]
    assert flat["reach_trl_final_accuracy"]["leantune_plain"]["cpu_s"] == 0.0
    assert lpc.compare({"leantune_plain": [(0.0, 0.1)]})["target"]["met"] is None  # no TRL arm


def test_curve_points_start_at_zero():
    run = {"curve": {"points": [{"train_cpu_s": 3.5, "accuracy": 0.25}, {"train_cpu_s": 7.0, "accuracy": 0.5}]}}
    assert lpc.curve_points(run, 0.125) == [(0.0, 0.125), (3.5, 0.25), (7.0, 0.5)]


def test_arm_recipe_switches(tmp_path):
    """The router arm gets the shipped recipe's rl.router; plain DAPO has every filter off; shared settings equal."""
    spec = {"quick": True, "tiny_dir": str(tmp_path / "tiny"), "dtype": "float32", "lr": 0.01, "steps": 4,
            "micro_batch": 8, "threads": 1, "sft_dir": str(tmp_path / "sft"), "task": "countdown", "num_prompts": 64,
            "group_size": 4, "prompts_per_step": 2, "max_new_tokens": 16, "speculative": "off"}
    router = lpc.arm_recipe({**spec, "runner": "leantune_router"}, str(tmp_path / "a"))
    plain = lpc.arm_recipe({**spec, "runner": "leantune_plain"}, str(tmp_path / "b"))
    assert router.rl.router.enabled and router.rl.dynamic_sampling and router.rl.prompt_selection.enabled
    assert router.rl.router.warmup_prompts == 4  # --quick: two updates' prompts
    assert router.rl.router.skip_solved == lpc.router_settings({"quick": False})["skip_solved"]
    assert not (plain.rl.router.enabled or plain.rl.dynamic_sampling or plain.rl.prompt_selection.enabled)
    for r in (router, plain):
        assert r.rl.task == "countdown" and r.rl.group_size == 4 and r.optim.lr == 0.01 and r.train.steps == 4
        assert r.rl.rewards == {"task": 1.0}


def test_budget_defaults():
    assert lpc.parse_args([]).cpu_budget == 5400.0 and lpc.parse_args([]).max_updates == 200
    assert lpc.parse_args(["--cpu-budget", "0"]).cpu_budget is None  # updates alone
    quick = lpc.parse_args(["--quick"])
    assert quick.cpu_budget is None and quick.max_updates == 6 and quick.dtype == "float32"
    with pytest.raises(SystemExit):
        lpc.parse_args(["--group-size", "3", "--prompts-per-step", "3"])  # 9 rollouts, micro-batch 8
    a = lpc.parse_args([])
    assert a.parallel == 1 and a.prep_threads is None  # arms one after another unless asked
    a = lpc.parse_args(["--parallel", "3", "--prep-threads", "2"])
    assert a.parallel == 3 and a.prep_threads == 2 and a.threads == 1


def test_learning_signal_warning():
    def run(trained):
        return {"status": "ok", "curve": {"points": [{"rollouts_trained": trained}]}}

    assert "warning" in lpc.learning_signal({"leantune_plain": run(0), "leantune_router": run(0), "trl": run(None)})
    assert lpc.learning_signal({"leantune_plain": run(0), "leantune_router": run(12)}) == {}
