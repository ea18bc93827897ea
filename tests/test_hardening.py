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
    assert code == 2 and f"holds --input_dir {scored}: writing the stage would replace its own input" in err
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
    assert json.loads((out / "scoring.json").read_text())["reward_fingerprints"][0] is not None


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
    settings = {"num_samples": 2, "max_new_tokens": 3}
    rows = generate(
        GenerateConfig(str(reference_dir), str(prompts_file), str(tmp_path / "forced"), **settings,
                       teacher_forced_logprobs=True)
    )  # fmt: skip
    assert processor_sets and all(len(sets) == 1 for sets in processor_sets)
    assert rows["ref_logprob"] == rows["proposal_logprob"]
    # By default the sampling pass already read it: no teacher-forced pass at all.
    processor_sets.clear()
    rows = generate(GenerateConfig(str(reference_dir), str(prompts_file), str(tmp_path / "sampled"), **settings))
    assert processor_sets == [] and rows["ref_logprob"] == rows["proposal_logprob"]


def test_checkpoints_of_a_run_with_other_settings_are_not_resumed(reference_dir, scored, tmp_path, capsys):
    from rlfree.stages.train import IN_PROGRESS

    out = tmp_path / "model"
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")  # a checkpoint of an older version: no record
    (out / IN_PROGRESS).write_text(json.dumps({"learning_rate": 0.1}))  # what an interrupted run left
    code, err = run_cli([*argv, "--resume_from_checkpoint", "last"], capsys)
    assert code == 2 and "comes from a run with other settings (" in err and "learning_rate: 0.1 -> 5e-05" in err


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


# --- round two: what a new (and careless) user found ---


@pytest.fixture(scope="module")
def weighted(scored, tmp_path_factory):
    from rlfree.stages.weight import WeightConfig, weight

    path = tmp_path_factory.mktemp("stages") / "weighted"
    weight(WeightConfig(str(scored), str(path), "rlhf", beta=0.5))
    return path


def one_line_error(code: int, err: str, command: str) -> bool:
    """Exit 2 with one line `rlfree COMMAND: error: ...` on stderr (after any progress bars), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("rlfree ")]
    return (
        code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"rlfree {command}: error:")
    )


def test_prompt_columns_named_like_stage_columns_are_refused(reference_dir, tmp_path, capsys):
    """A TRL prompt-completion file: its gold `completion` would have replaced every sampled one (all rewards 1.0)."""
    prompts = tmp_path / "prompt_completion.jsonl"
    prompts.write_text('{"prompt": "1 + 2 =", "completion": "3"}\n{"prompt": "2 + 2 =", "completion": "4"}\n')
    out = tmp_path / "out"
    code, err = run_cli(generate_args(reference_dir, prompts, out), capsys)
    assert one_line_error(code, err, "generate") and nothing_made(out)
    assert "column(s) ['completion']" in err and "'completion' -> 'gold_completion'" in err
    for column in ("weight", "ref_logprob", "reward_accuracy"):
        prompts.write_text(json.dumps({"prompt": "1 + 2 =", column: 1.0}) + "\n")
        code, err = run_cli(generate_args(reference_dir, prompts, out), capsys)
        assert code == 2 and f"column(s) ['{column}']" in err and nothing_made(out)


def test_every_column_a_stage_writes_is_reserved(weighted, reference_dir, prompts_file, tmp_path):
    """`STAGE_COLUMNS` is what a prompt file may not carry: it must name every column the stages write, or a prompt
    column of that name would again replace one silently."""
    from rlfree.data import REWARD_COLUMN_PREFIX, STAGE_COLUMNS
    from rlfree.stages.sample import SampleConfig, sample

    reserved = set().union(*STAGE_COLUMNS.values())
    inputs = {"prompt", "answer"}  # the prompt file's own columns
    sample(
        SampleConfig(
            str(reference_dir), str(prompts_file), str(tmp_path / "soft"), soft_best_of_n=2, beta=0.5,
            reward=[REWARD], max_new_tokens=3,
        )
    )  # fmt: skip
    for folder in (weighted, tmp_path / "soft" / "picked"):
        written = set(load_from_disk(str(folder)).column_names) - inputs
        unreserved = {name for name in written - reserved if not name.startswith(REWARD_COLUMN_PREFIX)}
        assert written and not unreserved


def test_rerunning_a_stage_keeps_a_users_files_in_its_output_folder(generated, tmp_path, capsys):
    out = tmp_path / "scored"
    argv = ["score", "--input_dir", generated, "--reward", REWARD, "--output_dir", out]
    assert run_cli(argv, capsys)[0] == 0
    (out / "inspect").mkdir()  # `rlfree inspect`'s default report: rlfree's own, stale once the data is rewritten
    assert run_cli(argv, capsys)[0] == 0
    (out / "NOTES.md").write_text("what I tried")
    code, err = run_cli(argv, capsys)
    assert one_line_error(code, err, "score") and "also NOTES.md, which the stage did not write" in err
    assert (out / "NOTES.md").read_text() == "what I tried" and len(load_from_disk(str(out))) == 16


def test_an_output_folder_inside_an_input_folder_is_refused(reference_dir, prompts_file, generated, tmp_path, capsys):
    """Re-running generate would have deleted `generated/scored` with the rest of its folder."""
    inside = generated / "scored"
    code, err = run_cli(["score", "--input_dir", generated, "--reward", REWARD, "--output_dir", inside], capsys)
    assert one_line_error(code, err, "score") and f"is inside --input_dir {generated}" in err
    assert nothing_made(inside)
    code, err = run_cli(generate_args(reference_dir, prompts_file, reference_dir / "samples"), capsys)
    assert code == 2 and "is inside --model_name_or_path" in err and nothing_made(reference_dir / "samples")
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(prompts_file, holder / "prompts.jsonl")
    code, err = run_cli(generate_args(reference_dir, holder / "prompts.jsonl", holder), capsys)
    assert code == 2 and "holds --prompts" in err and (holder / "prompts.jsonl").is_file()


def test_scoring_a_weighted_folder_drops_its_weighting(reference_dir, weighted, tmp_path, capsys):
    """Weights computed from the old reward must not reach `train` beside a sidecar naming the new one."""
    spec = write_reward(tmp_path / "length.py", "    return [float(len(c)) for c in completions]")
    out = tmp_path / "rescored"
    score(ScoreConfig(input_dir=str(weighted), output_dir=str(out), reward=[spec]))
    assert "holds scoring and weighting results; this scoring replaces them" in capsys.readouterr().out
    columns = load_from_disk(str(out)).column_names
    assert not {"weight", "log_weight", "ess", "kl_estimate", "max_weight", "reward_arithmetic_reward"} & set(columns)
    assert "reward_reward" in columns and not (out / "weighting.json").exists()
    assert json.loads((out / "scoring.json").read_text())["reward"] == [spec]
    code, err = run_cli(
        ["train", "--model_name_or_path", reference_dir, "--dataset_dir", out, "--output_dir", tmp_path / "m"], capsys
    )
    assert one_line_error(code, err, "train") and "missing column(s) ['weight']" in err


def train_args(reference_dir, weighted, out, *extra) -> list:
    return [
        "train", "--model_name_or_path", reference_dir, "--dataset_dir", weighted, "--output_dir", out,
        "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 1, "--per_device_train_batch_size", 4,
        "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def checkpointed(reference_dir, weighted, tmp_path_factory):
    """A finished two-step run that saved checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("train") / "model"
    main([str(arg) for arg in train_args(reference_dir, weighted, out)])
    return out


def test_last_skips_a_checkpoint_a_kill_left_half_written(reference_dir, weighted, checkpointed, tmp_path, capsys):
    """Killed while checkpoint-2 was written: its trainer_state.json is empty, the run unfinished."""
    out = tmp_path / "model"
    shutil.copytree(checkpointed, out)
    (out / "checkpoint-2" / "trainer_state.json").write_text("")
    (out / "training.json").rename(out / ".rlfree-training-in-progress.json")
    code, err = run_cli(train_args(reference_dir, weighted, out), capsys)
    assert code == 2 and "resume from them with --resume_from_checkpoint last" in err
    code, err = run_cli(train_args(reference_dir, weighted, out, "--resume_from_checkpoint", "last"), capsys)
    assert code == 0, err
    assert f"skipping {out / 'checkpoint-2'}: its trainer_state.json is empty or cut off" in err
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "training.json").is_file()
    code, err = run_cli(
        train_args(reference_dir, weighted, tmp_path / "other", "--resume_from_checkpoint", out / "nowhere"), capsys
    )
    assert one_line_error(code, err, "train") and "no such checkpoint folder" in err


def test_resuming_a_checkpoint_with_other_settings_is_refused_from_any_folder(
    reference_dir, weighted, checkpointed, tmp_path, capsys
):
    """The checkpoint carries its run's settings: resumed into a new folder with another learning rate, the Trainer
    would have gone on with the checkpoint's schedule while the card recorded the new rate."""
    checkpoint = checkpointed / "checkpoint-1"
    assert json.loads((checkpoint / "rlfree_training.json").read_text())["learning_rate"] == 5e-05
    out = tmp_path / "resumed"
    argv = train_args(reference_dir, weighted, out, "--resume_from_checkpoint", checkpoint)
    code, err = run_cli([*argv, "--learning_rate", 0.001], capsys)
    assert one_line_error(code, err, "train") and "learning_rate: 5e-05 -> 0.001" in err and not out.exists()
    assert run_cli(argv, capsys)[0] == 0 and (out / "training.json").is_file()


def test_a_demo_over_one_with_other_settings_stops_before_changing_anything(tmp_path, capsys):
    """Step 1 rewrites the reference and the prompts: it must not run when step 2 would refuse its folder."""
    from dataclasses import asdict

    from rlfree.data import save_stage
    from rlfree.stages.checks import check_outputs
    from rlfree.toy.demo import DemoConfig, stage_configs

    out = tmp_path / "demo"
    stages = stage_configs(DemoConfig(output_dir=str(out), seed=0), out)
    (generation,) = stages["generate"]
    save_stage(Dataset.from_list([{"prompt": "1 + 2 ="}]), generation.output_dir, "generation", asdict(generation))
    (out / "prompts.jsonl").write_text("the first run's prompts\n")
    check_outputs(stages.values())  # the same settings go on
    code, err = run_cli(["demo", "--seed", 1, "--output_dir", out], capsys)
    assert one_line_error(code, err, "demo") and "seed: 0 -> 1" in err
    assert (out / "prompts.jsonl").read_text() == "the first run's prompts\n" and not (out / "reference").exists()


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


def test_a_sampler_folder_accepts_a_byte_identical_copy_of_its_prompts(prompts_file, tmp_path):
    from rlfree.evaluation.evaluate import EvaluateConfig, check_sampler_prompts
    from rlfree.sources import content_fingerprint

    copy = tmp_path / "copy.jsonl"
    shutil.copy(prompts_file, copy)
    fingerprint = content_fingerprint(str(prompts_file))
    settings = {"prompts": str(prompts_file), "prompts_split": "train", "prompts_fingerprint": fingerprint}
    config = EvaluateConfig(str(tmp_path), str(copy), str(tmp_path / "eval"), reward=[REWARD])
    check_sampler_prompts(tmp_path, settings, config)
    copy.write_text(copy.read_text() + json.dumps({"prompt": "9 + 9 ="}) + "\n")
    with pytest.raises(StageInputError, match="holds picks for --prompts"):
        check_sampler_prompts(tmp_path, settings, config)


def write(path, content: str | bytes):
    """Write `content` to `path` and return the path."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def reward_spec(path, source: str) -> str:
    """`path:f` for a reward file holding `source`."""
    return f"{write(path, source)}:f"


def recipe(folder, reference_dir, prompts_file, **overrides) -> str:
    sections = {
        "model_name_or_path": str(reference_dir), "prompts": str(prompts_file), "num_samples": 2,
        "max_new_tokens": 3, "output_dir": str(folder / "out"),
    } | overrides  # fmt: skip
    return str(write(folder / "recipe.yaml", "generate:\n" + "".join(f"  {k}: {v}\n" for k, v in sections.items())))


# (command, what the error says, the arguments) for inputs that answered with a traceback, no message or wrong advice.
# `t` holds the test's folder and fixtures; every case must leave `t.out` (and its .partial) uncreated.
BAD_INPUTS = {
    "non-UTF-8 prompt file": (
        "generate", "line 1 is not UTF-8 text (byte 0xe9",
        lambda t: generate_args(t.reference, write(t.tmp / "p.jsonl", b'{"prompt": "caf\xe9 1 + 2 ="}\n'), t.out),
    ),
    "score --batch_size 0": (
        "score", "--batch_size must be >= 1, got 0",
        lambda t: ["score", "--input_dir", t.generated, "--reward", REWARD, "--output_dir", t.out, "--batch_size", 0],
    ),
    "train --learning_rate -1": (
        "train", "--learning_rate must be >= 0, got -1.0",
        lambda t: ["train", "--model_name_or_path", t.reference, "--dataset_dir", t.weighted, "--output_dir", t.out,
                   "--learning_rate", -1],
    ),
    "train --gradient_accumulation_steps 0": (
        "train", "--gradient_accumulation_steps must be >= 1",
        lambda t: ["train", "--model_name_or_path", t.reference, "--dataset_dir", t.weighted, "--output_dir", t.out,
                   "--gradient_accumulation_steps", 0],
    ),
    "inspect --output_dir onto a file": (
        "inspect", "is an existing file",
        lambda t: ["inspect", t.weighted, "--output_dir", write(t.tmp / "report.txt", "mine")],
    ),
    "recipe value of the wrong type": (
        "generate", "num_samples must be an integer, got 16.7",
        lambda t: ["generate", "--config", recipe(t.tmp, t.reference, t.prompts, num_samples=16.7)],
    ),
    "recipe value outside the choices": (
        "generate", "backend must be one of hf, vllm, got 'tgi'",
        lambda t: ["generate", "--config", recipe(t.tmp, t.reference, t.prompts, backend="tgi")],
    ),
    "broken YAML": (
        "generate", "not valid YAML at line 3",
        lambda t: ["generate", "--config", write(t.tmp / "r.yaml", "generate:\n  num_samples: 2\n   prompts: [x\n")],
    ),
    "reward file with a syntax error": (
        "score", "importing",
        lambda t: ["score", "--input_dir", t.generated, "--output_dir", t.out,
                   "--reward", reward_spec(t.tmp / "bad.py", "def f(prompts, completions):\n    return [1.0\n")],
    ),
    "reward file that fails when imported": (
        "score", "raised ModuleNotFoundError: No module named 'not_installed'",
        lambda t: ["score", "--input_dir", t.generated, "--output_dir", t.out,
                   "--reward", reward_spec(t.tmp / "bad.py", "import not_installed\n")],
    ),
    "demo --num_prompts 1000": (
        "demo", "--num_prompts must be in 1..100",
        lambda t: ["demo", "--num_prompts", 1000, "--output_dir", t.out],
    ),
    "a billion samples of 4 prompts": (
        "generate", "--num_samples 1000000000: the samples of one prompt take about",
        lambda t: generate_args(t.reference, t.prompts, t.out, "--num_samples", 1_000_000_000),
    ),
    "inspect on a missing path": (
        "inspect", "--input_dir", lambda t: ["inspect", t.tmp / "nowhere", "--output_dir", t.out],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_one_line_naming_the_input_and_create_nothing(
    case, reference_dir, prompts_file, generated, weighted, tmp_path, capsys
):
    from types import SimpleNamespace

    command, message, arguments = BAD_INPUTS[case]
    paths = SimpleNamespace(
        tmp=tmp_path, out=tmp_path / "out", reference=reference_dir, prompts=prompts_file, generated=generated,
        weighted=weighted,
    )  # fmt: skip
    code, err = run_cli(arguments(paths), capsys)
    assert one_line_error(code, err, command), err
    assert message in err and nothing_made(paths.out)
    if case == "reward file with a syntax error":
        assert "'[' was never closed (at" in err and "bad.py:2)" in err
    if case == "inspect on a missing path":
        assert "nowhere: no such folder" in err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    import sys\n    sys.exit(0)", "called sys.exit(0) (at"),
        ("    return ['1.0'] * len(completions)", "returned str '1.0' for row 0: rewards must be numbers"),
    ],
)
def test_rewards_that_end_the_process_or_return_text_are_named(generated, tmp_path, capsys, body, message):
    """`sys.exit(0)` in a reward ended rlfree with exit 0 and no output; numeric strings passed as rewards."""
    spec = write_reward(tmp_path / "reward.py", body)
    code, err = run_cli(["score", "--input_dir", generated, "--reward", spec, "--output_dir", tmp_path / "s"], capsys)
    assert one_line_error(code, err, "score") and message in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("reward", "weighting", "advice"),
    [
        (
            "    return [float(i) for i in kwargs['sample_index']]",
            ["--weighting", "rlhf", "--beta", 0.5],
            "raise --beta",
        ),
        (None, ["--weighting", "rlif", "--rlif_exponent", 1.0], "lower --rlif_exponent"),
        (None, ["--weighting", "rlif", "--target_kl", 0.3], "lower --target_kl"),
        ("    return [1.0] * len(completions)", ["--weighting", "rlhf", "--beta", 0.5], None),
    ],
)
def test_the_few_samples_warning_names_the_weightings_own_knob(generated, tmp_path, capsys, reward, weighting, advice):
    """N = 4 is below 10·exp(KL) for every prompt; rlif has no beta to raise, and uniform weights (constant rewards,
    KL 0) are estimated exactly, so there is nothing to warn about."""
    source = generated
    if reward is not None:
        source = tmp_path / "scored"
        score(
            ScoreConfig(
                input_dir=str(generated), output_dir=str(source), reward=[write_reward(tmp_path / "r.py", reward)]
            )
        )
    code, err = run_cli(["weight", "--input_dir", source, *weighting, "--output_dir", tmp_path / "w"], capsys)
    assert code == 0
    if advice is None:
        assert "plug-in KL" not in err
    else:
        assert "plug-in KL(pi* || p) within log 10 of its ceiling" in err and f"or {advice}." in err
        assert "raise beta" not in err
