"""LoRA for a pipeline's UNet (`rlfree train --use_peft`), and serving a tuned adapter and its base from one UNet.

`train --use_peft` on a pipeline writes the pipeline with the LoRA-merged UNet at the root (so that
`DiffusionPipeline.from_pretrained` loads it as it loads any pipeline) and the adapter alone in `unet_lora/` (peft's
format, a few MB to share). RLG between that output and its base (`--ref_model BASE`) loads the base UNet once with
the adapter on top, and runs the reference with the adapter switched off, as RLG's own code does for LMs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..sources import model_file, same_source

ADAPTER_DIR = "unet_lora"


def default_targets(unet: torch.nn.Module) -> list[str]:
    """What `--lora_target_modules all-linear` means on a UNet: every linear layer (attention projections, time
    embeddings) and the 3×3 convolutions of its ResNet blocks, where a convolutional UNet keeps most of its weights."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        or (isinstance(module, torch.nn.Conv2d) and name.rsplit(".", 1)[-1] in ("conv1", "conv2"))
    ]


def add_lora(unet: torch.nn.Module, rank: int, alpha: int, dropout: float, target_modules: list[str]):
    """The UNet wrapped in a trainable LoRA adapter (a `peft.PeftModel`); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = default_targets(unet) if target_modules == ["all-linear"] else target_modules
    return get_peft_model(unet, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))


def save_adapter_and_merge(peft_unet, output_dir: str | Path, base_model: str) -> torch.nn.Module:
    """Write the adapter to `output_dir/unet_lora` (naming `base_model` as its base) and return the merged UNet."""
    peft_unet.peft_config[peft_unet.active_adapter].base_model_name_or_path = base_model
    peft_unet.save_pretrained(Path(output_dir) / ADAPTER_DIR, save_embedding_layers=False)
    return peft_unet.merge_and_unload()


def adapter_base(pipeline_path: str) -> str | None:
    """The base pipeline a `train --use_peft` output's adapter was trained on, else None."""
    config = model_file(pipeline_path, f"{ADAPTER_DIR}/adapter_config.json")
    return None if config is None else json.loads(config.read_text()).get("base_model_name_or_path")


def shares_base(pipeline_path: str, ref_model: str | None) -> bool:
    """Whether `pipeline_path` is a LoRA output whose adapter sits on `ref_model`: then one UNet serves both."""
    base = adapter_base(pipeline_path)
    return ref_model is not None and base is not None and same_source(base, ref_model)


def with_adapter(base_unet: torch.nn.Module, pipeline_path: str):
    """`base_unet` with the adapter of the LoRA output `pipeline_path` on top, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_unet, pipeline_path, subfolder=ADAPTER_DIR).eval()
