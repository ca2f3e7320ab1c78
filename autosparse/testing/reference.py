"""The dense reference attention that tests and benchmarks check autosparse against.

One oracle above the kernel: :func:`attention`, dense attention with the semantics models give it
(boolean mask, float bias, softcapping, learned sinks, GQA), computed in float64 (or a dtype the
caller picks). It is written here, apart from ``kernels/reference.py``, so that it shares no code
with what it checks: on CPU the runtime serves calls with ``kernels.reference``'s PyTorch path, and
``dense_attention`` there has the kernel's contract (boolean mask, lse) but no bias, softcap or
sinks. Kernel-level checks (``tests/test_kernels.py``, ``benchmarks/kernel_speed.py``) keep using
``kernels.reference.dense_attention``: the kernel package's own specification, importable without
autosparse.

Around it: the token masks a call means (:func:`causal_mask`, :func:`sdpa_rule`, the layout's
claim in the model's order: :func:`layout_mask`), torch's SDPA restricted to a mask
(:func:`sdpa_attention`), a second, independent oracle (:func:`flex_attention`, FlexAttention), and
the two ways to run a model with its attention replaced: :func:`sdpa_per_layer` (models that call
``F.scaled_dot_product_attention``) and :func:`attention_function` / :func:`transformers_reference`
(transformers' ``AttentionInterface``). Nothing that serves a model imports this module.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from autosparse.layout import BlockLayout, grid_order, left_padded
from autosparse.models import attention_layers
from autosparse.patterns import BlockGeometry, Pattern, TokenGeometry
from autosparse.profile import Profile

__all__ = ["attention", "attention_function", "causal_mask", "flex_attention", "in_model_order", "layout_mask",
           "sdpa_attention", "sdpa_per_layer", "sdpa_rule", "transformers_reference"]

REFERENCE = "autosparse_reference"  # the name the reference attention is registered under with transformers


# -- the oracle ------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None, *, bias: Tensor | None = None,
              scale: float | None = None, softcap: float | None = None, sinks: Tensor | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense attention computed in ``dtype``, returned in ``dtype``.

    Parameters
    ----------
    q : Tensor [B, Hq, Sq, D]
    k, v : Tensor [B, Hkv, Sk, D] and [B, Hkv, Sk, Dv], Hq % Hkv == 0: query head h reads KV head
        h // (Hq // Hkv).
    allowed : optional bool Tensor broadcastable to [B, Hq, Sq, Sk]; True = attend.
    bias : optional float Tensor broadcastable to [B, Hq, Sq, Sk], added to the scaled scores
        (torch SDPA's float ``attn_mask``).
    scale : softmax scale, default 1 / sqrt(D).
    softcap : scores become ``tanh(s / softcap) * softcap`` before bias and mask (Gemma-2).
    sinks : optional Tensor [Hq]: one more logit per head in the softmax, with no value (gpt-oss).

    A row with no allowed key gives 0. Non-finite keys and values reach only the rows that attend
    them: the contract of a block-sparse kernel, which never reads the others.
    """
    b, hq = q.shape[:2]
    if hq % k.shape[1]:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {k.shape[1]}")
    group = hq // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.to(dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype).reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    denom = p.sum(-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    if sinks is not None:
        p = p[..., :-1]
    if allowed is None or bool(torch.isfinite(v).all()):
        return (p @ v) / denom
    keep = allowed.expand(p.shape)  # 0 * inf would reach rows that never attend that value
    rows = [torch.where(keep[i, h][..., None], p[i, h][..., None] * v[i, h][None], 0.0).sum(-2)
            for i in range(p.shape[0]) for h in range(p.shape[1])]
    return torch.stack(rows).view(*p.shape[:3], v.shape[-1]) / denom


def flex_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, bias: Tensor | None = None,
                   scale: float | None = None) -> Tensor:
    """The second oracle: PyTorch FlexAttention (eager) in float64 with ``allowed`` (bool
    ``[B, H, Sq, Sk]``) as its mask_mod and ``bias`` as a score_mod; k/v one head per query head."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    b, h, sq, _ = q.shape
    sk = k.shape[2]
    allowed = allowed.expand(b, h, sq, sk).contiguous()

    def mask_mod(bi, hi, qi, ki):
        return allowed[bi, hi, qi, ki]

    full = None if bias is None else bias.double().expand(b, h, sq, sk).contiguous()

    def add_bias(score, bi, hi, qi, ki):
        return score + full[bi, hi, qi, ki]

    block_mask = create_block_mask(mask_mod, b, h, sq, sk, device=q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        return flex(q.double(), k.double(), v.double(), score_mod=None if full is None else add_bias,
                    block_mask=block_mask, scale=scale)


# -- the token masks a call means --------------------------------------------------------------------------


def causal_mask(q_len: int, kv_len: int, *, top_left: bool = False, device: torch.device | str | None = None) -> Tensor:
    """bool ``[Sq, Sk]``: key k visible to query q under the causal rule, bottom-right aligned
    (k <= q + Sk - Sq: the kernel's and transformers') or ``top_left`` (k <= q: torch SDPA's
    ``is_causal``)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(0 if top_left else kv_len - q_len)


def sdpa_rule(q_len: int, kv_len: int, attn_mask: Tensor | None = None, is_causal: bool = False,
              device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
    """(allowed, bias), broadcastable to ``[..., Sq, Sk]``: what torch's SDPA means by these
    arguments. ``is_causal`` is top-left and combines with a boolean ``attn_mask``; a float
    ``attn_mask`` is a bias on the scaled scores."""
    allowed = (causal_mask(q_len, kv_len, top_left=True, device=device) if is_causal
               else torch.ones(q_len, kv_len, dtype=torch.bool, device=device))
    if attn_mask is None:
        return allowed, None
    if attn_mask.dtype == torch.bool:
        return allowed & attn_mask, None
    return allowed, attn_mask


def in_model_order(mask: Tensor, tokens: TokenGeometry | None) -> Tensor:
    """A square token mask ``[..., S, S]`` in the kernel's order (what ``BlockLayout.to_dense()``
    gives) put in the model's order: differs where ``tokens`` permutes the grid into tiles."""
    if tokens is None or not tokens.permuted:
        return mask
    inverse = tokens.inverse_permutation(mask.device)
    return mask.index_select(-2, inverse).index_select(-1, inverse)


def layout_mask(patterns: Sequence[Pattern], tokens: TokenGeometry | None, q_len: int, kv_len: int,
                block_size: tuple[int, int], causal: bool = False) -> Tensor:
    """bool ``[H, Sq, Sk]`` in the model's order: the token mask the layout of one call claims, for
    per-head ``patterns`` over ``tokens`` (None: a 1-D sequence), grid patterns in the token order
    ``layout.grid_order`` picks (as the runtime lays them out), text dense."""
    if tokens is not None and any(p.needs_grid for p in patterns):
        tokens = grid_order(patterns, tokens, *block_size)
    geometry = BlockGeometry(q_len, kv_len, *block_size, causal, tokens)
    return in_model_order(BlockLayout.from_patterns(patterns, geometry).to_dense(), tokens)


def sdpa_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   is_causal: bool = False, scale: float | None = None, *, allowed: Tensor | None = None,
                   dtype: torch.dtype = torch.float64) -> Tensor:
    """torch's SDPA on these arguments (GQA by head mapping), computed densely in ``dtype`` and
    restricted to ``allowed`` (bool, broadcastable to ``[B, H, Sq, Sk]``); in query's dtype."""
    rule, bias = sdpa_rule(query.shape[-2], key.shape[-2], attn_mask, is_causal, query.device)
    if allowed is not None:
        rule = rule & allowed
    return attention(query, key, value, rule, bias=bias, scale=scale, dtype=dtype).to(query.dtype)


# -- a model with its attention replaced ------------------------------------------------------------------


@contextlib.contextmanager
def sdpa_per_layer(layers: Mapping[nn.Module, Any], attend: Callable[..., Tensor]) -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is ``attend(layer, original, *args,
    **kwargs)``: ``layer`` is the value ``layers`` maps the calling module to (hooks on its forward),
    None for a call outside them; ``original`` is torch's function. The reference models of the
    hook route (diffusers, VGGT) are built on it."""
    current, original = [], F.scaled_dot_product_attention

    def enter(module, args):
        current.append(layers[module])

    def leave(module, args, output):
        current.pop()

    def sdpa(*args, **kwargs):
        return attend(current[-1] if current else None, original, *args, **kwargs)

    handles = [hook for module in layers for hook in (module.register_forward_pre_hook(enter),
                                                      module.register_forward_hook(leave))]
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def attention_function(model: nn.Module, attend: Callable[..., tuple[Tensor, Any]]) -> Iterator[None]:
    """Within the block, the transformers ``model`` calls ``attend`` (transformers' attention-function
    signature) for every attention call, with torch's SDPA mask function (without a registered mask
    function transformers passes no padding mask); its attention implementation is restored after."""
    AttentionInterface.register(REFERENCE, attend)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def transformers_reference(model: nn.Module, profile: Profile, attention_mask: Tensor | None = None, *,
                           layers: set[nn.Module] | None = None,
                           dtype: torch.dtype = torch.float64) -> contextlib.AbstractContextManager[None]:
    """Within the block, every attention call of the transformers ``model`` is :func:`attention` in
    ``dtype`` with the model's own semantics (its mask, else the module's causality; softcapping;
    learned sinks) and, in the attention layers of ``profile`` (only those in ``layers`` if given),
    the layout's token mask (geometry: the module's causality, bottom-right, as the op builds it;
    with the padding ``attention_mask`` [B, S] of the forward, causal rows of a left-padded sample
    count the pattern from their first real token, as the runtime serves them)."""
    names = {layer.module: layer.name for layer in attention_layers(model)
             if layers is None or layer.module in layers}
    first = None if attention_mask is None else attention_mask.int().argmax(1).tolist()

    def attend(module, query, key, value, mask, dropout=0.0, scaling=None, softcap=None, s_aux=None,
               is_causal=None, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        if mask is None:
            causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
            allowed = (causal_mask(q_len, kv_len, device=query.device) if causal
                       else torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device))[None, None]
        elif mask.dtype == torch.bool:
            allowed = mask
        else:  # additive: blocked where transformers puts the dtype's minimum
            allowed = mask > torch.finfo(mask.dtype).min / 2
        if module in names:
            causal = bool(getattr(module, "is_causal", True))
            geometry = BlockGeometry(q_len, kv_len, *profile.block_size, causal)
            patterns = profile.patterns(names[module], query.shape[1])
            claimed = BlockLayout.from_patterns(patterns, geometry, query.device).to_dense()
            square = first is not None and causal and q_len == kv_len
            allowed = allowed & (left_padded(claimed, first) if square else claimed[None])
        out = attention(query, key, value, allowed, scale=scaling, softcap=softcap, sinks=s_aux, dtype=dtype)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention_function(model, attend)
