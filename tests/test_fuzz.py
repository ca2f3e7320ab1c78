"""Property / fuzz suite of the hook route (issue 14, part 3): every pattern kind, through
``patch_model`` and through the compile backend, over random calls of
``F.scaled_dot_product_attention`` as torch accepts them.

The harness is a real diffusers model (``FuzzModel``, no family adapter: 1-D patterns) with one
attention module that calls ``F.scaled_dot_product_attention(q, k, v, **kwargs)`` with the case's
tensors and arguments, so a case reaches the op exactly as a diffusers processor's call would.

Each case ends in exactly one class, decided from ``autosparse.stats(model)`` deltas and exceptions:

(a) ``sparse``: served sparse (stats.sparse + 1) and equal to two independent oracles, float64 dense
    attention and FlexAttention (eager, float64), both on the token mask torch's own arguments
    define (attn_mask, is_causal top-left) intersected with the layout's token mask;
(b) ``dense`` / ``fallback``: counted with a reason and equal to torch's own SDPA on the same
    arguments;
(c) ``refused``: ValueError/TypeError from the profile or ``patch_model``, with a message;
and ``rejected``: torch's own SDPA raises on these arguments and so does the patched call.
Anything else (a mismatch, an exception torch does not raise, a call counted in no class or twice,
arguments torch refuses but the patched call accepts) is a finding: the test fails listing one
reproduction per kind (``Case(...)``; run it with ``run_case(Case(...))``).

CI: a fixed-seed slice (hypothesis ``derandomize``). ``pytest tests/test_fuzz.py --long``: >= 10,000
op-level cases plus a longer compile-backend run; counts per class and reason are printed at the end.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionModuleMixin
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
import torch.nn.functional as F

import autosparse
from autosparse.layout import left_padded
from autosparse import BlockGeometry, BlockLayout, LayerProfile, Profile, pattern_from_spec
from autosparse.kernels.reference import layout_mask
from autosparse.testing.reference import attention, flex_attention, sdpa_rule
from conftest import LEDGER, TORCH_SDPA, compare

LAYER = "attn"
CI_CASES = 300  # eager route, fixed seed
CI_COMPILE_CASES = 20
LONG_CASES = 10_000
LONG_COMPILE_CASES = 300

warnings.filterwarnings("ignore", message=".*flex_attention.*")


# -- the harness model ---------------------------------------------------------------------------------


class FuzzAttention(nn.Module, AttentionModuleMixin):
    """A diffusers attention module that calls F.scaled_dot_product_attention with what it is given.
    ``anchor`` (0.0) is the parameter the compile backend computes the layer id from."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.inner_dim = heads, heads, heads * 16
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, query, key, value, kwargs):
        return F.scaled_dot_product_attention(query, key, value, **kwargs) + self.anchor


class FuzzModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_attention_heads: int = 4, num_layers: int = 1):
        super().__init__()
        self.attn = FuzzAttention(num_attention_heads)

    def forward(self, query, key, value, kwargs):
        return self.attn(query, key, value, kwargs)


_MODELS: dict[int, FuzzModel] = {}


def model_with(heads: int) -> FuzzModel:
    if heads not in _MODELS:
        _MODELS[heads] = FuzzModel(heads).eval()
    return _MODELS[heads]


# -- cases ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call and the profile it is served with; tensors are made from ``seed``."""

    heads: tuple  # one pattern spec per query head (all equal: a uniform profile)
    block: tuple = (16, 16)
    dtype: str = "fp32"
    batch: int = 1
    hq: int = 4
    hkv: int = 4
    sq: int = 40
    sk: int = 40
    d: int = 16
    dv: int | None = None  # value head dim (None: d)
    causal: bool = False
    mask: str = "none"  # see MASKS
    pad: str = "right"  # key padding side for the padding masks
    padded: int = 0  # padded keys per sample (sample i: min(padded * (i + 1) // batch, sk))
    scale: float | None = None
    gqa_flag: bool | None = None  # enable_gqa (None: hq != hkv)
    ndim: int = 4  # 3 (q [H, S, D]), 4, or 5 ([B, 2, H, S, D])
    kv_batch1: bool = False  # k/v with batch 1 (torch broadcasts it)
    memory: str = "contiguous"  # contiguous | bshd (transposed) | strided (last dim stride 2) | expand (k/v stride-0 batch)
    nonfinite: str = "none"  # none | nan_q | inf_k | neginf_k | nan_v | inf_v
    dropout: float = 0.0
    grad: bool = False
    seed: int = 0

    # ---- tensors

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        g = torch.Generator().manual_seed(self.seed)
        dtype = DTYPES[self.dtype]
        dv = self.dv or self.d
        lead = {3: (), 4: (self.batch,), 5: (self.batch, 2)}[self.ndim]
        kv_lead = lead if not (self.kv_batch1 and lead) else (1,) * len(lead)

        def make(lead_dims, heads, length, dim):
            if self.memory == "bshd":
                x = torch.randn(*lead_dims, length, heads, dim, generator=g, dtype=torch.float64).transpose(-2, -3)
            elif self.memory == "strided":
                x = torch.randn(*lead_dims, heads, length, 2 * dim, generator=g, dtype=torch.float64)[..., ::2]
            else:
                x = torch.randn(*lead_dims, heads, length, dim, generator=g, dtype=torch.float64)
            return x

        q = make(lead, self.hq, self.sq, self.d)
        if self.memory == "expand" and lead:
            k = make((1,) * len(lead), self.hkv, self.sk, self.d).expand(*kv_lead if self.kv_batch1 else lead, -1, -1, -1)
            v = make((1,) * len(lead), self.hkv, self.sk, dv).expand(*kv_lead if self.kv_batch1 else lead, -1, -1, -1)
        else:
            k = make(kv_lead, self.hkv, self.sk, self.d)
            v = make(kv_lead, self.hkv, self.sk, dv)
        q, k, v = self._poison(q, k, v, g)
        q, k, v = (x.to(dtype) for x in (q, k, v))
        if self.grad:
            q.requires_grad_(True)
        kwargs: dict[str, Any] = {}
        mask = self._mask(g, dtype)
        if mask is not None:
            kwargs["attn_mask"] = mask
        if self.causal:
            kwargs["is_causal"] = True
        if self.scale is not None:
            kwargs["scale"] = self.scale
        if self.dropout:
            kwargs["dropout_p"] = self.dropout
        gqa = self.hq != self.hkv if self.gqa_flag is None else self.gqa_flag
        if gqa:
            kwargs["enable_gqa"] = True
        return q, k, v, kwargs

    def _poison(self, q, k, v, g):
        if self.nonfinite == "none":
            return q, k, v
        q, k, v = q.clone(), k.clone(), v.clone()  # expanded views cannot be written
        which = {"nan_q": q, "inf_k": k, "neginf_k": k, "nan_v": v, "inf_v": v}[self.nonfinite]
        value = {"nan_q": math.nan, "inf_k": math.inf, "neginf_k": -math.inf, "nan_v": math.nan, "inf_v": math.inf}
        row = int(torch.randint(which.shape[-2], (1,), generator=g))
        which[..., row, 0] = value[self.nonfinite]
        return q, k, v

    def key_valid(self) -> torch.Tensor:
        """Bool ``[B, Sk]``: the keys left after padding (left or right)."""
        b = self.batch if self.ndim != 3 else 1
        valid = torch.ones(b, self.sk, dtype=torch.bool)
        for i in range(b):
            n = min(self.padded * (i + 1) // b, self.sk)
            if n:
                if self.pad == "left":
                    valid[i, :n] = False
                else:
                    valid[i, self.sk - n:] = False
        return valid

    def _mask(self, g, dtype):
        b = self.batch if self.ndim != 3 else 1
        sq, sk = self.sq, self.sk
        kind = self.mask
        if kind == "none":
            return None
        valid = self.key_valid()
        tril = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)  # bottom-right, as transformers builds it
        if kind == "keypad_b11k":  # HunyuanVideo-style key padding
            mask = valid[:, None, None, :]
        elif kind == "keypad_b1qk":
            mask = valid[:, None, None, :].expand(b, 1, sq, sk)
        elif kind == "causal_keypad":  # what transformers' sdpa_mask makes
            mask = (tril & valid[:, None, :])[:, None]
        elif kind == "bool_2d":
            mask = torch.rand(sq, sk, generator=g) < 0.7
        elif kind == "bool_bhqk":
            mask = torch.rand(b, self.hq, sq, sk, generator=g) < 0.7
        elif kind == "bool_rows_masked":  # whole query rows with no key
            mask = (torch.rand(b, 1, sq, sk, generator=g) < 0.8)
            mask[:, :, torch.rand(sq, generator=g) < 0.3] = False
        elif kind == "float_bias":
            mask = torch.randn(b, 1, sq, sk, generator=g, dtype=torch.float64).to(dtype)
        elif kind == "float_keypad":  # additive: -inf on padded keys
            mask = torch.zeros(b, 1, 1, sk, dtype=dtype).masked_fill(~valid[:, None, None, :], -math.inf)
        elif kind == "float_zero":
            mask = torch.zeros(b, 1, sq, sk, dtype=dtype)
        else:
            raise AssertionError(kind)
        if self.ndim == 5 and mask.dim() == 4:
            mask = mask[:, None]
        if self.ndim == 3 and mask.dim() == 4:
            mask = mask[0]
        return mask

    # ---- the expected token rule and the profile

    def profile(self, model: nn.Module) -> Profile:
        """The case's profile (ValueError/TypeError: refused, class (c))."""
        profile = Profile.uniform(model, self.heads[0], block_size=self.block)
        if any(h != self.heads[0] for h in self.heads):
            patterns = tuple(pattern_from_spec(h, f"heads[{i}]") for i, h in enumerate(self.heads))
            profile.layers[LAYER] = LayerProfile(0, self.hq, patterns)
        return profile


# -- the strategies ---------------------------------------------------------------------------------------

_windows = st.integers(1, 64)
_simple = st.one_of(
    st.builds(lambda w: {"kind": "window", "window": w}, _windows),
    st.builds(lambda s, w: {"kind": "sink_local", "sinks": s, "window": w}, st.integers(0, 24), _windows),
    st.builds(lambda bs: {"kind": "blocks", "kv_blocks": bs}, st.lists(st.integers(0, 5), min_size=1, max_size=3)),
)
_global = st.builds(lambda p, s, inner: {"kind": "global", "prefix": p, "suffix": s, "inner": inner},
                    st.integers(0, 20), st.integers(0, 20), _simple)
_union = st.builds(lambda of: {"kind": "union", "of": of}, st.lists(st.one_of(_simple, _global), min_size=1, max_size=3))
_dynamic = st.one_of(
    st.builds(lambda k: {"kind": "block_topk", "k": k}, st.integers(1, 4)),
    st.builds(lambda m: {"kind": "block_cdf", "mass": m}, st.sampled_from([0.1, 0.5, 0.9, 1.0])),
    st.builds(lambda v, s: {"kind": "vertical_slash", "vertical": v, "slash": s}, st.integers(1, 40), st.integers(1, 40)),
    st.builds(lambda v, s, m: {"kind": "vertical_slash", "vertical": v, "slash": s, "mass": m},
              st.integers(1, 40), st.integers(1, 40), st.sampled_from([0.3, 0.9])),
)
_grid = st.sampled_from([{"kind": "neighborhood", "window": [3, 3]}, {"kind": "spatial", "frames": 1},
                         {"kind": "temporal", "window": [3, 3]}])
_invalid = st.sampled_from([{"kind": "window", "window": 0}, {"kind": "sink_local", "sinks": -1, "window": 4},
                            {"kind": "nope"}, {"kind": "global", "prefix": 0, "suffix": 0, "inner": {"kind": "dense"}},
                            {"kind": "blocks", "kv_blocks": []}, {"kind": "window"}, {"kind": "block_topk", "k": 0}])
PATTERNS = st.one_of(st.just({"kind": "dense"}), _simple, _simple, _simple, _global, _union, _dynamic, _dynamic, _grid,
                     _invalid)
MASKS = ["none"] * 4 + ["keypad_b11k", "keypad_b1qk"] * 2 + ["causal_keypad"] * 3 + [
    "bool_2d", "bool_bhqk", "bool_rows_masked", "float_bias", "float_keypad", "float_zero"]


@st.composite
def cases(draw) -> Case:
    block = draw(st.sampled_from([(16, 16), (16, 32), (32, 16)]))
    hkv = draw(st.sampled_from([1, 2, 3, 4]))
    hq = hkv * draw(st.sampled_from([1, 1, 2, 3, 4]))
    spec = draw(PATTERNS)
    if draw(st.integers(0, 4)) == 0:  # mixed heads (dense heads of a mixed layer go to SDPA)
        heads = tuple(draw(st.one_of(st.just({"kind": "dense"}), _simple, _global, _dynamic)) for _ in range(hq))
    else:
        heads = (spec,) * hq
    span = 3 * max(block)
    sq = draw(st.integers(1, span))
    sk = sq if draw(st.integers(0, 4)) else draw(st.integers(1, span))
    mask = draw(st.sampled_from(MASKS))
    causal = draw(st.booleans())
    if mask == "causal_keypad" and draw(st.integers(0, 3)):  # mostly the pairing transformers makes
        causal = True
    special = draw(st.integers(0, 19))
    return Case(
        heads=heads, block=block, dtype=draw(st.sampled_from(list(DTYPES))), batch=draw(st.integers(1, 3)),
        hq=hq, hkv=hkv, sq=sq, sk=sk, d=draw(st.sampled_from([8, 16, 24, 32, 64, 80, 128, 256])),
        dv=draw(st.sampled_from([None] * 9 + [8])),
        causal=causal, mask=mask, pad=draw(st.sampled_from(["left", "right"])),
        padded=draw(st.integers(0, sk + 2)) if draw(st.booleans()) else 0,
        scale=draw(st.sampled_from([None, None, None, 0.05, 0.3, 1.0, 2.5])),
        gqa_flag=draw(st.sampled_from([None] * 10 + [True, False])),
        ndim=draw(st.sampled_from([4] * 10 + [3, 5])), kv_batch1=draw(st.integers(0, 11)) == 0,
        memory=draw(st.sampled_from(["contiguous", "contiguous", "bshd", "strided", "expand"])),
        nonfinite=draw(st.sampled_from(["none"] * 8 + ["nan_q", "inf_k", "neginf_k", "nan_v", "inf_v"])),
        dropout=0.3 if special == 0 else 0.0, grad=special == 1, seed=draw(st.integers(0, 2**31 - 1)),
    )


# -- one case ---------------------------------------------------------------------------------------------


def _as4d(x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """``[*lead, H, S, D]`` (broadcast) -> ``[prod(lead) or 1, H, S, D]``."""
    x = x.expand(*lead, *x.shape[-3:]) if lead else x
    return x.reshape(-1, *x.shape[-3:])


def _torch_rule(case: Case, q: torch.Tensor, k: torch.Tensor, kwargs: dict) -> tuple:
    """(bool allowed ``[B', H, Sq, Sk]``, float64 bias ``[B', H, Sq, Sk]`` or None): what torch's SDPA
    means by the case's arguments (attn_mask, top-left is_causal), over the broadcast batch dims."""
    lead = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3]))
    full = (*lead, case.hq, case.sq, case.sk)
    allowed, bias = sdpa_rule(case.sq, case.sk, kwargs.get("attn_mask"), case.causal)
    if bias is not None:
        bias = bias.double().expand(full).reshape(-1, *full[-3:])
    return allowed.expand(full).reshape(-1, *full[-3:]), bias


def oracle_mask(case: Case, profile: Profile, q: torch.Tensor, k: torch.Tensor, kwargs: dict) -> tuple:
    """(bool allowed ``[B', H, Sq, Sk]``, float bias or None): torch's rule for these arguments
    (attn_mask, top-left is_causal) AND the layout's token mask (as the op would build it)."""
    lead = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3]))
    allowed, bias = _torch_rule(case, q, k, kwargs)
    sq, sk = case.sq, case.sk
    patterns = profile.patterns(LAYER, case.hq)
    # A sparse call's token positions are torch's (top-left): with more keys than queries, the keys
    # after the last query are seen by no causal query, and the layout covers the first Sq keys.
    layout_keys = sq if case.causal and sk > sq else sk
    geometry = BlockGeometry(sq, layout_keys, case.block[0], case.block[1], case.causal)
    scale = case.scale if case.scale is not None else case.d ** -0.5
    if any(p.is_dynamic for p in patterns):
        q4, k4 = _as4d(q.detach(), lead), _as4d(k, lead)[:, :, :layout_keys]  # the keys the op keeps
        from autosparse.layout import block_mask

        blocks = torch.stack([geometry.reachable() if p.is_dynamic else block_mask(p, geometry) for p in patterns])
        columns, most = None, 0
        group = case.hq // case.hkv
        for pattern in {p for p in patterns if p.is_dynamic}:
            heads = [h for h, p in enumerate(patterns) if p == pattern]
            index = torch.tensor(heads)
            chosen, cols = pattern.select(q4.index_select(1, index), k4.index_select(1, index // group), geometry, scale)
            blocks[index] = chosen.any(0)
            most = max(most, pattern.max_columns)
            if cols is not None:
                columns = torch.zeros(case.hq, layout_keys, dtype=torch.bool) if columns is None else columns
                columns[index] = cols.any(0)
        layout = BlockLayout.from_block_mask(blocks, geometry, columns, max_columns=most * q4.shape[0], sync=False)
    else:
        layout = BlockLayout.from_patterns(patterns, geometry)
    dense = layout.to_dense()
    if case.mask == "causal_keypad" and not case.causal and sq == sk and case.ndim == 4:
        # The op reads the mask as causal + key padding: a left-padded row's pattern counts from
        # its first real token (a prompt gives the same answer alone or left-padded in a batch).
        first = case.key_valid().int().argmax(1).tolist()
        return allowed & left_padded(dense, first), bias, layout
    if layout_keys < sk:
        dense = torch.nn.functional.pad(dense, (0, sk - layout_keys), value=False)
    return allowed & dense[None], bias, layout


def _delta(before, after) -> tuple[int, Counter, Counter]:
    return after.sparse - before.sparse, after.dense - before.dense, after.fallback - before.fallback


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"


def _outcome(case: Case, route: str) -> tuple[str, str | None, str | None]:
    """(class, reason, finding text or None) of one case; route "eager" (patch_model), "compile"
    (torch.compile(model, backend="autosparse"), inner compiler "eager") or "inductor" (the
    backend's default inner compiler)."""
    model = model_with(case.hq)
    try:
        profile = case.profile(model)
    except (ValueError, TypeError) as err:
        return "refused", _error_text(err), None
    q, k, v, kwargs = case.tensors()
    torch.manual_seed(case.seed)
    try:
        want, torch_error = TORCH_SDPA(q, k, v, **kwargs), None
    except Exception as err:  # noqa: BLE001 - whatever torch refuses, the patched call must refuse too
        want, torch_error = None, err
    runner: Any = model
    try:
        if route == "eager":
            autosparse.patch_model(model, profile)
        else:
            torch._dynamo.reset()
            options = {"profile": profile} if route == "inductor" else {"profile": profile, "inner": "eager"}
            runner = torch.compile(model, backend="autosparse", options=options, dynamic=False)
    except (ValueError, TypeError) as err:
        return "refused", _error_text(err), None
    from autosparse.runtime import AttentionStats

    got, error, before, after = None, None, AttentionStats(), None
    try:
        torch.manual_seed(case.seed)
        with torch.enable_grad() if case.grad else torch.no_grad():
            if route == "eager":
                before = autosparse.stats(model)
            got = runner(q, k, v, kwargs)  # compile: the backend attaches the profile at the first graph
        after = autosparse.stats(model) if _patched(model) else None
    except Exception as err:  # noqa: BLE001
        error = err
    finally:
        if _patched(model):
            autosparse.unpatch_model(model)
        if route != "eager":
            torch._dynamo.reset()
    if torch_error is not None:
        if error is not None:
            return "rejected", f"{type(torch_error).__name__} (torch) / {type(error).__name__}", None
        # torch refuses (or its chosen backend does: e.g. attn_mask with is_causal on its math path); the
        # patched call is more lenient: not a wrong answer if it gives what torch's documented rule means.
        want = None if case.nonfinite != "none" else _documented(case, q, k, v, kwargs)
        klass, reason, finding = _served_outcome(case, profile, q, k, v, kwargs, got, want, before, after)
        return ("lenient-" + klass if finding is None else klass), _error_text(torch_error), finding
    if error is not None:
        cause = getattr(error, "inner_exception", None) or error.__cause__  # the backend attaches the profile at compile time
        if isinstance(error, torch._dynamo.exc.BackendCompilerFailed) and isinstance(cause, (ValueError, TypeError)):
            return "refused", f"at compile: {_error_text(cause)}", None
        return "FINDING", None, f"patched call raised {_error_text(error)}"
    return _served_outcome(case, profile, q, k, v, kwargs, got, want, before, after)


def _served_outcome(case, profile, q, k, v, kwargs, got, want, before, after):
    """The class of a call that returned: from the stats delta, checked against the oracles (served
    sparse) or ``want`` (dense; None: not compared)."""
    if after is None:
        return "FINDING", None, "the compile backend did not attach the profile to the model"
    sparse, dense, fallback = _delta(before, after)
    counted = sparse + sum(dense.values()) + sum(fallback.values())
    if counted != 1:
        return "FINDING", None, f"call counted {counted} times (sparse={sparse}, dense={dict(dense)}, fallback={dict(fallback)})"
    if want is not None and got.dtype != want.dtype:
        return "FINDING", None, f"output dtype {got.dtype}, torch gives {want.dtype}"
    if sparse:
        try:
            allowed, bias, layout = oracle_mask(case, profile, q, k, kwargs)
        except ValueError as err:  # e.g. a causal geometry with q_len > kv_len: the op should not have served it
            return "FINDING", None, f"served sparse, but no layout for this call ({_error_text(err)})"
        lead = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3]))
        q4, k4, v4 = (_as4d(x.detach(), lead) for x in (q, k, v))
        group = case.hq // case.hkv
        k4, v4 = k4.repeat_interleave(group, 1), v4.repeat_interleave(group, 1)
        scale = case.scale if case.scale is not None else case.d ** -0.5
        ref = attention(q4, k4, v4, allowed, bias=bias, scale=scale)
        if want is not None and tuple(got.shape) != tuple(want.shape):
            return "FINDING", None, f"served sparse: output shape {tuple(got.shape)}, torch gives {tuple(want.shape)}"
        free = None
        if case.nonfinite != "none":  # rows whose visited key blocks hold a non-finite key: torch poisons every row
            g = layout.geometry
            blocks = layout_mask(layout.kv_indices, layout.kv_counts, q_block=g.q_block, kv_block=g.kv_block,
                                 seq_q=g.q_len, seq_k=g.kv_len, columns=layout.columns,
                                 column_counts=layout.column_counts)  # [1, H, Sq, Sk], no causal rule
            bad_keys = ~(torch.isfinite(k4).all(-1) & torch.isfinite(v4).all(-1))  # [B, H, Sk]
            blocks = torch.nn.functional.pad(blocks, (0, bad_keys.shape[-1] - blocks.shape[-1]), value=False)
            free = (blocks & bad_keys[:, :, None, :]).any(-1) | ~torch.isfinite(q4).all(-1)
            # Dense heads of a mixed layer run on torch's SDPA, which poisons every row of a head
            # with a non-finite key (0 * inf), as the unpatched model does.
            dense_heads = torch.tensor([p.is_dense for p in profile.patterns(LAYER, case.hq)])
            free = free | (dense_heads[None, :, None] & bad_keys.any(-1)[:, :, None])
        diff = compare(got.reshape(ref.shape), ref, q.dtype, free)
        if diff is not None:
            return "FINDING", None, f"served sparse != float64 oracle: {diff}"
        if case.nonfinite == "none" and case.dv is None:
            diff = compare(got.reshape(ref.shape), flex_attention(q4, k4, v4, allowed, bias=bias, scale=scale), q.dtype)
            if diff is not None:
                return "FINDING", None, f"served sparse != FlexAttention oracle: {diff}"
        return "sparse", None, None
    klass, reasons = ("dense", dense) if dense else ("fallback", fallback)
    reason = next(iter(reasons))
    if not reason:
        return "FINDING", None, f"{klass} without a reason"
    diff = None if want is None else compare(got, want.reshape(got.shape) if want.numel() == got.numel() else want,
                                             q.dtype)
    if diff is not None:
        return "FINDING", None, f"{klass} [{reason}] != torch SDPA: {diff}"
    return klass, reason, None


def _documented(case: Case, q, k, v, kwargs) -> torch.Tensor | None:
    """torch's documented SDPA (attn_mask AND top-left is_causal, GQA by head mapping) in float64,
    for arguments torch's kernels refuse; None where the arguments mean nothing (shapes)."""
    try:
        lead = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3]))
        q4, k4, v4 = (_as4d(x.detach(), lead) for x in (q, k, v))
        allowed, bias = _torch_rule(case, q, k, kwargs)
        scale = case.scale if case.scale is not None else case.d ** -0.5
        # torch gives NaN rows where nothing is allowed on the math path, 0 on its fused ones: 0 here.
        return attention(q4, k4, v4, allowed, bias=bias, scale=scale).reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)
    except (RuntimeError, ValueError):  # ValueError: query heads not a multiple of key/value heads
        return None


def _patched(model: nn.Module) -> bool:
    from autosparse.patch import patch_of

    return patch_of(model) is not None


def _signature(case: Case, text: str) -> str:
    """A finding's kind: what went wrong and the case features that usually decide it."""
    kinds = "+".join(sorted({h["kind"] for h in case.heads}))
    served = text.startswith("served sparse !=")
    text = text.split(":")[0] if served or "!= torch SDPA" in text else text[:90]
    return (text + (f" | kinds={kinds} dtype={case.dtype}" if served else "")
            + f" | mask={case.mask} causal={case.causal} ndim={case.ndim} sq{'==' if case.sq == case.sk else '!='}sk")


def run_case(case: Case, route: str = "eager", suite: str | None = None) -> tuple[str, str | None, str | None]:
    """Run one case and record it in the session ledger."""
    klass, reason, finding = _outcome(case, route)
    suite = suite or f"op/{route}"
    if finding is not None:
        LEDGER.finding(suite, _signature(case, finding), f"run_case({case!r}, {route!r})\n  -> {finding}")
    else:
        LEDGER.record(suite, klass, reason)
    return klass, reason, finding


def _fuzz(route: str, examples: int) -> None:
    suite = f"op/{route}"
    before = Counter(LEDGER.findings)

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def body(case):
        run_case(case, route, suite)

    body()
    new = LEDGER.findings - before
    if new:
        lines = [f"{n} case(s): {kind}\n    {LEDGER.examples[kind]}" for kind, n in new.most_common()]
        pytest.fail(f"{sum(new.values())} finding(s) in {suite}:\n" + "\n".join(lines), pytrace=False)


# -- tests ------------------------------------------------------------------------------------------------


def test_hook_route_fuzz(long_run):
    """patch_model: random calls, every pattern kind, each case in exactly one class."""
    _fuzz("eager", LONG_CASES if long_run else CI_CASES)


def test_compile_backend_fuzz(long_run):
    """torch.compile(model, backend="autosparse"): the same cases, fewer (a compile each)."""
    _fuzz("compile", LONG_COMPILE_CASES if long_run else CI_COMPILE_CASES)


# Hand-picked cases: each names a semantics of torch's SDPA the hook route must keep.
PINNED = {
    "sparse causal": Case(heads=({"kind": "sink_local", "sinks": 4, "window": 16},) * 4, causal=True),
    "sparse key padding b11k": Case(heads=({"kind": "window", "window": 16},) * 4, mask="keypad_b11k", padded=9, batch=2),
    "sparse causal + padding (left)": Case(heads=({"kind": "window", "window": 16},) * 4, causal=True,
                                           mask="causal_keypad", pad="left", padded=7, batch=2),
    "causal + key padding mask [B,1,1,Sk]": Case(heads=({"kind": "window", "window": 16},) * 4, causal=True,
                                                 mask="keypad_b11k", padded=7, batch=2),
    "causal + arbitrary bool mask": Case(heads=({"kind": "window", "window": 16},) * 4, causal=True, mask="bool_2d"),
    "causal + float bias": Case(heads=({"kind": "window", "window": 16},) * 4, causal=True, mask="float_bias"),
    "causal, Sq < Sk (top-left)": Case(heads=({"kind": "window", "window": 16},) * 4, causal=True, sq=20, sk=40),
    "causal, Sq > Sk (top-left)": Case(heads=({"kind": "window", "window": 16},) * 4, causal=True, sq=40, sk=20),
    "3-D q/k/v": Case(heads=({"kind": "window", "window": 16},) * 4, ndim=3),
    "3-D causal": Case(heads=({"kind": "window", "window": 16},) * 4, ndim=3, causal=True),
    "5-D q/k/v": Case(heads=({"kind": "window", "window": 16},) * 4, ndim=5, batch=2),
    "k/v broadcast over batch": Case(heads=({"kind": "window", "window": 16},) * 4, batch=3, kv_batch1=True),
    "scale": Case(heads=({"kind": "window", "window": 16},) * 4, scale=2.5),
    "GQA": Case(heads=({"kind": "window", "window": 16},) * 4, hkv=2),
    "GQA without enable_gqa (torch refuses)": Case(heads=({"kind": "window", "window": 16},) * 4, hkv=2, gqa_flag=False),
    "vertical_slash, not causal": Case(heads=({"kind": "vertical_slash", "vertical": 8, "slash": 8},) * 4),
    "fully masked rows": Case(heads=({"kind": "window", "window": 16},) * 4, mask="bool_rows_masked"),
    "fp16 strided": Case(heads=({"kind": "sink_local", "sinks": 4, "window": 16},) * 4, dtype="fp16",
                         memory="strided", causal=True),
    "bf16 bshd, d=256": Case(heads=({"kind": "window", "window": 16},) * 4, dtype="bf16", memory="bshd", d=256),
    "NaN in a value row": Case(heads=({"kind": "window", "window": 16},) * 4, nonfinite="nan_v", sq=48, sk=48),
    "mixed dense + sparse heads, padding": Case(heads=({"kind": "dense"}, {"kind": "window", "window": 16}) * 2,
                                                mask="keypad_b11k", padded=5, batch=2),
}


@pytest.mark.parametrize("route", ["eager", "compile"])
@pytest.mark.parametrize("name", list(PINNED))
def test_pinned(name, route):
    klass, reason, finding = run_case(PINNED[name], route, suite=f"pinned/{route}")
    assert finding is None, f"{name}: {finding}"
    if name in SERVABLE:
        assert klass == "sparse", f"{name}: expected to be served sparse, got {klass} [{reason}]"


SERVABLE = {"sparse causal", "sparse key padding b11k", "scale", "GQA",
            "fp16 strided", "bf16 bshd, d=256", "NaN in a value row",
            "mixed dense + sparse heads, padding"}


@pytest.mark.parametrize("name", ["sparse key padding b11k", "mixed dense + sparse heads, padding", "fp16 strided"])
def test_pinned_inductor(name):
    """The compile backend with its default inner compiler (inductor) on a few served cases."""
    klass, reason, finding = run_case(PINNED[name], "inductor", suite="pinned/inductor")
    assert finding is None, f"{name}: {finding}"
    assert klass == "sparse", f"{name}: expected to be served sparse, got {klass} [{reason}]"
