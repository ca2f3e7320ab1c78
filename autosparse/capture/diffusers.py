"""autosparse as a diffusers attention backend: ``transformer.set_attention_backend("autosparse")``
on a patched model, also under ``transformer.enable_parallelism(...)`` (Ulysses, ring, both).

The hook route (``capture.hooks``) stays the default for diffusers models: it serves every
processor, including those that call ``F.scaled_dot_product_attention`` themselves (CogVideoX,
diffusers' older ``AttnProcessor2_0``), and uses no private diffusers API; under Ulysses it already
sees each rank's heads over the whole sequence. Ring attention needs the backend: diffusers calls
the backend's forward op once per key chunk and merges by log-sum-exp, which SDPA does not return.
The backend still learns its layer from the hooks' pre-hooks (``served_layer``): the dispatcher
passes no module.

Registering needs a private step: diffusers names its backends by a closed enum
(``AttentionBackendName``), which ``set_attention_backend`` and the dispatcher both check names
against. ``_backend_name`` adds the member the way ``Enum`` stores its own; ``tests/test_parallel.py``
checks every place diffusers reads it, so a change in diffusers (or Python) fails there, not in use.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from autosparse.capture.common import sdpa_reason
from autosparse.capture.hooks import scaled_dot_product_attention, served_layer
from autosparse.runtime import plan_of
from autosparse.runtime.ring import RingStep, dense_step, serve_ring

__all__ = ["BACKEND", "autosparse_attention", "register_diffusers"]

BACKEND = "autosparse"
_STEP_ATTR = "_autosparse_ring_step"  # on diffusers' autograd ctx: which ring step the forward op is at


def register_diffusers() -> None:
    """Make ``"autosparse"`` a diffusers attention backend that supports context parallelism
    (once per process; never removed, like the transformers registration)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = _backend_name()
    if name not in _AttentionBackendRegistry._backends:
        _AttentionBackendRegistry.register(name, supports_context_parallel=True)(autosparse_attention)


def _backend_name() -> enum.Enum:
    """``AttentionBackendName``'s member for ``BACKEND``, added if missing (a ``str`` enum: the
    member is the string, with the name and value ``Enum`` gives its own)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    member = AttentionBackendName._value2member_map_.get(BACKEND)
    if member is None:
        member = str.__new__(AttentionBackendName, BACKEND)
        member._name_, member._value_ = BACKEND.upper(), BACKEND
        AttentionBackendName._member_map_[member._name_] = member
        AttentionBackendName._value2member_map_[BACKEND] = member
        AttentionBackendName._member_names_.append(member._name_)
    return member


def autosparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                         scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                         _parallel_config: Any = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The registered backend, in diffusers' layout: q/k/v ``[B, S, H, D]``, output ``[B, S, H, D]``
    (and lse ``[B, S, H]``). A served module's call is served as the hook route serves it; any
    other call is torch's SDPA. Under context parallelism diffusers' templated attention runs it."""
    if attn_mask is not None and attn_mask.dim() == 2 and tuple(attn_mask.shape) == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]  # key padding [B, Sk], as diffusers' native backend reads it
    if _parallel_config is None:
        return _forward_op(None, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse)
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    return _templated_context_parallel_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                 return_lse, forward_op=_forward_op, backward_op=_backward_op,
                                                 _parallel_config=_parallel_config)


def _forward_op(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                _save_ctx: bool = True, _parallel_config: Any = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """diffusers' forward-op signature: under Ulysses one call over this rank's heads and the whole
    sequence; under ring one call per key chunk, with ``return_lse``."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if not return_lse:
        return scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa).transpose(1, 2)
    reason = "attn_mask (diffusers' ring passes one mask with every key chunk)" if attn_mask is not None else None
    reason = reason or ("is_causal" if is_causal else None) or sdpa_reason(q, k, v, dropout_p, scale, enable_gqa)
    if reason is not None:
        raise NotImplementedError(f"the autosparse attention backend cannot return the lse of this call: {reason}")
    step = _ring_step(ctx, _save_ctx, _parallel_config)
    layer = served_layer()
    out, lse = dense_step(q, k, v, scale) if layer is None else serve_ring(plan_of(layer), q, k, v, scale, step)
    return out.transpose(1, 2), lse.transpose(1, 2)


def _ring_step(ctx: Any, first: bool, parallel_config: Any) -> RingStep:
    """The key chunk of this forward-op call. diffusers' ring loop (``TemplatedRingAttention``)
    calls it first with the rank's own keys (``_save_ctx=True``), then with the next ranks' in ring
    order; the step is counted on its autograd ``ctx``. Without a ring: one step, all keys."""
    config = getattr(parallel_config, "context_parallel_config", None)
    if ctx is None or config is None or config.ring_degree == 1:
        return RingStep(1, 0, 0)
    offset = 0 if first else getattr(ctx, _STEP_ATTR) + 1
    setattr(ctx, _STEP_ATTR, offset)
    rank = config._ring_local_rank
    return RingStep(config.ring_degree, rank, (rank + offset) % config.ring_degree)


def _backward_op(ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
    raise NotImplementedError("the autosparse attention backend has no backward (its kernel is forward-only); "
                              "train with another attention backend")
