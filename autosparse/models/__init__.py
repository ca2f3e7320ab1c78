"""What a model is to autosparse: its kind (which capture route serves it), its attention modules
in call order, its signature (what a profile is checked against), and its family (the structure and
token geometry of a model without a registry, e.g. VGGT)."""

from autosparse.models.families import FAMILIES, Family, family_of, structural_family, vggt_aggregator
from autosparse.models.layers import (AttentionLayer, attention_layers, attention_structure, library, model_signature,
                                      signature_fingerprint)

__all__ = ["FAMILIES", "AttentionLayer", "Family", "attention_layers", "attention_structure", "family_of", "library",
           "model_signature", "signature_fingerprint", "structural_family", "vggt_aggregator"]
