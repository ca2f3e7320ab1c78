"""Shared fixtures: small random-weight transformers models (plumbing only: random weights have
near-uniform attention, so sparsity quality is judged on the real SmolLM2 weights elsewhere)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@contextlib.contextmanager
def sdpa_per_layer(layers: dict, attend):
    """Within the block, ``F.scaled_dot_product_attention`` is ``attend(layer, original, *args,
    **kwargs)``: ``layer`` is the value ``layers`` maps the calling module to (hooks on its forward),
    None for a call outside them; ``original`` is torch's function. The reference models of the hook
    route (diffusers, VGGT) are built on it."""
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
