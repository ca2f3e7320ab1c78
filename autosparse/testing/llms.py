"""Random-weight Llama models at the shapes the LLM benchmarks run: Llama-3.1-8B's attention and
MLP widths with few layers (GPU), or a tiny one (CPU smoke runs)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["llama"]


def llama(layers: int, *, tiny: bool = False, device: torch.device | str = "cuda") -> LlamaForCausalLM:
    """``layers`` decoder layers in eval mode, seeded (the same weights every call): Llama-3.1-8B-shaped
    (32 query / 8 KV heads, head_dim 128, bf16, 128K positions) or, ``tiny``, 4 / 2 heads of 32 in fp32."""
    if tiny:
        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                             attn_implementation="sdpa")
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=131072 + 1024, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.float32 if tiny else torch.bfloat16).eval()
