"""Model sources (`rlfree.sources`): local folders are checked up front, custom code asks for trust_remote_code,
and a model's context length is read from its config."""

from __future__ import annotations

import json
import shutil

from rlfree.sources import context_length
from tests.helpers import generate_args, nothing_made


def test_model_folders_are_checked_up_front(prompts_file, reference_dir, tmp_path, monkeypatch, run_cli):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "out"
    code, _, err = run_cli(generate_args(tmp_path / "no_such_model", prompts_file, out))
    assert code == 2 and "no such model folder" in err and nothing_made(out)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(reference_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    code, _, err = run_cli(generate_args(no_weights, prompts_file, out))
    assert code == 2 and "has a config but no weights" in err and nothing_made(out)


def test_custom_code_asks_for_trust_remote_code_without_pointing_at_the_hub(
    prompts_file, reference_dir, tmp_path, run_cli
):
    custom = tmp_path / "custom"
    shutil.copytree(reference_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "my_arch", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(generate_args(custom, prompts_file, tmp_path / "out"))
    assert code == 2 and "pass --trust_remote_code" in err and "hf.co" not in err


def test_gpt2_style_configs_give_their_context_too():
    from transformers import GPT2Config

    assert context_length(GPT2Config(n_positions=16))[0] == 16
