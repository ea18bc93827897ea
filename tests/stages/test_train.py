"""`rlfree train`: an SFT-style checkpoint with a model card, LoRA, and resuming from checkpoints of the same run only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlfree.cli import main
from rlfree.lm.trainer import RLFreeTrainer
from rlfree.stages.train import train
from rlfree.training import ModelConfig
from tests.helpers import ROWS, one_line_error, training_args, write_weighted

# --- the checkpoint --------------------------------------------------------------------------------------------------


def test_checkpoint_is_sft_style_with_model_card(reference_dir, tmp_path):
    sidecar = {"weighting": "rlhf", "beta": 0.37, "num_prompts": 2, "ess_min": 1.5, "ess_median": 1.7}
    dataset_dir = write_weighted(tmp_path, ROWS, sidecar=sidecar)
    (dataset_dir / "generation.json").write_text(json.dumps({"num_samples": 3, "prompts": "my-prompts.jsonl"}))
    (dataset_dir / "scoring.json").write_text(json.dumps({"reward": ["rewards.py:exact_match"], "reward_model": []}))
    out = tmp_path / "checkpoint"
    train(
        ModelConfig(model_name_or_path=str(reference_dir)),
        training_args(tmp_path, dataset_dir, output_dir=str(out), max_steps=2, learning_rate=1e-2),
    )
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    for fact in ("| weighting | rlhf |", "| beta | 0.37 |", "| samples per prompt (N) | 3 |", "exact_match",
                 "my-prompts.jsonl", f"| base model | {reference_dir.resolve()} |"):  # fmt: skip
        assert fact in card, fact
    assert "base_model:" not in card  # a local folder is no Hub id
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    assert not torch.equal(reloaded.lm_head.weight, reference.lm_head.weight)


@pytest.mark.parametrize("merge", [False, True])
def test_lora_saves_adapter_or_merged_model(reference_dir, tmp_path, merge):
    out = tmp_path / "lora"
    trainer = train(
        ModelConfig(
            model_name_or_path=str(reference_dir), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
            merge_lora=merge,
        ),
        training_args(tmp_path, write_weighted(tmp_path, ROWS), output_dir=str(out), max_steps=3, learning_rate=5e-2),
    )  # fmt: skip
    assert (out / "adapter_config.json").is_file() != merge
    assert (out / "model.safetensors").is_file() == merge
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # transformers resolves an adapter folder through peft
    ids = torch.tensor([[3, 12, 4, 13, 3, 4]])
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(reference_dir)(input_ids=ids).logits
    assert (reloaded(input_ids=ids).logits - base).abs().max() > 1e-4


def test_missing_weight_column_is_a_clear_error(reference_dir, tmp_path):
    rows = [{key: value for key, value in row.items() if key != "weight"} for row in ROWS]
    with pytest.raises(ValueError, match="weight"):
        train(
            ModelConfig(model_name_or_path=str(reference_dir)), training_args(tmp_path, write_weighted(tmp_path, rows))
        )


def test_train_errors_name_its_own_flag(reference_dir, generated, tmp_path, run_cli):
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", generated, "--output_dir", tmp_path / "m"]
    code, _, err = run_cli(argv)
    assert code == 2 and f"--dataset_dir {generated}: missing column(s) ['weight']" in err and "--input_dir" not in err


# --- resuming from checkpoints of the same run only ------------------------------------------------------------------


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(reference_dir, tmp_path, monkeypatch):
    rows = ROWS * 8  # 40 rows: 5 steps of 8
    dataset_dir = write_weighted(tmp_path, rows)
    flags = {"per_device_train_batch_size": 8, "max_steps": 4, "learning_rate": 0.01, "save_strategy": "steps"}
    model_config = ModelConfig(model_name_or_path=str(reference_dir))
    train(
        model_config, training_args(tmp_path, dataset_dir, output_dir=str(tmp_path / "whole"), save_steps=2, **flags)
    )
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")

    # A run killed after step 2: only its first checkpoint exists, and no finished model.
    train(
        model_config, training_args(tmp_path, dataset_dir, output_dir=str(tmp_path / "killed"), save_steps=2, **flags)
    )
    killed = tmp_path / "killed"
    for path in killed.iterdir():
        if path.name != "checkpoint-2":
            path.unlink() if path.is_file() else shutil.rmtree(path)
    resumed_args = training_args(
        tmp_path, dataset_dir, output_dir=str(killed), save_steps=2, resume_from_checkpoint="last", **flags
    )
    steps_run = []
    original_step = RLFreeTrainer.training_step
    monkeypatch.setattr(
        RLFreeTrainer, "training_step", lambda self, *a, **k: steps_run.append(1) or original_step(self, *a, **k)
    )
    trainer = train(model_config, resumed_args)
    assert trainer.state.global_step == 4
    assert len(steps_run) == 2  # steps 3 and 4 only: it really started from checkpoint-2
    resumed = AutoModelForCausalLM.from_pretrained(killed)
    for (name, expected), actual in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(actual, expected, atol=1e-6), name
    assert (killed / "training.json").is_file()


def test_resume_last_without_a_checkpoint_starts_from_step_zero(reference_dir, tmp_path):
    args = training_args(tmp_path, write_weighted(tmp_path, ROWS), max_steps=1, resume_from_checkpoint="last")
    assert train(ModelConfig(model_name_or_path=str(reference_dir)), args).state.global_step == 1


def test_checkpoints_of_a_run_with_other_settings_are_not_resumed(reference_dir, scored, tmp_path, run_cli):
    from rlfree.stages.train import IN_PROGRESS

    out = tmp_path / "model"
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")  # a checkpoint of an older version: no record
    (out / IN_PROGRESS).write_text(json.dumps({"learning_rate": 0.1}))  # what an interrupted run left
    code, _, err = run_cli([*argv, "--resume_from_checkpoint", "last"])
    assert code == 2 and "comes from a run with other settings (" in err and "learning_rate: 0.1 -> 5e-05" in err


def test_a_fresh_start_over_checkpoints_of_an_interrupted_run_is_refused(reference_dir, scored, tmp_path, run_cli):
    """New checkpoints beside old ones would let a later `--resume_from_checkpoint last` pick an old one."""
    out = tmp_path / "model"
    (out / "checkpoint-8").mkdir(parents=True)
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    code, _, err = run_cli(argv)
    assert (
        code == 2 and "holds checkpoints of an earlier run: resume from them with --resume_from_checkpoint last" in err
    )


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


def test_last_skips_a_checkpoint_a_kill_left_half_written(reference_dir, weighted, checkpointed, tmp_path, run_cli):
    """Killed while checkpoint-2 was written: its trainer_state.json is empty, the run unfinished."""
    out = tmp_path / "model"
    shutil.copytree(checkpointed, out)
    (out / "checkpoint-2" / "trainer_state.json").write_text("")
    (out / "training.json").rename(out / ".rlfree-training-in-progress.json")
    code, _, err = run_cli(train_args(reference_dir, weighted, out))
    assert code == 2 and "resume from them with --resume_from_checkpoint last" in err
    code, _, err = run_cli(train_args(reference_dir, weighted, out, "--resume_from_checkpoint", "last"))
    assert code == 0, err
    assert f"skipping {out / 'checkpoint-2'}: its trainer_state.json is empty or cut off" in err
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "training.json").is_file()
    code, _, err = run_cli(
        train_args(reference_dir, weighted, tmp_path / "other", "--resume_from_checkpoint", out / "nowhere")
    )
    assert one_line_error(code, err, "train") and "no such checkpoint folder" in err


def test_resuming_a_checkpoint_with_other_settings_is_refused_from_any_folder(
    reference_dir, weighted, checkpointed, tmp_path, run_cli
):
    """The checkpoint carries its run's settings: resumed into a new folder with another learning rate, the Trainer
    would have gone on with the checkpoint's schedule while the card recorded the new rate."""
    checkpoint = checkpointed / "checkpoint-1"
    assert json.loads((checkpoint / "rlfree_training.json").read_text())["learning_rate"] == 5e-05
    out = tmp_path / "resumed"
    argv = train_args(reference_dir, weighted, out, "--resume_from_checkpoint", checkpoint)
    code, _, err = run_cli([*argv, "--learning_rate", 0.001])
    assert one_line_error(code, err, "train") and "learning_rate: 5e-05 -> 0.001" in err and not out.exists()
    assert run_cli(argv)[0] == 0 and (out / "training.json").is_file()
