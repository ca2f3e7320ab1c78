"""Every model family end to end (issue 14, part 3): each transformers decoder family that uses the
attention interface, with and without a left-padded batch, and every diffusers transformer class
(``ModelMixin`` named "*Transformer*"), each built from a small config, with a dense and a sparse
uniform profile (diffusers: a 1-D window, which every family can run).

Each forward is classified from per-layer ``autosparse.stats`` deltas (hooks on every served
attention module) and exceptions:

(a) some layers served sparse: the logits equal an oracle, the UNPATCHED model with every attention
    call replaced by float64 attention with the model's own semantics (mask, softcapping, sinks) and,
    in the layers that were served sparse, the layout's token mask;
    diffusers: the unpatched model with each SDPA call the patched forward served sparse (in call
    order) replaced by float64 attention on the layout's token mask (the family's token geometry;
    without an adapter, the 1-D layout over the call's own sequence);
(b) every call dense by design or a counted fallback (with a reason): equal to the unpatched model
    (eager attention);
(c) refused at patch time (ValueError/TypeError) with a message.
Anything else is a finding: the test fails. Families that cannot be built from a small config are
listed (and skipped) with the reason; the CI slice is the families the issue names (diffusers:
DIT_CI), ``--long`` every family found.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections import Counter

import pytest
import torch
import transformers

import autosparse
from autosparse import Profile
from autosparse.models import attention_layers
from autosparse.testing.reference import layout_mask, sdpa_attention, sdpa_per_layer, transformers_reference
from conftest import LEDGER, compare

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


def transformers_oracle(model, inputs, sparse_modules: set, profile: Profile) -> torch.Tensor:
    """The unpatched model with float64 attention with its own semantics; in ``sparse_modules`` the
    layout's token mask as well (geometry: the module's causality, bottom-right, as the op builds it;
    causal rows of a left-padded sample count the pattern from their first real token)."""
    with transformers_reference(model, profile, inputs.get("attention_mask"), layers=sparse_modules):
        return _logits(model, inputs)


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
    if "dit_class" in metafunc.fixturenames:
        names = dit_classes() if metafunc.config.getoption("--long") else DIT_CI
        metafunc.parametrize("dit_class", names, ids=[DIT_KNOWN.get(n, n) for n in names])


_BUILT: dict[str, object] = {}


def _model(family: str, entry: tuple):
    if family not in _BUILT:
        try:
            model = build_family(*entry)
            for padded in (False, True):  # the small config must run unpatched, else nothing is tested
                _logits(model, _inputs(padded))
            _BUILT[family] = model
        except Exception as err:  # noqa: BLE001 - any reason a family does not build or run is reported
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
        pytest.skip(f"{family} could not be built or run unpatched from a small config: {UNBUILT[family]}")
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


# -- every diffusers transformer (issue 14, part 3) ---------------------------------------------------------
#
# Every ``ModelMixin`` subclass of diffusers whose name contains "Transformer", built from a small
# config (DIT_SMALL for the constructor arguments it has, DIT_CONFIG per class) with tiny inputs (a
# generic builder from the forward signature, DIT_INPUTS per class); the four families of
# ``autosparse.testing.dits`` are built there. A class that does not build, or whose unpatched forward fails
# or takes longer than DIT_MAX_SECONDS, is listed by ``test_report_unbuilt_dits`` with the reason.

DIT_SPARSE = {"kind": "window", "window": 16}  # 1-D: every family runs it (no token grid needed)
DIT_MAX_SECONDS = 2.0
DIT_SMALL = dict(num_layers=1, num_single_layers=1, num_refiner_layers=1, num_attention_heads=2, attention_head_dim=16,
                 in_channels=4, out_channels=4, cross_attention_dim=32, joint_attention_dim=32, caption_channels=32,
                 text_embed_dim=32, text_dim=32, pooled_projection_dim=16, caption_projection_dim=32, ffn_dim=64,
                 freq_dim=32, time_embed_dim=32, axes_dims_rope=(4, 6, 6), sample_size=16, pos_embed_max_size=32,
                 hidden_size=32, intermediate_size=64, head_dim=16, num_key_value_heads=2, norm_num_groups=2)
DIT_TEXT_FIELDS = ("joint_attention_dim", "cross_attention_dim", "caption_channels", "text_embed_dim", "text_dim",
                   "cap_feat_dim")
TEXT = 8  # text tokens
DIT_CONFIG: dict[str, dict] = {  # class -> constructor arguments beyond DIT_SMALL
    "LTXVideoTransformer3DModel": dict(patch_size=1),
    "AuraFlowTransformer2DModel": dict(num_mmdit_layers=1, num_single_dit_layers=1),
    "Lumina2Transformer2DModel": dict(num_kv_heads=2, axes_dim_rope=(4, 6, 6), cap_feat_dim=32, multiple_of=16),
    "MochiTransformer3DModel": dict(),
    "QwenImageTransformer2DModel": dict(out_channels=4),
    "CogView3PlusTransformer2DModel": dict(condition_dim=16),
    "CogView4Transformer2DModel": dict(condition_dim=16),
    "ChromaTransformer2DModel": dict(approximator_hidden_dim=32, approximator_layers=1, approximator_num_channels=16),
    "HunyuanImageTransformer2DModel": dict(rope_axes_dim=(8, 8), patch_size=(1, 1)),
    "HiDreamImageTransformer2DModel": dict(patch_size=2, caption_channels=[32, 32], text_emb_dim=32,
                                           axes_dims_rope=(8, 8), llama_layers=[0], num_routed_experts=2),
    "LatteTransformer3DModel": dict(patch_size=2, video_length=4),
    "EasyAnimateTransformer3DModel": dict(patch_size=2, mmdit_layers=1, sample_width=16, sample_height=16),
}


def _grid_ids(rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).float()


def _cogview_inputs(model, randn):
    size = torch.tensor([[128.0, 128.0]])
    return [{"hidden_states": randn(1, 4, 16, 16), "encoder_hidden_states": randn(1, TEXT, 32),
             "timestep": torch.tensor([500.0]), "original_size": size, "target_size": size,
             "crop_coords": torch.zeros(1, 2)}]


DIT_INPUTS = {  # class -> (model, randn) -> candidate forward arguments (the first that runs is used)
    "LTXVideoTransformer3DModel": lambda model, randn: [{
        "hidden_states": randn(1, 64, 4), "encoder_hidden_states": randn(1, TEXT, 32), "timestep": torch.tensor([500]),
        "encoder_attention_mask": torch.ones(1, TEXT), "num_frames": 4, "height": 4, "width": 4}],
    "QwenImageTransformer2DModel": lambda model, randn: [{
        "hidden_states": randn(1, 64, 4), "encoder_hidden_states": randn(1, TEXT, 32),
        "encoder_hidden_states_mask": torch.ones(1, TEXT), "timestep": torch.tensor([0.5]), "img_shapes": [(1, 8, 8)]}],
    "CogView3PlusTransformer2DModel": _cogview_inputs,
    "CogView4Transformer2DModel": _cogview_inputs,
    "HiDreamImageTransformer2DModel": lambda model, randn: [{
        "hidden_states": randn(1, 4, 16, 16), "timesteps": torch.tensor([500.0]),
        "encoder_hidden_states_t5": randn(1, TEXT, 32), "encoder_hidden_states_llama3": randn(1, 1, TEXT, 32),
        "pooled_embeds": randn(1, 32)}],
}


def _generic_inputs(model, randn) -> list[dict]:
    """Candidate forward arguments from the forward signature: hidden_states of each plausible rank
    (64 grid tokens at patch 2, or 64 packed tokens), text, timestep, pooled projections, image ids."""
    config, name = dict(model.config), type(model).__name__
    channels = config.get("in_channels") or 4
    text_dim = next((config[k] for k in DIT_TEXT_FIELDS if isinstance(config.get(k), int)), 32)
    wanted = inspect.signature(type(model).forward).parameters
    latents = [(1, channels, 4, 8, 8), (1, 4, channels, 8, 8)] if "3D" in name else []
    latents += [(1, channels, 16, 16), (1, 64, channels), (1, channels, 4, 8, 8)]
    found = []
    for shape in latents:
        args = {"hidden_states": randn(*shape)}
        if "encoder_hidden_states" in wanted:
            args["encoder_hidden_states"] = randn(1, TEXT, text_dim)
        if "encoder_attention_mask" in wanted and wanted["encoder_attention_mask"].default is inspect.Parameter.empty:
            args["encoder_attention_mask"] = torch.ones(1, TEXT, dtype=torch.long)
        if "timestep" in wanted:
            args["timestep"] = torch.tensor([500.0])
        if "pooled_projections" in wanted and config.get("pooled_projection_dim"):
            args["pooled_projections"] = randn(1, config["pooled_projection_dim"])
        if "img_ids" in wanted and len(shape) == 3:
            args["img_ids"], args["txt_ids"] = _grid_ids(8, 8), torch.zeros(TEXT, 3)
        found.append(args)
    mask_variants = []
    for args in found:  # a boolean text mask where an integer one fails
        if "encoder_attention_mask" in args:
            mask_variants.append({**args, "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.bool)})
    return found + mask_variants


def dit_classes() -> list[str]:
    """Every diffusers model class (ModelMixin) whose name contains "Transformer"."""
    import diffusers
    from diffusers import ModelMixin

    found = []
    for name in sorted(dir(diffusers)):
        if "Transformer" not in name:
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # noqa: BLE001 - an optional dependency missing: not a class here
            continue
        if inspect.isclass(cls) and issubclass(cls, ModelMixin):
            found.append(name)
    return found


DIT_KNOWN = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan_video",
             "CogVideoXTransformer3DModel": "cogvideox", "FluxTransformer2DModel": "flux"}
# The CI slice: the four families of autosparse.testing.dits and a fixed set of others that build and run fast.
DIT_CI = [*DIT_KNOWN, "SD3Transformer2DModel", "PixArtTransformer2DModel", "SanaTransformer2DModel",
          "Lumina2Transformer2DModel", "MochiTransformer3DModel", "LTXVideoTransformer3DModel",
          "AuraFlowTransformer2DModel", "AllegroTransformer3DModel", "CogView4Transformer2DModel",
          "Flux2Transformer2DModel", "SkyReelsV2Transformer3DModel"]
# Token shapes beyond the tiny defaults: FLUX's 4x6 grid (29 tokens with the text) is two blocks, which
# a 16-token window covers whole (the sparse case would be dense in all but name).
DIT_SHAPES = {"FluxTransformer2DModel": dict(height=8, width=8)}
UNBUILT_DITS: dict[str, str] = {}
_DITS: dict[str, tuple | None] = {}


def _sample(output) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def build_dit_case(name: str) -> tuple:
    """(model, forward arguments) of a tiny ``name``, or raises (why it cannot be built or run)."""
    import diffusers

    if name in DIT_KNOWN:
        from autosparse.testing.dits import build_dit

        dit = build_dit(DIT_KNOWN[name], "tiny", **DIT_SHAPES.get(name, {}))
        torch.manual_seed(2)
        return dit.model, dit.inputs()
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**DIT_SMALL, **DIT_CONFIG.get(name, {})}.items() if k in params}
    with torch.device("meta"):
        size = sum(p.numel() for p in cls(**kwargs).parameters())
    if size > MAX_PARAMS:
        raise RuntimeError(f"{size / 1e6:.1f}M parameters from the small config (fields not shrunk)")
    torch.manual_seed(0)
    model = cls(**kwargs).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    errors = []
    for args in DIT_INPUTS.get(name, _generic_inputs)(model, lambda *s: torch.randn(*s, generator=g)):
        try:
            with torch.no_grad():
                _sample(model(**args))
            return model, args
        except Exception as err:  # noqa: BLE001 - try the next candidate
            errors.append(f"{type(err).__name__}: {' '.join(str(err).split())[:150]}")
    raise RuntimeError(f"no tiny input ran: {errors[0]}")


def _dit_case(name: str):
    if name not in _DITS:
        try:
            model, args = build_dit_case(name)
            start = time.perf_counter()
            with torch.no_grad():
                _sample(model(**args))
            took = time.perf_counter() - start
            if took > DIT_MAX_SECONDS:
                raise RuntimeError(f"unpatched forward took {took:.1f}s on CPU (over {DIT_MAX_SECONDS}s)")
            _DITS[name] = model, args
        except Exception as err:  # noqa: BLE001 - any reason a class does not build or run is reported
            _DITS[name] = None
            UNBUILT_DITS[name] = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return _DITS[name]


class SdpaCalls:
    """While a hooked model is patched: every ``F.scaled_dot_product_attention`` call, in order, and
    whether autosparse served it sparse (its ``stats`` sparse count rose across the call)."""

    def __init__(self, model):
        self.model, self.sparse = model, []

    def __enter__(self):
        import torch.nn.functional as F

        self.inner = F.scaled_dot_product_attention

        def sdpa(*args, **kwargs):
            before = autosparse.stats(self.model).sparse
            out = self.inner(*args, **kwargs)
            self.sparse.append(autosparse.stats(self.model).sparse > before)
            return out

        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self.inner


def dit_oracle(model, inputs, pattern, served: list[bool]) -> torch.Tensor:
    """The unpatched model with its SDPA calls replayed in order: call i, if the patched forward
    served it sparse (``served[i]``), is float64 attention on the layout's token mask (the family's
    token geometry, tile order mapped back, text dense; without an adapter the 1-D layout over the
    call's own sequence, non-causal unless the call is causal) and the call's own mask; the others
    torch's SDPA."""
    from autosparse.models.families import family_of

    family = family_of(model)
    try:
        tokens = None if family.geometry is None else family.geometry(model, inputs)
    except (KeyError, ValueError, AttributeError):
        tokens = None
    index = [0]

    def sdpa(layer, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        i = index[0]
        index[0] += 1
        if i >= len(served):
            raise AssertionError(f"the unpatched forward makes more SDPA calls than the patched one ({len(served)})")
        if not served[i]:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        length = query.shape[2]
        claimed = layout_mask((pattern,) * query.shape[1], tokens, length, length, BLOCKS, bool(is_causal))[None]
        return sdpa_attention(query, key, value, attn_mask, is_causal, scale, allowed=claimed)

    with sdpa_per_layer({}, sdpa), torch.no_grad():
        out = _sample(model(**inputs))
    if index[0] != len(served):
        raise AssertionError(f"the unpatched forward made {index[0]} SDPA calls, the patched one {len(served)}")
    return out


def run_dit(model, inputs, spec: dict) -> tuple[str, str | None, str | None, int]:
    """(class, reasons, finding, sparse calls) of one forward of a diffusers ``model`` with the
    uniform profile ``spec``."""
    from autosparse.patterns import pattern_from_spec

    with torch.no_grad():
        expected = _sample(model(**inputs))
    try:
        profile = Profile.uniform(model, spec, block_size=BLOCKS)
        autosparse.patch_model(model, profile)
    except (ValueError, TypeError) as err:
        return "refused", f"{type(err).__name__}: {err}", None, 0
    hooks = LayerCalls(model, [layer.module for layer in attention_layers(model)])
    try:
        with SdpaCalls(model) as calls, torch.no_grad():
            got = _sample(model(**inputs))
    except Exception as err:  # noqa: BLE001
        return "FINDING", None, f"patched forward raised {type(err).__name__}: {str(err)[:200]}", 0
    finally:
        hooks.remove()
        autosparse.unpatch_model(model)
    sparse, dense, fallback, anomaly = classify_calls(hooks.calls)
    if anomaly:
        return "FINDING", None, anomaly, 0
    reasons = "; ".join(f"{r} x{n}" for r, n in (dense + fallback).items())
    served = sum(calls.sparse)
    if served:
        want = dit_oracle(model, inputs, pattern_from_spec(spec), calls.sparse)
        diff = compare(got, want, got.dtype)
        if diff is not None:
            return ("FINDING", None, f"served sparse ({served} of {len(calls.sparse)} SDPA calls; "
                    f"{reasons or 'no dense calls'}) != oracle: {diff}", served)
        return "sparse", reasons or None, None, served
    klass = "fallback" if fallback else "dense"
    diff = compare(got, expected, got.dtype)
    if diff is not None:
        return "FINDING", None, f"{klass} ({reasons}) != unpatched model: {diff}", 0
    if any(not r for r in dense + fallback):
        return "FINDING", None, f"{klass} without a reason", 0
    return klass, reasons, None, 0


@pytest.mark.parametrize("profile", ["dense", "sparse"])
def test_diffusers_family(dit_class, profile):
    case = _dit_case(dit_class)
    if case is None:
        if dit_class in DIT_CI:
            pytest.fail(f"{dit_class} (in the CI slice) could not be built or run: {UNBUILT_DITS[dit_class]}")
        pytest.skip(f"{dit_class} could not be built or run from a small config: {UNBUILT_DITS[dit_class]}")
    model, inputs = case
    klass, reason, finding, served = run_dit(model, inputs, DENSE if profile == "dense" else DIT_SPARSE)
    suite = "families/diffusers"
    if finding is not None:
        LEDGER.finding(suite, f"{dit_class} {profile}: {finding[:120]}", finding)
        pytest.fail(f"{dit_class}, {profile} profile: {finding}", pytrace=False)
    LEDGER.record(suite, klass, reason)
    DIT_CLASSES[(dit_class, profile)] = f"{klass}" + (f" ({served} SDPA calls sparse)" if served else "") + (
        f": {reason}" if reason else "")
    if profile == "dense":
        assert klass in ("dense", "refused"), f"a dense profile was served {klass}"
    elif dit_class in DIT_KNOWN:  # the families with a token-geometry adapter serve a 1-D window
        assert klass == "sparse", f"{dit_class}: the window profile served nothing sparse ({reason})"


DIT_CLASSES: dict[tuple[str, str], str] = {}


def test_report_unbuilt_dits():
    """Lists the diffusers classes that could not be built or run, and each case's class (run last)."""
    if DIT_CLASSES:
        print("\ndiffusers cases:\n" + "\n".join(f"  {n} {p}: {k}" for (n, p), k in sorted(DIT_CLASSES.items())))
    if UNBUILT_DITS:
        print("\ndiffusers classes not built or run from a small config:\n"
              + "\n".join(f"  {k}: {v}" for k, v in sorted(UNBUILT_DITS.items())))
