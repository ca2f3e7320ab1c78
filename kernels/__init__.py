"""Kernels of autosparse: a block-sparse flash-attention forward (Triton) and its PyTorch references.

``block_sparse_attention(q, k, v, kv_indices, kv_counts, *, q_block, kv_block, causal, ...)`` runs the
Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), else the block-sparse PyTorch path;
``supports(...)`` says why a call cannot be served; ``torch.ops.autosparse.block_sparse_attention`` is
the same function as an opaque custom op. ``reference`` holds the dense oracle and layout helpers;
``schedule`` the program order; ``tile_config`` the launch parameters; ``backends`` who runs a
prepared call (Triton, PyTorch, FlashAttention-4), chosen by measurement; ``tuning`` times tile configs
on this GPU and caches the fastest (``autosparse tune``) through ``cache``.

A leaf: these modules import torch, triton and the standard library, nothing of autosparse
(``tests/test_imports.py``).
"""

if __name__ == "kernels":
    # This folder is ``autosparse.kernels``. It is imported as a top-level ``kernels`` only when the
    # repository root is on sys.path (``python -m pytest``, ``python`` started there), where it would
    # shadow the installed package of that name (Hugging Face's ``kernels``, which transformers
    # imports): hand the name to the installed package. Without one, the name is what a plain folder
    # would give, an empty namespace package (no ``__file__``), which is how transformers recognises
    # a folder that shadows nothing.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds at its end
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    from . import backends, tuning
    from .block_sparse_op import KernelCall, block_sparse_attention, block_sparse_attention_op, call_reason, supports
    from .reference import block_sparse_attention_torch, dense_attention, layout_mask
    from .schedule import row_schedule
    from .tile_config import TileConfig, default_config

    __all__ = [
        "KernelCall",
        "block_sparse_attention",
        "block_sparse_attention_op",
        "call_reason",
        "supports",
        "TileConfig",
        "default_config",
        "row_schedule",
        "tuning",
        "backends",
        "block_sparse_attention_torch",
        "dense_attention",
        "layout_mask",
    ]
