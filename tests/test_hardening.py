"""What users really type: bad or unusual input gets a clear error naming the flag and the fix, before anything is
created, and no stage loses data or keeps results computed by code or settings that have since changed."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from datasets import Dataset, load_from_disk

from rlfree.cli import main
from rlfree.data import load_prompts
from rlfree.errors import StageInputError
from rlfree.lm import generation
from rlfree.lm.backends import hf as hf_backend
from rlfree.lm.backends.hf import HFBackend
from rlfree.lm.modeling import load_causal_lm
from rlfree.sources import context_length
from rlfree.stages import score as score_stage
from rlfree.stages.generate import GenerateConfig, generate
from rlfree.stages.score import ScoreConfig, score

REWARD = "rlfree.toy:arithmetic_reward"


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """Exit code and stderr of `rlfree ARGV` run in-process."""
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def generate_args(reference_dir, prompts_file, output_dir, *extra) -> list:
    return [
        "generate", "--model_name_or_path", reference_dir, "--prompts", prompts_file, "--num_samples", 2,
        "--max_new_tokens", 3, "--output_dir", output_dir, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def generated(reference_dir, prompts_file, tmp_path_factory):
    """A generate stage of 4 prompts x 4 samples."""
    path = tmp_path_factory.mktemp("stages") / "generated"
    config = GenerateConfig(str(reference_dir), str(prompts_file), str(path), num_samples=4, max_new_tokens=3)
    generate(config)
    return path


@pytest.fixture(scope="module")
def scored(generated, tmp_path_factory):
    path = tmp_path_factory.mktemp("stages") / "scored"
    score(ScoreConfig(input_dir=str(generated), output_dir=str(path), reward=[REWARD]))
    return path


def nothing_made(path) -> bool:
    return not os.path.exists(path) and not os.path.exists(f"{path}.partial")


# --- output folders: nothing a user did not ask for is deleted or replaced ---


def test_an_existing_file_as_output_dir_is_refused_and_kept(reference_dir, prompts_file, scored, tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("a user's file")
    code, err = run_cli(generate_args(reference_dir, prompts_file, precious), capsys)
    assert code == 2 and f"--output_dir {precious} is an existing file" in err
    code, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", precious], capsys)
    assert code == 2 and "is an existing file" in err
    assert precious.read_text() == "a user's file"
    assert not os.path.exists(f"{precious}.partial")


def test_output_dir_equal_to_input_dir_is_refused(scored, capsys):
    before = load_from_disk(str(scored)).to_list()
    code, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", scored], capsys)
    assert code == 2 and "is --input_dir" in err
    code, err = run_cli(["score", "--input_dir", scored, "--reward", REWARD, "--output_dir", scored], capsys)
    assert code == 2 and "is --input_dir" in err
    assert load_from_disk(str(scored)).to_list() == before


def test_a_complete_output_with_other_settings_is_not_replaced(scored, tmp_path, capsys):
    out = tmp_path / "weighted"
    assert run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", out], capsys)[0] == 0
    written = load_from_disk(str(out))["weight"]
    code, err = run_cli(["weight", "--input_dir", scored, "--beta", 2.0, "--output_dir", out], capsys)
    assert (
        code == 2
        and "already holds a complete `weighting` output written with other settings (beta: 0.5 -> 2.0)" in err
    )
    assert load_from_disk(str(out))["weight"] == written
    # The same settings may run again (and replace the folder with the same result).
    assert run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", out], capsys)[0] == 0


def test_a_folder_that_is_not_a_stage_output_is_not_replaced(scored, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    code, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", home], capsys)
    assert code == 2 and "already holds other files" in err
    code, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", scored.parent], capsys)
    assert code == 2 and "already holds other files" in err
    assert (home / "thesis.tex").read_text() == "years of work" and scored.exists()


def test_a_read_only_location_is_refused_up_front(scored, tmp_path, capsys):
    if os.geteuid() == 0:
        location = "/sys"  # root writes through permission bits; sysfs refuses it
    else:
        location = tmp_path / "read_only"
        location.mkdir()
        location.chmod(stat.S_IRUSR | stat.S_IXUSR)
    out = f"{location}/rlfree-weighted"
    code, err = run_cli(["weight", "--input_dir", scored, "--beta", 0.5, "--output_dir", out], capsys)
    assert code == 2 and f"--output_dir {out}: cannot write in {location}" in err


def test_stage_folders_follow_the_umask(generated):
    mode = stat.S_IMODE(generated.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


# --- resuming never keeps results of code or settings that changed ---


def write_reward(path, body: str) -> str:
    path.write_text(f"import math\n\n\ndef reward(prompts, completions, prompt_index, **kwargs):\n{body}\n")
    return f"{path}:reward"


def test_a_fixed_reward_function_rescores_the_shards_its_broken_version_wrote(generated, tmp_path, capsys):
    """Shard 0 is scored by the old code, shard 1 crashes; after the fix no row keeps the old code's reward."""
    reward_file = tmp_path / "my_reward.py"
    spec = write_reward(
        reward_file,
        "    if max(prompt_index) >= 2:\n        raise ZeroDivisionError('bug')\n    return [1.0] * len(completions)",
    )
    out = tmp_path / "scored"
    argv = ["score", "--input_dir", generated, "--reward", spec, "--shard_size", 8, "--output_dir", out]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert (
        "reward reward_reward raised ZeroDivisionError: bug" in err and "my_reward.py:6" in err and "rows 8..15" in err
    )
    assert len(list((tmp_path / "scored.partial").glob("shard-*"))) == 1
    write_reward(reward_file, "    return [2.0] * len(completions)")
    assert run_cli(argv, capsys)[0] == 0
    assert set(load_from_disk(str(out))["reward"]) == {2.0}
    assert json.loads((out / "scoring.json").read_text())["reward_fingerprints"][spec] is not None


def test_the_nan_reward_advice_works_both_ways(generated, tmp_path, capsys, monkeypatch):
    reward_file = tmp_path / "nan_reward.py"
    nan_body = "    return [math.nan if i == 3 else 1.0 for i in prompt_index]"
    spec = write_reward(reward_file, nan_body)
    argv = ["score", "--input_dir", generated, "--reward", spec, "--shard_size", 8, "--output_dir", tmp_path / "a"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "Fix the reward function or pass --drop_invalid_rewards" in err
    # Fixing the function and re-running the same command rescores.
    write_reward(reward_file, "    return [0.0 if i == 3 else 1.0 for i in prompt_index]")
    assert run_cli(argv, capsys)[0] == 0
    assert sorted(set(load_from_disk(str(tmp_path / "a"))["reward"])) == [0.0, 1.0]
    # Adding the flag instead goes on with the shards already scored: it only decides what the stage keeps.
    write_reward(reward_file, nan_body)
    argv[-1] = tmp_path / "b"
    assert run_cli(argv, capsys)[0] == 2
    calls = []
    original = score_stage.score_dataset
    monkeypatch.setattr(
        score_stage, "score_dataset", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    )
    assert run_cli([*argv, "--drop_invalid_rewards"], capsys)[0] == 0
    assert calls == [] and len(load_from_disk(str(tmp_path / "b"))) == 12


def test_a_failed_run_that_wrote_no_shard_does_not_block_the_corrected_command(generated, tmp_path, capsys):
    write_reward(tmp_path / "ok.py", "    return [1.0] * len(completions)")
    out = tmp_path / "scored"
    code, err = run_cli(
        ["score", "--input_dir", generated, "--reward", tmp_path / "ok.py", "--output_dir", out], capsys
    )
    assert code == 2 and "expected path/to/file.py:FUNC" in err and nothing_made(out)
    code, err = run_cli(
        ["score", "--input_dir", generated, "--reward", f"{tmp_path}/ok.py:missing", "--output_dir", out], capsys
    )
    assert code == 2 and "has no function 'missing'" in err and nothing_made(out)
    assert (
        run_cli(
            ["score", "--input_dir", generated, "--reward", f"{tmp_path}/ok.py:reward", "--output_dir", out], capsys
        )[0]
        == 0
    )


def test_a_changed_model_folder_restarts_an_unfinished_generation(
    reference_dir, prompts_file, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "model"
    shutil.copytree(reference_dir, model)
    calls = []

    def fail_on_second(*args, **kwargs):
        if calls:
            raise RuntimeError("out of memory")
        calls.append(1)
        return original(*args, **kwargs)

    original = HFBackend.draw
    monkeypatch.setattr(HFBackend, "draw", fail_on_second)
    config = GenerateConfig(
        str(model), str(prompts_file), str(tmp_path / "out"), num_samples=2, max_new_tokens=3, shard_size=2
    )
    with pytest.raises(RuntimeError):
        generate(config)
    monkeypatch.undo()
    weights = model / "model.safetensors"
    os.utime(weights, (weights.stat().st_mtime + 10, weights.stat().st_mtime + 10))  # retrained since
    capsys.readouterr()
    generate(config)
    assert (
        "discarding an unfinished run's 1 shard(s), computed with other settings (model_stamp:"
        in capsys.readouterr().out
    )
    assert json.loads((tmp_path / "out" / "generation.json").read_text())["model_stamp"] == weights.stat().st_mtime


# --- argument errors: clear, and before anything is created ---


@pytest.mark.parametrize(
    "extra",
    [
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--dtype", "float8"],
        ["--num_sample", "4"],
        ["--top_p", "nan"],
    ],
)
def test_bad_generate_flags_are_refused_before_anything_is_made(reference_dir, prompts_file, tmp_path, capsys, extra):
    out = tmp_path / "out"
    code, err = run_cli(generate_args(reference_dir, prompts_file, out, *extra), capsys)
    assert code == 2 and "Traceback" not in err and extra[0] in err
    assert nothing_made(out)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_beta_is_refused(scored, tmp_path, capsys, value):
    out = tmp_path / "weighted"
    code, err = run_cli(["weight", "--input_dir", scored, f"--beta={value}", "--output_dir", out], capsys)
    assert code == 2 and "--beta must be a finite number" in err and nothing_made(out)


def test_non_finite_learning_rate_is_refused_before_the_output_folder_is_made(reference_dir, scored, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    code, err = run_cli([*argv, "--learning_rate", "nan"], capsys)
    assert code == 2 and "--learning_rate must be a finite number" in err and not out.exists()


def test_train_errors_name_its_own_flag(reference_dir, generated, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", generated, "--output_dir", tmp_path / "m"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and f"--dataset_dir {generated}: missing column(s) ['weight']" in err and "--input_dir" not in err


def test_a_missing_local_prompts_file_is_not_looked_up_on_the_hub(reference_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a Hub look-up would retry for tens of seconds here
    for missing in (tmp_path / "prompts.jsonl", "prompts.jsonl", f"{tmp_path.name}/p"):
        monkeypatch.chdir(tmp_path.parent)
        code, err = run_cli(generate_args(reference_dir, missing, tmp_path / "out"), capsys)
        assert code == 2 and f"--prompts {missing}: no such file or folder" in err


def test_model_folders_are_checked_up_front(prompts_file, reference_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "out"
    code, err = run_cli(generate_args(tmp_path / "no_such_model", prompts_file, out), capsys)
    assert code == 2 and "no such model folder" in err and nothing_made(out)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(reference_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    code, err = run_cli(generate_args(no_weights, prompts_file, out), capsys)
    assert code == 2 and "has a config but no weights" in err and nothing_made(out)


def test_custom_code_asks_for_trust_remote_code_without_pointing_at_the_hub(
    prompts_file, reference_dir, tmp_path, capsys
):
    custom = tmp_path / "custom"
    shutil.copytree(reference_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "my_arch", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    code, err = run_cli(generate_args(custom, prompts_file, tmp_path / "out"), capsys)
    assert code == 2 and "pass --trust_remote_code" in err and "hf.co" not in err


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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    return 1.0", r"returned float 1.0 .*must return a list with one float per completion"),
        ("    return ['good'] * len(completions)", r"returned str 'good' for row 0: rewards must be numbers"),
        ("    return [1.0]", r"returned 1 values for 16 completions"),
    ],
)
def test_reward_functions_returning_the_wrong_shape_are_named(generated, tmp_path, body, message):
    spec = write_reward(tmp_path / "bad.py", body)
    with pytest.raises(StageInputError, match=message):
        score(ScoreConfig(input_dir=str(generated), output_dir=str(tmp_path / "scored"), reward=[spec]))


# --- prompts that do not fit the model's context ---


def long_prompts_file(tmp_path):
    """Three prompts; the middle one has 38 tokens, more than the toy model's 32 positions."""
    rows = [{"prompt": "1 + 2 ="}, {"prompt": " + ".join(["1"] * 19) + " ="}, {"prompt": "3 + 4 ="}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_prompt_longer_than_the_context_is_named(reference_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(generate_args(reference_dir, long_prompts_file(tmp_path), out), capsys)
    assert code == 2 and nothing_made(out)
    assert "prompt 1 has 38 tokens, but the model attends over 32 positions (max_position_embeddings)" in err
    assert "leaves room for 29" in err and "--long_prompts skip" in err


def test_max_new_tokens_beyond_the_context_is_refused(reference_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(generate_args(reference_dir, prompts_file, out, "--max_new_tokens", 32), capsys)
    assert code == 2 and "--max_new_tokens 32 leaves no room for a prompt" in err and nothing_made(out)


def test_long_prompts_can_be_skipped_or_truncated(reference_dir, tmp_path):
    prompts = long_prompts_file(tmp_path)
    config = {"num_samples": 2, "max_new_tokens": 3}
    skipped = generate(
        GenerateConfig(str(reference_dir), str(prompts), str(tmp_path / "skip"), long_prompts="skip", **config)
    )
    assert sorted(set(skipped["prompt_index"])) == [0, 2]
    cut = generate(
        GenerateConfig(str(reference_dir), str(prompts), str(tmp_path / "cut"), long_prompts="truncate", **config)
    )
    lengths = {row["prompt_index"]: len(row["prompt_ids"]) for row in cut}
    assert lengths == {0: 4, 1: 29, 2: 4}
    long_row = next(row for row in cut if row["prompt_index"] == 1)
    assert long_row["prompt"].endswith("1 + 1 =") and long_row["prompt_ids"][-2:] == [3, 13]


def test_gpt2_style_configs_give_their_context_too():
    from transformers import GPT2Config

    assert context_length(GPT2Config(n_positions=16))[0] == 16


# --- TRL's reward functions plug in unchanged, chat prompts included ---


def test_trl_conversational_reward_functions_get_trl_conversational_inputs(reference_dir, tmp_path):
    """As TRL documents them: `completion[0]["content"]`, and each prompt a list of messages."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat_model = tmp_path / "chat_model"
    shutil.copytree(reference_dir, chat_model)
    tokenizer.save_pretrained(chat_model)
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "2 + 3 ="}]}) + "\n")
    generate(GenerateConfig(str(chat_model), str(prompts), str(tmp_path / "gen"), num_samples=3, max_new_tokens=3))
    (tmp_path / "trl_reward.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    assert prompts[0][-1]['role'] == 'user', prompts\n"
        "    return [float(len(completion[0]['content'])) for completion in completions]\n"
    )
    spec = f"{tmp_path}/trl_reward.py:length_reward"
    scored_rows = score(ScoreConfig(input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "s"), reward=[spec]))
    assert scored_rows["reward"] == [float(len(text)) for text in scored_rows["completion"]]


# --- noise a user cannot act on, and work done twice ---


def test_the_sampler_config_is_valid_so_generate_warns_about_nothing(reference_dir):
    """transformers warns on every `generate` about sampling flags set on a greedy config (strict mode raises)."""
    model = load_causal_lm(str(reference_dir))
    with hf_backend.plain_sampling(model, [0], 0) as generation_config:
        generation_config.validate(strict=True)


def test_sampling_from_pi_ref_reads_its_log_softmax_once(reference_dir, prompts_file, tmp_path, monkeypatch):
    processor_sets = []
    original = generation.model_completion_logprobs

    def spy(*args, **kwargs):
        processor_sets.append(args[4] if len(args) > 4 else (None,))
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "model_completion_logprobs", spy)
    rows = generate(
        GenerateConfig(str(reference_dir), str(prompts_file), str(tmp_path / "out"), num_samples=2, max_new_tokens=3)
    )
    assert processor_sets and all(len(sets) == 1 for sets in processor_sets)
    assert rows["ref_logprob"] == rows["proposal_logprob"]


def test_checkpoints_of_a_run_with_other_settings_are_not_resumed(reference_dir, scored, tmp_path, capsys):
    from rlfree.stages.train import IN_PROGRESS

    out = tmp_path / "model"
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    out.mkdir()
    (out / "checkpoint-2").mkdir()
    (out / IN_PROGRESS).write_text(json.dumps({"learning_rate": 0.1}))  # what an interrupted run left
    code, err = run_cli([*argv, "--resume_from_checkpoint", "last"], capsys)
    assert code == 2 and "come from a run with other settings (" in err and "learning_rate: 0.1 -> 5e-05" in err


def test_the_same_command_after_a_reward_fix_rescores_a_complete_folder(generated, tmp_path, capsys):
    """Only the flags decide whether a complete folder may be replaced: after an edit, the same command rescores it."""
    spec = write_reward(tmp_path / "r.py", "    return [1.0] * len(completions)")
    argv = ["score", "--input_dir", generated, "--reward", spec, "--output_dir", tmp_path / "scored"]
    assert run_cli(argv, capsys)[0] == 0
    write_reward(tmp_path / "r.py", "    return [3.0] * len(completions)")
    assert run_cli(argv, capsys)[0] == 0
    assert set(load_from_disk(str(tmp_path / "scored"))["reward"]) == {3.0}


def test_soft_best_of_n_and_evaluate_skip_long_prompts_too(reference_dir, tmp_path):
    from rlfree.evaluation.evaluate import EvaluateConfig, evaluate
    from rlfree.stages.sample import SampleConfig, soft_best_of_n

    prompts = long_prompts_file(tmp_path)
    common = {"model_name_or_path": str(reference_dir), "prompts": str(prompts), "reward": [REWARD]}
    picked = soft_best_of_n(
        SampleConfig(
            **common, output_dir=str(tmp_path / "bon"), soft_best_of_n=4, num_picks=2, max_new_tokens=3,
            long_prompts="skip",
        )
    )  # fmt: skip
    assert sorted(picked["prompt_index"]) == [0, 0, 2, 2] and sorted(picked["pick_index"]) == [0, 0, 1, 1]
    report = evaluate(
        EvaluateConfig(
            **common, output_dir=str(tmp_path / "eval"), num_samples=4, max_new_tokens=3, long_prompts="skip"
        )
    )
    assert report["num_prompts"] == 2


def test_a_fresh_start_over_checkpoints_of_an_interrupted_run_is_refused(reference_dir, scored, tmp_path, capsys):
    """New checkpoints beside old ones would let a later `--resume_from_checkpoint last` pick an old one."""
    out = tmp_path / "model"
    (out / "checkpoint-8").mkdir(parents=True)
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    code, err = run_cli(argv, capsys)
    assert (
        code == 2 and "holds checkpoints of an earlier run: resume from them with --resume_from_checkpoint last" in err
    )
