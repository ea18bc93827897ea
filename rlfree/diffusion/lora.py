"""LoRA for a pipeline's denoiser (`rlfree train --use_peft`), and serving a tuned adapter and its base from one
denoiser.

`train --use_peft` on a pipeline writes the pipeline with the LoRA-merged denoiser at the root (so that
`DiffusionPipeline.from_pretrained` loads it as it loads any pipeline) and the adapter alone in `unet_lora/` or
`transformer_lora/` (peft's format, a few MB to share). RLG between that output and its base (`--ref_model BASE`)
loads the base denoiser once with the adapter on top, and runs the reference with the adapter switched off, as RLG's
own code does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..sources import model_file, same_source
from .layouts import Layout


def add_lora(
    network: torch.nn.Module, rank: int, alpha: int, dropout: float, target_modules: list[str], layout: Layout
):
    """The denoiser wrapped in a trainable LoRA adapter (a `peft.PeftModel`); the base weights are frozen.
    `all-linear` means what the layout says (`Layout.lora_targets`)."""
    from peft import LoraConfig, get_peft_model

    targets = layout.lora_targets(network) if target_modules == ["all-linear"] else target_modules
    return get_peft_model(network, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))


def save_adapter_and_merge(peft_network, output_dir: str | Path, base_model: str, layout: Layout) -> torch.nn.Module:
    """Write the adapter to `output_dir/<denoiser>_lora` (naming `base_model` as its base) and return the merged
    denoiser."""
    peft_network.peft_config[peft_network.active_adapter].base_model_name_or_path = base_model
    peft_network.save_pretrained(Path(output_dir) / layout.adapter_dir, save_embedding_layers=False)
    return peft_network.merge_and_unload()


def adapter_base(pipeline_path: str, layout: Layout) -> str | None:
    """The base pipeline a `train --use_peft` output's adapter was trained on, else None."""
    config = model_file(pipeline_path, f"{layout.adapter_dir}/adapter_config.json")
    return None if config is None else json.loads(config.read_text()).get("base_model_name_or_path")


def shares_base(pipeline_path: str, ref_model: str | None, layout: Layout) -> bool:
    """Whether `pipeline_path` is a LoRA output whose adapter sits on `ref_model`: then one denoiser serves both."""
    base = adapter_base(pipeline_path, layout)
    return ref_model is not None and base is not None and same_source(base, ref_model)


def with_adapter(base_network: torch.nn.Module, pipeline_path: str, layout: Layout):
    """`base_network` with the adapter of the LoRA output `pipeline_path` on top, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_network, pipeline_path, subfolder=layout.adapter_dir).eval()
