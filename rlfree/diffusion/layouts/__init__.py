"""Pipeline layouts: `read_layout` picks the one that serves a pipeline folder (see `base.Layout`)."""

from __future__ import annotations

import json

from ...errors import StageInputError
from ...sources import model_file
from .base import Condition, Layout
from .flux import FluxLayout
from .sd3 import SD3Layout
from .sdxl import SDXLLayout
from .unet import UNetLayout

# Checked in order: the pipeline classes by name first, then any UNet pipeline.
LAYOUTS: tuple[type[Layout], ...] = (SD3Layout, FluxLayout, SDXLLayout, UNetLayout)

__all__ = ["LAYOUTS", "Condition", "Layout", "null_components", "read_layout"]


def pipeline_index(path: str) -> dict:
    return json.loads(model_file(path, "model_index.json").read_text())


def null_components(path: str) -> dict[str, None]:
    """The components a pipeline folder saved as null (SD3 without T5, no safety checker): `from_pretrained` must be
    told they are absent, or it tries to load them."""
    return {
        name: None
        for name, value in pipeline_index(path).items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is None
    }


def read_layout(path: str) -> Layout:
    """The layout of the pipeline folder (or Hub repository) `path`, or a clear refusal of what rlfree cannot sample
    or train yet."""
    index = pipeline_index(path)
    pipeline_class = index.get("_class_name", "pipeline")
    components = {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
    }
    for layout in LAYOUTS:
        if layout.serves(pipeline_class, components):
            return layout.read(path, pipeline_class, components)
    raise StageInputError(
        f"--model_name_or_path {path}: a {pipeline_class}; rlfree supports "
        f"{', '.join(layout.name for layout in LAYOUTS)} pipelines"
    )
