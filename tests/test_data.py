"""Datasets on disk (`rlfree.data`): reading prompts, the atomic stage writer and its sidecars, the output folders a
stage refuses to replace, and shards that resume an interrupted run to the uninterrupted result."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from rlfree.data import load_prompts, load_stage, save_stage
from rlfree.errors import StageInputError
from rlfree.lm.backends.hf import HFBackend
from rlfree.stages import score as score_stage
from rlfree.stages.generate import generate
from rlfree.stages.score import ScoreConfig, score
from tests.helpers import assert_same_rows, generate_args, nothing_made, one_line_error, write_reward

REWARD = "rlfree.toy:arithmetic_reward"

# Non-numeric answers, so CSV type inference keeps them as strings.
PROMPT_ROWS = [
    {"prompt": "1 + 2 =", "answer": "three"},
    {"prompt": "4 + 4 =", "answer": "eight"},
    {"prompt": "0 + 9 =", "answer": "nine"},
]


# --- reading prompts -------------------------------------------------------------------------------------------------


def write_prompts(directory: Path, kind: str, rows: list[dict]) -> Path:
    if kind == "jsonl":
        path = directory / "prompts.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path = directory / "prompts.json"
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        path = directory / "prompts.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = directory / "prompts.csv"
        path.write_text("prompt,answer\n" + "".join(f"{row['prompt']},{row['answer']}\n" for row in rows))
    elif kind == "save_to_disk":
        path = directory / "prompts_folder"
        Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_load_prompts_reads_every_supported_format_to_the_same_rows(tmp_path, kind):
    dataset = load_prompts(str(write_prompts(tmp_path, kind, PROMPT_ROWS)))
    assert dataset.to_list() == PROMPT_ROWS


def test_load_prompts_accepts_a_messages_column(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "What is 1 + 2?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "4 + 4?"}]},
    ]
    dataset = load_prompts(str(write_prompts(tmp_path, "jsonl", rows)))
    assert dataset.column_names == ["messages"]
    assert dataset.to_list() == rows


def test_load_prompts_reads_a_conversational_prompt_column_as_messages(tmp_path):
    # TRL's conversational datasets (trl-lib/ultrafeedback-prompt, say) keep the chat under `prompt`.
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "answer": "3"}]
    dataset = load_prompts(str(write_prompts(tmp_path, "jsonl", rows)))
    assert sorted(dataset.column_names) == ["answer", "messages"]
    assert dataset[0]["messages"] == rows[0]["prompt"]


def test_load_prompts_without_prompt_or_messages_names_the_columns(tmp_path):
    path = write_prompts(tmp_path, "jsonl", [{"question": "1 + 2 =", "answer": "three"}])
    with pytest.raises(
        StageInputError, match=r"needs a 'prompt' column .* or a 'messages' column .*\['question', 'answer'\]"
    ):
        load_prompts(str(path))


def test_load_prompts_rejects_an_empty_saved_dataset(tmp_path):
    path = tmp_path / "empty_folder"
    Dataset.from_list(PROMPT_ROWS).filter(lambda row: False).save_to_disk(str(path))
    with pytest.raises(StageInputError, match=r"the prompt set is empty"):
        load_prompts(str(path))


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("header_only.csv", "prompt,answer\n")])
def test_load_prompts_rejects_an_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(StageInputError, match=r"empty"):
        load_prompts(str(path))


def test_load_prompts_rejects_an_unsupported_suffix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("1 + 2 =\n")
    with pytest.raises(
        StageInputError, match=r"unsupported file type '\.txt'; use \.jsonl, \.json, \.parquet or \.csv"
    ):
        load_prompts(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "1 + 2 ="}\n{"prompt": "3 + 4 ="}\n{"prompt": "5 + 6 =",}\n')
    with pytest.raises(StageInputError, match=r"--prompts .*prompts.jsonl: line 3 is not valid JSON"):
        load_prompts(str(path))


def test_non_text_prompts_name_the_row(tmp_path):
    path = tmp_path / "prompts"
    Dataset.from_dict({"prompt": [["1 + 2 ="], ["3 + 4 ="]]}).save_to_disk(str(path))  # a list, not chat turns
    with pytest.raises(StageInputError, match=r"row 0's messages must be a list of"):
        load_prompts(str(path))
    Dataset.from_dict({"prompt": [12, 34]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(StageInputError, match=r"row 0's prompt is int 12, not text"):
        load_prompts(str(tmp_path / "numbers"))


def test_a_missing_local_prompts_file_is_not_looked_up_on_the_hub(reference_dir, tmp_path, monkeypatch, run_cli):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a Hub look-up would retry for tens of seconds here
    for missing in (tmp_path / "prompts.jsonl", "prompts.jsonl", f"{tmp_path.name}/p"):
        monkeypatch.chdir(tmp_path.parent)
        code, _, err = run_cli(generate_args(reference_dir, missing, tmp_path / "out"))
        assert code == 2 and f"--prompts {missing}: no such file or folder" in err


def test_prompt_columns_named_like_stage_columns_are_refused(reference_dir, tmp_path, run_cli):
    """A TRL prompt-completion file: its gold `completion` would have replaced every sampled one (all rewards 1.0)."""
    prompts = tmp_path / "prompt_completion.jsonl"
    prompts.write_text('{"prompt": "1 + 2 =", "completion": "3"}\n{"prompt": "2 + 2 =", "completion": "4"}\n')
    out = tmp_path / "out"
    code, _, err = run_cli(generate_args(reference_dir, prompts, out))
    assert one_line_error(code, err, "generate") and nothing_made(out)
    assert "column(s) ['completion']" in err and "'completion' -> 'gold_completion'" in err
    for column in ("weight", "ref_logprob", "reward_accuracy"):
        prompts.write_text(json.dumps({"prompt": "1 + 2 =", column: 1.0}) + "\n")
        code, _, err = run_cli(generate_args(reference_dir, prompts, out))
        assert code == 2 and f"column(s) ['{column}']" in err and nothing_made(out)


def test_every_column_a_stage_writes_is_reserved(weighted, tmp_path, sample_config):
    """`STAGE_COLUMNS` is what a prompt file may not carry: it must name every column the stages write, or a prompt
    column of that name would again replace one silently."""
    from rlfree.data import REWARD_COLUMN_PREFIX, STAGE_COLUMNS
    from rlfree.stages.sample import sample

    reserved = set().union(*STAGE_COLUMNS.values())
    inputs = {"prompt", "answer"}  # the prompt file's own columns
    sample(sample_config(tmp_path / "soft", soft_best_of_n=2, beta=0.5, reward=[REWARD]))
    for folder in (weighted, tmp_path / "soft" / "picked"):
        written = set(load_from_disk(str(folder)).column_names) - inputs
        unreserved = {name for name in written - reserved if not name.startswith(REWARD_COLUMN_PREFIX)}
        assert written and not unreserved


# --- save_stage: the atomic stage writer -----------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".incomplete-" in p.name or ".old-" in p.name)


class ExplodingDataset:
    """Writes part of a dataset, then fails, like a full disk or a killed process halfway through save_to_disk."""

    def save_to_disk(self, path: str) -> None:
        Path(path, "data-00000-of-00002.arrow").write_bytes(b"partial")
        raise OSError("disk full")


def test_save_stage_writes_dataset_and_sidecars_atomically(tmp_path):
    earlier = tmp_path / "generated"
    earlier.mkdir()
    (earlier / "generation.json").write_text(json.dumps({"num_samples": 4}))
    (earlier / "unrelated.json").write_text("{}")
    output = tmp_path / "stages" / "scored"

    save_stage(Dataset.from_list(PROMPT_ROWS), output, "scoring", {"reward": ["r.py:f"]}, input_dir=earlier)

    assert load_from_disk(str(output)).to_list() == PROMPT_ROWS
    assert json.loads((output / "scoring.json").read_text()) == {"reward": ["r.py:f"], "working_dir": os.getcwd()}
    assert json.loads((output / "generation.json").read_text()) == {"num_samples": 4}
    assert not (output / "unrelated.json").exists()
    assert leftovers(output.parent) == []
    assert sorted(p.name for p in output.parent.iterdir()) == ["scored"]


def test_save_stage_failing_midway_leaves_no_output_and_no_staging_folder(tmp_path):
    output = tmp_path / "scored"
    with pytest.raises(OSError, match="disk full"):
        save_stage(ExplodingDataset(), output, "scoring", {})
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_stage_failing_midway_keeps_the_previous_output(tmp_path):
    output = tmp_path / "scored"
    save_stage(Dataset.from_list(PROMPT_ROWS), output, "scoring", {"run": 1})
    with pytest.raises(OSError, match="disk full"):
        save_stage(ExplodingDataset(), output, "scoring", {"run": 2})
    assert load_from_disk(str(output)).to_list() == PROMPT_ROWS
    assert json.loads((output / "scoring.json").read_text()) == {"run": 1, "working_dir": os.getcwd()}
    assert leftovers(tmp_path) == []


def test_save_stage_overwrites_an_existing_output(tmp_path):
    output = tmp_path / "weighted"
    save_stage(Dataset.from_list(PROMPT_ROWS), output, "scoring", {"run": 1})
    save_stage(Dataset.from_list(PROMPT_ROWS[:1]), output, "weighting", {"run": 2})
    assert load_from_disk(str(output)).to_list() == PROMPT_ROWS[:1]
    assert json.loads((output / "weighting.json").read_text()) == {"run": 2, "working_dir": os.getcwd()}
    assert not (output / "scoring.json").exists()  # the whole folder was replaced, not merged
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weighted"]


def test_stage_folders_follow_the_umask(generated):
    mode = stat.S_IMODE(generated.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


# --- output folders: nothing a user did not ask for is deleted or replaced -------------------------------------------


def test_an_existing_file_as_output_dir_is_refused_and_kept(reference_dir, prompts_file, scored, tmp_path, run_cli):
    precious = tmp_path / "notes.txt"
    precious.write_text("a user's file")
    code, _, err = run_cli(generate_args(reference_dir, prompts_file, precious))
    assert code == 2 and f"--output_dir {precious} is an existing file" in err
    code, _, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", precious])
    assert code == 2 and "is an existing file" in err
    assert precious.read_text() == "a user's file"
    assert not os.path.exists(f"{precious}.partial")


def test_output_dir_equal_to_input_dir_is_refused(scored, run_cli):
    before = load_from_disk(str(scored)).to_list()
    code, _, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", scored])
    assert code == 2 and "is --input_dir" in err
    code, _, err = run_cli(["score", "--input_dir", scored, "--reward", REWARD, "--output_dir", scored])
    assert code == 2 and "is --input_dir" in err
    assert load_from_disk(str(scored)).to_list() == before


def test_a_complete_output_with_other_settings_is_not_replaced(scored, tmp_path, run_cli):
    out = tmp_path / "weighted"
    assert run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", out])[0] == 0
    written = load_from_disk(str(out))["weight"]
    code, _, err = run_cli(["weight", "--input_dir", scored, "--beta", 2.0, "--output_dir", out])
    assert (
        code == 2
        and "already holds a complete `weighting` output written with other settings (beta: 0.5 -> 2.0)" in err
    )
    assert load_from_disk(str(out))["weight"] == written
    # The same settings may run again (and replace the folder with the same result).
    assert run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", out])[0] == 0


def test_a_folder_that_is_not_a_stage_output_is_not_replaced(scored, tmp_path, run_cli):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", home])
    assert code == 2 and "already holds other files" in err
    code, _, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", scored.parent])
    assert code == 2 and f"holds --input_dir {scored}: writing the stage would replace its own input" in err
    assert (home / "thesis.tex").read_text() == "years of work" and scored.exists()


def test_a_read_only_location_is_refused_up_front(scored, tmp_path, run_cli):
    if os.geteuid() == 0:
        location = "/sys"  # root writes through permission bits; sysfs refuses it
    else:
        location = tmp_path / "read_only"
        location.mkdir()
        location.chmod(stat.S_IRUSR | stat.S_IXUSR)
    out = f"{location}/rlfree-weighted"
    code, _, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", out])
    assert code == 2 and f"--output_dir {out}: cannot write in {location}" in err


def test_rerunning_a_stage_keeps_a_users_files_in_its_output_folder(generated, tmp_path, run_cli):
    out = tmp_path / "scored"
    argv = ["score", "--input_dir", generated, "--reward", REWARD, "--output_dir", out]
    assert run_cli(argv)[0] == 0
    (out / "inspect").mkdir()  # `rlfree inspect`'s default report: rlfree's own, stale once the data is rewritten
    assert run_cli(argv)[0] == 0
    (out / "NOTES.md").write_text("what I tried")
    code, _, err = run_cli(argv)
    assert one_line_error(code, err, "score") and "also NOTES.md, which the stage did not write" in err
    assert (out / "NOTES.md").read_text() == "what I tried" and len(load_from_disk(str(out))) == 16


def test_an_output_folder_inside_an_input_folder_is_refused(reference_dir, prompts_file, generated, tmp_path, run_cli):
    """Re-running generate would have deleted `generated/scored` with the rest of its folder."""
    inside = generated / "scored"
    code, _, err = run_cli(["score", "--input_dir", generated, "--reward", REWARD, "--output_dir", inside])
    assert one_line_error(code, err, "score") and f"is inside --input_dir {generated}" in err
    assert nothing_made(inside)
    code, _, err = run_cli(generate_args(reference_dir, prompts_file, reference_dir / "samples"))
    assert code == 2 and "is inside --model_name_or_path" in err and nothing_made(reference_dir / "samples")
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(prompts_file, holder / "prompts.jsonl")
    code, _, err = run_cli(generate_args(reference_dir, holder / "prompts.jsonl", holder))
    assert code == 2 and "holds --prompts" in err and (holder / "prompts.jsonl").is_file()


# --- shards: an interrupted run resumes to the uninterrupted result --------------------------------------------------


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


def test_an_interrupted_generation_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, shard_config):
    whole = generate(shard_config(tmp_path / "whole")).to_list()
    output = tmp_path / "resumed"
    interrupt_after(monkeypatch, HFBackend, "draw", calls=2)
    with pytest.raises(KeyboardInterrupt):
        generate(shard_config(output))
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
    resumed = generate(shard_config(output, batch_size=2))
    assert len(made) == 2  # only the two missing prompts were generated
    assert_same_rows(resumed.to_list(), whole)
    assert not (tmp_path / "resumed.partial").exists()


def test_other_settings_discard_an_unfinished_run_instead_of_keeping_or_refusing_it(
    tmp_path, monkeypatch, capsys, shard_config
):
    """A corrected command is not trapped by its failed run's shards, and none of them survives into its output."""
    interrupt_after(monkeypatch, HFBackend, "draw", calls=1)
    with pytest.raises(KeyboardInterrupt):
        generate(shard_config(tmp_path / "out"))
    monkeypatch.undo()
    assert len(list((tmp_path / "out.partial").glob("shard-*"))) == 1
    resumed = generate(shard_config(tmp_path / "out", seed=9)).to_list()
    assert re.search(
        r"out.partial: discarding an unfinished run's 1 shard\(s\), .*\(seed: 5 -> 9\)", capsys.readouterr().out
    )
    fresh = generate(shard_config(tmp_path / "fresh", seed=9)).to_list()
    assert resumed == fresh


def test_an_interrupted_scoring_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, shard_config):
    generated = tmp_path / "generated"
    generate(shard_config(generated))
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


@pytest.mark.slow
def test_a_generation_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, shard_config):
    """A real kill, mid-shard: the half-written shard is left behind as a staging folder and must not count."""
    import signal
    import time

    flags = {"num_samples": 1500, "batch_size": 500, "shard_size": 1}
    whole = generate(shard_config(tmp_path / "whole", **flags)).to_list()
    command = [sys.executable, "-m", "rlfree", "generate"] + [
        item
        for key, value in vars(shard_config(tmp_path / "killed", **flags)).items()
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

    resumed = generate(shard_config(tmp_path / "killed", **flags))
    assert_same_rows(resumed.to_list(), whole)
    assert not partial.exists()


# --- settings compared across runs -----------------------------------------------------------------------------------


def test_a_resumed_run_keeps_its_shards_when_paths_are_spelled_otherwise(generated, tmp_path, capsys, monkeypatch):
    """The first run typed relative paths, the second absolute ones: the same files, so the finished shard is kept
    (it was discarded as "other settings", and the work done thrown away)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(generated, "generated")
    write_reward(
        tmp_path / "r.py", "    if max(prompt_index) >= 2:\n        raise ValueError('bug')\n    return [1.0] * 8"
    )
    relative = ScoreConfig(input_dir="generated", output_dir="out", reward=["r.py:reward"], shard_size=8)
    absolute = ScoreConfig(
        input_dir=str(tmp_path / "generated"), output_dir=f"{tmp_path}/out/", reward=[f"{tmp_path}/./r.py:reward"],
        shard_size=8,
    )  # fmt: skip
    for config in (relative, absolute):
        capsys.readouterr()
        with pytest.raises(StageInputError, match="raised ValueError: bug"):
            score(config)
    out = capsys.readouterr().out
    assert "discarding" not in out and "resuming: 1 of 2 shards already written" in out
    write_reward(tmp_path / "r.py", "    return [1.0] * len(completions)")
    score(absolute)
    score(relative)  # over the finished output: the same settings, so it is not refused as "other settings"


def test_settings_are_compared_by_the_place_they_name(tmp_path, monkeypatch):
    """A path recorded relative to the folder its run started in is the same setting as that place typed any other
    way; the same spelling from another folder is not. Hub ids compare as written; a prompt file by its contents."""
    from rlfree.data import changed_settings
    from rlfree.sources import content_fingerprint

    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        (folder / "data").mkdir(parents=True)
    (first / "p.jsonl").write_text('{"prompt": "1 + 2 ="}\n')
    recorded = {
        "input_dir": "data", "output_dir": "out/", "model_name_or_path": "org/model", "prompts": "p.jsonl",
        "prompts_fingerprint": content_fingerprint(str(first / "p.jsonl")), "reward": ["r.py:f", "pkg.mod:f"],
        "working_dir": str(first),
    }  # fmt: skip
    monkeypatch.chdir(second)
    same = {
        "input_dir": str(first / "data"), "output_dir": f"{first}/./out", "model_name_or_path": "org/model",
        "prompts": str(first / "p.jsonl"), "reward": [f"{first}/r.py:f", "pkg.mod:f"],
    }  # fmt: skip
    assert changed_settings(recorded, same) == {}
    (second / "copy.jsonl").write_text((first / "p.jsonl").read_text())
    assert changed_settings(recorded, {"prompts": "copy.jsonl"}) == {}
    (second / "copy.jsonl").write_text('{"prompt": "2 + 2 ="}\n')
    other = {
        "input_dir": "data", "model_name_or_path": "org/other", "prompts": "copy.jsonl", "reward": ["r.py:g", "pkg.mod:f"],
    }  # fmt: skip
    assert set(changed_settings(recorded, other)) == set(other)
