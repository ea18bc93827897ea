"""`rlfree run`: a whole recipe in order, rounds that keep the target fixed, and resuming without stale outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM

from rlfree import toy
from rlfree.cli import main
from rlfree.errors import StageInputError
from rlfree.stages.run import RunConfig, run_recipe
from rlfree.stages.train import IN_PROGRESS

STAGE_FOLDERS = ("generated", "scored", "weighted", "model")


@pytest.fixture
def two_rounds(tmp_path, monkeypatch, toy_recipe):
    """A two-round run of the toy recipe in tmp_path; returns the recipe path."""
    monkeypatch.chdir(tmp_path)
    recipe = toy_recipe(tmp_path)
    assert run_recipe(recipe, RunConfig(rounds=2)) == ["out/model", "out/model_round2"]
    return recipe


def modification_times(root) -> dict[str, float]:
    return {str(path): path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_round_two_samples_from_round_one_and_keeps_pi_ref_as_the_target(two_rounds, reference_dir, tmp_path):
    settings = json.loads((tmp_path / "out/generated_round2/generation.json").read_text())
    assert settings["model_name_or_path"] == "out/model"
    assert settings["ref_model"] == str(reference_dir)
    assert settings["seed"] == 4  # a fresh seed per round
    trained_from = json.loads((tmp_path / "out/model_round2/training.json").read_text())["model_name_or_path"]
    assert trained_from == str(reference_dir)  # each round fits pi* from pi_ref; only the samples come from round 1
    assert (
        json.loads((tmp_path / "out/model_round2/training.json").read_text())["dataset_dir"] == "out/weighted_round2"
    )

    # ref_logprob is pi_ref's and proposal_logprob the round-1 model's, each checked against the exact oracle.
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    proposal = AutoModelForCausalLM.from_pretrained(tmp_path / "out/model")
    rows = load_from_disk(str(tmp_path / "out/weighted_round2")).select(range(0, 32, 5))
    for row in rows:
        exact_ref = toy.completion_logprobs(reference, row["prompt_ids"], [row["completion_ids"]])[0].item()
        exact_proposal = toy.completion_logprobs(proposal, row["prompt_ids"], [row["completion_ids"]])[0].item()
        assert row["ref_logprob"] == pytest.approx(exact_ref, abs=1e-4)
        assert row["proposal_logprob"] == pytest.approx(exact_proposal, abs=1e-4)
    assert any(abs(row["ref_logprob"] - row["proposal_logprob"]) > 1e-3 for row in rows)
    assert not torch.equal(
        AutoModelForCausalLM.from_pretrained(tmp_path / "out/model_round2").lm_head.weight, proposal.lm_head.weight
    )


def test_a_rerun_skips_every_finished_stage(two_rounds, tmp_path, capsys):
    before = modification_times(tmp_path / "out")
    capsys.readouterr()
    main(["run", "--config", two_rounds, "--rounds", "2"])
    out = capsys.readouterr().out
    assert out.count("is complete: skipped") == 8
    assert modification_times(tmp_path / "out") == before


def test_a_killed_training_is_redone_and_so_is_everything_after_it(two_rounds, tmp_path, capsys):
    # As if killed before training finished: the in-progress marker a run writes first is still there.
    (tmp_path / "out/model/training.json").rename(tmp_path / "out/model" / IN_PROGRESS)
    capsys.readouterr()
    run_recipe(two_rounds, RunConfig(rounds=2))
    out = capsys.readouterr().out
    assert out.count("is complete: skipped") == 3  # round 1's generate, score and weight
    for stage in ("train", "generate", "score", "weight"):
        assert f"round {1 if stage == 'train' else 2}/2 {stage}] -> " in out
    assert (tmp_path / "out/model/training.json").is_file() and not (tmp_path / "out/model" / IN_PROGRESS).exists()


def test_a_stage_rerun_by_hand_makes_the_later_stages_stale(two_rounds, tmp_path, capsys):
    main(["weight", "--input_dir", "out/scored", "--beta", "0.5", "--output_dir", "out/weighted"])
    os.utime(tmp_path / "out/weighted/weighting.json")  # make sure it is newer than the model at mtime resolution
    capsys.readouterr()
    run_recipe(two_rounds, RunConfig(rounds=1))
    out = capsys.readouterr().out
    assert "[round 1/1 weight] out/weighted is complete: skipped" in out
    assert "[round 1/1 train] -> out/model" in out


def test_a_batch_size_that_changes_nothing_does_not_make_a_stage_stale(two_rounds, tmp_path, capsys):
    recipe = json.loads((tmp_path / "recipe.yaml").read_text())
    recipe["generate"]["batch_size"] = 3  # samples depend on (seed, prompt, sample index) only
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    capsys.readouterr()
    run_recipe(two_rounds, RunConfig(rounds=1))
    assert capsys.readouterr().out.count("is complete: skipped") == 4


def test_other_settings_into_a_finished_folder_are_refused(two_rounds, tmp_path, toy_recipe):
    recipe = toy_recipe(tmp_path, beta=None, target_kl=0.2)
    with pytest.raises(StageInputError, match=r"out/weighted already holds a complete `weight` output .*target_kl"):
        run_recipe(recipe, RunConfig(rounds=1))


def test_run_needs_a_recipe_with_the_core_sections(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run"])
    assert exit_info.value.code == 2
    assert "`rlfree run` needs --config" in capsys.readouterr().err
    (tmp_path / "recipe.yaml").write_text("generate: {}\n")
    with pytest.raises(StageInputError, match=r"needs sections \['weight', 'train'\]"):
        run_recipe(str(tmp_path / "recipe.yaml"), RunConfig())
    with pytest.raises(StageInputError, match=r"rounds must be >= 1"):
        RunConfig(rounds=0)


def test_an_edited_reward_function_makes_the_scores_stale(tmp_path, monkeypatch, capsys, toy_recipe):
    monkeypatch.chdir(tmp_path)
    recipe_path = toy_recipe(tmp_path)
    recipe = json.loads((tmp_path / "recipe.yaml").read_text())
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def reward(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    recipe["score"]["reward"] = f"{reward_file}:reward"
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    run_recipe(recipe_path, RunConfig(rounds=1))
    reward_file.write_text("def reward(prompts, completions, **kwargs):\n    return [2.0] * len(completions)\n")
    capsys.readouterr()
    run_recipe(recipe_path, RunConfig(rounds=1))
    out = capsys.readouterr().out
    assert "[round 1/1 generate] out/generated is complete: skipped" in out
    for stage, folder in (("score", "scored"), ("weight", "weighted"), ("train", "model")):
        assert f"[round 1/1 {stage}] -> out/{folder}" in out
    assert set(load_from_disk("out/scored")["reward"]) == {2.0}
