"""Diffusion models: the same stages on diffusers pipelines (anthology §3).

A `--model_name_or_path` that holds `model_index.json` is a diffusers pipeline and selects this family. Samples are
drawn from the base pipeline with per-sample seeds, scored by reward functions that see each image as
`pipeline(output_type="np")` returns it, weighted by exp(r/beta) self-normalized per condition (the same weighting
as for LMs), and the denoiser is trained on the *weighted* denoising loss, whose optimum is p_base(x|c)·exp(r/beta)/Z.
"""

from __future__ import annotations

from pathlib import Path


def is_pipeline(name_or_path: str | None) -> bool:
    """A local diffusers pipeline folder: the family is chosen by the model folder, not by a flag."""
    return name_or_path is not None and (Path(name_or_path).expanduser() / "model_index.json").is_file()
