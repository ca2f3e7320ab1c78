"""Find the scaled-dot-product attention calls of a Dynamo graph; replace them with autosparse's op.

Dynamo records every ``F.scaled_dot_product_attention`` call as one ``call_function`` node whose
target is ``torch._C._nn.scaled_dot_product_attention``, in whichever style the model called it:
q/k/v positional (transformers, CogVideoX), as ``query=``/``key=``/``value=`` keywords (diffusers'
``dispatch_attention_fn``), or mixed. ``find_sdpa`` normalises all of them into ``SdpaCall`` with the
ids of the modules the call was made in (``nn_module_stack``, outermost first), so the backend can
name its layer. The rewrite works on the Dynamo graph, before AOT: there the call is still one node
with its boolean mask and flags (at aten level its name depends on the device and masks turn additive).
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autosparse.runtime import empty_output

__all__ = ["SdpaCall", "find_sdpa", "rewrite_sdpa"]

log = logging.getLogger("autosparse")

SDPA = torch._C._nn.scaled_dot_product_attention


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """The argument names and defaults of ``F.scaled_dot_product_attention``, to bind calls with."""


_SIGNATURE = inspect.signature(_sdpa_signature)


@dataclass(frozen=True)
class SdpaCall:
    """One SDPA node with its arguments by name (graph nodes or constants) and its module stack."""

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    dropout_p: Any  # a float, or a node when it is computed in the graph
    is_causal: Any
    scale: Any
    enable_gqa: Any
    module_ids: tuple[int, ...]


def find_sdpa(gm: fx.GraphModule) -> list[SdpaCall]:
    """Every SDPA call of ``gm`` in graph order, arguments normalised."""
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        stack = node.meta.get("nn_module_stack") or {}
        calls.append(SdpaCall(node, module_ids=tuple(int(key) for key in stack if str(key).isdigit()),
                              **bound.arguments))
    return calls


def rewrite_sdpa(gm: fx.GraphModule, anchors: Mapping[SdpaCall, fx.Node]) -> int:
    """Replace each call with ``torch.ops.autosparse.attention(q, k, v, layer_of(anchor), attn_mask,
    is_causal, scale)``; returns the number replaced.

    ``anchor`` is a graph value holding one parameter of the call's attention module (a placeholder,
    or a ``get_attr`` when Dynamo keeps parameters as attributes): ``torch.ops.autosparse.layer_of``
    names the layer from it at run time, so a graph reused for every repeated block serves each
    block as itself.
    """
    attention, layer_of = torch.ops.autosparse.attention.default, torch.ops.autosparse.layer_of.default
    for call, anchor in anchors.items():
        key, value = unexpanded_kv(call.key), unexpanded_kv(call.value)
        if (key is call.key) != (value is call.value):  # both or neither
            key, value = call.key, call.value
        with gm.graph.inserting_before(call.node):
            layer = gm.graph.call_function(layer_of, (anchor,))
            new = gm.graph.call_function(attention, (call.query, key, value, layer, call.attn_mask,
                                                     call.is_causal, call.scale))
        new.meta = {k: v for k, v in call.node.meta.items() if k != "example_value"}
        example = _example_output(call)
        if example is not None:
            new.meta["example_value"] = example
        call.node.replace_all_uses_with(new)
        gm.graph.erase_node(call.node)
    if anchors:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.debug("autosparse: %d SDPA call(s) routed to torch.ops.autosparse.attention", len(anchors))
    return len(anchors)


_NEW_HEAD_AXIS = (slice(None), slice(None), None, slice(None), slice(None))


def unexpanded_kv(node: fx.Node) -> fx.Node:
    """The KV-head tensor behind transformers' ``repeat_kv`` (``x[:, :, None].expand(b, kv, n, s, d)
    .reshape(b, kv * n, s, d)``, which models run before SDPA when a mask keeps them off SDPA's GQA),
    else ``node``. Query head h reads KV head h // n there, as in the op, so the op can take ``x``:
    the copy disappears from the graph and the kernel shares K/V across a group again."""
    if not (node.op == "call_method" and node.target == "reshape"):
        return node
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return node
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem
            and index.args[1] == _NEW_HEAD_AXIS):
        return node
    source = index.args[0]
    before, after = source.meta.get("example_value"), node.meta.get("example_value")
    if before is None or after is None or before.dim() != 4 or after.dim() != 4:
        return node
    (b, kv, s, d), (b2, heads, s2, d2) = before.shape, after.shape
    # Sizes may be symbolic: only facts known without a new guard count.
    if not all(statically_known_true(x == y) for x, y in ((b, b2), (s, s2), (d, d2), (heads % kv, 0))):
        return node
    return source


def _example_output(call: SdpaCall) -> torch.Tensor | None:
    """The op's output as a fake tensor (its strides differ from SDPA's), for passes that read it."""
    query, value = call.query.meta.get("example_value"), call.value.meta.get("example_value")
    fake_mode = getattr(query, "fake_mode", None)
    if fake_mode is None or value is None:
        return None
    with fake_mode:
        return empty_output(query, value)
