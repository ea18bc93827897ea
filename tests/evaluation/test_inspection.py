"""`rlfree inspect`: the summary of a stage folder, checked against values computed by hand from the rows.

Folders are built with `save_stage`, as the stages write them, so the sidecars and layout are the real ones.
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from rlfree.data import save_stage
from rlfree.errors import StageInputError
from rlfree.evaluation.inspection import InspectConfig, inspect
from rlfree.stages.weight import WeightConfig, weight

PLOTS = ("rewards.png", "weights.png", "ess.png", "beta_curve.png")


def save_rows(path, prompt_index, stages=("generation",), **columns) -> None:
    """A generate-shaped folder (pi_ref is the proposal unless `proposal_logprob` is given), plus `columns`."""
    n = len(prompt_index)
    rows = {
        "prompt": [f"prompt {q}" for q in prompt_index],
        "completion": [f"completion {i}" for i in range(n)],
        "prompt_index": list(prompt_index),
        "sample_index": list(range(n)),
        "ref_logprob": [-1.0] * n,
        "num_tokens": [3] * n,
        "finish_reason": ["stop"] * n,
    }
    rows |= columns
    rows.setdefault("proposal_logprob", rows["ref_logprob"])
    save_stage(Dataset.from_dict(rows), path, stages[-1], {"stage": stages[-1]})
    for stage in stages[:-1]:
        (path / f"{stage}.json").write_text(json.dumps({"stage": stage}))


def plots_written(report: dict) -> set[str]:
    return {path.rsplit("/", 1)[-1] for path in report["plots"]}


def test_generate_folder_lengths_finish_reasons_and_only_what_the_columns_allow(tmp_path, capsys):
    folder = tmp_path / "generated"
    save_rows(
        folder,
        [0, 0, 0, 1, 1, 2],
        num_tokens=[1, 2, 3, 4, 5, 10],
        finish_reason=["stop", "stop", "length", "stop", "length", "stop"],
    )
    before = load_from_disk(str(folder)).to_dict()

    report = inspect(InspectConfig(input_dir=str(folder)))

    assert report["stages"] == ["generation"]
    assert report["num_rows"] == 6
    assert report["num_prompts"] == 3
    assert report["samples_per_prompt"] == {"min": 1, "median": 2, "max": 3}
    # p95 by linear interpolation over the sorted lengths 1 2 3 4 5 10: position 0.95 * 5 = 4.75, 5 + 0.75 * 5
    assert report["num_tokens"] == pytest.approx({"mean": 25 / 6, "median": 3.5, "p95": 8.75, "max": 10})
    assert report["finish_reasons"] == {
        "stop": {"count": 4, "share": pytest.approx(4 / 6)},
        "length": {"count": 2, "share": pytest.approx(2 / 6)},
    }
    assert not {"rewards", "weights", "beta_curve", "weighting"} & set(report)
    assert report["plots"] == []
    assert not any((folder / "inspect" / name).exists() for name in PLOTS)
    assert json.loads((folder / "inspect" / "inspect.json").read_text()) == report

    # The report folder inside the stage folder must not change what the stage folder loads as.
    assert load_from_disk(str(folder)).to_dict() == before
    out = capsys.readouterr().out
    assert "stop 4 (66.7%), length 2 (33.3%)" in out
    assert "1 / 2 / 3" in out  # samples per prompt


def test_scored_folder_reward_statistics_and_prompts_without_signal(tmp_path, capsys):
    folder = tmp_path / "scored"
    rewards = [0.0, 1.0, 2.0, 1.0, 1.0, 3.0]
    save_rows(
        folder,
        [0, 0, 0, 1, 1, 2],
        stages=("generation", "scoring"),
        reward=rewards,
        reward_accuracy=[0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    )

    report = inspect(InspectConfig(input_dir=str(folder), num_betas=7))

    assert report["stages"] == ["generation", "scoring"]
    assert report["rewards"]["reward"] == pytest.approx(
        {"mean": 8 / 6, "std": statistics.pstdev(rewards), "min": 0.0, "max": 3.0}
    )
    assert report["rewards"]["reward_accuracy"]["mean"] == pytest.approx(5 / 6)
    # prompt 1 (1, 1) and prompt 2 (one sample) carry no signal; prompt 0 (0, 1, 2) does
    assert report["share_prompts_equal_rewards"] == pytest.approx(2 / 3)
    assert [row["mean_reward"] for row in report["prompts"]] == pytest.approx([1.0, 1.0, 3.0])
    assert plots_written(report) == {"rewards.png", "beta_curve.png"}
    # beta grid: 0.01 to 100 x the pooled within-prompt std, sqrt((1 + 0 + 1 + 0 + 0 + 0) / 6)
    scale = math.sqrt(2 / 6)
    assert report["beta_curve"]["reward_scale"] == pytest.approx(scale)
    assert report["beta_curve"]["beta"] == pytest.approx([scale * 10 ** (-2 + 4 * i / 6) for i in range(7)])
    assert "reward mean / std / min / max" in capsys.readouterr().out


def test_rewards_equal_within_every_prompt_give_no_signal_at_any_beta(tmp_path):
    folder = tmp_path / "scored"
    save_rows(folder, [0, 0, 1, 1], reward=[1.0, 1.0, 0.0, 0.0])

    report = inspect(InspectConfig(input_dir=str(folder), num_betas=3))

    assert report["share_prompts_equal_rewards"] == 1.0
    curve = report["beta_curve"]
    assert curve["reward_scale"] == 0.0
    assert curve["beta"] == pytest.approx([0.01, 1.0, 100.0])  # the scale falls back to 1
    assert curve["kl_ref_estimate"] == pytest.approx([0.0] * 3, abs=1e-12)
    assert curve["ess_fraction"] == pytest.approx([1.0] * 3)


def test_weighted_folder_per_prompt_diagnostics_from_the_weights(tmp_path):
    # No stored diagnostics: ESS, KL and the largest weight come from the weights themselves.
    folder = tmp_path / "weighted"
    weights = [0.5, 0.25, 0.25, 0.9, 0.1]
    save_rows(folder, [3, 3, 3, 7, 7], stages=("generation", "weighting"), weight=weights)
    (folder / "weighting.json").write_text(
        json.dumps({"input_dir": "x", "output_dir": "y", "weighting": "rlhf", "beta": 0.5, "min_weight": 0.0})
    )

    report = inspect(InspectConfig(input_dir=str(folder)))

    ess = [1 / (0.5**2 + 2 * 0.25**2), 1 / (0.9**2 + 0.1**2)]
    kl = [0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75), 0.9 * math.log(1.8) + 0.1 * math.log(0.2)]
    assert [row["prompt_index"] for row in report["prompts"]] == [3, 7]
    assert [row["ess"] for row in report["prompts"]] == pytest.approx(ess, rel=1e-12)
    assert [row["kl_estimate"] for row in report["prompts"]] == pytest.approx(kl, rel=1e-12)
    assert [row["max_weight"] for row in report["prompts"]] == pytest.approx([0.5, 0.9])
    assert report["weights"]["ess"] == pytest.approx({"min": ess[1], "median": sum(ess) / 2, "max": ess[0]})
    assert "kl_ref_estimate" not in report["weights"]  # needs the proposal correction: only read, never guessed
    assert report["weighting"] == {"weighting": "rlhf", "beta": 0.5}  # defaults and paths left out
    assert plots_written(report) == {"weights.png", "ess.png"}


def test_stored_per_prompt_columns_are_reported_as_the_stage_wrote_them(tmp_path, capsys):
    folder = tmp_path / "weighted"
    save_rows(
        folder,
        [0, 0, 1, 1],
        stages=("weighting",),
        weight=[0.5, 0.5, 1.0, 0.0],
        ess=[2.0, 2.0, 1.0, 1.0],
        kl_estimate=[0.0, 0.0, 0.6, 0.6],
        kl_ref_estimate=[0.1, 0.1, 0.4, 0.4],
        max_weight=[0.5, 0.5, 1.0, 1.0],
        beta=[2.0, 2.0, 0.25, 0.25],
    )

    report = inspect(InspectConfig(input_dir=str(folder), max_prompts_shown=1))

    assert report["prompts"] == [
        {
            "prompt_index": 0,
            "count": 2,
            "ess": 2.0,
            "kl_estimate": 0.0,
            "max_weight": 0.5,
            "kl_ref_estimate": 0.1,
            "beta": 2.0,
        }
    ]
    assert report["weights"]["kl_ref_estimate"] == pytest.approx({"min": 0.1, "median": 0.25, "max": 0.4})
    assert report["weights"]["beta"] == pytest.approx({"min": 0.25, "median": 1.125, "max": 2.0})
    out = capsys.readouterr().out
    assert "per prompt (first 1 of 2)" in out
    assert "KL(pi*||pi_ref) min / median / max" in out


def test_beta_curve_is_monotone_with_greedy_and_pi_ref_limits(tmp_path):
    # Binary rewards, p = pi_ref: at beta = 0.01 x scale the weights are uniform over each prompt's reward-1 samples
    # (KL = log(N / k), ESS = k), and at 100 x scale they are nearly uniform (KL ~ 0, ESS / N ~ 1).
    rng = np.random.default_rng(0)
    rewards = [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    ref = rng.normal(-3.0, 1.0, size=24).tolist()
    folder = tmp_path / "scored"
    save_rows(
        folder,
        [q for q in range(3) for _ in range(8)],
        reward=[float(r) for row in rewards for r in row],
        ref_logprob=ref,
    )

    curve = inspect(InspectConfig(input_dir=str(folder), num_betas=25))["beta_curve"]

    kl, ess_fraction = np.array(curve["kl_ref_estimate"]), np.array(curve["ess_fraction"])
    assert len(curve["beta"]) == 25 and np.all(np.diff(curve["beta"]) > 0)
    assert np.all(np.diff(kl) <= 1e-12)  # beta grows along the curve: KL falls, ESS rises
    assert np.all(np.diff(ess_fraction) >= -1e-12)
    assert kl[0] == pytest.approx(np.mean([math.log(8 / 1), math.log(8 / 2), math.log(8 / 5)]), rel=1e-9)
    assert ess_fraction[0] == pytest.approx(np.mean([1 / 8, 2 / 8, 5 / 8]), rel=1e-9)
    assert kl[-1] == pytest.approx(0.0, abs=1e-3)
    assert ess_fraction[-1] == pytest.approx(1.0, abs=1e-3)


def test_weight_stage_output_end_to_end(tmp_path, capsys):
    scored = tmp_path / "scored"
    save_rows(
        scored,
        [0, 0, 0, 1, 1, 1],
        stages=("generation", "scoring"),
        reward=[0.0, 1.0, 2.0, 0.5, 0.0, 0.0],
        ref_logprob=[-1.0, -2.0, -3.0, -1.0, -1.5, -2.0],
        proposal_logprob=[-1.5, -2.0, -2.5, -1.0, -1.0, -2.0],
    )
    weighted = tmp_path / "weighted"
    weight(WeightConfig(input_dir=str(scored), output_dir=str(weighted), weighting="rlhf", beta=0.5))
    stage = load_from_disk(str(weighted)).to_dict()
    capsys.readouterr()

    report = inspect(InspectConfig(input_dir=str(weighted), output_dir=str(tmp_path / "report"), num_betas=5))

    assert report["stages"] == ["generation", "scoring", "weighting"]
    assert report["weighting"] == {"weighting": "rlhf", "beta": 0.5}
    by_prompt = [stage["weight"][:3], stage["weight"][3:]]
    assert [row["ess"] for row in report["prompts"]] == pytest.approx([1 / sum(w * w for w in ws) for ws in by_prompt])
    # The curve includes the beta used, and there agrees with what the weight stage recorded.
    curve = report["beta_curve"]
    assert len(curve["beta"]) == 6 and 0.5 in curve["beta"]
    at = curve["beta"].index(0.5)
    assert curve["kl_ref_estimate"][at] == pytest.approx(np.mean(stage["kl_ref_estimate"]), rel=1e-9)
    assert curve["ess_fraction"][at] == pytest.approx(np.mean(stage["ess"]) / 3, rel=1e-9)
    assert plots_written(report) == set(PLOTS)
    assert all((tmp_path / "report" / name).stat().st_size > 0 for name in PLOTS)
    assert not (weighted / "inspect").exists()
    out = capsys.readouterr().out
    assert "rlhf, beta=0.5" in out
    assert "* the beta of weighting.json" in out


def test_generated_scored_and_weighted_toy_folders(generate_config, tmp_path):
    """The real stages' folders, each inspected in place, still feed the next stage."""
    from rlfree.stages.generate import generate
    from rlfree.stages.score import ScoreConfig, score

    generated, scored, weighted = tmp_path / "generated", tmp_path / "scored", tmp_path / "weighted"
    generate(generate_config(generated, num_samples=8, max_new_tokens=2))
    reports = {"generated": inspect(InspectConfig(input_dir=str(generated)))}
    score(ScoreConfig(input_dir=str(generated), output_dir=str(scored), reward=["rlfree.toy:arithmetic_reward"]))
    reports["scored"] = inspect(InspectConfig(input_dir=str(scored)))
    weight(WeightConfig(input_dir=str(scored), output_dir=str(weighted), weighting="rlhf", beta=0.5))
    reports["weighted"] = inspect(InspectConfig(input_dir=str(weighted)))

    generated_rows = load_from_disk(str(generated))
    assert reports["generated"]["num_rows"] == len(generated_rows) == 32
    assert reports["generated"]["samples_per_prompt"] == {"min": 8, "median": 8, "max": 8}
    assert sum(reason["count"] for reason in reports["generated"]["finish_reasons"].values()) == 32
    assert reports["generated"]["num_tokens"]["max"] <= 2
    assert plots_written(reports["generated"]) == set()
    assert reports["scored"]["stages"] == ["generation", "scoring"]
    assert reports["scored"]["rewards"]["reward"]["mean"] == pytest.approx(
        np.mean(load_from_disk(str(scored))["reward"])
    )
    assert plots_written(reports["scored"]) == {"rewards.png", "beta_curve.png"}
    assert plots_written(reports["weighted"]) == set(PLOTS)
    assert reports["weighted"]["weights"]["ess"]["max"] <= 8


def test_folder_that_is_not_a_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageInputError, match=r"not a dataset folder"):
        inspect(InspectConfig(input_dir=str(tmp_path / "empty")))
    with pytest.raises(StageInputError, match=r"missing: no such folder"):
        inspect(InspectConfig(input_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "empty" / "inspect").exists()


def test_dataset_without_prompt_index_is_not_a_stage_output(tmp_path):
    Dataset.from_dict({"prompt": ["1 + 1 ="]}).save_to_disk(str(tmp_path / "prompts"))
    with pytest.raises(StageInputError, match=r"missing column\(s\) \['prompt_index'\]. Inspect the output folder"):
        inspect(InspectConfig(input_dir=str(tmp_path / "prompts")))


@pytest.mark.parametrize(("field", "value"), [("num_betas", 1), ("max_prompts_shown", -1)])
def test_settings_are_checked(field, value):
    with pytest.raises(StageInputError, match=rf"--{field} must be"):
        InspectConfig(input_dir="unused", **{field: value})


def test_cli_takes_the_folder_as_a_positional_argument(tmp_path, capsys):
    from rlfree.cli import main

    save_rows(tmp_path / "gen", [0, 0, 1], stages=("generation",))
    main(["inspect", str(tmp_path / "gen"), "--max_prompts_shown", "1"])
    assert "per prompt (first 1 of 2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "gen" / "inspect" / "inspect.json").read_text())["num_rows"] == 3
