"""Quality measure for patched models: perplexity on held-out tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity"]


def perplexity(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Perplexity of ``model`` on ``input_ids`` (``[batch, seq]``) in one forward pass.

    ``exp`` of the mean cross-entropy of predicting token ``t + 1`` from the logits at ``t``
    (logits and labels shifted by one, as transformers does for ``labels=``), over all
    ``batch * (seq - 1)`` predictions. The loss is computed here in float32 rather than through
    ``labels=`` so it does not depend on a model's loss hook or on its logits' dtype.
    """
    if input_ids.shape[-1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {input_ids.shape[-1]}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with torch.inference_mode():
        logits = model(input_ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    return math.exp(loss.item())
