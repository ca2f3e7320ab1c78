"""The offline search: calibrate on real inputs, pick per head the cheapest pattern under a budget.

Calibration runs the model patched with a dense profile, so every attention call goes through the
same capture as ``patch_model`` (transformers and diffusers models, with their token geometry and
denoising step) and runs dense, unchanged; an observer on the op scores, for every layer, each
candidate pattern on sampled query rows: error = ‖O_pattern − O_dense‖ / ‖O_dense‖ per head,
accumulated over calls. Exact dense rows are cheap, and a pattern's output follows from the dense
probabilities renormalised over its key blocks, so all candidates cost one matrix product each.
Cost is the kernel's time relative to dense SDPA, measured on the GPU and cached (``autosparse.search.cost``;
on a CPU, the key blocks computed). The scores of each input are kept apart and added up in input
order at the end, so a calibration split over processes (``autosparse.search.distributed``) or
resumed from a checkpoint makes the sums, bit for bit, of one process running every input.

Candidates: for a 1-D sequence (LLMs), windows and sinks + windows of ``SearchConfig.windows``; for
a diffusion transformer's token grid, tile-stepped neighborhoods (``structural.tile_window``) at the
block densities of ``SearchConfig.densities`` (video also: spatial, temporal, and the smallest
neighborhood plus the first frame), scored in the tile order the kernel runs them in. With
``SearchConfig.dynamic``, 1-D calls also try ``block_topk``/``block_cdf``, scored on each call's own
estimate. Dense always qualifies.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autosparse.search.cost import LayerShape, relative_costs
from autosparse.search.distributed import Share
from autosparse.patterns.dynamic import BlockCdf, BlockTopK, VerticalSlash, key_tiles
from autosparse.patterns.grid import Spatial, Stripes, Temporal
from autosparse.layout import block_mask, grid_order
from autosparse.models import AttentionLayer, attention_layers, model_kind, model_signature
from autosparse.patterns.basic import BlockGeometry, Dense, Pattern, SinkLocal, Union, Window
from autosparse.profile import DEFAULT_BLOCK_SIZE, LayerProfile, Profile, StepRange
from autosparse.patterns.geometry import TokenGeometry

# The token order grid candidates are scored in, recorded in the profiles the search makes
# (``Profile.token_order``), so the runtime lays them out in that order too.
SEARCH_ORDER = "tile"

__all__ = ["Calibration", "InputRunner", "SearchConfig", "calibrate", "candidate_patterns", "output_tensor",
           "record_inputs", "run_model", "search_profile", "widen_span", "window_density"]


@dataclass(frozen=True)
class SearchConfig:
    """Parameters:
        budget: largest accepted relative output error per head on the sampled rows.
        block_size: (q_block, kv_block) of the profile.
        windows: local window sizes (tokens) tried, each alone and with ``sinks`` sink tokens.
        sinks: sink tokens of the ``sink_local`` candidates.
        densities: token grids (diffusion transformers): a tile-stepped neighborhood is tried at
            each of these block densities.
        dense_steps: diffusion: the first denoising steps run dense in the profile and are not
            calibrated (they fix the image's layout and are the most sensitive to sparsity).
        step_ranges: diffusion: boundaries that split the later steps into ranges, each chosen
            on its own calibration calls (``(20, 35)``: ``[dense_steps, 20)``, ``[20, 35)``,
            ``[35, end)``); a range where every head stays dense becomes a dense range.
        query_rows: query rows sampled per layer call to measure errors.
        seed: seeds the row sampling, so a search is reproducible: input i's rows come from
            (seed, i), the same whichever process calibrates it, after whichever inputs.
        cost: ``"auto"``: kernel time measured on this GPU relative to dense SDPA (``autosparse.search.cost``;
            key blocks on a CPU); ``"blocks"``: always key blocks.
        dynamic: 1-D sequences (LLMs): also try the dynamic kinds (``block_topk`` k of
            ``DYNAMIC_TOPK``, ``block_cdf`` mass of ``DYNAMIC_MASS``, and for causal attention
            ``vertical_slash`` of ``DYNAMIC_VERTICAL_SLASH``), scored on each call's own estimate
            (key blocks and gathered columns, as the kernel visits them); their cost is the key
            tiles they visit over dense attention's (the estimate's time not counted).
    """

    budget: float = 0.05
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    # Steps of ~1.5x: between powers of two a head often fits (SmolLM2: 0.457 vs 0.471 density at
    # the same held-out perplexity; benchmarks/NOTES.md run 23).
    windows: tuple[int, ...] = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
    sinks: int = 4
    densities: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    dense_steps: int = 0
    step_ranges: tuple[int, ...] = ()
    query_rows: int = 256
    seed: int = 0
    cost: str = "auto"
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"SearchConfig.budget must be in (0, 1), got {self.budget!r}")
        if self.query_rows < 1:
            raise ValueError(f"SearchConfig.query_rows must be >= 1, got {self.query_rows!r}")
        if self.cost not in ("auto", "blocks"):
            raise ValueError(f"SearchConfig.cost must be 'auto' or 'blocks', got {self.cost!r}")
        bounds = (self.dense_steps, *self.step_ranges)
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"SearchConfig.step_ranges must rise above dense_steps={self.dense_steps}, "
                             f"got {self.step_ranges}")

    def range_of(self, step: int | None) -> int:
        """Index of the step range holding ``step`` (None, an LLM call: the last one)."""
        if step is None:
            return len(self.step_ranges)
        return sum(step >= b for b in self.step_ranges)


DYNAMIC_TOPK = (4, 8, 16, 32, 64)
DYNAMIC_MASS = (0.8, 0.9, 0.95)
# (vertical, slash, mass): fixed counts at a few scales, and MInference's counts thinned by mass.
DYNAMIC_VERTICAL_SLASH = ((64, 512, None), (128, 1024, None), (256, 2048, None), (1000, 6096, None),
                          (1000, 6096, 0.9), (1000, 6096, 0.95))


def candidate_patterns(config: SearchConfig, tokens: TokenGeometry | None = None) -> list[Pattern]:
    """The patterns tried for every head (on ``tokens``' grid, if given); Dense is always last and
    always qualifies."""
    from autosparse.search.structural import tile_window

    dynamic = ([BlockTopK(k) for k in DYNAMIC_TOPK] + [BlockCdf(m) for m in DYNAMIC_MASS]
               + [VerticalSlash(v, s, m) for v, s, m in DYNAMIC_VERTICAL_SLASH]) if config.dynamic else []
    candidates: list[Pattern] = []
    if tokens is None:
        for window in config.windows:
            candidates += [Window(window), SinkLocal(config.sinks, window)]
        return candidates + dynamic + [Dense()]
    # A token grid is scored in tile order, where the runtime estimates a dynamic pattern only if
    # its layer also has grid patterns: dynamic kinds are not offered there.
    for density in config.densities:
        try:
            pattern, _ = tile_window(tokens, density, block_size=config.block_size)
        except ValueError:  # even one tile per dim is denser than this
            continue
        if pattern not in candidates:
            candidates.append(pattern)
    if len(tokens.grid) == 3 and candidates:
        # Video: the spatial and temporal heads of Sparse VideoGen, and the smallest neighborhood
        # plus the first frame (a stripe every query sees: heads that anchor on it).
        candidates += [Spatial(1), Temporal((1, 1)), Union((candidates[0], Stripes(0, (0,))))]
    return candidates + [Dense()]


class _LayerScores:
    """Per head and candidate: squared error, key blocks (summed over calls; a dynamic candidate's
    differ per head and call); per head the squared reference norm; the layer's shape at its first
    call, where its static candidates' cost is measured (``_Calibrator.costs``)."""

    def __init__(self, num_heads: int, num_candidates: int, shape: LayerShape) -> None:
        self.err_sq = torch.zeros(num_heads, num_candidates, dtype=torch.float64)
        self.ref_sq = torch.zeros(num_heads, dtype=torch.float64)
        self.blocks = torch.zeros(num_heads, num_candidates, dtype=torch.float64)
        self.shape = shape

    def add(self, later: _LayerScores) -> None:
        """Add the scores of later calls (the first call's shape stays)."""
        self.err_sq += later.err_sq
        self.ref_sq += later.ref_sq
        self.blocks += later.blocks

    def density(self) -> torch.Tensor:
        """``[H, C]``: key blocks over dense attention's (Dense is the last candidate)."""
        return self.blocks / self.blocks[:, -1:].clamp_min(1e-30)

    @staticmethod
    def head_costs(density: torch.Tensor, cost: list[float | None]) -> torch.Tensor:
        """``[H, C]``: each candidate's cost for each head, relative to dense: ``cost`` for a static
        candidate (the same in every head), the density it reached for a dynamic one (None)."""
        fixed = torch.tensor([c if c is not None else float("nan") for c in cost], dtype=torch.float64)
        return torch.where(fixed.isnan(), density, fixed.expand_as(density))

    def relative_error(self) -> torch.Tensor:
        return (self.err_sq / self.ref_sq.clamp_min(1e-30)[:, None]).sqrt()


class _Scores:
    """What some calls measured: per step range (one for an LLM) and layer the ``_LayerScores``
    (a layer not called has none), the calls the capture left to the model's own attention (a
    sliding window shorter than the keys, ...: per layer reason -> calls, and a sliding one's
    (window, keys)), the shortest and longest keys of any call, and the calls' token geometry.
    A calibration keeps one per input and adds them up in input order (``add``), whichever process
    measured each: the same sums in the same order as one process running every input."""

    def __init__(self, num_ranges: int) -> None:
        self.ranges: list[dict[str, _LayerScores]] = [{} for _ in range(num_ranges)]
        self.unserved: dict[str, Counter[str]] = {}
        self.windows: dict[str, tuple[int, int]] = {}
        self.key_lengths: list[int] = []
        self.calls = 0  # calls scored
        self.tokens: TokenGeometry | None = None  # their token geometry (meaningful once calls > 0)

    def note_length(self, keys: int) -> None:
        self.key_lengths = widen_span(self.key_lengths, [keys, keys])

    def add(self, later: _Scores) -> None:
        """Add what the calls after these measured."""
        if later.calls and self.calls and later.tokens != self.tokens:
            raise ValueError(f"calibration inputs must share one token geometry: {self.tokens} then {later.tokens}")
        if later.calls and not self.calls:
            self.tokens = later.tokens
        self.calls += later.calls
        for mine, theirs in zip(self.ranges, later.ranges):
            for name, scores in theirs.items():
                if name in mine:
                    mine[name].add(scores)
                else:
                    mine[name] = copy.deepcopy(scores)
        for name, reasons in later.unserved.items():
            self.unserved.setdefault(name, Counter()).update(reasons)
        self.windows.update(later.windows)  # the last call's, as it would be one call after another
        self.key_lengths = widen_span(self.key_lengths, later.key_lengths)


def widen_span(span: list[int], other: list[int]) -> list[int]:
    """The ``[shortest, longest]`` covering both spans (``[]``: none yet)."""
    if not span or not other:
        return list(span or other)
    return [min(span[0], other[0]), max(span[1], other[1])]


class _Calibrator:
    """Scores every candidate of every head on the calls it observes. Used by ``calibrate``, the
    calls of each input are kept apart (``start_input``/``end_input``) and added up at the end
    (``merge``), so that inputs may be measured by several processes or runs; observed without
    inputs (tests, ``observe`` called directly), calls add up at once."""

    def __init__(self, config: SearchConfig, layers: Sequence[AttentionLayer], progress: tqdm | None) -> None:
        self.config = config
        self.layers = {layer.name: layer for layer in layers}
        self.candidates: list[Pattern] | None = None  # fixed by the first call (they depend on its grid)
        self.tokens: TokenGeometry | None = None
        self.device: torch.device | None = None  # where the first call ran: costs are measured there
        self.total = _Scores(len(config.step_ranges) + 1)
        self.input: _Scores | None = None  # the input being calibrated, if any
        self.generator = torch.Generator().manual_seed(config.seed)
        self.progress = progress
        self._costs: dict[LayerShape, list[float | None]] = {}  # layers of one shape share their cost table
        self._masks: dict[tuple[BlockGeometry, str], list[torch.Tensor | None]] = {}  # static candidates' blocks

    @property
    def ranges(self) -> list[dict[str, _LayerScores]]:
        """Per step range, per layer: the scores added up so far."""
        return self.total.ranges

    @property
    def _into(self) -> _Scores:
        return self.input if self.input is not None else self.total

    def start_input(self, index: int) -> None:
        """Calls from here on belong to input ``index``; their query rows are drawn from a generator
        seeded by (``config.seed``, ``index``), so an input's rows do not depend on the inputs run
        before it (another process's, a checkpoint's)."""
        digest = hashlib.blake2b(f"{self.config.seed}/{index}".encode(), digest_size=8).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        self.input = _Scores(len(self.config.step_ranges) + 1)

    def end_input(self) -> _Scores:
        """What the input's calls measured (``merge`` adds it in)."""
        done, self.input = self.input, None
        return done

    def merge(self, per_input: Sequence[_Scores]) -> None:
        """Add up every input's scores, in input order; the candidates follow from the first scored
        call's geometry when this process scored none itself."""
        for scores in per_input:
            self.total.add(scores)
        if self.candidates is None and self.total.calls:
            self.candidates, self.tokens = candidate_patterns(self.config, self.total.tokens), self.total.tokens

    def costs(self, share: Share, device: torch.device) -> None:
        """Measure every layer shape's candidate costs once, on the group's first process (a GPU
        timing per process would differ), and give them to every process."""
        shapes = list(dict.fromkeys(s.shape for by_layer in self.ranges for s in by_layer.values()))
        self._costs.update(zip(shapes, share.from_first(lambda: [self._measure(s, device) for s in shapes])))

    def note_unserved(self, name: str, reason: str, keys: int | None, window: int | None) -> None:
        """A call of layer ``name`` that ran the model's own attention for ``reason``."""
        into = self._into
        into.unserved.setdefault(name, Counter())[reason] += 1
        if keys is not None:
            into.note_length(keys)
        if window is not None and keys is not None:
            into.windows[name] = (window, keys)
        if self.progress is not None:
            self.progress.update(1)

    def _static_masks(self, geometry: BlockGeometry, device: torch.device) -> list[torch.Tensor | None]:
        """Each static candidate's ``[NQ, NK]`` blocks at ``geometry`` (None for dynamic ones), built
        once: every layer and call of one shape reuses them."""
        key = (geometry, str(device))
        if key not in self._masks:
            self._masks[key] = [None if p.is_dynamic else block_mask(p, geometry, device) for p in self.candidates]
        return self._masks[key]

    def _cost(self, shape: LayerShape) -> list[float | None]:
        if shape not in self._costs:
            self._costs[shape] = self._measure(shape, self.device)
        return self._costs[shape]

    def _measure(self, shape: LayerShape, device: torch.device) -> list[float | None]:
        """Per candidate its cost relative to dense at ``shape`` (None for dynamic ones)."""
        measure_on = device if self.config.cost == "auto" else torch.device("cpu")
        static = [p for p in self.candidates if not p.is_dynamic]
        measured = iter(relative_costs(static, shape, measure_on))
        return [None if p.is_dynamic else next(measured) for p in self.candidates]

    def _start(self, tokens: TokenGeometry | None, device: torch.device) -> None:
        """Candidates from the first call's geometry; every later call must have the same one."""
        if self.candidates is None:
            self.candidates, self.tokens, self.device = candidate_patterns(self.config, tokens), tokens, device
        elif tokens != self.tokens:
            raise ValueError(f"calibration inputs must share one token geometry: {self.tokens} then {tokens}")
        into = self._into
        into.calls, into.tokens = into.calls + 1, tokens

    @property
    def scores(self) -> dict[str, _LayerScores]:
        """The last step range's scores (an LLM's only ones)."""
        return self.ranges[-1]

    @torch.no_grad()
    def observe(self, name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                scale: float, *, tokens: TokenGeometry | None = None, kv_valid: torch.Tensor | None = None,
                step: int | None = None) -> None:
        """q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` of one layer call, in the model's token order;
        ``tokens``: a diffusion transformer's token geometry (grid candidates, scored in tile
        order); ``kv_valid``: ``[B, S]`` keys not padded; ``step``: the denoising step."""
        self._start(tokens, query.device)
        heads, q_len = query.shape[1:3]
        kv_len = key.shape[2]
        self._into.note_length(kv_len)
        rows_from = q_len
        if tokens is not None:  # the kernel's order (the profile records it: the runtime runs this one)
            tokens = grid_order((), tokens, *self.config.block_size, query.device, SEARCH_ORDER)
            order = tokens.permutation(query.device)
            query, key, value = (x.index_select(2, order) for x in (query, key, value))
            kv_valid = kv_valid.index_select(1, order) if kv_valid is not None else None
            rows_from = tokens.grid_tokens  # text rows are dense in every pattern: sample the grid only
        geometry = BlockGeometry(q_len, kv_len, *self.config.block_size, causal, tokens)
        rows = torch.randperm(rows_from, generator=self.generator)[: self.config.query_rows].sort().values
        group = heads // key.shape[1]
        q = query[:, :, rows.to(query.device)].float()
        k = key.float().repeat_interleave(group, dim=1)
        v = value.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("bhrd,bhkd->bhrk", q, k) * scale  # [B, H, R, Sk]
        positions = (rows + (kv_len - q_len)).to(query.device)
        keys = torch.arange(kv_len, device=query.device)
        visible = (keys[None, :] <= positions[:, None])[None] if causal else \
            torch.ones(1, len(rows), kv_len, dtype=torch.bool, device=query.device)
        if kv_valid is not None:
            visible = visible & kv_valid[:, None, :]
        probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        # Patterns keep or drop whole key blocks, so per-block partial outputs and masses make
        # every candidate one small contraction: O = sum_j keep_j O_j / sum_j keep_j mass_j.
        num_kv, kv_block = geometry.num_kv_blocks, geometry.kv_block
        pad = num_kv * kv_block - kv_len
        probs_blocks = F.pad(probs, (0, pad)).unflatten(-1, (num_kv, kv_block))  # [B, H, R, NK, kb]
        v_blocks = F.pad(v, (0, 0, 0, pad)).unflatten(2, (num_kv, kv_block))  # [B, H, NK, kb, D]
        block_out = torch.einsum("bhrjk,bhjkd->bhrjd", probs_blocks, v_blocks)
        block_mass = probs_blocks.sum(-1)  # [B, H, R, NK]
        dense = block_out.sum(3)
        by_layer = self._into.ranges[self.config.range_of(step)]
        if name not in by_layer:
            by_layer[name] = _LayerScores(heads, len(self.candidates),
                                          LayerShape(geometry, heads, key.shape[1], query.shape[-1], query.dtype))
        layer = by_layer[name]
        layer.ref_sq += dense.double().square().sum(dim=(0, 2, 3)).cpu()
        q_blocks = (rows // geometry.q_block).to(query.device)
        dense_blocks = float(geometry.reachable().sum())
        for c, (pattern, mask) in enumerate(zip(self.candidates, self._static_masks(geometry, query.device))):
            columns = None
            if mask is None and pattern.unfit(geometry) is not None:  # vertical_slash, non-causal attention
                layer.blocks[:, c] += dense_blocks
                layer.err_sq[:, c] = float("inf")
                continue
            if mask is None:  # dynamic: this call's own estimate (blocks, gathered columns), per sample and head
                mask, columns = pattern.select(query, key, geometry, scale)  # [B, H, NQ, NK], [B, H, Sk]
                layer.blocks[:, c] += key_tiles(mask, columns, geometry).double().mean(0).cpu()
                keep = mask[:, :, q_blocks].to(probs)  # [B, H, R, NK]
                spec = "bhrj"
            else:
                blocks = float(mask.sum())
                layer.blocks[:, c] += blocks
                if blocks == dense_blocks:
                    continue  # computes every block: exactly dense, no error
                keep = mask[q_blocks].to(probs)  # [R, NK]
                spec = "rj"
            approx = torch.einsum(f"bhrjd,{spec}->bhrd", block_out, keep)
            mass = torch.einsum(f"bhrj,{spec}->bhr", block_mass, keep)
            if columns is not None:  # gathered key columns outside the kept blocks, token by token
                outside = columns[:, :, None, :] & ~keep.bool().repeat_interleave(kv_block, -1)[..., :kv_len]
                extra = probs * outside  # [B, H, R, Sk]
                approx, mass = approx + extra @ v, mass + extra.sum(-1)
            approx = approx / mass.clamp_min(1e-30)[..., None]
            layer.err_sq[:, c] += (approx - dense).double().square().sum(dim=(0, 2, 3)).cpu()
        if self.progress is not None:
            self.progress.update(1)

    def choose(self, layer: AttentionLayer, budget: float | None = None, step_range: int = -1) -> LayerProfile:
        """Per head: the cheapest candidate whose error is within ``budget`` (default: the
        config's); dense where none is cheaper than dense attention."""
        budget = self.config.budget if budget is None else budget
        scores = self.ranges[step_range].get(layer.name)
        if scores is None and layer.name in self.total.unserved:  # only the model's own attention ran it
            return self._model_owned(layer)
        if scores is None:
            raise ValueError(f"layer {layer.name} was never called during calibration"
                             + (f" in step range {step_range}" if len(self.ranges) > 1 else ""))
        errors = scores.relative_error()
        density = scores.density()
        costs = scores.head_costs(density, self._cost(scores.shape))
        heads, measured = [], []
        for h in range(layer.num_heads):
            order = sorted(range(len(self.candidates)), key=lambda c: (float(costs[h, c]), float(density[h, c]), c))
            for c in order:
                # Not cheaper than dense attention (all blocks, or slower here): dense SDPA then.
                if float(errors[h, c]) <= budget or float(costs[h, c]) >= 1.0:
                    break
            sparse = float(costs[h, c]) < 1.0 and float(density[h, c]) < 1.0
            heads.append(self.candidates[c] if sparse else Dense())
            measured.append({"error": round(float(errors[h, c]), 6) if sparse else 0.0,
                             "density": round(float(density[h, c]), 6) if sparse else 1.0,
                             "cost": round(float(costs[h, c]), 4) if sparse else 1.0})
        return LayerProfile(layer.index, layer.num_heads, tuple(heads), tuple(measured))

    def _model_owned(self, layer: AttentionLayer) -> LayerProfile:
        """A layer whose calls ran the model's own attention (the capture does not serve them, e.g.
        a sliding window shorter than the keys): dense in the profile, with the reason; a sliding
        window's density is its real cost at the calibration length (``window_density``)."""
        reason, calls = self.total.unserved[layer.name].most_common(1)[0]
        density = 1.0
        if layer.name in self.total.windows:
            window, keys = self.total.windows[layer.name]
            density = window_density(window, keys)
        note = f"the model's own attention: {reason} ({calls} calibration call{'s' * (calls != 1)})"
        measured = ({"error": 0.0, "density": round(density, 6), "cost": 1.0},) * layer.num_heads
        return LayerProfile(layer.index, layer.num_heads, (Dense(),) * layer.num_heads, measured, dense_by_model=note)


def window_density(window: int, keys: int) -> float:
    """Key-query pairs a causal sliding window of ``window`` keys (``0 <= q - k < window``, as
    transformers' ``sliding_window``) computes over ``keys`` tokens, relative to causal attention:
    ``sum_i min(i + 1, window) / (keys (keys + 1) / 2)`` (about ``2 window / keys`` for a short window)."""
    w = min(window, keys)
    pairs = w * (w + 1) // 2 + (keys - w) * w
    return pairs / (keys * (keys + 1) // 2)


@dataclass
class Calibration:
    """What calibration measured, per layer, head and candidate: the error on the sampled rows and
    the key blocks computed. Choosing under any budget is free from here (no forward pass), which
    is what end-to-end validation uses to tighten a profile (``autosparse.search.validate``)."""

    model: nn.Module
    config: SearchConfig
    calibrator: _Calibrator
    details: dict[str, Any]  # recorded in the profile's search.calibration
    share: Share = Share()  # the processes it was split over: validation (fit_to_target) splits the same way

    def profile(self, budget: float | None = None) -> Profile:
        """The cheapest per-head choice under ``budget`` (default: the config's)."""
        budget = self.config.budget if budget is None else budget
        calibrator = self.calibrator
        per_range = [{name: calibrator.choose(layer, budget, r) for name, layer in calibrator.layers.items()}
                     for r in range(len(calibrator.ranges))]
        layers = per_range[-1]  # the last range's choice is the default (and an LLM's only one)
        profile = Profile(
            model=model_signature(self.model),
            layers=layers,
            block_size=self.config.block_size,
            token_order=SEARCH_ORDER if calibrator.tokens is not None else "auto",
            lengths={"calibrated": list(calibrator.total.key_lengths)} if calibrator.total.key_lengths else None,
            search={
                "method": "calibrated",
                "budget": budget,
                "error": "relative L2 error of the attention output per head on sampled query rows",
                "cost": ("kernel time relative to dense SDPA, measured on " + _device_name(self.model)
                         if self.config.cost == "auto" and _device_name(self.model) != "cpu"
                         else "key blocks computed at the calibration shape"),
                "candidates": [p.short_str() for p in calibrator.candidates],
                "calibration": self.details,
            },
        )
        return _with_schedule(profile, per_range, self.config)


def _with_schedule(profile: Profile, per_range: list[dict[str, LayerProfile]], config: SearchConfig) -> Profile:
    """Dense first steps, then a StepRange with its own layers for every range but the last
    (the profile's default); a range whose choice is dense everywhere runs dense."""
    bounds = (config.dense_steps, *config.step_ranges, None)
    ranges = [StepRange(0, config.dense_steps, dense=True)] if config.dense_steps else []
    for r, layers in enumerate(per_range[:-1]):
        dense = all(p.is_dense for layer in layers.values() for p in layer.heads)
        ranges.append(StepRange(bounds[r], bounds[r + 1], dense=dense, layers={} if dense else layers))
    return replace(profile, steps=tuple(ranges)) if ranges else profile


def search_profile(model: nn.Module, inputs: Iterable[torch.Tensor | dict[str, Any]],
                   config: SearchConfig = SearchConfig(), *, progress: bool = True, group: Any = None) -> Profile:
    """Calibrate ``model`` on ``inputs`` and return the profile under ``config.budget``
    (``calibrate(...).profile()``; ``group``: split over its processes, as there)."""
    return calibrate(model, inputs, config, progress=progress, group=group).profile()


def calibrate(model: nn.Module, inputs: Iterable[torch.Tensor | dict[str, Any]],
              config: SearchConfig = SearchConfig(), *, progress: bool = True,
              checkpoint: str | Path | None = None, group: Any = None) -> Calibration:
    """Run ``model`` on ``inputs`` and score every candidate pattern of every head.

    ``inputs``: for a transformers model, LongTensors ``[1, S]`` of token ids (unpadded); for a
    diffusers transformer, the keyword arguments of one forward call each (e.g. the transformer's
    inputs at several denoising steps, in order: the step is counted from the timestep as in
    ``patch_model``). The model runs dense and unchanged; it is unpatched afterwards.

    ``checkpoint``: a file the scores are saved to after every input; a calibration started again
    with the same model, inputs count and config resumes after the inputs saved (and gives the
    same result as one uninterrupted run). Load only checkpoints you wrote: they are pickles.

    ``group``: a ``torch.distributed`` process group to split the work over
    (``torch.distributed.group.WORLD`` under ``torchrun`` / ``accelerate launch``): every process
    calls ``calibrate`` with the same model, inputs (checked) and config, calibrates every N-th
    input, and returns the calibration one process would have made (the scores of each input
    added up in input order on every process; ``autosparse.search.distributed``). Kernel costs are
    measured by the group's first process. Each process keeps its own ``checkpoint``, the path
    with ``.rank<r>`` appended, and resumes only with the same number of processes.
    """
    from autosparse.patch import patch_model, patch_of, unpatch_model

    share = Share.of(group)
    inputs = list(inputs)
    if not inputs:
        raise ValueError("calibration needs at least one input")
    share.check_same(inputs, "calibration inputs")
    layers = attention_layers(model)
    mine = share.indices(len(inputs))
    bar = tqdm(total=len(mine) * len(layers), desc="calibrating", unit="call", disable=not progress or not share.first)
    calibrator = _Calibrator(config, layers, bar)
    patch_model(model, Profile.uniform(model, Dense(), block_size=config.block_size))
    patch_of(model).state.observer = _observer(calibrator, config)
    identity = {"model": model_signature(model)["fingerprint"], "class": type(model).__name__,
                "inputs": len(inputs), "config": repr(config), "processes": share.world, "rank": share.rank}
    path = None if checkpoint is None else Path(checkpoint if share.world == 1 else f"{checkpoint}.rank{share.rank}")
    started = time.perf_counter()
    try:  # from here on the model is patched: unpatch it whatever happens
        measured = _resume(path, identity) if path else {}
        bar.update(len(measured) * len(layers))
        run = InputRunner(model, inputs)
        with torch.inference_mode():
            for i in mine:
                if i in measured:
                    continue
                calibrator.start_input(i)
                run(i)
                measured[i] = calibrator.end_input()
                if path:
                    _save_checkpoint(path, identity, measured)
    finally:
        unpatch_model(model)
        bar.close()
    calibrator.merge(share.by_input(measured, len(inputs)))
    if calibrator.candidates is None:
        unserved = sorted({r for reasons in calibrator.total.unserved.values() for r in reasons})
        raise ValueError(f"no attention call was calibrated: {len(inputs)} inputs, dense_steps={config.dense_steps} "
                         + (f"(every call ran the model's own attention: {unserved})" if unserved else
                            "(give inputs past the dense steps)"))
    calibrator.costs(share, next(model.parameters()).device)
    tokens = calibrator.tokens
    details = {
        "inputs": len(inputs),
        **({"tokens": int(sum(x.shape[-1] for x in inputs))} if model_kind(model).token_ids else
           {"grid": list(tokens.grid) if tokens else None,
            "text_tokens": tokens.text_tokens if tokens else 0,
            "dense_steps": config.dense_steps}),
        "query_rows": config.query_rows,
        "seed": config.seed,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Calibration(model, config, calibrator, details, share)


def _device_name(model: nn.Module) -> str:
    device = next(model.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def record_inputs(module: nn.Module, run: Callable[[], Any], *, calls: int | None = None) -> list[dict[str, Any]]:
    """The keyword arguments of ``module``'s forward calls while ``run()`` runs (the first ``calls``):
    a diffusion pipeline's transformer inputs at its denoising steps, ready to calibrate on, e.g.
    ``record_inputs(pipe.transformer, lambda: pipe(prompt, num_inference_steps=50), calls=20)``.
    Positional arguments are stored under their parameter names."""
    signature = inspect.signature(module.forward)
    recorded: list[dict[str, Any]] = []

    def keep(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if calls is None or len(recorded) < calls:
            recorded.append(dict(signature.bind_partial(*args, **kwargs).arguments))
        return None

    handle = module.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return recorded


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model call returns: an LLM's logits, a diffusers transformer's sample."""
    for name in ("logits", "sample"):
        if hasattr(output, name):
            return getattr(output, name)
    return output if isinstance(output, torch.Tensor) else output[0]


_CHECKPOINT_VERSION = 2


def _save_checkpoint(path: Path, identity: dict[str, Any], measured: dict[int, _Scores]) -> None:
    """The scores of every input done so far, by input index, written atomically."""
    tmp = Path(f"{path}.tmp")
    torch.save({"version": _CHECKPOINT_VERSION, "identity": identity, "measured": measured}, tmp)
    tmp.replace(path)


def _resume(path: Path, identity: dict[str, Any]) -> dict[int, _Scores]:
    """The scores of the inputs a checkpoint holds (none if there is no file yet)."""
    if not path.exists():
        return {}
    snapshot = torch.load(path, weights_only=False)
    if snapshot.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path}: version {snapshot.get('version')!r}, expected {_CHECKPOINT_VERSION} "
                         "(delete the file to start over)")
    for key, want in identity.items():
        if snapshot["identity"].get(key) != want:
            raise ValueError(f"checkpoint {path}: {key} is {snapshot['identity'].get(key)!r}, this calibration has "
                             f"{want!r} (delete the file to start over)")
    return snapshot["measured"]


def run_model(model: nn.Module, x: torch.Tensor | dict[str, Any]) -> Any:
    """One forward on a calibration/validation input: token ids (LLM, no cache) or a call's kwargs."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in _forward_kwargs(x).items()})


def _forward_kwargs(x: torch.Tensor | dict[str, Any]) -> dict[str, Any]:
    return x if isinstance(x, dict) else {"input_ids": x, "use_cache": False}


class InputRunner:
    """Runs chosen inputs of a sequence, in ascending order, as if every input ran: a patched
    diffusion transformer counts denoising steps across its calls (``CallContext.advance``), so
    the inputs skipped before each one (another process's, a checkpoint's) still pass through the
    model's call reader, which advances the step counter without a forward."""

    def __init__(self, model: nn.Module, inputs: Sequence[torch.Tensor | dict[str, Any]]) -> None:
        from autosparse.capture import CallReader
        from autosparse.patch import patch_of

        patch = patch_of(model)
        self.model, self.inputs, self._next = model, inputs, 0
        self._reader = CallReader(model, patch.state) if patch is not None and patch.kind.hooked else None

    def __call__(self, index: int) -> Any:
        """The model's output on ``inputs[index]``."""
        if index < self._next:
            raise ValueError(f"InputRunner: input {index} comes before input {self._next - 1}, already run")
        if self._reader is not None:
            for skipped in self.inputs[self._next:index]:
                self._reader(self.model, (), _forward_kwargs(skipped))
        self._next = index + 1
        return run_model(self.model, self.inputs[index])


def _observer(calibrator: _Calibrator, config: SearchConfig) -> _Observer:
    return _Observer(calibrator, config)


class _Observer:
    """Sees every served call before it runs dense: hands q/k/v, the call's geometry and key
    padding to the calibrator (skipping the dense first steps); ``unserved`` hears of the calls
    the capture left to the model's own attention (``runtime.count_unserved``)."""

    def __init__(self, calibrator: _Calibrator, config: SearchConfig) -> None:
        self.calibrator, self.config = calibrator, config

    def _skipped(self, plan) -> bool:
        step = plan.state.context.step
        return step is not None and step < self.config.dense_steps

    def __call__(self, plan, query, key, value, mask, causal, scale) -> None:
        context = plan.state.context
        if self._skipped(plan):
            return
        if query.shape[2] != key.shape[2]:  # cross-attention: never sparse
            return
        kv_valid = None
        if mask is not None:
            if context.tokens is None or mask.dtype != torch.bool or mask.shape[-2] != 1:
                raise ValueError("calibration inputs must be unpadded single sequences (got an attention mask)")
            kv_valid = mask[:, 0, 0, :]
        self.calibrator.observe(plan.name, query, key, value, causal, scale, tokens=context.tokens,
                                kv_valid=kv_valid, step=context.step)

    def unserved(self, plan, reason: str, *, keys: int | None = None, window: int | None = None) -> None:
        if not self._skipped(plan):
            self.calibrator.note_unserved(plan.name, reason, keys, window)
