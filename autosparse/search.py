"""The offline search: calibrate on real inputs, pick per head the cheapest pattern under a budget.

Calibration runs the model once per input with a capturing attention function (dense SDPA for the
output, so the forward is unchanged) that, for every layer, scores each candidate pattern on sampled
query rows: error = ‖O_pattern − O_dense‖ / ‖O_dense‖ per head, accumulated over inputs. Exact dense
rows are cheap, and a pattern's output follows from the dense probabilities renormalised over its
keys, so all candidates cost one matrix product each. Cost is the number of key blocks the pattern
computes at the calibration shape (the CPU model of kernel time; measured timings come later).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autosparse.models import AttentionLayer, attention_layers, model_signature
from autosparse.patterns import BlockGeometry, Dense, Pattern, SinkLocal, Window
from autosparse.profile import DEFAULT_BLOCK_SIZE, LayerProfile, Profile

__all__ = ["SearchConfig", "candidate_patterns", "search_profile"]

_CAPTURE = "autosparse_calibrate"
_OBSERVER_ATTR = "_autosparse_observer"


@dataclass(frozen=True)
class SearchConfig:
    """Parameters:
        budget: largest accepted relative output error per head on the sampled rows.
        block_size: (q_block, kv_block) of the profile.
        windows: local window sizes (tokens) tried, each alone and with ``sinks`` sink tokens.
        sinks: sink tokens of the ``sink_local`` candidates.
        query_rows: query rows sampled per layer call to measure errors.
        seed: seeds the row sampling, so a search is reproducible.
    """

    budget: float = 0.05
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    windows: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    sinks: int = 4
    query_rows: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"SearchConfig.budget must be in (0, 1), got {self.budget!r}")
        if self.query_rows < 1:
            raise ValueError(f"SearchConfig.query_rows must be >= 1, got {self.query_rows!r}")


def candidate_patterns(config: SearchConfig) -> list[Pattern]:
    """The patterns tried for every head; Dense is always last and always qualifies."""
    candidates: list[Pattern] = []
    for window in config.windows:
        candidates += [Window(window), SinkLocal(config.sinks, window)]
    return candidates + [Dense()]


class _LayerScores:
    """Per head and candidate: squared error and squared reference norm, summed over calls."""

    def __init__(self, num_heads: int, num_candidates: int) -> None:
        self.err_sq = torch.zeros(num_heads, num_candidates, dtype=torch.float64)
        self.ref_sq = torch.zeros(num_heads, dtype=torch.float64)
        self.blocks = torch.zeros(num_candidates, dtype=torch.float64)

    def relative_error(self) -> torch.Tensor:
        return (self.err_sq / self.ref_sq.clamp_min(1e-30)[:, None]).sqrt()


class _Calibrator:
    def __init__(self, config: SearchConfig, layers: Sequence[AttentionLayer], progress: tqdm | None) -> None:
        self.config = config
        self.candidates = candidate_patterns(config)
        self.scores = {layer.name: _LayerScores(layer.num_heads, len(self.candidates)) for layer in layers}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.progress = progress

    @torch.no_grad()
    def observe(self, name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                scale: float) -> None:
        """q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` of one layer call (no padding)."""
        heads, q_len = query.shape[1:3]
        kv_len = key.shape[2]
        geometry = BlockGeometry(q_len, kv_len, *self.config.block_size, causal)
        rows = torch.randperm(q_len, generator=self.generator)[: self.config.query_rows].sort().values
        group = heads // key.shape[1]
        q = query[:, :, rows].float()
        k = key.float().repeat_interleave(group, dim=1)
        v = value.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("bhrd,bhkd->bhrk", q, k) * scale  # [B, H, R, Sk]
        positions = rows + (kv_len - q_len)
        keys = torch.arange(kv_len)
        visible = keys[None, :] <= positions[:, None] if causal else torch.ones(len(rows), kv_len, dtype=torch.bool)
        probs = torch.softmax(scores.masked_fill(~visible.to(scores.device), float("-inf")), dim=-1)
        # Patterns keep or drop whole key blocks, so per-block partial outputs and masses make
        # every candidate one small contraction: O = sum_j keep_j O_j / sum_j keep_j mass_j.
        num_kv, kv_block = geometry.num_kv_blocks, geometry.kv_block
        pad = num_kv * kv_block - kv_len
        probs_blocks = F.pad(probs, (0, pad)).unflatten(-1, (num_kv, kv_block))  # [B, H, R, NK, kb]
        v_blocks = F.pad(v, (0, 0, 0, pad)).unflatten(2, (num_kv, kv_block))  # [B, H, NK, kb, D]
        block_out = torch.einsum("bhrjk,bhjkd->bhrjd", probs_blocks, v_blocks)
        block_mass = probs_blocks.sum(-1)  # [B, H, R, NK]
        dense = block_out.sum(3)
        layer = self.scores[name]
        layer.ref_sq += dense.double().square().sum(dim=(0, 2, 3)).cpu()
        q_blocks = rows // geometry.q_block
        dense_blocks = float(geometry.reachable().sum())
        for c, pattern in enumerate(self.candidates):
            block_mask = pattern.block_mask(geometry)
            blocks = float(block_mask.sum())
            layer.blocks[c] += blocks
            if blocks == dense_blocks:
                continue  # computes every block: exactly dense, no error
            keep = block_mask[q_blocks].to(probs)  # [R, NK]
            approx = torch.einsum("bhrjd,rj->bhrd", block_out, keep)
            approx = approx / torch.einsum("bhrj,rj->bhr", block_mass, keep).clamp_min(1e-30)[..., None]
            layer.err_sq[:, c] += (approx - dense).double().square().sum(dim=(0, 2, 3)).cpu()
        if self.progress is not None:
            self.progress.update(1)

    def choose(self, layer: AttentionLayer) -> LayerProfile:
        """Per head: the candidate with the fewest key blocks whose error is within budget."""
        scores = self.scores[layer.name]
        errors = scores.relative_error()
        dense_blocks = float(scores.blocks[-1])
        if dense_blocks == 0:
            raise RuntimeError(f"layer {layer.name} was never called during calibration")
        order = sorted(range(len(self.candidates)), key=lambda c: (float(scores.blocks[c]), c))
        heads, measured = [], []
        for h in range(layer.num_heads):
            for c in order:
                # A pattern that computes every block is dense, and dense SDPA runs it faster.
                if float(errors[h, c]) <= self.config.budget or float(scores.blocks[c]) >= dense_blocks:
                    break
            chosen = self.candidates[c] if float(scores.blocks[c]) < dense_blocks else Dense()
            heads.append(chosen)
            error = 0.0 if chosen.is_dense else float(errors[h, c])
            density = 1.0 if chosen.is_dense else float(scores.blocks[c]) / dense_blocks
            measured.append({"error": round(error, 6), "density": round(density, 6)})
        return LayerProfile(layer.index, layer.num_heads, tuple(heads), tuple(measured))


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Dense SDPA (the forward is unchanged) plus a look at q/k/v for the calibrator."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observer = getattr(module, _OBSERVER_ATTR, None)
    if observer is not None:
        if attention_mask is not None:
            raise ValueError("calibration inputs must be unpadded single sequences (got an attention mask)")
        calibrator, name = observer
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        calibrator.observe(name, query, key, value, causal, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def search_profile(model: nn.Module, inputs: Iterable[torch.Tensor], config: SearchConfig = SearchConfig(), *,
                   progress: bool = True) -> Profile:
    """Calibrate ``model`` on ``inputs`` (LongTensors ``[1, S]`` of token ids) and return the profile.

    The model runs unchanged (dense); its attention implementation is restored afterwards.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    inputs = list(inputs)
    if not inputs:
        raise ValueError("search_profile needs at least one calibration input")
    layers = attention_layers(model)
    bar = tqdm(total=len(inputs) * len(layers), desc="calibrating", unit="layer", disable=not progress)
    calibrator = _Calibrator(config, layers, bar)
    AttentionInterface.register(_CAPTURE, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    original = model.config._attn_implementation
    started = time.perf_counter()
    try:
        for layer in layers:
            setattr(layer.module, _OBSERVER_ATTR, (calibrator, layer.name))
        model.set_attn_implementation(_CAPTURE)
        device = next(model.parameters()).device
        with torch.inference_mode():
            for input_ids in inputs:
                model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        model.set_attn_implementation(original)
        for layer in layers:
            if hasattr(layer.module, _OBSERVER_ATTR):
                delattr(layer.module, _OBSERVER_ATTR)
        bar.close()
    profile_layers = {layer.name: calibrator.choose(layer) for layer in layers}
    return Profile(
        model=model_signature(model),
        layers=profile_layers,
        block_size=config.block_size,
        search={
            "method": "calibrated",
            "budget": config.budget,
            "error": "relative L2 error of the attention output per head on sampled query rows",
            "cost": "key blocks computed at the calibration shape",
            "candidates": [p.short_str() for p in calibrator.candidates],
            "calibration": {
                "inputs": len(inputs),
                "tokens": int(sum(x.shape[-1] for x in inputs)),
                "query_rows": config.query_rows,
                "seed": config.seed,
                "seconds": round(time.perf_counter() - started, 2),
            },
        },
    )
