"""The bad-profile matrix (issue 14, "no silently wrong answer"): a valid saved profile with every
field corrupted once must be refused by ``Profile.load`` with a ValueError that names the field
(its path in the file) and says what was expected and what was found.

Two valid profiles are the starting points: a tiny transformers Llama (``Profile.uniform``, a
denoising-step schedule and per-head measurements) and a tiny diffusers Wan (a 3-D neighbourhood,
dense first steps, measurements). Which head a case corrupts, and the measured values, are drawn
fresh on every run (the seed is in every failure message). A curated list of cases, one per field
and kind of damage, not a product of all of them.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import autosparse.profile as profile_module
from autosparse import Profile, pattern_from_spec
from autosparse.testing.dits import build_dit
from autosparse.kernels.block_sparse_op import BLOCK_SIZES
from autosparse.patterns import MAX_PATTERN_DEPTH
from autosparse.profile import LayerProfile, StepRange

from conftest import tiny_llama

SEED = random.randrange(2 ** 32)
RNG = random.Random(SEED)
L0, L1 = "model.layers.0.self_attn", "model.layers.1.self_attn"
W0 = "blocks.0.attn1"
H = RNG.randrange(4)  # the LLM head a case corrupts (4 heads)
HW = RNG.randrange(2)  # the Wan head (2 heads)


def _measured(num_heads: int) -> tuple[dict[str, float], ...]:
    return tuple({"error": round(RNG.uniform(0.0, 0.3), 6), "density": round(RNG.uniform(0.05, 1.0), 6),
                  "cost": round(RNG.uniform(0.05, 1.5), 4)} for _ in range(num_heads))


def _with_measured(profile: Profile) -> Profile:
    for name, entry in profile.layers.items():
        profile.layers[name] = LayerProfile(entry.index, entry.num_heads, entry.heads, _measured(entry.num_heads))
    return profile


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The two valid profiles, as saved files read back into plain JSON data."""
    llama = tiny_llama()
    llm = _with_measured(Profile.uniform(llama, {"kind": "sink_local", "sinks": 4, "window": 64}, block_size=(32, 64)))
    window = LayerProfile(1, 4, (pattern_from_spec({"kind": "window", "window": 32}),) * 4,
                          _measured(4))
    llm = Profile(model=llm.model, layers=llm.layers, block_size=llm.block_size, search=llm.search,
                  steps=(StepRange(0, 2, dense=True), StepRange(5, None, layers={L1: window})))
    wan = build_dit("wan", "tiny").model
    dit = _with_measured(Profile.uniform(wan, {"kind": "neighborhood", "window": [1, 3, 3]}, block_size=(16, 32)))
    dit = dit.with_dense_steps(3)
    folder = tmp_path_factory.mktemp("valid")
    data = {}
    for name, profile, model in (("llm", llm, llama), ("dit", dit, wan)):
        path = folder / f"{name}.json"
        profile.save(path)
        Profile.load(path).check_model(model)  # valid: loads, and fits its model
        data[name] = json.loads(path.read_text())
    return data


@dataclass
class Case:
    id: str
    base: str  # "llm" or "dit"
    edit: Callable[[dict[str, Any]], Any] | None  # edits the data in place, returns nothing that counts
    field: str  # the path the message must name (after the file name)
    expected: str  # what the message says is expected
    found: str  # and what was found
    text: Callable[[str], str] | None = None  # edits the saved text (after ``edit``)


def _set(path: tuple, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _pop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


def _nested(depth: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": "window", "window": 4}
    for _ in range(depth - 1):
        spec = {"kind": "union", "of": [spec]}
    return spec


LAYER = f"layers[{L0!r}]"
HEAD = f"{LAYER}.heads[{H}]"
MEASURED = f"{LAYER}.measured[{H}]"
STEP_LAYER = f"steps[1].layers[{L1!r}]"
WAN = f"layers[{W0!r}]"
BLOCKS = str(list(BLOCK_SIZES))

CASES = [
    # -- the top level ----------------------------------------------------------------------------
    Case("schema-str", "llm", _set(("schema_version",), "1"), "schema_version", "expected 1", "found '1'"),
    Case("schema-bool", "llm", _set(("schema_version",), True), "schema_version", "expected 1", "found True"),
    Case("schema-missing", "llm", _pop("schema_version"), "schema_version", "missing", ""),
    Case("version-int", "llm", _set(("autosparse_version",), 1), "autosparse_version", "expected str", "found 1"),
    Case("version-missing", "dit", _pop("autosparse_version"), "autosparse_version", "missing", ""),
    Case("unknown-key", "llm", _set(("extra",), 1), "", "expected only the fields", "found unknown field 'extra'"),
    Case("created-list", "llm", _set(("created",), []), "created", "expected dict", "found []"),
    Case("search-str", "dit", _set(("search",), "calibrated"), "search", "expected dict", "found 'calibrated'"),
    Case("top-level-list", "llm", None, "", "expected dict", "found [{", text=lambda t: f"[{t}]"),
    # -- block size ---------------------------------------------------------------------------------
    Case("block-huge", "llm", _set(("block_size",), [2 ** 30, 64]), "block_size",
         f"each one of {BLOCKS} (the block sizes the kernel supports)", "found [1073741824, 64]"),
    Case("block-256", "dit", _set(("block_size",), [16, 256]), "block_size", f"each one of {BLOCKS}",
         "found [16, 256]"),
    Case("block-one", "llm", _set(("block_size",), [64]), "block_size", "expected [q_block, kv_block]", "found [64]"),
    Case("block-float", "llm", _set(("block_size",), [64.0, 64]), "block_size", f"each one of {BLOCKS}",
         "found [64.0, 64]"),
    Case("block-str", "dit", _set(("block_size",), "64x128"), "block_size", "expected list", "found '64x128'"),
    Case("block-missing", "llm", _pop("block_size"), "block_size", "missing", ""),
    # -- the model record -----------------------------------------------------------------------------
    Case("model-missing", "llm", _pop("model"), "model", "missing", ""),
    Case("model-list", "llm", _set(("model",), []), "model", "expected dict", "found []"),
    Case("model-unknown", "dit", _set(("model", "extra"), 1), "model", "expected only the fields",
         "found unknown field 'extra'"),
    Case("class-int", "llm", _set(("model", "class"), 5), "model.class", "expected a class name", "found 5"),
    Case("class-empty", "dit", _set(("model", "class"), ""), "model.class", "expected a class name", "found ''"),
    Case("config-list", "llm", _set(("model", "config"), [1]), "model.config", "expected dict", "found [1]"),
    Case("config-value", "llm", _set(("model", "config", "num_hidden_layers"), {"n": 2}),
         "model.config.num_hidden_layers", "expected a str, bool, finite number or a list of them", "found {'n': 2}"),
    Case("config-edited", "llm", _set(("model", "config", "num_hidden_layers"), 3), "model.fingerprint",
         "(the hash of model.class, model.config and model.attention as recorded)", "found '"),
    Case("config-edited-dit", "dit", _set(("model", "config", "patch_size"), [1, 2, 4]), "model.fingerprint",
         "expected '", "found '"),
    Case("fingerprint-int", "llm", _set(("model", "fingerprint"), 12), "model.fingerprint", "expected 16 hex digits",
         "found 12"),
    Case("fingerprint-other", "dit", _set(("model", "fingerprint"), "0" * 16), "model.fingerprint",
         "(the hash of model.class", "found '0000000000000000'"),
    Case("fingerprint-missing", "llm", _pop("model", "fingerprint"), "model.fingerprint", "missing", ""),
    Case("attention-missing", "llm", _pop("model", "attention"), "model.attention", "missing", ""),
    Case("attention-unknown", "llm", _set(("model", "attention", "bias"), [0, 0]), "model.attention",
         "expected only the fields", "found unknown field 'bias'"),
    Case("names-int", "llm", _set(("model", "attention", "names", 1), 7), "model.attention.names[1]",
         "expected a layer name", "found 7"),
    Case("names-twice", "llm", _set(("model", "attention", "names", 1), L0), "model.attention.names[1]",
         "expected each name once", f"found {L0!r} again"),
    Case("names-empty", "dit", _set(("model", "attention", "names"), []), "model.attention.names",
         "expected at least one attention layer", "found none"),
    Case("attention-heads-short", "llm", _set(("model", "attention", "heads"), [4]), "model.attention.heads",
         "expected 2 entries", "found 1"),
    Case("kv-heads-zero", "llm", _set(("model", "attention", "kv_heads", 0), 0), "model.attention.kv_heads[0]",
         "expected int >= 1", "found 0"),
    Case("kv-heads-divisor", "llm", _set(("model", "attention", "kv_heads", 1), 3), "model.attention.kv_heads[1]",
         "expected a divisor of heads[1] (4)", "found 3"),
    Case("head-dim-str", "dit", _set(("model", "attention", "head_dim", 1), "16"), "model.attention.head_dim[1]",
         "expected int >= 1", "found '16'"),
    # -- a layer entry ---------------------------------------------------------------------------------
    Case("layers-list", "llm", _set(("layers",), []), "layers", "expected dict", "found []"),
    Case("layer-unknown-key", "llm", _set(("layers", L0, "extra"), 1), LAYER, "expected only the fields",
         "found unknown field 'extra'"),
    Case("layer-not-in-model", "dit", lambda d: d["layers"].update({"blocks.0.attn2": d["layers"][W0]}),
         "layers['blocks.0.attn2']", "expected a layer of model.attention.names", "found 'blocks.0.attn2'"),
    Case("index-negative", "llm", _set(("layers", L0, "index"), -1), f"{LAYER}.index", "expected int >= 0",
         "found -1"),
    Case("index-str", "llm", _set(("layers", L0, "index"), "0"), f"{LAYER}.index", "expected int >= 0", "found '0'"),
    Case("index-wrong", "llm", _set(("layers", L0, "index"), 1), f"{LAYER}.index",
         "expected 0 (its position in model.attention.names)", "found 1"),
    Case("index-missing", "dit", _pop("layers", W0, "index"), f"{WAN}.index", "missing", ""),
    Case("num-heads-zero", "llm", _set(("layers", L0, "num_heads"), 0), f"{LAYER}.num_heads", "expected int >= 1",
         "found 0"),
    Case("num-heads-float", "llm", _set(("layers", L0, "num_heads"), 4.0), f"{LAYER}.num_heads",
         "expected int >= 1", "found 4.0"),
    Case("num-heads-wrong", "dit", lambda d: d["layers"][W0].update(num_heads=1, heads=d["layers"][W0]["heads"][:1],
                                                                    measured=d["layers"][W0]["measured"][:1]),
         f"{WAN}.num_heads", "expected 2 (model.attention.heads[0])", "found 1"),
    Case("heads-dict", "llm", _set(("layers", L0, "heads"), {}), f"{LAYER}.heads", "expected list", "found {}"),
    Case("heads-short", "llm", lambda d: d["layers"][L0]["heads"].pop(), f"{LAYER}.heads",
         "expected 4 patterns (num_heads)", "found 3"),
    Case("heads-missing", "dit", _pop("layers", W0, "heads"), f"{WAN}.heads", "missing", ""),
    # -- a head's pattern -------------------------------------------------------------------------------
    Case("pattern-str", "llm", _set(("layers", L0, "heads", H), "window"), HEAD,
         "expected a dict with a 'kind' key", "found 'window'"),
    Case("pattern-kind", "llm", _set(("layers", L0, "heads", H), {"kind": "magic"}), f"{HEAD}.kind",
         "expected one of", "found 'magic'"),
    Case("pattern-window", "llm", _set(("layers", L0, "heads", H, "window"), -3), HEAD, "must be an int >= 1",
         "got -3"),
    Case("pattern-sinks-type", "llm", _set(("layers", L0, "heads", H, "sinks"), "4"), HEAD, "must be an int >= 0",
         "got '4'"),
    Case("pattern-extra", "llm", _set(("layers", L0, "heads", H, "extra"), 1), HEAD,
         "takes fields ['sinks', 'window']", "unknown ['extra']"),
    Case("pattern-missing", "llm", _pop("layers", L0, "heads", H, "window"), HEAD, "takes fields",
         "missing ['window']"),
    Case("neighborhood-window", "dit", _set(("layers", W0, "heads", HW, "window", 1), 0), f"{WAN}.heads[{HW}]",
         "neighborhood.window[1] must be an int >= 1", "got 0"),
    Case("union-dynamic", "llm", _set(("layers", L0, "heads", H),
                                      {"kind": "union", "of": [{"kind": "window", "window": 8},
                                                               {"kind": "block_topk", "k": 2}]}),
         HEAD, "union.of[1]: dynamic pattern 'block_topk' cannot be nested", "'block_topk'"),
    Case("global-dynamic", "dit", _set(("layers", W0, "heads", HW),
                                       {"kind": "global", "prefix": 1, "suffix": 0,
                                        "inner": {"kind": "block_cdf", "mass": 0.9}}),
         f"{WAN}.heads[{HW}]", "global.inner: dynamic pattern 'block_cdf' cannot be nested", "'block_cdf'"),
    Case("pattern-deep", "llm", _set(("layers", L0, "heads", H), _nested(20)),
         f"{HEAD}" + ".of[0]" * MAX_PATTERN_DEPTH, f"expected patterns nested at most {MAX_PATTERN_DEPTH} levels deep",
         "found deeper"),
    Case("json-deep", "llm", _set(("layers", L0, "heads", H), "@deep@"), f"{HEAD}" + ".of[0]" * 28,
         f"expected JSON nested at most {profile_module.MAX_JSON_DEPTH} levels deep", "found deeper",
         text=lambda t: t.replace('"@deep@"', '{"kind": "union", "of": [' * 599 + '{"kind": "window", "window": 4}'
                                  + "]}" * 599)),
    # -- measurements -------------------------------------------------------------------------------------
    Case("measured-str", "llm", _set(("layers", L0, "measured"), "x"), f"{LAYER}.measured", "expected list",
         "found 'x'"),
    Case("measured-short", "llm", lambda d: d["layers"][L0]["measured"].pop(), f"{LAYER}.measured",
         "expected 4 entries (num_heads)", "found 3"),
    Case("measured-entry", "llm", _set(("layers", L0, "measured", H), 0.5), MEASURED, "expected dict", "found 0.5"),
    Case("error-negative", "llm", _set(("layers", L0, "measured", H, "error"), -0.1), f"{MEASURED}.error",
         "expected a finite number >= 0", "found -0.1"),
    Case("density-above-one", "llm", _set(("layers", L0, "measured", H, "density"), 1.5), f"{MEASURED}.density",
         "expected a finite number in [0, 1]", "found 1.5"),
    Case("density-str", "dit", _set(("layers", W0, "measured", HW, "density"), "0.5"),
         f"{WAN}.measured[{HW}].density", "expected a finite number in [0, 1]", "found '0.5'"),
    Case("cost-bool", "llm", _set(("layers", L0, "measured", H, "cost"), True), f"{MEASURED}.cost",
         "expected a finite number >= 0", "found True"),
    Case("measured-unknown", "llm", _set(("layers", L0, "measured", H, "speed"), 2.0), MEASURED,
         "expected only the fields ['cost', 'density', 'error']", "found unknown field 'speed'"),
    Case("error-nan", "llm", _set(("layers", L0, "measured", H, "error"), "@NaN@"), f"{MEASURED}.error",
         "expected a finite number", "found NaN", text=lambda t: t.replace('"@NaN@"', "NaN")),
    Case("density-infinity", "dit", _set(("layers", W0, "measured", HW, "density"), "@inf@"),
         f"{WAN}.measured[{HW}].density", "expected a finite number", "found Infinity",
         text=lambda t: t.replace('"@inf@"', "Infinity")),
    Case("cost-overflow", "llm", _set(("layers", L0, "measured", H, "cost"), "@big@"), f"{MEASURED}.cost",
         "expected a finite number", "found inf", text=lambda t: t.replace('"@big@"', "1e999")),
    Case("config-nan", "llm", _set(("model", "config", "hidden_size"), "@nan@"), "model.config.hidden_size",
         "expected a finite number", "found -Infinity", text=lambda t: t.replace('"@nan@"', "-Infinity")),
    # -- the step schedule -----------------------------------------------------------------------------------
    Case("steps-dict", "llm", _set(("steps",), {}), "steps", "expected list", "found {}"),
    Case("step-int", "dit", _set(("steps", 0), 5), "steps[0]", "expected dict", "found 5"),
    Case("step-unknown", "llm", _set(("steps", 0, "extra"), 1), "steps[0]", "expected only the fields",
         "found unknown field 'extra'"),
    Case("step-start-str", "llm", _set(("steps", 0, "start"), "0"), "steps[0].start", "expected int >= 0",
         "found '0'"),
    Case("step-start-negative", "dit", _set(("steps", 0, "start"), -1), "steps[0].start", "expected int >= 0",
         "found -1"),
    Case("step-end-before", "llm", _set(("steps", 1, "end"), 3), "steps[1].end", "expected null or int > start (5)",
         "found 3"),
    Case("step-end-missing", "llm", _pop("steps", 0, "end"), "steps[0].end", "missing", ""),
    Case("step-dense-str", "dit", _set(("steps", 0, "dense"), "yes"), "steps[0].dense", "expected bool",
         "found 'yes'"),
    Case("step-overlap", "llm", _set(("steps", 1, "start"), 1), "steps[1]", "[1, inf) overlaps steps[0]",
         "[0, 2)"),
    Case("step-overlap-dit", "dit", lambda d: d["steps"].append({"start": 2, "end": 6, "dense": True}), "steps[1]",
         "[2, 6) overlaps steps[0]", "[0, 3)"),
    Case("step-layers-list", "llm", _set(("steps", 1, "layers"), []), "steps[1].layers", "expected dict",
         "found []"),
    Case("step-layer-kind", "llm", _set(("steps", 1, "layers", L1, "heads", H, "kind"), "wndow"),
         f"{STEP_LAYER}.heads[{H}].kind", "expected one of", "found 'wndow'"),
    Case("step-layer-index", "llm", _set(("steps", 1, "layers", L1, "index"), 0), f"{STEP_LAYER}.index",
         "expected 1 (its position in model.attention.names)", "found 0"),
    Case("step-layer-measured", "llm", _set(("steps", 1, "layers", L1, "measured", H, "density"), -0.5),
         f"{STEP_LAYER}.measured[{H}].density", "in [0, 1]", "found -0.5"),
    # -- the file itself ---------------------------------------------------------------------------------------
    Case("duplicate-top", "llm", None, "block_size", "expected each key once in a JSON object",
         "found 'block_size' 2 times",
         text=lambda t: t.replace('"block_size": [', '"block_size": [16, 16], "block_size": [', 1)),
    Case("duplicate-pattern", "llm", None, f"layers[{L0!r}].heads[0].sinks", "expected each key once",
         "found 'sinks' 2 times", text=lambda t: _after('"layers"', t, '"sinks": 4,', '"sinks": 4, "sinks": 400,')),
    Case("duplicate-layer", "dit", None, f"layers[{W0!r}]", "expected each key once", f"found {W0!r} 2 times",
         text=lambda t: t.replace(f'"layers": {{\n  "{W0}": {{', f'"layers": {{\n  "{W0}": {{}}, "{W0}": {{', 1)),
    Case("truncated", "llm", None, "", "not valid JSON", "line", text=lambda t: t[: len(t) // 2]),
    Case("truncated-end", "dit", None, "", "not valid JSON", "line", text=lambda t: t.rstrip()[:-1]),
    Case("empty", "llm", None, "", "expected a JSON profile", "found an empty file", text=lambda t: ""),
    Case("whitespace", "dit", None, "", "expected a JSON profile", "found an empty file", text=lambda t: " \n\t\n"),
    Case("deep-brackets", "llm", None, "", "levels deep", "found deeper", text=lambda t: "[" * 200_000),
]


def _after(marker: str, text: str, old: str, new: str) -> str:
    """``text`` with the first ``old`` after ``marker`` replaced by ``new``."""
    head, tail = text.split(marker, 1)
    return head + marker + tail.replace(old, new, 1)


def _corrupt(valid: dict[str, dict[str, Any]], case: Case, tmp_path: Path) -> Path:
    data = copy.deepcopy(valid[case.base])
    if case.edit is not None:
        case.edit(data)
    text = json.dumps(data, indent=1)
    if case.text is not None:
        text = case.text(text)
    path = tmp_path / f"{case.id}.json"
    path.write_text(text)
    return path


def _check_message(message: str, path: Path, field: str, expected: str, found: str) -> None:
    context = f"seed {SEED}: {message}"
    assert message.startswith(f"{path}: "), context
    rest = message[len(f"{path}: "):]
    if field:
        assert rest.startswith(f"{field}"), context
        assert re.match(rf"{re.escape(field)}[:.\[ ]", rest), context  # the whole field, not a prefix of a name
    assert expected in rest and found in rest, context


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_corrupted_field_is_refused_naming_it(valid, case, tmp_path):
    path = _corrupt(valid, case, tmp_path)
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    _check_message(str(err.value), path, case.field, case.expected, case.found)


def test_every_case_starts_from_a_profile_that_loads(valid, tmp_path):
    """The matrix is meaningful only if an unedited file loads: the same write path, no edit."""
    for name in ("llm", "dit"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(valid[name], indent=1))
        assert Profile.load(path).to_dict() == valid[name]


def test_directory_missing_file_and_undecodable_bytes(tmp_path):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: expected a profile file \(JSON\), "
                                         r"found a directory$"):
        Profile.load(tmp_path)
    missing = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(missing))}: no such profile file$"):
        Profile.load(missing)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"schema_version": 1, "x": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(binary))}: expected UTF-8 JSON text, found a byte that "
                                         r"is not UTF-8 at offset 28$"):
        Profile.load(binary)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(valid, tmp_path, monkeypatch):
    """The limit (64 MiB) is checked on the file's size; a smaller limit stands in for a huge file."""
    assert profile_module.MAX_PROFILE_BYTES == 64 * 2 ** 20
    path = tmp_path / "big.json"
    path.write_text(json.dumps(valid["llm"], indent=1))
    size = path.stat().st_size
    limit = RNG.randrange(1024, size)
    monkeypatch.setattr(profile_module, "MAX_PROFILE_BYTES", limit)
    reads = []
    monkeypatch.setattr(Path, "open", lambda *args, **kwargs: reads.append(args) or open(*args, **kwargs))
    with pytest.raises(ValueError) as err:
        Profile.load(path)
    _check_message(str(err.value), path, "", f"expected a profile file of at most {limit} bytes", f"found {size} bytes")
    assert reads == []  # refused on its size alone
    monkeypatch.setattr(profile_module, "MAX_PROFILE_BYTES", size)
    Profile.load(path)  # at the limit: read
