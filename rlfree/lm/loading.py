"""Loading causal LMs, their tokenizers and their reference: local folders, GGUF files, Hub ids and PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import AdapterOff
from ..device import default_device, resolve_dtype
from ..sources import model_folder, same_source


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_folder(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """A causal LM from a local folder, a GGUF file (`model_folder`) or the Hub, in eval mode on `device` (CUDA when
    present).

    A local PEFT adapter folder (what `rlfree train --use_peft` saves) loads as its base model wrapped in the adapter:
    peft's own loader, since transformers' built-in one asks for a newer peft than the package index has."""
    device = device or default_device()
    base = adapter_base(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_folder(base or name_or_path), dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, name_or_path)
    return model.to(device).eval()


def adapter_base(name_or_path: str) -> str | None:
    """The base model a local PEFT adapter folder was trained on, else None."""
    config = Path(name_or_path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def load_reference(
    ref_path: str, model: PreTrainedModel, model_path: str, dtype: str, trust_remote_code: bool, device
) -> PreTrainedModel | AdapterOff:
    """--ref_model beside an already loaded --model_name_or_path: when that is a PEFT adapter on this very reference,
    the adapted model with its adapter off (one copy of the base weights), else the reference loaded on its own."""
    base = adapter_base(model_path)
    if base is not None and same_source(base, ref_path):
        return AdapterOff(model)
    return load_causal_lm(ref_path, dtype, trust_remote_code, device)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """All ids that end a completion: the generation config's (it may list several) or the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model has no eos_token_id in its generation config and the tokenizer has none either")
    return [eos] if isinstance(eos, int) else list(eos)
