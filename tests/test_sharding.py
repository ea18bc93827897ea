"""Generation and scoring in shards: samples independent of batching, resuming after a crash, data parallelism."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from datasets import load_from_disk

from rlfree.data import StageInputError, load_stage
from rlfree.lm.backends.hf import HFBackend
from rlfree.stages import score as score_stage
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.score import ScoreConfig, score

REWARD = "rlfree.toy:arithmetic_reward"


def generate_config(reference_dir, prompts_file, output_dir, **overrides) -> GenerateConfig:
    settings = {
        "model_name_or_path": str(reference_dir),
        "prompts": str(prompts_file),
        "output_dir": str(output_dir),
        "num_samples": 6,
        "max_new_tokens": 3,
        "seed": 5,
        "batch_size": 7,
        "shard_size": 1,
    }
    return GenerateConfig(**settings | overrides)


def rows(path) -> list[dict]:
    return load_from_disk(str(path)).to_list()


LOGPROBS = ("ref_logprob", "proposal_logprob")


def assert_same_rows(actual: list[dict], expected: list[dict]) -> None:
    """Equal rows: the same samples exactly; log-probabilities up to float rounding (batch shapes change matmuls)."""
    assert [{k: v for k, v in row.items() if k not in LOGPROBS} for row in actual] == [
        {k: v for k, v in row.items() if k not in LOGPROBS} for row in expected
    ]
    for name in LOGPROBS:
        assert [row[name] for row in actual] == pytest.approx([row[name] for row in expected], abs=1e-5)


def interrupt_after(monkeypatch, module, name: str, calls: int) -> list:
    """Make `module.name` raise KeyboardInterrupt on call number `calls + 1`; returns the list of calls made."""
    original, made = getattr(module, name), []

    def wrapper(*args, **kwargs):
        made.append(1)
        if len(made) > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return made


def test_samples_do_not_depend_on_batch_or_shard_size(reference_dir, prompts_file, tmp_path):
    small = generate(generate_config(reference_dir, prompts_file, tmp_path / "a", batch_size=1, shard_size=1))
    large = generate(generate_config(reference_dir, prompts_file, tmp_path / "b", batch_size=64, shard_size=3))
    assert_same_rows(small.to_list(), large.to_list())
    other_seed = generate(generate_config(reference_dir, prompts_file, tmp_path / "c", seed=6))
    assert other_seed["completion_ids"] != small["completion_ids"]


def test_an_interrupted_generation_resumes_to_the_uninterrupted_result(
    reference_dir, prompts_file, tmp_path, monkeypatch
):
    whole = generate(generate_config(reference_dir, prompts_file, tmp_path / "whole")).to_list()
    output = tmp_path / "resumed"
    interrupt_after(monkeypatch, HFBackend, "draw", calls=2)
    with pytest.raises(KeyboardInterrupt):
        generate(generate_config(reference_dir, prompts_file, output))
    assert not output.exists()  # nothing that could load as a finished stage
    assert sorted(path.name for path in (tmp_path / "resumed.partial").glob("shard-*")) == [
        "shard-00000",
        "shard-00001",
    ]
    with pytest.raises(StageInputError, match="no such folder .resumed.partial beside it holds an unfinished run"):
        load_stage(output)

    monkeypatch.undo()
    made = interrupt_after(monkeypatch, HFBackend, "draw", calls=100)
    # A different batch size does not change the samples, so it may finish the run.
    resumed = generate(generate_config(reference_dir, prompts_file, output, batch_size=2))
    assert len(made) == 2  # only the two missing prompts were generated
    assert_same_rows(resumed.to_list(), whole)
    assert not (tmp_path / "resumed.partial").exists()


def test_other_settings_discard_an_unfinished_run_instead_of_keeping_or_refusing_it(
    reference_dir, prompts_file, tmp_path, monkeypatch, capsys
):
    """A corrected command is not trapped by its failed run's shards, and none of them survives into its output."""
    interrupt_after(monkeypatch, HFBackend, "draw", calls=1)
    with pytest.raises(KeyboardInterrupt):
        generate(generate_config(reference_dir, prompts_file, tmp_path / "out"))
    monkeypatch.undo()
    assert len(list((tmp_path / "out.partial").glob("shard-*"))) == 1
    resumed = generate(generate_config(reference_dir, prompts_file, tmp_path / "out", seed=9)).to_list()
    assert re.search(
        r"out.partial: discarding an unfinished run's 1 shard\(s\), .*\(seed: 5 -> 9\)", capsys.readouterr().out
    )
    fresh = generate(generate_config(reference_dir, prompts_file, tmp_path / "fresh", seed=9)).to_list()
    assert resumed == fresh


def test_an_interrupted_scoring_resumes_to_the_uninterrupted_result(
    reference_dir, prompts_file, tmp_path, monkeypatch
):
    generated = tmp_path / "generated"
    generate(generate_config(reference_dir, prompts_file, generated))
    config = {"input_dir": str(generated), "reward": [REWARD], "shard_size": 5}
    whole = score(ScoreConfig(output_dir=str(tmp_path / "whole"), **config)).to_list()
    interrupt_after(monkeypatch, score_stage, "score_dataset", calls=3)
    with pytest.raises(KeyboardInterrupt):
        score(ScoreConfig(output_dir=str(tmp_path / "scored"), **config))
    assert not (tmp_path / "scored").exists()
    monkeypatch.undo()
    made = interrupt_after(monkeypatch, score_stage, "score_dataset", calls=100)
    assert score(ScoreConfig(output_dir=str(tmp_path / "scored"), **config)).to_list() == whole
    assert len(made) == 2  # 24 rows in shards of 5: 3 were done, 2 were left


def launch_two_processes(*args, cwd) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2`: two real gloo ranks on a CPU-only machine."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlfree", *map(str, args),
    ]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_write_the_same_dataset_as_one(reference_dir, prompts_file, tmp_path):
    one = generate(generate_config(reference_dir, prompts_file, tmp_path / "one")).to_list()
    result = launch_two_processes(
        "generate", "--model_name_or_path", reference_dir, "--prompts", prompts_file, "--num_samples", 6,
        "--max_new_tokens", 3, "--seed", 5, "--batch_size", 7, "--shard_size", 1, "--output_dir", "two", cwd=tmp_path,
    )  # fmt: skip
    assert "generation shards (rank 1/2)" in result.stderr  # the second rank really ran, and wrote its half
    assert json.loads((tmp_path / "two" / "generation.json").read_text())["num_processes"] == 2
    assert_same_rows(rows(tmp_path / "two"), one)

    launch_two_processes(
        "score",
        "--input_dir",
        "two",
        "--reward",
        REWARD,
        "--shard_size",
        5,
        "--output_dir",
        "two_scored",
        cwd=tmp_path,
    )
    single = score(
        ScoreConfig(input_dir=str(tmp_path / "two"), output_dir=str(tmp_path / "one_scored"), reward=[REWARD])
    )
    assert rows(tmp_path / "two_scored") == single.to_list()


@pytest.mark.slow
def test_a_whole_recipe_runs_data_parallel(reference_dir, prompts_file, tmp_path):
    from test_pipeline import write_recipe

    recipe = write_recipe(tmp_path, reference_dir, prompts_file)
    result = launch_two_processes("run", "--config", recipe, cwd=tmp_path)
    assert result.stdout.count("[round 1/1") == 4  # one line per stage, from the main process only
    assert json.loads((tmp_path / "out/generated/generation.json").read_text())["num_processes"] == 2
    assert json.loads((tmp_path / "out/scored/scoring.json").read_text())["num_processes"] == 2
    assert (tmp_path / "out/model/training.json").is_file()
    again = launch_two_processes("run", "--config", recipe, cwd=tmp_path)
    assert again.stdout.count("is complete: skipped") == 4


@pytest.mark.slow
def test_a_generation_killed_with_sigkill_resumes_to_the_uninterrupted_result(reference_dir, prompts_file, tmp_path):
    """A real kill, mid-shard: the half-written shard is left behind as a staging folder and must not count."""
    import signal
    import time

    flags = {"num_samples": 1500, "batch_size": 500, "shard_size": 1}
    whole = generate(generate_config(reference_dir, prompts_file, tmp_path / "whole", **flags)).to_list()
    command = [sys.executable, "-m", "rlfree", "generate"] + [
        item
        for key, value in vars(generate_config(reference_dir, prompts_file, tmp_path / "killed", **flags)).items()
        if value is not None and not isinstance(value, bool)
        for item in (f"--{key}", str(value))
    ]
    process = subprocess.Popen(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    partial = tmp_path / "killed.partial"
    deadline = time.time() + 300
    while not (partial / "shard-00000").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = sorted(path.name for path in partial.glob("shard-*"))
    assert 1 <= len(written) < 4, written  # killed after the first shard, before the last
    assert not (tmp_path / "killed").exists()

    resumed = generate(generate_config(reference_dir, prompts_file, tmp_path / "killed", **flags))
    assert_same_rows(resumed.to_list(), whole)
    assert not partial.exists()
