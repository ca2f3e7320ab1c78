"""Shared fixtures: small random-weight transformers models (plumbing only: random weights have
near-uniform attention, so sparsity quality is judged on the real SmolLM2 weights elsewhere)."""

import pytest
import torch
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
