"""Tiny random text-to-image pipelines in each layout rlfree serves, built locally from small configs (nothing is
downloaded) and saved as pipeline folders: what tests and benchmarks run the stages on. Images are 3×16×16, from
4×8×8 latents (a VAE with 2× downsampling); every text encoder reads a word-level tokenizer over `TEXT_WORDS`.

    sd:   StableDiffusionPipeline (UNet2DConditionModel with cross-attention, one CLIP encoder, DDIM)
    sdxl: StableDiffusionXLPipeline (+ a second CLIP encoder with projection, added time ids, Euler)
    sd3:  StableDiffusion3Pipeline (SD3Transformer2DModel, two CLIP encoders with projection, no T5, flow matching
          shifted by 3 as SD3.5)
    flux: FluxPipeline (FluxTransformer2DModel with guidance embedding, CLIP + T5, flow matching with the resolution
          shift; 16×16 images need --resolution 16)
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_WORDS = ("<pad>", "<unk>", "a", "bright", "dark", "square", "circle", "small", "large")
MAX_TOKENS = 6
RESOLUTION = 16  # pixels: the images of every tiny pipeline


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(TEXT_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_TOKENS
    )


def clip(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(TEXT_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, projection_dim=16, pad_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def vae(flow: bool = False):
    """SD3 and Flux's VAEs shift their latents and have no quant convolutions."""
    from diffusers import AutoencoderKL

    extra = {"shift_factor": 0.06, "scaling_factor": 1.5, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        sample_size=RESOLUTION, **(extra if flow else {}),
    )  # fmt: skip


def unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8, **extra,
    )  # fmt: skip


def build_sd(folder: str | Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", steps_offset=1,
        clip_sample=False,
    )  # fmt: skip
    encoder = clip()  # drawn first, then the VAE and the UNet: the weights rlfree's tests were written against
    autoencoder = vae()
    StableDiffusionPipeline(
        vae=autoencoder, text_encoder=encoder, tokenizer=tokenizer(), unet=unet(cross_attention_dim=16),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)  # fmt: skip


def build_sdxl(folder: str | Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    added = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8}
    denoiser = unet(cross_attention_dim=32, projection_class_embeddings_input_dim=6 * 8 + 16, **added)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=100, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip(), text_encoder_2=clip(projection=True), tokenizer=tokenizer(),
        tokenizer_2=tokenizer(), unet=denoiser, scheduler=scheduler, add_watermarker=False,
    ).save_pretrained(folder)  # fmt: skip


def build_sd3(folder: str | Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=32, out_channels=4,
    )  # fmt: skip
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(flow=True),
        text_encoder=clip(projection=True), tokenizer=tokenizer(), text_encoder_2=clip(projection=True),
        tokenizer_2=tokenizer(), text_encoder_3=None, tokenizer_3=None,
    ).save_pretrained(folder)  # fmt: skip


def build_flux(folder: str | Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(TEXT_WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0)
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae(flow=True), text_encoder=clip(), tokenizer=tokenizer(),
        text_encoder_2=t5, tokenizer_2=tokenizer(),
    ).save_pretrained(folder)  # fmt: skip


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}


def build(kind: str, folder: str | Path, seed: int = 0) -> None:
    """A tiny random pipeline of `kind` (a key of `BUILDERS`), its weights drawn from `seed`."""
    torch.manual_seed(seed)
    BUILDERS[kind](folder)
