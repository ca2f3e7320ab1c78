"""What a model is to autosparse: its kind (``ModelKind``: which capture route serves it), its
attention modules in call order and what their calls are like, its signature (what a profile is
checked against), and its family (the structure and token geometry of a model without a registry,
e.g. VGGT)."""

from autosparse.models.families import FAMILIES, Family, family_of, structural_family, vggt_aggregator
from autosparse.models.kind import ModelKind, model_kind
from autosparse.models.layers import (AttentionLayer, CallTraits, attention_layers, attention_structure, call_traits,
                                      model_signature, signature_fingerprint)

__all__ = ["FAMILIES", "AttentionLayer", "CallTraits", "Family", "ModelKind", "attention_layers", "attention_structure",
           "call_traits", "family_of", "model_kind", "model_signature", "signature_fingerprint", "structural_family",
           "vggt_aggregator"]
