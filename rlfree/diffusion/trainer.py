"""The weighted denoising loss (anthology eq. 38-39) as a small `transformers.Trainer` subclass.

    loss(theta) = sum_c sum_i w_i * E_{t, eps} || target(x_i, eps, t) - net_theta(x_i,t, c, t) ||²

with w_i ∝ exp(r(x_i, c)/beta) self-normalized per condition over N samples of the base pipeline (`rlfree weight`),
so the fine-tuned model targets p_base(x|c)·exp(r(x, c)/beta)/Z. The target and noising follow the pipeline's
scheduler (epsilon, v_prediction, sample, or flow matching), and the loss is normalized per optimizer step across
micro-batches and ranks exactly as the LM trainer's (`rlfree.training`). The result is the base pipeline with the
trained denoiser (UNet or transformer), saved where `DiffusionPipeline.from_pretrained` (and the pipeline's own
class) loads it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer

from ..data import read_sidecars
from ..errors import StageInputError
from ..seeds import stream_seed
from ..training import CardFamily, RLFreeConfig, model_card, weight_scale, weighted_step_loss
from .layouts import Condition, Layout
from .lora import save_adapter_and_merge
from .pipeline import denoising_loss, noise_scheduler

TRAIN_COLUMNS = ("sample", "weight")
# Prompts whose embeddings the trainer keeps (on the CPU; SD3's are ~2.7 MB each in bfloat16, T5 included).
PROMPT_CACHE_SIZE = 1024


class DenoisingCollator:
    """Model-space samples, their (rescaled) weights and their condition: class labels for a class-conditional UNet,
    prompt texts for a text-to-image one (embedded by the pipeline's frozen text encoder in the loss)."""

    def __init__(self, weight_scale: float, condition_column: str | None):
        self.weight_scale = weight_scale
        self.condition_column = condition_column

    def __call__(self, features: list[dict]) -> dict:
        batch = {
            "samples": torch.from_numpy(np.stack([np.asarray(f["sample"], dtype=np.float32) for f in features])),
            "weight": torch.tensor([float(f["weight"]) for f in features], dtype=torch.float32) * self.weight_scale,
            "rows": [int(f["row"]) for f in features],
        }
        if self.condition_column == "class_label":
            batch["class_labels"] = torch.tensor([int(f["class_label"]) for f in features])
        elif self.condition_column == "prompt":
            batch["prompts"] = [str(f["prompt"]) for f in features]
        return batch


class DiffusionTrainer(Trainer):
    """Trainer whose loss is the weighted denoising loss of the pipeline's denoiser, normalized per optimizer step."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's row count

    def __init__(
        self,
        pipeline,
        args: RLFreeConfig,
        train_dataset: Dataset,
        base_model: str,
        network=None,
        lora: str = "",
        *,
        layout: Layout,
        **kwargs,
    ):
        """`network` is what trains: the pipeline's own denoiser (full fine-tuning) or a LoRA-wrapped one
        (`lora.add_lora`), which `lora` describes for the model card; `layout` drives it (`read_layout`)."""
        scale = weight_scale(train_dataset, TRAIN_COLUMNS, "train on the output of `rlfree weight`")
        self.pipeline = pipeline
        self.layout = layout
        self.noise_scheduler = noise_scheduler(pipeline.scheduler)
        self.base_model = base_model
        self.lora = lora
        self.embeddings: OrderedDict[str, Condition] = OrderedDict()  # prompt -> its conditioning, least recent first
        condition_column = {"text": "prompt", "class": "class_label"}.get(layout.conditioning)
        if condition_column and condition_column not in train_dataset.column_names:
            raise StageInputError(
                f"the {layout.denoiser} is {layout.conditioning}-conditional but the training data has no "
                f"{condition_column} column: train on the output of `rlfree weight` over this pipeline's own samples"
            )
        columns = [*TRAIN_COLUMNS, *([condition_column] if condition_column else [])]
        # Rows as numpy: a sample read as nested Python lists costs a float object per pixel.
        rows = train_dataset.select_columns(columns).add_column("row", list(range(len(train_dataset))))
        super().__init__(
            model=layout.network(pipeline) if network is None else network,
            args=args,
            train_dataset=rows.with_format("numpy"),
            data_collator=DenoisingCollator(scale, condition_column),
            **kwargs,
        )
        for name, component in pipeline.components.items():  # frozen, on this process's device: they embed prompts
            if name.startswith("text_encoder") and component is not None:
                component.requires_grad_(False).to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        samples = inputs["samples"]
        condition = self.condition(inputs, samples.device)
        per_sample = denoising_loss(
            model, self.noise_scheduler, samples, condition, self.generators(inputs), self.layout
        )
        loss = weighted_step_loss(inputs["weight"], per_sample, self.args)
        return (loss, {"denoising_loss": per_sample}) if return_outputs else loss

    def condition(self, inputs: dict, device: torch.device) -> Condition:
        """The batch's conditioning. The frozen text encoders embed each prompt once, as diffusers' training scripts
        precompute the embeddings: the N samples of a prompt share it, and no step re-runs the encoders (T5-XXL, for
        SD3 and Flux); at most `PROMPT_CACHE_SIZE` prompts are kept, the least recently used dropped first."""
        if self.layout.conditioning != "text":
            return self.layout.condition(self.pipeline, None, inputs.get("class_labels"), device)
        prompts = inputs["prompts"]
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self.embeddings]
        if missing:
            fresh = self.layout.condition(self.pipeline, missing, None, device)
            for position, prompt in enumerate(missing):
                self.embeddings[prompt] = {key: value[position : position + 1].cpu() for key, value in fresh.items()}
        for prompt in prompts:
            self.embeddings.move_to_end(prompt)
        keys = self.embeddings[prompts[0]]
        condition = {key: torch.cat([self.embeddings[prompt][key] for prompt in prompts]).to(device) for key in keys}
        while len(self.embeddings) > PROMPT_CACHE_SIZE:
            self.embeddings.popitem(last=False)
        return condition

    def generators(self, inputs: dict) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, dataset row, optimizer step): a sample's time and noise do not
        depend on how the step's rows are split into micro-batches and ranks, and a resumed run draws what the
        uninterrupted one would have."""
        step = self.state.global_step
        return [
            torch.Generator().manual_seed(stream_seed(self.args.seed, "denoise", row, step)) for row in inputs["rows"]
        ]

    def save_pipeline(self, output_dir: str) -> None:
        """The base pipeline with the trained denoiser, as `DiffusionPipeline.from_pretrained` reads it, and its card.
        A LoRA adapter is saved alone in `<denoiser>_lora/` and merged into the pipeline's denoiser."""
        if not self.is_world_process_zero():
            return
        network = self.accelerator.unwrap_model(self.model)
        if self.lora:
            network = save_adapter_and_merge(network, output_dir, self.base_model, self.layout)
        self.pipeline.register_modules(**{self.layout.denoiser: network})
        self.pipeline.save_pretrained(output_dir)
        sidecars = read_sidecars(self.args.dataset_dir)
        steps = sidecars.get("generation", {}).get("num_inference_steps")
        card_family = CardFamily(
            "diffusers",
            f"num_inference_steps={steps}",
            'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{name}")\n',
        )
        card = model_card(
            self.base_model, sidecars, self.args.dataset_dir, self.args, card_family, self.lora or "full"
        )
        Path(output_dir, "README.md").write_text(card)
