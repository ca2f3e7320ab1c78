"""``torch.compile(model, backend="autosparse")``: entry point, the SDPA pass, regional compilation,
same answers as ``patch_model``, graph breaks and recompiles counted (tiny random-weight models, CPU).

The reference for every compiled run is the same model patched eagerly with the same profile (itself
checked against dense masked attention in test_patch.py / test_diffusers.py); a dense profile must
give exactly what plain ``torch.compile`` gives.
"""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import autosparse
from autosparse import profiles
from autosparse.testing.dits import build_dit
from autosparse.passes.sdpa import find_sdpa
from conftest import tiny_llama
from test_diffusers import NEIGHBORHOOD, SERVED, _dit, _profile

ATTENTION = torch.ops.autosparse.attention.default
SINK_LOCAL = {"kind": "sink_local", "sinks": 4, "window": 64}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Inner:
    """An inner compiler that keeps every graph it is handed (after autosparse's pass)."""

    def __init__(self, backend="aot_eager"):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs = []
        self._backend = lookup_backend(backend)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self._backend(gm, example_inputs)

    def count(self, target):
        return sum(1 for gm in self.graphs for node in gm.graph.nodes if node.target is target)


def tiny_qwen3():
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                         attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).eval()


def eager_patched(model, profile, *args, **kwargs):
    """The model's output patched eagerly with ``profile`` (the reference), then unpatched."""
    autosparse.patch_model(model, profile, strict=True)
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
        return out, autosparse.stats(model)
    finally:
        autosparse.unpatch_model(model)


# -- LLMs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding-mask"])
def test_llm_matches_patch_model(make, padded):
    """GQA models: without padding transformers passes is_causal and unexpanded k/v; with a padding
    mask it passes a bool mask and expanded k/v. Both run sparse and equal the eager patch."""
    model = make()
    profile = autosparse.Profile.uniform(model, SINK_LOCAL)
    ids = torch.randint(0, 512, (2, 320))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :37] = 0
    expected, eager_calls = eager_patched(model, profile, ids, attention_mask=mask, use_cache=False)
    inner = Inner()
    compiled = torch.compile(model, backend="autosparse", options={"profile": profile, "inner": inner})
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask, use_cache=False)
    calls = autosparse.stats(model)
    torch.testing.assert_close(got.logits[mask.bool()], expected.logits[mask.bool()], rtol=1e-5, atol=1e-5)
    assert calls == eager_calls and calls.sparse == 2 and not calls.fallback
    assert inner.count(ATTENTION) == 2
    # GQA reaches the op unexpanded (with a mask transformers repeats k/v; the pass looks through it)
    kv_heads = [node.args[1].meta["example_value"].shape[1] for gm in inner.graphs for node in gm.graph.nodes
                if node.target is ATTENTION]
    assert kv_heads == [model.config.num_key_value_heads] * 2
    autosparse.unpatch_model(model)


def test_dense_profile_is_plain_torch_compile(llama):
    """Every layer dense at every step: SDPA stays in the graph, the result is bit-identical to plain
    torch.compile, and the calls are counted."""
    profile = autosparse.Profile.uniform(llama, {"kind": "dense"})
    ids = torch.randint(0, 512, (1, 256))
    with torch.no_grad():
        plain = torch.compile(llama, backend="aot_eager")(ids).logits
        torch._dynamo.reset()
        inner = Inner()
        got = torch.compile(llama, backend="autosparse", options={"profile": profile, "inner": inner})(ids).logits
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert inner.count(ATTENTION) == 0 and sum(len(find_sdpa(gm)) for gm in inner.graphs) == 2
    assert autosparse.stats(llama).dense["dense in profile"] == 2
    with pytest.raises(RuntimeError, match="served by torch.compile.*patch a copy"):  # eager on top: say how
        autosparse.patch_model(llama, profile)
    autosparse.unpatch_model(llama)


def test_inductor_inner_compiler(llama):
    """The default inner compiler: inductor compiles the graph around the opaque op."""
    profile = autosparse.Profile.uniform(llama, SINK_LOCAL)
    ids = torch.randint(0, 512, (1, 320))
    expected, _ = eager_patched(llama, profile, ids)
    with torch.no_grad():
        got = torch.compile(llama, backend="autosparse", options={"profile": profile})(ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert autosparse.stats(llama).sparse == 2
    autosparse.unpatch_model(llama)


def test_entry_point_in_a_fresh_process(tmp_path, llama):
    """backend="autosparse" resolves through the torch_dynamo_backends entry point: the child
    process imports torch and transformers only, then compiles."""
    profile_path = tmp_path / "p.json"
    autosparse.Profile.uniform(llama, SINK_LOCAL).save(profile_path)
    llama.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, attn_implementation="sdpa").eval()
        compiled = torch.compile(model, backend="autosparse",
                                 options={{"profile": {str(profile_path)!r}, "inner": "aot_eager"}})
        with torch.no_grad():
            compiled(torch.randint(0, 512, (1, 256)))
        import autosparse
        print(autosparse.stats(model).sparse)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "2"


# -- diffusers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(SERVED))
def test_dit_matches_patch_model(family):
    """Whole-model compile: the call context (grid, text, padding, step) is read from the graph's
    inputs, the grid patterns run in tile order, exactly as when patched eagerly."""
    dit = _dit(family)
    profile = _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD[family]})
    inputs = dit.inputs()
    expected, eager_calls = eager_patched(dit.model, profile, **inputs)
    inner = Inner()
    compiled = torch.compile(dit.model, backend="autosparse",
                             options={"profile": profile, "inner": inner, "strict": True})
    with torch.no_grad():
        got = compiled(**inputs)
    torch.testing.assert_close(got.sample, expected.sample, rtol=1e-5, atol=1e-5)
    assert autosparse.stats(dit.model) == eager_calls and eager_calls.sparse == SERVED[family]
    assert len(inner.graphs) == 1 and inner.count(ATTENTION) == SERVED[family]
    autosparse.unpatch_model(dit.model)


def _per_layer_profile(model):
    """Block 0 dense, block 1 a neighborhood: a graph shared by both blocks must tell them apart."""
    profile = _profile(model, {"kind": "neighborhood", "window": NEIGHBORHOOD["wan"]})
    first = profile.layers["blocks.0.attn1"]
    profile.layers["blocks.0.attn1"] = autosparse.LayerProfile(first.index, first.num_heads,
                                                               (autosparse.Dense(),) * first.num_heads)
    return profile


def test_compile_repeated_blocks_one_graph_per_block_kind():
    """Regional compilation: one graph for both Wan blocks, each block served with its own
    patterns (the layer id comes from the block's parameters at run time), no recompile per block;
    the transformer runs eagerly, so its call context comes from the pre-hook the backend installs,
    seeded for the call that triggered compilation."""
    dit = _dit("wan")
    profile = _per_layer_profile(dit.model)
    inputs = dit.inputs()
    expected, eager_calls = eager_patched(dit.model, profile, **inputs)
    inner = Inner()
    dit.model.compile_repeated_blocks(backend="autosparse", options={"profile": profile, "inner": inner})
    with torch.no_grad():
        first = dit.model(**inputs).sample
        second = dit.model(**inputs).sample
    calls = autosparse.stats(dit.model)
    torch.testing.assert_close(first, expected.sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected.sample, rtol=1e-5, atol=1e-5)
    assert eager_calls.sparse == 1 and calls.sparse == 2 and calls.dense["dense in profile"] == 2
    assert len(inner.graphs) == 1
    autosparse.unpatch_model(dit.model)


def test_resolution_change_recompiles_once_then_stays_dynamic():
    dit = build_dit("wan", frames=2, height=32, width=96)
    model = dit.model
    profile = _profile(model, {"kind": "neighborhood", "window": NEIGHBORHOOD["wan"]})
    shapes = [(2, 32, 96), (2, 48, 64), (4, 32, 80)]
    inputs = [build_dit("wan", frames=f, height=h, width=w).inputs() for f, h, w in shapes]
    expected = [eager_patched(model, profile, **x)[0].sample for x in inputs]
    inner = Inner()
    model.compile_repeated_blocks(backend="autosparse", options={"profile": profile, "inner": inner})
    for x, e in zip(inputs, expected):
        with torch.no_grad():
            got = model(**x).sample
        calls = autosparse.stats(model, reset=True)
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-5)
        assert calls.sparse == SERVED["wan"] and not calls.fallback
    assert len(inner.graphs) == 2  # the first shape, then one dynamic graph for every later one
    autosparse.unpatch_model(model)


def test_no_graph_breaks_and_no_recompiles():
    """Whole-model compile of Wan and Llama: one graph, no graph break; calling again (and again at
    another denoising step) compiles nothing new."""
    from torch._dynamo.utils import counters

    counters.clear()
    dit = _dit("wan")
    inner = Inner()
    profile = _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD["wan"]}).with_dense_steps(1)
    compiled = torch.compile(dit.model, backend="autosparse", options={"profile": profile, "inner": inner})
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            compiled(**dit.inputs(timestep=t))
    llama = tiny_llama()
    compiled = torch.compile(llama, backend="autosparse",
                             options={"profile": autosparse.Profile.uniform(llama, SINK_LOCAL), "inner": inner})
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randint(0, 512, (1, 256)))
    assert len(inner.graphs) == 2
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    calls = autosparse.stats(dit.model)
    assert calls.dense["dense in profile"] == SERVED["wan"] and calls.sparse == 2 * SERVED["wan"]
    autosparse.unpatch_model(dit.model)
    autosparse.unpatch_model(llama)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_step_schedule_under_compile(regional):
    """Dense first step, sparse after: the step is read per call (from the graph's timestep input, or
    by the pre-hook) and the op decides at run time, with one graph."""
    dit = _dit("wan")
    profile = _profile(dit.model, {"kind": "neighborhood", "window": NEIGHBORHOOD["wan"]}).with_dense_steps(1)
    steps = [dit.inputs(timestep=t) for t in (900.0, 800.0)]
    autosparse.patch_model(dit.model, profile)
    with torch.no_grad():  # the eager patch sees both steps in one generation
        expected = [dit.model(**inputs).sample for inputs in steps]
    autosparse.unpatch_model(dit.model)
    inner = Inner()
    options = {"profile": profile, "inner": inner}
    if regional:
        dit.model.compile_repeated_blocks(backend="autosparse", options=options)
        run = dit.model
    else:
        run = torch.compile(dit.model, backend="autosparse", options=options)
    with torch.no_grad():
        got = [run(**inputs).sample for inputs in steps]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    calls = autosparse.stats(dit.model)
    assert calls.dense["dense in profile"] == SERVED["wan"] and calls.sparse == SERVED["wan"]
    assert len(inner.graphs) == 1
    autosparse.unpatch_model(dit.model)


# -- what is not served, options, profiles --------------------------------------------------------


def test_calls_with_gradients_stay_sdpa_and_are_counted(llama):
    profile = autosparse.Profile.uniform(llama, SINK_LOCAL)
    llama.requires_grad_(True)
    ids = torch.randint(0, 512, (1, 256))
    plain = torch.compile(llama, backend="aot_eager")(ids).logits
    torch._dynamo.reset()
    inner = Inner()
    got = torch.compile(llama, backend="autosparse", options={"profile": profile, "inner": inner})(ids).logits
    got.sum().backward()
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert inner.count(ATTENTION) == 0
    assert autosparse.stats(llama).fallback == {"autograd (the kernel has no backward)": 2}
    autosparse.unpatch_model(llama)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strict=True"):
        torch.compile(llama, backend="autosparse", options={"profile": profile, "strict": True})(ids)
    autosparse.unpatch_model(llama)


def test_without_a_profile_compiles_dense_and_says_so_once(llama, caplog):
    ids = torch.randint(0, 512, (1, 128))
    with torch.no_grad():
        plain = torch.compile(llama, backend="aot_eager")(ids).logits
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING, logger="autosparse"):
            compiled = torch.compile(llama, backend="autosparse", options={"inner": "aot_eager"})
            got = compiled(ids).logits
            compiled(torch.randint(0, 512, (1, 200)))  # a recompile: not said again
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    said = [r.getMessage() for r in caplog.records if "no shipped profile fits" in r.getMessage()]
    assert len(said) == 1, said
    assert autosparse.patch.patch_of(llama) is None


def test_shipped_profile_found_for_a_real_shaped_model():
    wan = build_dit("wan", "real", device="meta").model
    assert profiles.matching(wan).stem == "wan2.1-t2v-1.3b-480p"
    flux = build_dit("flux", "real", device="meta").model
    assert profiles.matching(flux).stem == "flux.1-dev-1024"  # 1024 and 2048 fit: the first by name
    assert profiles.matching(build_dit("wan").model) is None


def test_options_and_profiles_are_checked(llama, tmp_path):
    ids = torch.randint(0, 512, (1, 64))
    with pytest.raises(Exception, match=r"options \['profil'\]: unknown"):
        torch.compile(llama, backend="autosparse", options={"profil": "x.json"})(ids)
    torch._dynamo.reset()
    wrong = autosparse.Profile.uniform(tiny_llama(layers=3), SINK_LOCAL)
    with pytest.raises(Exception, match="model.config.num_hidden_layers"):
        torch.compile(llama, backend="autosparse", options={"profile": wrong, "inner": "aot_eager"})(ids)


def test_a_model_patched_eagerly_compiles_through_its_op(llama):
    """patch_model then backend="autosparse": the graph already calls the op; nothing attaches twice."""
    profile = autosparse.Profile.uniform(llama, SINK_LOCAL)
    ids = torch.randint(0, 512, (1, 320))
    expected, _ = eager_patched(llama, profile, ids)
    autosparse.patch_model(llama, profile)
    with torch.no_grad():
        got = torch.compile(llama, backend="autosparse", options={"inner": "aot_eager"})(ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert autosparse.stats(llama).sparse == 2
    autosparse.unpatch_model(llama)


def test_unpatching_a_compiled_model_refuses_to_run_it(llama):
    profile = autosparse.Profile.uniform(llama, SINK_LOCAL)
    compiled = torch.compile(llama, backend="autosparse", options={"profile": profile, "inner": "aot_eager"})
    ids = torch.randint(0, 512, (1, 256))
    with torch.no_grad():
        compiled(ids)
        autosparse.unpatch_model(llama)
        with pytest.raises(RuntimeError, match="torch._dynamo.reset"):
            compiled(ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs, the Triton kernel in bf16)")
def test_cuda_graph_mode_keeps_per_call_decisions():
    """mode="reduce-overhead" turns on CUDA graphs in inductor; the op decides per call on the host
    (dense first step, sparse after), so it must stay out of the captured graphs."""
    dit = build_dit("wan", device="cuda", dtype=torch.bfloat16, config={"attention_head_dim": 64},
                    frames=2, height=32, width=96)
    profile = autosparse.Profile.uniform(dit.model, {"kind": "neighborhood", "window": [1, 5, 5]}).with_dense_steps(1)
    steps = [dit.inputs(timestep=t) for t in (900.0, 800.0, 700.0)]
    autosparse.patch_model(dit.model, profile, strict=True)
    with torch.no_grad():
        expected = [dit.model(**inputs).sample for inputs in steps]
    autosparse.unpatch_model(dit.model)
    compiled = torch.compile(dit.model, backend="autosparse",
                             options={"profile": profile, "strict": True, "mode": "reduce-overhead"})
    with torch.no_grad():
        for _ in range(2):  # a second generation: replays whatever was captured in the first
            got = [compiled(**inputs).sample.clone() for inputs in steps]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)
    calls = autosparse.stats(dit.model)
    assert calls.dense["dense in profile"] == 2 * SERVED["wan"] and calls.sparse == 4 * SERVED["wan"]
    autosparse.unpatch_model(dit.model)
