"""Which kind of model autosparse serves, and the facts about a kind that code outside ``models/``
acts on (the capture route, what the inputs are), so that no caller compares names."""

from __future__ import annotations

import enum

from torch import nn

from autosparse.models.families import structural_family

__all__ = ["ModelKind", "model_kind"]


class ModelKind(enum.Enum):
    """How autosparse serves a model, by where the model comes from; the value is the kind's name.
    A member pickles by name, so a patched model's record (``copy.deepcopy``, ``torch.save``) keeps it."""

    TRANSFORMERS = "transformers"  # a PreTrainedModel: its attention interface passes the module along
    DIFFUSERS = "diffusers"  # a ModelMixin: its attention modules call F.scaled_dot_product_attention
    MODULE = "module"  # a plain nn.Module a family recognises by its structure (VGGT): as diffusers

    @property
    def hooked(self) -> bool:
        """Served through hooks on its attention modules, with each call's context (token geometry,
        denoising step) read by the model's family; else through transformers' AttentionInterface."""
        return self is not ModelKind.TRANSFORMERS

    @property
    def token_ids(self) -> bool:
        """Its inputs are token ids of a language model (validation measures perplexity, calibration
        counts tokens); else the model's output is compared as a tensor (a diffusion transformer's)."""
        return self is ModelKind.TRANSFORMERS


def model_kind(model: nn.Module) -> ModelKind:
    """The kind of ``model``; TypeError for a model autosparse cannot serve."""
    if hasattr(model, "set_attn_implementation") and hasattr(model, "config"):
        return ModelKind.TRANSFORMERS
    if _is_diffusers_model(model):
        return ModelKind.DIFFUSERS
    if structural_family(model) is not None:
        return ModelKind.MODULE
    raise TypeError(
        f"autosparse patches transformers models (PreTrainedModel), diffusers models (ModelMixin, e.g. "
        f"WanTransformer3DModel or pipeline.transformer) and modules of a known structure (\"module\": VGGT, "
        f"or its aggregator); got {type(model).__name__}"
    )


def _is_diffusers_model(model: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(model, ModelMixin)
