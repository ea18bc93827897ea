"""`rlfree score`: invalid rewards stop the stage or are dropped on request, and a fixed reward function rescores
what its broken version wrote."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, load_from_disk

from rlfree.errors import StageInputError
from rlfree.stages import score as score_stage
from rlfree.stages.score import ScoreConfig, score
from tests.helpers import nothing_made, one_line_error, write_module, write_reward

INVALID_REWARDS = """
import math
import re

VALUES = {" 3": 1.0, " 4": None, " 8": math.nan, " 9": math.inf, " 5": 0.5}

def flaky(prompts, completions, **kwargs):
    return [VALUES[c] for c in completions]
"""


def invalid_reward_setup(tmp_path, completions):
    generated = tmp_path / "generated"
    n = len(completions)
    Dataset.from_dict(
        {
            "prompt": ["1 + 2 ="] * n,
            "completion": completions,
            "prompt_index": [0] * n,
            "sample_index": list(range(n)),
        }
    ).save_to_disk(str(generated))
    reward = write_module(tmp_path / "flaky.py", INVALID_REWARDS)
    return str(generated), f"{reward}:flaky"


def test_invalid_reward_stops_the_stage_naming_the_row(tmp_path):
    generated, reward = invalid_reward_setup(tmp_path, [" 3", " 8", " 4", " 9", " 5"])
    config = ScoreConfig(input_dir=generated, output_dir=str(tmp_path / "scored"), reward=[reward])
    with pytest.raises(
        StageInputError, match=r"NaN/inf/None for 3 row\(s\); first: row 1 \(prompt_index 0, sample_index 1"
    ):
        score(config)
    assert not (tmp_path / "scored").exists()


def test_invalid_rewards_are_dropped_on_request(tmp_path, capsys):
    generated, reward = invalid_reward_setup(tmp_path, [" 3", " 8", " 4", " 9", " 5"])
    output = tmp_path / "scored"
    config = ScoreConfig(input_dir=generated, output_dir=str(output), reward=[reward], drop_invalid_rewards=True)
    score(config)

    assert "dropped 3 of 5 rows" in capsys.readouterr().out
    columns = load_from_disk(str(output)).to_dict()
    assert columns["completion"] == [" 3", " 5"]
    assert columns["sample_index"] == [0, 4]
    assert columns["reward"] == [1.0, 0.5]
    assert columns["reward_flaky"] == [1.0, 0.5]
    settings = json.loads((output / "scoring.json").read_text())
    assert settings["reward"] == [reward]
    assert settings["drop_invalid_rewards"] is True


def test_dropping_every_row_is_an_error_not_an_unreadable_folder(tmp_path):
    generated, reward = invalid_reward_setup(tmp_path, [" 8", " 4"])
    config = ScoreConfig(
        input_dir=generated, output_dir=str(tmp_path / "scored"), reward=[reward], drop_invalid_rewards=True
    )
    with pytest.raises(StageInputError):
        score(config)


# --- rescoring never keeps results of code that changed --------------------------------------------------------------


def test_a_fixed_reward_function_rescores_the_shards_its_broken_version_wrote(generated, tmp_path, run_cli):
    """Shard 0 is scored by the old code, shard 1 crashes; after the fix no row keeps the old code's reward."""
    reward_file = tmp_path / "my_reward.py"
    spec = write_reward(
        reward_file,
        "    if max(prompt_index) >= 2:\n        raise ZeroDivisionError('bug')\n    return [1.0] * len(completions)",
    )
    out = tmp_path / "scored"
    argv = ["score", "--input_dir", generated, "--reward", spec, "--shard_size", 8, "--output_dir", out]
    code, _, err = run_cli(argv)
    assert code == 2
    assert (
        "reward reward_reward raised ZeroDivisionError: bug" in err and "my_reward.py:6" in err and "rows 8..15" in err
    )
    assert len(list((tmp_path / "scored.partial").glob("shard-*"))) == 1
    write_reward(reward_file, "    return [2.0] * len(completions)")
    assert run_cli(argv)[0] == 0
    assert set(load_from_disk(str(out))["reward"]) == {2.0}
    assert json.loads((out / "scoring.json").read_text())["reward_fingerprints"][0] is not None


def test_the_nan_reward_advice_works_both_ways(generated, tmp_path, monkeypatch, run_cli):
    reward_file = tmp_path / "nan_reward.py"
    nan_body = "    return [math.nan if i == 3 else 1.0 for i in prompt_index]"
    spec = write_reward(reward_file, nan_body)
    argv = ["score", "--input_dir", generated, "--reward", spec, "--shard_size", 8, "--output_dir", tmp_path / "a"]
    code, _, err = run_cli(argv)
    assert code == 2 and "Fix the reward function or pass --drop_invalid_rewards" in err
    # Fixing the function and re-running the same command rescores.
    write_reward(reward_file, "    return [0.0 if i == 3 else 1.0 for i in prompt_index]")
    assert run_cli(argv)[0] == 0
    assert sorted(set(load_from_disk(str(tmp_path / "a"))["reward"])) == [0.0, 1.0]
    # Adding the flag instead goes on with the shards already scored: it only decides what the stage keeps.
    write_reward(reward_file, nan_body)
    argv[-1] = tmp_path / "b"
    assert run_cli(argv)[0] == 2
    calls = []
    original = score_stage.score_dataset
    monkeypatch.setattr(
        score_stage, "score_dataset", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    )
    assert run_cli([*argv, "--drop_invalid_rewards"])[0] == 0
    assert calls == [] and len(load_from_disk(str(tmp_path / "b"))) == 12


def test_a_failed_run_that_wrote_no_shard_does_not_block_the_corrected_command(generated, tmp_path, run_cli):
    write_reward(tmp_path / "ok.py", "    return [1.0] * len(completions)")
    out = tmp_path / "scored"
    code, _, err = run_cli(["score", "--input_dir", generated, "--reward", tmp_path / "ok.py", "--output_dir", out])
    assert code == 2 and "expected path/to/file.py:FUNC" in err and nothing_made(out)
    code, _, err = run_cli(
        ["score", "--input_dir", generated, "--reward", f"{tmp_path}/ok.py:missing", "--output_dir", out]
    )
    assert code == 2 and "has no function 'missing'" in err and nothing_made(out)
    assert (
        run_cli(["score", "--input_dir", generated, "--reward", f"{tmp_path}/ok.py:reward", "--output_dir", out])[0]
        == 0
    )


def test_the_same_command_after_a_reward_fix_rescores_a_complete_folder(generated, tmp_path, run_cli):
    """Only the flags decide whether a complete folder may be replaced: after an edit, the same command rescores it."""
    spec = write_reward(tmp_path / "r.py", "    return [1.0] * len(completions)")
    argv = ["score", "--input_dir", generated, "--reward", spec, "--output_dir", tmp_path / "scored"]
    assert run_cli(argv)[0] == 0
    write_reward(tmp_path / "r.py", "    return [3.0] * len(completions)")
    assert run_cli(argv)[0] == 0
    assert set(load_from_disk(str(tmp_path / "scored"))["reward"]) == {3.0}


def test_scoring_a_weighted_folder_drops_its_weighting(reference_dir, weighted, tmp_path, capsys, run_cli):
    """Weights computed from the old reward must not reach `train` beside a sidecar naming the new one."""
    spec = write_reward(tmp_path / "length.py", "    return [float(len(c)) for c in completions]")
    out = tmp_path / "rescored"
    score(ScoreConfig(input_dir=str(weighted), output_dir=str(out), reward=[spec]))
    assert "holds scoring and weighting results; this scoring replaces them" in capsys.readouterr().out
    columns = load_from_disk(str(out)).column_names
    assert not {"weight", "log_weight", "ess", "kl_estimate", "max_weight", "reward_arithmetic_reward"} & set(columns)
    assert "reward_reward" in columns and not (out / "weighting.json").exists()
    assert json.loads((out / "scoring.json").read_text())["reward"] == [spec]
    code, _, err = run_cli(
        ["train", "--model_name_or_path", reference_dir, "--dataset_dir", out, "--output_dir", tmp_path / "m"]
    )
    assert one_line_error(code, err, "train") and "missing column(s) ['weight']" in err
