"""Loading models: a LoRA adapter's own base is pi_ref with the adapter off, one set of weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfree.stages.generate import generate


def test_a_lora_adapter_guides_against_its_own_base_with_one_set_of_weights(reference_dir, generate_config, tmp_path):
    """--model_name_or_path ADAPTER --ref_model BASE: pi_ref is the adapted model with its adapter off (no second copy
    of the base), and every candidate and log-probability equals guidance between the merged model and the base."""
    from peft import LoraConfig, get_peft_model

    from rlfree.adapters import AdapterOff
    from rlfree.lm.loading import load_causal_lm, load_reference

    torch.manual_seed(0)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(reference_dir),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),  # a random, non-zero adapter
    )
    adapted.save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(reference_dir).save_pretrained(tmp_path / "merged")

    model = load_causal_lm(str(tmp_path / "adapter"))
    shared = load_reference(str(reference_dir), model, str(tmp_path / "adapter"), "auto", False, model.device)
    assert isinstance(shared, AdapterOff) and shared.model is model
    own = load_reference(str(reference_dir), merged, str(tmp_path / "merged"), "auto", False, merged.device)
    assert not isinstance(own, AdapterOff)

    datasets = {
        name: generate(
            generate_config(
                tmp_path / f"{name}_out",
                model_name_or_path=tmp_path / name,
                ref_model=reference_dir,
                guidance_scale=2.0,
                num_samples=32,
                batch_size=64,
            )
        )  # fmt: skip
        for name in ("adapter", "merged")
    }
    adapter, merged = datasets["adapter"], datasets["merged"]
    assert adapter["completion_ids"] == merged["completion_ids"]
    for column in ("ref_logprob", "model_logprob", "proposal_logprob"):
        torch.testing.assert_close(torch.tensor(adapter[column]), torch.tensor(merged[column]), atol=1e-4, rtol=0)
    # The adapter changes the model: guidance is not sampling pi_ref by accident.
    assert max(abs(a - b) for a, b in zip(adapter["ref_logprob"], adapter["model_logprob"], strict=True)) > 0.1
