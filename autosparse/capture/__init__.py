"""Capture: route a model's attention calls to ``torch.ops.autosparse.attention`` with their layer.

Two routes, one per way models call attention: ``transformers`` (its ``AttentionInterface``) and
``hooks`` (diffusers models and structural families: module hooks around
``F.scaled_dot_product_attention``); ``diffusers`` registers autosparse as a diffusers attention
backend beside the hooks (what ring context parallelism needs). The compiled-graph route is ``autosparse.backend`` with
``autosparse.passes``. Every call keeps the meaning its caller gave it: what the op cannot take as
SDPA (or transformers' attention function) defines it runs there, unchanged, and is counted.
"""

from autosparse.capture.common import GRAD_REASON, IMPLEMENTATION, LAYER_ATTR, needs_grad, sdpa_reason
from autosparse.capture.diffusers import BACKEND, autosparse_attention, register_diffusers
from autosparse.capture.hooks import (CallReader, attach_hooks, count_hooked, detach_hooks, model_forward,
                                      scaled_dot_product_attention, served_layer)
from autosparse.capture.hooks import _current  # noqa: F401  (the thread's published layer: tests and repros read it)
from autosparse.capture.transformers import (FALLBACK_IMPLEMENTATIONS, PLAIN_KWARGS, attach_transformers,
                                             detach_transformers, model_attention, register_transformers,
                                             transformers_attention)

__all__ = ["BACKEND", "FALLBACK_IMPLEMENTATIONS", "GRAD_REASON", "IMPLEMENTATION", "LAYER_ATTR", "PLAIN_KWARGS",
           "CallReader", "attach_hooks", "attach_transformers", "autosparse_attention", "count_hooked", "detach_hooks",
           "detach_transformers", "model_attention", "model_forward", "needs_grad", "register_diffusers",
           "register_transformers", "scaled_dot_product_attention", "sdpa_reason", "served_layer",
           "transformers_attention"]
