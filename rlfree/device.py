"""Where models run and in which dtype: the one rule every family and reward model loads by."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> str | torch.dtype:
    """`auto` keeps the checkpoint's dtype on GPU but means float32 on CPU, where bf16 is slow and imprecise."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    return getattr(torch, dtype)
