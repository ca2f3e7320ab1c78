"""Attention patterns: which key blocks each query block attends.

A pattern is a small frozen dataclass (hashable: it keys layout caches) with a ``kind`` and a JSON
form ``{"kind": "sink_local", "sinks": 4, "window": 256}``. Sizes are given in tokens, but a pattern
means a set of *blocks*: a key block is attended by a query block when the token rule touches any
(query, key) pair of the two, and then the whole block is attended (subject to causality). Full
blocks are what make block-sparse kernels fast; the exact token set is ``BlockLayout.to_dense()``.
Patterns over a video/image token grid (``BlockGeometry.tokens``) are in ``autosparse.patterns.grid``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from autosparse.patterns.geometry import TokenGeometry

__all__ = [
    "BlockGeometry",
    "MAX_PATTERN_DEPTH",
    "Pattern",
    "Dense",
    "Window",
    "SinkLocal",
    "Blocks",
    "Global",
    "Union",
    "pattern_from_spec",
    "register_pattern",
    "registered_kinds",
]


@dataclass(frozen=True)
class BlockGeometry:
    """The coordinate system a pattern is laid out in: one attention call's lengths and blocks.

    With ``causal`` the query at row ``q`` sits at absolute position ``q + kv_len - q_len``
    (bottom-right alignment, as with a KV cache), and may attend keys at positions ``<=`` its own.
    Query blocks start at row 0: for a chunk after a KV-cache prefix of ``kv_len - q_len`` tokens
    they are a full prefill's query blocks (and a pattern's rows those of the same positions in a
    full prefill) when the prefix is a multiple of ``q_block``; otherwise they straddle them, and
    the pattern's rule is laid out on the chunk's own blocks.

    ``tokens`` describes a diffusion transformer's self-attention (text tokens and a token grid,
    non-causal, ``q_len == kv_len == tokens.length``): grid patterns need it, and the layout makes
    its text tokens dense. Positions are those the kernel sees (``tokens``' kernel order: with a tile,
    the grid tokens in tile order first, then all text tokens).
    """

    q_len: int
    kv_len: int
    q_block: int
    kv_block: int
    causal: bool
    tokens: TokenGeometry | None = None

    def __post_init__(self) -> None:
        for name in ("q_len", "kv_len", "q_block", "kv_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockGeometry.{name} must be a positive int, got {value!r}")
        if self.causal and self.q_len > self.kv_len:
            raise ValueError(f"causal attention needs q_len <= kv_len, got {self.q_len=} {self.kv_len=}")
        if self.tokens is None:
            return
        if not isinstance(self.tokens, TokenGeometry):
            raise ValueError(f"BlockGeometry.tokens must be a TokenGeometry or None, got {self.tokens!r}")
        if not self.tokens.length == self.q_len == self.kv_len:
            raise ValueError(f"BlockGeometry.tokens: its length {self.tokens.length} must equal q_len and kv_len, "
                             f"got {self.q_len=} {self.kv_len=}")
        if self.causal:
            raise ValueError("BlockGeometry.tokens: a token grid is for non-causal attention, got causal=True")

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.kv_block)

    def block_spans(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """First/last absolute query position of each query block ``[NQ, 1]`` and first/last key
        position of each key block ``[1, NK]``: the inputs every block rule is written in. Cached
        per device (a dynamic pattern asks on every call): do not modify."""
        return _block_spans(self, str(torch.device(device)))

    def reachable(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[NQ, NK]`` bool: the blocks dense attention computes (all, or the causal triangle).
        Cached per device: do not modify."""
        return _reachable(self, str(torch.device(device)))

    def text_block_mask(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``[NQ, NK]`` bool: the blocks holding a (query, key) pair with the query or the key a text
        token of ``tokens`` (text attends everything and is attended by everything); ``None``
        without text. Text positions are kernel positions (``tokens.kernel_prefix``/``kernel_suffix``:
        with a tile, all text follows the grid)."""
        if self.tokens is None or not self.tokens.has_text:
            return None
        return _text_mask(self, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _block_spans(geometry: BlockGeometry, device: str) -> tuple[torch.Tensor, ...]:
    offset = geometry.kv_len - geometry.q_len if geometry.causal else 0
    q_first = torch.arange(geometry.num_q_blocks, device=device) * geometry.q_block
    q_last = torch.clamp(q_first + geometry.q_block, max=geometry.q_len) - 1
    k_first = torch.arange(geometry.num_kv_blocks, device=device) * geometry.kv_block
    k_last = torch.clamp(k_first + geometry.kv_block, max=geometry.kv_len) - 1
    return (q_first[:, None] + offset, q_last[:, None] + offset, k_first[None, :], k_last[None, :])


@functools.lru_cache(maxsize=64)
def _text_mask(geometry: BlockGeometry, device: str) -> torch.Tensor:
    return _global_mask(geometry, geometry.tokens.kernel_prefix, geometry.tokens.kernel_suffix, device)


@functools.lru_cache(maxsize=64)
def _reachable(geometry: BlockGeometry, device: str) -> torch.Tensor:
    _, q_last, k_first, _ = geometry.block_spans(device)
    if geometry.causal:
        return k_first <= q_last
    return torch.ones(geometry.num_q_blocks, geometry.num_kv_blocks, dtype=torch.bool, device=device)


_PATTERNS: dict[str, type[Pattern]] = {}

# Levels of patterns in one head, the leaf included (``global(union(window, stripes))``: 3). Deeper
# specs are refused before they are built: a 600-deep one would otherwise exhaust Python's stack.
MAX_PATTERN_DEPTH = 16
_spec_depth = contextvars.ContextVar("autosparse_pattern_spec_depth", default=0)


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make a pattern kind loadable from its JSON spec."""
    if cls.kind in _PATTERNS:
        raise ValueError(f"pattern kind {cls.kind!r} is already registered by {_PATTERNS[cls.kind].__name__}")
    _PATTERNS[cls.kind] = cls
    return cls


def registered_kinds() -> list[str]:
    return sorted(_PATTERNS)


@dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses set ``kind`` and implement ``block_mask``."""

    kind: ClassVar[str]

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[NQ, NK]`` bool: key blocks attended by each query block (within ``reachable``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement block_mask")

    @property
    def is_dense(self) -> bool:
        return False

    @property
    def needs_grid(self) -> bool:
        """Whether the pattern is laid out on ``BlockGeometry.tokens`` (grid tokens in tile order)."""
        return False

    @property
    def is_dynamic(self) -> bool:
        """Whether the key blocks depend on each call's q and k (``autosparse.patterns.dynamic``)."""
        return False

    def unfit(self, geometry: BlockGeometry) -> str | None:
        """Why this pattern cannot be laid out on the call ``geometry`` describes (a grid pattern
        without a token grid or on a grid of other dims, a causal-only pattern on non-causal
        attention), or None when it can. Asked before laying out, so such a call runs dense,
        counted, with this reason, rather than failing inside the kernel's layout."""
        return None

    def unfit_layer(self, causal: bool, grid_rank: int | None) -> str | None:
        """Why this pattern can run on no call of an attention layer whose calls are ``causal`` (or
        not) with a token grid of ``grid_rank`` dims (None: never a grid), or None when some call
        may fit: what ``Profile.check_model`` refuses at patch time. Implies nothing about sizes."""
        return None

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            spec[field.name] = list(value) if isinstance(value, tuple) else value
        return spec

    def short_str(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.to_spec().items() if k != "kind")
        return f"{self.kind}({args})" if args else self.kind

    @classmethod
    def fields_from_spec(cls, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """Spec fields -> constructor arguments. Kinds that nest patterns parse them here, so that
        a nested error names its own path (``pattern.inner.kind``)."""
        return fields


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _depth(pattern: Pattern) -> int:
    """Levels of patterns in ``pattern``, itself included (bounded: composites refuse deeper members)."""
    if isinstance(pattern, Global):
        return 1 + _depth(pattern.inner)
    if isinstance(pattern, Union):
        return 1 + max(_depth(member) for member in pattern.of)
    return 1


def _check_member(owner: str, member: Any) -> None:
    """A composite's member: a pattern, static (the runtime estimates only a head's own dynamic
    pattern, never one inside another), and shallow enough to nest once more."""
    if not isinstance(member, Pattern):
        raise ValueError(f"{owner} must be a pattern, got {member!r}")
    if member.is_dynamic:
        raise ValueError(f"{owner}: dynamic pattern {member.kind!r} cannot be nested (its key blocks are "
                         f"estimated per call only as a head's own pattern); use it as the head's pattern")
    if _depth(member) >= MAX_PATTERN_DEPTH:
        raise ValueError(f"{owner}: expected patterns nested at most {MAX_PATTERN_DEPTH} levels deep, "
                         f"found {_depth(member) + 1}")


@register_pattern
@dataclass(frozen=True)
class Dense(Pattern):
    """Every key (every earlier key when causal): the unmodified attention."""

    kind: ClassVar[str] = "dense"

    @property
    def is_dense(self) -> bool:
        return True

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        return geometry.reachable(device).clone()


@register_pattern
@dataclass(frozen=True)
class Window(Pattern):
    """1-D sliding window: keys within ``window`` tokens of the query (``0 <= q - k < window`` when
    causal, ``|q - k| < window`` otherwise)."""

    kind: ClassVar[str] = "window"
    window: int

    def __post_init__(self) -> None:
        _check_int("window", "window", self.window, 1)

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        q_first, q_last, k_first, k_last = geometry.block_spans(device)
        # Block pair touches the band iff the range of (q - k) over the pair meets it.
        lowest_gap, highest_gap = q_first - k_last, q_last - k_first
        near = lowest_gap <= self.window - 1
        if geometry.causal:
            return near & (highest_gap >= 0)
        return near & (highest_gap >= -(self.window - 1))


@register_pattern
@dataclass(frozen=True)
class SinkLocal(Pattern):
    """Attention sinks plus a local window: the first ``sinks`` tokens and a ``window`` around the
    query (causal aware), the shape StreamingLLM found in trained LLM heads."""

    kind: ClassVar[str] = "sink_local"
    sinks: int
    window: int

    def __post_init__(self) -> None:
        _check_int("sink_local", "sinks", self.sinks, 0)
        _check_int("sink_local", "window", self.window, 1)

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        _, _, k_first, _ = geometry.block_spans(device)
        sink_blocks = (k_first < self.sinks) & geometry.reachable(device)
        return Window(self.window).block_mask(geometry, device) | sink_blocks


@register_pattern
@dataclass(frozen=True)
class Blocks(Pattern):
    """A static list of key blocks (indices in units of the profile's ``kv_block``) that every
    query block attends, e.g. global "vertical" columns; blocks past the end are ignored."""

    kind: ClassVar[str] = "blocks"
    kv_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        blocks = tuple(self.kv_blocks) if isinstance(self.kv_blocks, (list, tuple)) else self.kv_blocks
        if not isinstance(blocks, tuple) or not blocks:
            raise ValueError(f"blocks.kv_blocks must be a non-empty list of ints, got {self.kv_blocks!r}")
        for i, block in enumerate(blocks):
            _check_int("blocks", f"kv_blocks[{i}]", block, 0)
        object.__setattr__(self, "kv_blocks", tuple(sorted(set(blocks))))

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        columns = torch.zeros(geometry.num_kv_blocks, dtype=torch.bool, device=device)
        listed = torch.tensor([b for b in self.kv_blocks if b < geometry.num_kv_blocks], dtype=torch.long)
        columns[listed.to(device)] = True
        return columns[None, :] & geometry.reachable(device)


@register_pattern
@dataclass(frozen=True)
class Global(Pattern):
    """Global tokens around an ``inner`` pattern: the first ``prefix`` and last ``suffix`` tokens
    attend and are attended by everything, as the text tokens that diffusion transformers (FLUX,
    CogVideoX, HunyuanVideo) concatenate to the image or video tokens need.

    Global keys are ``[0, prefix)`` and ``[kv_len - suffix, kv_len)``; global queries are the same
    tokens in query positions, ``[0, prefix)`` and ``[end - suffix, end)`` where ``end`` is the
    absolute position after the last query: ``q_len``, or ``kv_len`` when causal (the queries are
    then the last ``q_len`` tokens, so a later chunk holds no prefix queries; a ``suffix`` is then
    ``unfit``: a chunk's end is not the sequence's). Block-granular as
    everywhere: a block pair is attended when ``inner`` attends it or it holds a causally allowed
    (query, key) pair with the key or the query global.

    Positions are the model's: where ``BlockGeometry.tokens`` permutes the sequence into kernel order
    (a tile, or frame specials), the global tokens are wherever that puts them. ``inner`` may be any
    static pattern (a grid pattern included: ``needs_grid`` is the inner one's), never a dynamic one.
    """

    kind: ClassVar[str] = "global"
    inner: Pattern
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self) -> None:
        _check_member("global.inner", self.inner)
        _check_int("global", "prefix", self.prefix, 0)
        _check_int("global", "suffix", self.suffix, 0)
        if self.prefix == 0 and self.suffix == 0:
            raise ValueError("global.prefix, global.suffix: at least one must be > 0, got both 0")

    @property
    def is_dense(self) -> bool:
        return self.inner.is_dense

    @property
    def needs_grid(self) -> bool:
        return self.inner.needs_grid

    @property
    def is_dynamic(self) -> bool:
        return self.inner.is_dynamic  # False: a dynamic inner is refused (see _check_member)

    def unfit(self, geometry: BlockGeometry) -> str | None:
        if self.suffix and geometry.causal and geometry.kv_len != geometry.q_len:
            # A chunk's last queries are not the sequence's: their rows would differ from a full prefill's.
            return "global.suffix counts from the sequence's end, unknown to a chunk after a KV-cache prefix"
        reason = self.inner.unfit(geometry)
        return None if reason is None else f"global.inner: {reason}"

    def unfit_layer(self, causal: bool, grid_rank: int | None) -> str | None:
        reason = self.inner.unfit_layer(causal, grid_rank)
        return None if reason is None else f"global.inner: {reason}"

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        tokens = geometry.tokens
        if tokens is not None and tokens.permuted:
            # The kernel sees the tokens in its own order: the global ones are wherever the
            # permutation put the model's first ``prefix`` and last ``suffix`` (non-causal).
            model_position = tokens.permutation(device)
            is_global = (model_position < self.prefix) | (model_position >= tokens.length - self.suffix)
            rows = _any_per_block(is_global, geometry.q_block, geometry.num_q_blocks)
            columns = _any_per_block(is_global, geometry.kv_block, geometry.num_kv_blocks)
            return self.inner.block_mask(geometry, device) | rows[:, None] | columns[None, :]
        return self.inner.block_mask(geometry, device) | _global_mask(geometry, self.prefix, self.suffix, device)

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "prefix": self.prefix, "suffix": self.suffix, "inner": self.inner.to_spec()}

    def short_str(self) -> str:
        sizes = "".join(f"{name}={getattr(self, name)}," for name in ("prefix", "suffix") if getattr(self, name))
        return f"{self.kind}({sizes}inner={self.inner.short_str()})"

    @classmethod
    def fields_from_spec(cls, fields: dict[str, Any], where: str) -> dict[str, Any]:
        return {**fields, "inner": pattern_from_spec(fields["inner"], f"{where}.inner")}


def _any_per_block(flags: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    """Bool ``[blocks]``: whether any of the ``block`` positions of each block is set in ``flags``."""
    padded = torch.zeros(blocks * block, dtype=torch.bool, device=flags.device)
    padded[: flags.shape[0]] = flags
    return padded.view(blocks, block).any(1)


@register_pattern
@dataclass(frozen=True)
class Union(Pattern):
    """Several patterns in one head: a block pair is attended iff any member attends it (e.g. a
    3-D neighbourhood plus the first frame's stripe, as video heads mix local and global keys)."""

    kind: ClassVar[str] = "union"
    of: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        members = tuple(self.of) if isinstance(self.of, (list, tuple)) else None
        if not members:
            raise ValueError(f"union.of must be a non-empty list of patterns, got {self.of!r}")
        for i, member in enumerate(members):
            _check_member(f"union.of[{i}]", member)
        object.__setattr__(self, "of", members)

    @property
    def is_dense(self) -> bool:
        return any(member.is_dense for member in self.of)

    @property
    def needs_grid(self) -> bool:
        return any(member.needs_grid for member in self.of)

    @property
    def is_dynamic(self) -> bool:
        return any(member.is_dynamic for member in self.of)  # False: dynamic members are refused

    def unfit(self, geometry: BlockGeometry) -> str | None:
        return _first_reason(member.unfit(geometry) for member in self.of)

    def unfit_layer(self, causal: bool, grid_rank: int | None) -> str | None:
        return _first_reason(member.unfit_layer(causal, grid_rank) for member in self.of)

    def block_mask(self, geometry: BlockGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        masks = [member.block_mask(geometry, device) for member in self.of]
        return torch.stack(masks).any(0)

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "of": [member.to_spec() for member in self.of]}

    def short_str(self) -> str:
        return f"{self.kind}({'|'.join(member.short_str() for member in self.of)})"

    @classmethod
    def fields_from_spec(cls, fields: dict[str, Any], where: str) -> dict[str, Any]:
        members = fields["of"]
        if not isinstance(members, list) or not members:
            raise ValueError(f"{where}.of: expected a non-empty list of patterns, found {members!r}")
        return {"of": tuple(pattern_from_spec(m, f"{where}.of[{i}]") for i, m in enumerate(members))}


def _first_reason(reasons) -> str | None:
    """The first member's reason, as ``union.of[i]: reason``, or None."""
    return next((f"union.of[{i}]: {reason}" for i, reason in enumerate(reasons) if reason is not None), None)


def _global_mask(geometry: BlockGeometry, prefix: int, suffix: int, device: torch.device | str) -> torch.Tensor:
    """``[NQ, NK]`` bool: the block pairs holding a causally allowed (query, key) pair with the
    key or the query among the first ``prefix`` or last ``suffix`` tokens (the rule of ``Global``
    and of a geometry's text tokens; see ``Global`` for the positions when causal)."""
    q_end, kv_end = (geometry.kv_len if geometry.causal else geometry.q_len), geometry.kv_len
    regions = (  # (absolute query range, key range): global columns, then global rows
        ((0, q_end), (0, prefix)),
        ((0, q_end), (kv_end - suffix, kv_end)),
        ((0, prefix), (0, kv_end)),
        ((q_end - suffix, q_end), (0, kv_end)),
    )
    mask = torch.zeros(geometry.num_q_blocks, geometry.num_kv_blocks, dtype=torch.bool, device=device)
    for queries, keys in regions:
        mask = mask | _touches(geometry, queries, keys, device)
    return mask


def _touches(
    geometry: BlockGeometry, queries: tuple[int, int], keys: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    """``[NQ, NK]`` bool: block pairs holding a (query, key) pair with the query in ``queries`` and
    the key in ``keys`` (half-open, absolute positions) that causality allows. Clipping each block
    to the ranges keeps the rule exact where a range ends inside a block; the causal test also keeps
    the result within ``reachable``."""
    q_first, q_last, k_first, k_last = geometry.block_spans(device)
    q_lo, q_hi = torch.clamp(q_first, min=queries[0]), torch.clamp(q_last, max=queries[1] - 1)
    k_lo, k_hi = torch.clamp(k_first, min=keys[0]), torch.clamp(k_last, max=keys[1] - 1)
    hit = (q_lo <= q_hi) & (k_lo <= k_hi)
    return hit & (k_lo <= q_hi) if geometry.causal else hit


def pattern_from_spec(spec: Any, where: str = "pattern") -> Pattern:
    """Build a pattern from its JSON form; errors name ``where`` (e.g. ``layers['x'].heads[3]``).
    Every field is required, except those whose default is ``None``, which may be left out."""
    if isinstance(spec, Pattern):
        return spec
    depth = _spec_depth.get()
    if depth >= MAX_PATTERN_DEPTH:
        raise ValueError(f"{where}: expected patterns nested at most {MAX_PATTERN_DEPTH} levels deep, found deeper")
    token = _spec_depth.set(depth + 1)
    try:
        return _pattern_from_spec(spec, where)
    finally:
        _spec_depth.reset(token)


def _pattern_from_spec(spec: Any, where: str) -> Pattern:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"{where}: expected a dict with a 'kind' key, found {spec!r}")
    kind = spec["kind"]
    cls = _PATTERNS.get(kind)
    if cls is None:
        raise ValueError(f"{where}.kind: expected one of {registered_kinds()}, found {kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    nullable = {f.name for f in dataclasses.fields(cls) if f.default is None}  # left out means null
    given = set(spec) - {"kind"}
    missing, unknown = sorted(names - nullable - given), sorted(given - names)
    if missing or unknown:
        raise ValueError(f"{where}: {kind!r} takes fields {sorted(names)}; missing {missing}, unknown {unknown}")
    fields = cls.fields_from_spec({name: spec[name] for name in given}, where)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
