"""Diffusion models: the same stages on diffusers pipelines (anthology §3).

A `--model_name_or_path` that holds `model_index.json` is a diffusers pipeline and selects this family. Samples are
drawn from the base pipeline with per-sample seeds, scored by reward functions that see each image as
`pipeline(output_type="np")` returns it, weighted by exp(r/beta) self-normalized per condition (the same weighting
as for LMs), and the denoiser is trained on the *weighted* denoising loss, whose optimum is p_base(x|c)·exp(r/beta)/Z.
"""

from __future__ import annotations

import functools

from ..sources import is_local_path, model_file


def is_pipeline(name_or_path: str | None) -> bool:
    """A diffusers pipeline (a local folder or a Hub repository with `model_index.json`): the family is chosen by the
    model, not by a flag."""
    if name_or_path is None:
        return False
    if is_local_path(name_or_path):
        return model_file(name_or_path, "model_index.json") is not None
    return _is_hub_pipeline(name_or_path)


@functools.cache
def _is_hub_pipeline(repo_id: str) -> bool:
    """One Hub look-up per repository and process (a local folder is checked afresh: it may be written meanwhile)."""
    return model_file(repo_id, "model_index.json") is not None
