"""Every model family end to end (issue 14, part 3): each transformers decoder family that uses the
attention interface, built from a small config, and the diffusers transformers of
``autosparse.dits``, with a dense and a sparse uniform profile, with and without a left-padded batch.

Each forward is classified from per-layer ``autosparse.stats`` deltas (hooks on every served
attention module) and exceptions:

(a) some layers served sparse: the logits equal an oracle, the UNPATCHED model with every attention
    call replaced by float64 attention with the model's own semantics (mask, softcapping, sinks) and,
    in the layers that were served sparse, the layout's token mask;
(b) every call dense by design or a counted fallback (with a reason): equal to the unpatched model
    (eager attention);
(c) refused at patch time (ValueError/TypeError) with a message.
Anything else is a finding: the test fails. Families that cannot be built from a small config are
listed (and skipped) with the reason; the CI slice is the families the issue names, ``--long`` every
family found.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import autosparse
from autosparse import BlockGeometry, BlockLayout, Profile
from autosparse.layout import left_padded
from autosparse.models import attention_layers
from conftest import LEDGER, attention64, compare, sdpa_per_layer

warnings.filterwarnings("ignore")

BLOCKS = (16, 16)
SPARSE = {"kind": "sink_local", "sinks": 4, "window": 16}
DENSE = {"kind": "dense"}
SEQ, PAD = 64, 13  # tokens per sample; left padding of the second sample in the padded batch (not block-aligned)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=64, vocab_size=128, max_position_embeddings=256, num_experts=4, num_local_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             shared_expert_intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)
# The families the issue names (id -> model_type, class, config overrides); --long adds every other one.
NAMED = {
    "llama": ("llama", None, {}),
    "mistral-window8": ("mistral", None, {"sliding_window": 8}),
    "mistral-window64": ("mistral", None, {"sliding_window": 64}),
    "qwen2": ("qwen2", None, {}),
    "qwen3": ("qwen3", None, {}),
    "phi3": ("phi3", None, {}),
    "gemma": ("gemma", None, {}),
    "gemma2-softcap": ("gemma2", None, {"attn_logit_softcapping": 5.0, "sliding_window": 24}),
    "gemma3": ("gemma3_text", None, {"sliding_window": 24}),
    "gpt_oss-sinks": ("gpt_oss", None, {"sliding_window": 24}),
    "gpt2": ("gpt2", "GPT2LMHeadModel", {}),
    "opt": ("opt", None, {}),
}
UNBUILT: dict[str, str] = {}  # family -> why it could not be built (reported at the end)
MAX_PARAMS = 5e6


def _all_families() -> dict[str, tuple]:
    """Every ``*ForCausalLM`` whose modeling file uses ALL_ATTENTION_FUNCTIONS (the attention interface)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.dirname(transformers.__file__)
    found = {}
    for model_type, name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        module = model_type_to_module_name(model_type)
        path = os.path.join(root, "models", module, f"modeling_{module}.py")
        if name.endswith("ForCausalLM") and os.path.exists(path) and "ALL_ATTENTION_FUNCTIONS" in open(path).read():
            found[model_type] = (model_type, name, {})
    return found


def build_family(model_type: str, class_name: str | None, overrides: dict, implementation: str = "eager"):
    """A small random-weight model of the family (sinks, if any, drawn with std 2), or raises."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, class_name or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    config._attn_implementation = implementation
    with torch.device("meta"):
        size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMS:
        raise RuntimeError(f"{size / 1e6:.1f}M parameters from the small config (fields not shrunk)")
    torch.manual_seed(0)
    model = cls(config).eval()
    for module in model.modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.nn.Parameter):
            with torch.no_grad():
                sinks.normal_(0.0, 2.0)
    return model


def _inputs(padded: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    if not padded:
        return {"input_ids": torch.randint(3, 128, (1, SEQ), generator=g)}
    ids = torch.randint(3, 128, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _valid(inputs) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones(inputs["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool()


# -- per-layer classes from stats deltas ------------------------------------------------------------------


class LayerCalls:
    """Hooks on every served attention module of a patched model: per module, the stats delta of
    each of its calls (sparse count, dense reasons, fallback reasons)."""

    def __init__(self, model, modules):
        self.model, self.calls, self.handles, self._before = model, {m: [] for m in modules}, [], {}
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module, args):
        self._before[module] = autosparse.stats(self.model)

    def _leave(self, module, args, output):
        before, after = self._before.pop(module), autosparse.stats(self.model)
        self.calls[module].append((after.sparse - before.sparse, after.dense - before.dense,
                                   after.fallback - before.fallback))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def classify_calls(calls: dict) -> tuple[set, Counter, Counter, str | None]:
    """(modules served sparse, dense reasons, fallback reasons, anomaly or None)."""
    sparse, dense, fallback = set(), Counter(), Counter()
    for module, deltas in calls.items():
        for s, d, f in deltas:
            if s + sum(d.values()) + sum(f.values()) < 1:  # >1: a module may call attention more than once (DiffLlama)
                return sparse, dense, fallback, "an attention module's call was counted in no class"
            if s:
                sparse.add(module)
            dense.update(d)
            fallback.update(f)
    if not any(calls.values()):
        return sparse, dense, fallback, "no attention call was counted"
    return sparse, dense, fallback, None


# -- the transformers oracle ----------------------------------------------------------------------------------

_ORACLE = "autosparse_families_oracle"


def transformers_oracle(model, inputs, sparse_modules: set, profile: Profile) -> torch.Tensor:
    """The unpatched model with float64 attention with its own semantics; in ``sparse_modules`` the
    layout's token mask as well (geometry: the module's causality, bottom-right, as the op builds it;
    causal rows of a left-padded sample count the pattern from their first real token)."""
    names = {layer.module: layer.name for layer in attention_layers(model)}
    padding = inputs.get("attention_mask")
    first = [0] * len(inputs["input_ids"]) if padding is None else padding.int().argmax(1).tolist()

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, s_aux=None,
               is_causal=None, **kwargs):
        group = query.shape[1] // key.shape[1]
        q, k, v = query.double(), key.double().repeat_interleave(group, 1), value.double().repeat_interleave(group, 1)
        sq, sk = q.shape[2], k.shape[2]
        scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
        s = (q @ k.transpose(-1, -2)) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if attention_mask is None:
            causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
            allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else torch.ones(sq, sk, dtype=torch.bool)
            allowed = allowed[None, None]
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:
            allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        if module in sparse_modules:
            patterns = profile.patterns(names[module], query.shape[1])
            causal = bool(getattr(module, "is_causal", True))
            geometry = BlockGeometry(sq, sk, *profile.block_size, causal)
            layout = BlockLayout.from_patterns(patterns, geometry).to_dense()
            allowed = allowed & (left_padded(layout, first) if causal and sq == sk else layout[None])
        s = s.masked_fill(~allowed, float("-inf"))
        if s_aux is not None:  # learned sinks: one more logit per head, dropped after the softmax
            s = torch.cat([s, s_aux.double().reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        if s_aux is not None:
            p = p[..., :-1]
        out = p @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(_ORACLE, attend)
    AttentionMaskInterface.register(_ORACLE, sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(_ORACLE)
    try:
        return _logits(model, inputs)
    finally:
        model.set_attn_implementation(original)


def run_transformers(model, spec: dict, padded: bool) -> tuple[str, str | None, str | None]:
    """(class, reason, finding) of one forward of ``model`` with the uniform profile ``spec``."""
    inputs = _inputs(padded)
    valid = _valid(inputs)
    expected = _logits(model, inputs)
    try:
        profile = Profile.uniform(model, spec, block_size=BLOCKS)
        autosparse.patch_model(model, profile)
    except (ValueError, TypeError) as err:
        return "refused", f"{type(err).__name__}: {err}", None
    hooks = LayerCalls(model, [layer.module for layer in attention_layers(model)])
    try:
        got = _logits(model, inputs)
    except Exception as err:  # noqa: BLE001
        return "FINDING", None, f"patched forward raised {type(err).__name__}: {str(err)[:200]}"
    finally:
        hooks.remove()
        autosparse.unpatch_model(model)
    sparse, dense, fallback, anomaly = classify_calls(hooks.calls)
    if anomaly:
        return "FINDING", None, anomaly
    reasons = "; ".join(f"{r} x{n}" for r, n in (dense + fallback).items())
    if sparse:
        want = transformers_oracle(model, inputs, sparse, profile)
        diff = compare(got[valid], want[valid], got.dtype)
        if diff is None and len(sparse) < len(hooks.calls):  # layers not served must still be the model's own
            diff = compare(transformers_oracle(model, inputs, set(), profile)[valid], expected[valid], got.dtype)
            diff = None if diff is None else f"oracle without layouts != unpatched model: {diff}"
        if diff is not None:
            return "FINDING", None, f"served sparse ({len(sparse)} layers; {reasons or 'no dense calls'}) != oracle: {diff}"
        return "sparse", None, None
    diff = compare(got[valid], expected[valid], got.dtype)
    klass = "fallback" if fallback else "dense"
    if diff is not None:
        return "FINDING", None, f"{klass} ({reasons}) != unpatched model: {diff}"
    if any(not r for r in dense + fallback):
        return "FINDING", None, f"{klass} without a reason"
    return klass, reasons, None


def pytest_generate_tests(metafunc):
    if "transformers_family" in metafunc.fixturenames:
        families = dict(NAMED)
        if metafunc.config.getoption("--long"):
            families.update({k: v for k, v in _all_families().items() if k not in {v[0] for v in NAMED.values()}})
        metafunc.parametrize("transformers_family", list(families.items()), ids=list(families))


_BUILT: dict[str, object] = {}


def _model(family: str, entry: tuple):
    if family not in _BUILT:
        try:
            _BUILT[family] = build_family(*entry)
        except Exception as err:  # noqa: BLE001 - any reason a family does not build is reported
            _BUILT[family] = None
            UNBUILT[family] = f"{type(err).__name__}: {' '.join(str(err).split())[:150]}"
    return _BUILT[family]


@pytest.mark.parametrize("padded", [False, True], ids=["one", "left-padded"])
@pytest.mark.parametrize("profile", ["dense", "sparse"])
def test_transformers_family(transformers_family, profile, padded):
    family, entry = transformers_family
    model = _model(family, entry)
    if model is None:
        if family in NAMED:
            pytest.fail(f"{family} (named by the issue) could not be built: {UNBUILT[family]}")
        pytest.skip(f"{family} could not be built from a small config: {UNBUILT[family]}")
    klass, reason, finding = run_transformers(model, DENSE if profile == "dense" else SPARSE, padded)
    suite = "families/transformers"
    if finding is not None:
        LEDGER.finding(suite, f"{family} {profile} {'padded' if padded else 'one'}: {finding[:120]}", finding)
        pytest.fail(f"{family}, {profile} profile, {'left-padded batch' if padded else 'one sample'}: {finding}",
                    pytrace=False)
    LEDGER.record(suite, klass, reason)
    if profile == "dense":
        assert klass in ("dense", "refused"), f"a dense profile was served {klass}"


def test_report_unbuilt_families():
    """Lists the families that could not be built (run last in the file's order)."""
    if UNBUILT:
        print("\nfamilies not built from a small config:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(UNBUILT.items())))


# -- diffusers ----------------------------------------------------------------------------------------------


def _dit_reference(dit, profile, inputs, sparse_modules: set):
    """The unpatched model, each call of a layer served sparse run as float64 attention on the layout's
    token mask (tile order mapped back, text dense, the call's own key padding); others torch's SDPA."""
    from autosparse.families import family_of
    from autosparse.layout import grid_order

    model = dit.model
    tokens = family_of(model).geometry(model, inputs)
    layers = {layer.module: layer for layer in attention_layers(model)}

    def attend(layer, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        if layer is None or layer.module not in sparse_modules:
            return original(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        patterns = profile.patterns(layer.name, layer.num_heads)
        tiled = grid_order(patterns, tokens, *BLOCKS) if any(p.needs_grid for p in patterns) else tokens
        geometry = BlockGeometry(query.shape[2], key.shape[2], *BLOCKS, False, tiled)
        mask = BlockLayout.from_patterns(patterns, geometry).to_dense()
        if tiled.tile is not None:
            inverse = tiled.inverse_permutation()
            mask = mask[:, inverse][:, :, inverse]
        mask = mask[None]
        if attn_mask is not None:
            mask = mask & attn_mask
        return attention64(query, key, value, mask, None, scale).to(query.dtype)

    with sdpa_per_layer(layers, attend), torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("profile", ["dense", "sparse"])
@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox", "flux"])
def test_diffusers_family(family, profile):
    from autosparse.dits import build_dit

    dit = build_dit(family, "tiny")
    inputs = dit.inputs()
    with torch.no_grad():
        expected = dit.model(**inputs).sample
    suite = "families/diffusers"
    try:
        prof = Profile.uniform(dit.model, DENSE if profile == "dense" else SPARSE, block_size=BLOCKS)
        autosparse.patch_model(dit.model, prof)
    except (ValueError, TypeError) as err:
        LEDGER.record(suite, "refused", f"{type(err).__name__}: {err}")
        return
    hooks = LayerCalls(dit.model, [layer.module for layer in attention_layers(dit.model)])
    try:
        with torch.no_grad():
            got = dit.model(**inputs).sample
    finally:
        hooks.remove()
        autosparse.unpatch_model(dit.model)
    sparse, dense, fallback, anomaly = classify_calls(hooks.calls)
    finding = anomaly
    if finding is None:
        want = _dit_reference(dit, prof, inputs, sparse) if sparse else expected
        diff = compare(got, want, got.dtype)
        if diff is not None:
            finding = f"{'served sparse' if sparse else 'dense'} ({dict(dense + fallback)}) != reference: {diff}"
    if finding is not None:
        LEDGER.finding(suite, f"{family} {profile}: {finding[:120]}", finding)
        pytest.fail(f"{family}, {profile} profile: {finding}", pytrace=False)
    klass = "sparse" if sparse else ("fallback" if fallback else "dense")
    LEDGER.record(suite, klass, "; ".join(dense + fallback) or None)
    if profile == "dense":
        assert not sparse and not fallback, f"dense profile: {len(sparse)} layers sparse, fallbacks {dict(fallback)}"
    else:
        assert sparse, f"sink_local profile served nothing sparse ({dict(dense + fallback)})"
