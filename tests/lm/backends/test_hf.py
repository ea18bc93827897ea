"""The HF sampling backend samples pi_ref itself, whatever the checkpoint's generation config."""

from __future__ import annotations

import json
import shutil

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from rlfree import toy
from rlfree.lm.backends import hf as hf_backend
from rlfree.lm.loading import load_causal_lm
from rlfree.stages.generate import generate


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_checkpoint_generation_config_does_not_change_the_sampler(reference_dir, generate_config, tmp_path):
    """A checkpoint shipping top_k=1, a low temperature, penalties or suppressed tokens is still sampled as pi_ref."""
    local = tmp_path / "greedy-config"
    shutil.copytree(reference_dir, local)
    GenerationConfig(
        do_sample=True,
        top_k=1,
        temperature=0.05,
        top_p=0.5,
        repetition_penalty=10.0,
        min_new_tokens=3,
        suppress_tokens=[5],
        eos_token_id=0,
        pad_token_id=0,
    ).save_pretrained(local)
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"prompt": "4 + 5 ="}) + "\n")
    config = generate_config(
        tmp_path / "gen", model_name_or_path=local, prompts=prompts, num_samples=600, batch_size=600
    )
    dataset = generate(config)
    tokenizer = toy.build_tokenizer()
    exact = toy.exact_distributions(_model(reference_dir), tokenizer, ["4 + 5 ="], 3)
    index = {tuple(ids): i for i, ids in enumerate(exact["completions"])}
    counts = torch.zeros(len(index), dtype=torch.float64)
    for ids in dataset["completion_ids"]:
        counts[index[tuple(ids)]] += 1
    total_variation = 0.5 * (counts / counts.sum() - exact["logprobs"][0].exp()).abs().sum().item()
    # top_k=1 would put all 600 samples on the mode (TV = 1 - p(mode), about 0.5 here); sampling error is ~0.05.
    assert total_variation < 0.12
    assert len(set(map(tuple, dataset["completion_ids"]))) > 3


def test_the_sampler_config_is_valid_so_generate_warns_about_nothing(reference_dir):
    """transformers warns on every `generate` about sampling flags set on a greedy config (strict mode raises)."""
    model = load_causal_lm(str(reference_dir))
    with hf_backend.plain_sampling(model, [0], 0) as generation_config:
        generation_config.validate(strict=True)
