"""LoRA on a pipeline's UNet: a merged pipeline with its adapter beside it, and RLG from one UNet."""

from __future__ import annotations

import numpy as np
from safetensors.torch import load_file

from rlfree.stages.train import train
from rlfree.training import ModelConfig, RLFreeConfig

REWARD = "rlfree.diffusion.toy:plus_component_reward"


def test_lora_saves_a_merged_pipeline_and_serves_rlg_from_one_unet(random_pipeline, sample_score_weight, tmp_path):
    """`train --use_peft` on a pipeline: only the adapter trains; the root is a pipeline with the merged UNet, the
    adapter sits in unet_lora/ naming its base. RLG between that output and its base runs one UNet with the adapter on
    and off, and draws the same samples as RLG between the merged pipeline and a separate copy of the base."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    from rlfree.diffusion.layouts import read_layout
    from rlfree.diffusion.lora import adapter_base
    from rlfree.stages.sample import SampleConfig, sample

    sample_score_weight(tmp_path, random_pipeline, None, REWARD, 0.5, num_samples=16, num_inference_steps=2)
    train(
        ModelConfig(model_name_or_path=str(random_pipeline), use_peft=True, lora_r=4),
        RLFreeConfig(output_dir=str(tmp_path / "lora"), dataset_dir=str(tmp_path / "weighted"), max_steps=3,
                     per_device_train_batch_size=8, learning_rate=5e-2, report_to=[], disable_tqdm=True),
    )  # fmt: skip
    layout = read_layout(str(random_pipeline))
    assert layout.adapter_dir == "unet_lora"
    adapter = load_file(tmp_path / "lora" / layout.adapter_dir / "adapter_model.safetensors")
    assert all("lora_" in name for name in adapter) and any(".conv1.lora_A." in name for name in adapter)
    tuned = DiffusionPipeline.from_pretrained(tmp_path / "lora")
    base = DDPMPipeline.from_pretrained(random_pipeline)
    assert isinstance(tuned, DDPMPipeline) and adapter_base(str(tmp_path / "lora"), layout) == str(random_pipeline)
    assert "LoRA r=4" in (tmp_path / "lora" / "README.md").read_text()
    targets = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in adapter}
    base_weights = dict(base.unet.named_parameters())
    for name, tuned_weight in tuned.unet.named_parameters():
        moved = (tuned_weight - base_weights[name]).abs().max().item()
        if name.rsplit(".", 1)[0] in targets and name.endswith("weight"):
            assert moved > 1e-5, name  # the adapter, merged
        else:
            assert moved == 0, name  # frozen

    def rlg(model: str, name: str):
        config = SampleConfig(model, None, str(tmp_path / name), guidance_scale=1.5, ref_model=str(random_pipeline),
                              num_picks=6, num_inference_steps=3)  # fmt: skip
        return sample(config).with_format("numpy")[:]["sample"]

    one_unet = rlg(str(tmp_path / "lora"), "one")
    merged_copy = tmp_path / "merged"  # the same pipeline without its adapter folder: two separate UNets
    tuned.save_pretrained(merged_copy)
    np.testing.assert_allclose(one_unet, rlg(str(merged_copy), "two"), atol=1e-4)
    assert np.abs(one_unet - rlg(str(random_pipeline), "base")).max() > 1e-2  # and the adapter does move the samples
