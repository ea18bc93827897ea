"""`rlfree baseline`: TRL's RLOO on the same prompts, reward and beta as rlfree, as an optional extra."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from rlfree.cli import main
from rlfree.commands import command_types
from rlfree.recipe import parse_command
from tests.helpers import RECIPES


def test_toy_recipe_shares_beta_and_reward_with_rlfree():
    config, args = parse_command("baseline", command_types("baseline"), ["--config", str(RECIPES / "toy_rloo.yaml")])
    assert args.beta == 0.5
    assert config.reward == ["rlfree.toy:arithmetic_reward"]
    (weight_config,) = parse_command(
        "weight",
        command_types("weight"),
        ["--config", str(RECIPES / "toy_rloo.yaml"), "--input_dir", "x", "--output_dir", "y"],
    )
    assert weight_config.beta == args.beta


def test_rloo_trains_from_the_reference_with_the_given_beta(reference_dir, prompts_file, tmp_path, capsys):
    main(
        [
            "baseline", "--model_name_or_path", str(reference_dir), "--prompts", str(prompts_file),
            "--reward", "rlfree.toy:arithmetic_reward", "--beta", "0.5", "--max_new_tokens", "3",
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_steps", "2",
            "--learning_rate", "1e-3", "--output_dir", str(tmp_path / "rloo"), "--report_to", "none",
        ]
    )  # fmt: skip
    assert "wrote the RLOO baseline (beta=0.5)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rloo")
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    assert model.config.vocab_size == reference.config.vocab_size
    assert any((a != b).any() for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_chat_prompts_reach_trl_in_its_conversational_format(tmp_path):
    from rlfree.baselines.rloo import trl_prompts

    chat = [{"role": "user", "content": "What is 7 + 5?"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat, "answer": "12"}) + "\n")
    dataset = trl_prompts(str(tmp_path / "chat.jsonl"))
    assert dataset.column_names == ["prompt", "answer"] and dataset[0]["prompt"] == chat
    (tmp_path / "text.jsonl").write_text(json.dumps({"prompt": "7 + 5 =", "answer": "12"}) + "\n")
    assert trl_prompts(str(tmp_path / "text.jsonl"))[0] == {"prompt": "7 + 5 =", "answer": "12"}
