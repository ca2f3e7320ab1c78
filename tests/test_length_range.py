"""The length range a profile holds for: recorded by the search (``lengths``: calibrated and
validated key lengths), read back by old and new files, enforced at run time (longer calls run dense
unless every pattern of the layer scales with length), and a validated profile's perplexity change
carried over to other held-out text of the same length."""

import json
import logging
import re

import pytest
import torch

import autosparse
from autosparse import Dense, Profile, SinkLocal, Window
from autosparse.cli import _print_summary, heldout_spans
from autosparse.patterns.dynamic import BlockTopK
from autosparse.profile import LayerProfile
from autosparse.runtime.lengths import scales_with_length
from autosparse.patterns.basic import Blocks, Union
from autosparse.search.calibration import SearchConfig, calibrate, window_density
from autosparse.search.validate import Reference, chosen_trial, fit_to_target, heldout_error, heldout_report

from conftest import tiny_llama


def _ids(seed, length):
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))


def _with(profile: Profile, pattern, lengths) -> Profile:
    layers = {name: LayerProfile(entry.index, entry.num_heads, (pattern,) * entry.num_heads)
              for name, entry in profile.layers.items()}
    return Profile(model=profile.model, layers=layers, block_size=(32, 16), lengths=lengths)


def test_lengths_round_trip_and_old_files_load(llama, tmp_path):
    profile = _with(Profile.uniform(llama, Dense()), Window(64), {"calibrated": [256, 256], "validated": [512, 512]})
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.lengths == {"calibrated": [256, 256], "validated": [512, 512]}
    assert loaded.length_limit() == (512, "validated")
    data = json.loads(path.read_text())
    del data["lengths"]  # a file written before the field: loads, no limit
    path.write_text(json.dumps(data))
    old = Profile.load(path)
    assert old.lengths is None and old.length_limit() is None
    assert "lengths" not in old.to_dict()
    calibrated_only = _with(Profile.uniform(llama, Dense()), Window(64), {"calibrated": [128, 300]})
    assert calibrated_only.length_limit() == (300, "calibrated")


@pytest.mark.parametrize("lengths, message", [
    ({"validated": [512]}, "lengths.validated: expected [shortest, longest] key length"),
    ({"validated": [512, 256]}, "lengths.validated[1]: expected int >= 512"),
    ({"calibrated": [0, 5]}, "lengths.calibrated[0]: expected int >= 1"),
    ({"tested": [1, 2]}, "lengths: expected only the fields ['calibrated', 'validated']"),
    ({}, "lengths: expected at least one of"),
    ([1, 2], "lengths: expected dict"),
])
def test_bad_lengths_name_the_field(llama, tmp_path, lengths, message):
    path = tmp_path / "p.json"
    Profile.uniform(llama, Dense()).save(path)
    data = json.loads(path.read_text())
    data["lengths"] = lengths
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"p.json: {message}")):
        Profile.load(path)


def test_dense_by_model_round_trip_and_checks(llama, tmp_path):
    base = Profile.uniform(llama, Dense())
    name = next(iter(base.layers))
    entry = base.layers[name]
    owned = LayerProfile(entry.index, entry.num_heads, entry.heads, dense_by_model="the model's own attention: x")
    profile = Profile(model=base.model, layers={**base.layers, name: owned})
    path = tmp_path / "p.json"
    profile.save(path)
    assert Profile.load(path).layers[name].dense_by_model == "the model's own attention: x"
    data = json.loads(path.read_text())
    data["layers"][name]["heads"][1] = {"kind": "window", "window": 64}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layers\['model.layers.0.self_attn'\]\.heads\[1\]: expected dense"):
        Profile.load(path)
    data["layers"][name]["heads"][1] = {"kind": "dense"}
    data["layers"][name]["dense_by_model"] = ""
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\.dense_by_model: expected null or a reason"):
        Profile.load(path)


def test_which_patterns_scale_with_length():
    assert all(scales_with_length(p) for p in (Dense(), Window(64), SinkLocal(4, 64),
                                               Union((Window(64), SinkLocal(4, 32)))))
    assert not any(scales_with_length(p) for p in (BlockTopK(4), Blocks((0, 1)), Union((Window(64), Blocks((0,))))))


def test_beyond_the_validated_length_a_layer_runs_dense_logged_once(caplog):
    model = tiny_llama(layers=2)
    limited = _with(Profile.uniform(model, Dense()), BlockTopK(2), {"calibrated": [128, 128], "validated": [128, 128]})
    ids = _ids(0, 256)
    with torch.inference_mode():
        dense = model(ids).logits
        autosparse.patch_model(model, limited)
        with caplog.at_level(logging.WARNING, logger="autosparse"):
            longer = model(ids).logits
            model(ids)
        inside = model(ids[:, :128]).logits
        stats = autosparse.stats(model)
        autosparse.unpatch_model(model)
    reason = "beyond the profile's validated length 128"
    assert stats.dense[reason] == 4 and stats.sparse == 2  # 2 layers x 2 long forwards dense; the short one sparse
    assert torch.equal(longer, dense)
    logged = [r for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1  # once per patched model and length limit, not once per call
    assert not torch.allclose(inside, dense[:, :128])  # within the range the layer is sparse
    # Windows scale with length: served beyond the range.
    windowed = _with(Profile.uniform(model, Dense()), Window(32), {"calibrated": [128, 128]})
    with torch.inference_mode():
        autosparse.patch_model(model, windowed)
        model(ids)
        stats = autosparse.stats(model)
        autosparse.unpatch_model(model)
    assert stats.sparse == 2 and not stats.dense


def test_heldout_spans_stay_away_from_the_calibration_text():
    assert heldout_spans(17000, 2048, 4096, 2) == [(8808, 12904), (12904, 17000)]
    assert heldout_spans(10300, 2048, 4096, 2) == [(6204, 10300)]  # room for one past a one-window gap
    assert heldout_spans(10000, 2048, 4096, 2) == []  # 3856 tokens between: a neighbour
    assert heldout_spans(9000, 2048, 4096, 2) == []
    for a, _ in heldout_spans(50000, 1024, 2048, 5):
        assert a >= 1024 + 2048
    with pytest.raises(ValueError, match="--heldout-windows"):
        heldout_spans(10000, 1, 1, 0)


def test_fit_records_the_chosen_round_margin_and_validated_lengths(capsys):
    model = tiny_llama(layers=2)
    config = SearchConfig(budget=0.9, block_size=(32, 16), windows=(16, 32, 64), query_rows=64)
    calibration = calibrate(model, [_ids(0, 256)], config, progress=False)
    assert calibration.profile().lengths == {"calibrated": [256, 256]}
    heldout = [_ids(1, 384), _ids(2, 384)]
    profile = fit_to_target(calibration, heldout, 0.002, heldout_note="two random windows")
    validation = profile.search["validation"]
    saved = chosen_trial(validation)
    assert profile.lengths == {"calibrated": [256, 256], "validated": [384, 384]}
    assert len(saved["per_input"]) == 2 and validation["heldout"] == "two random windows"
    report = heldout_report(model, profile, Reference.of(model, heldout))
    assert report["error"] == pytest.approx(saved["error"], abs=1e-6)
    assert report["per_input"] == pytest.approx(saved["per_input"], abs=1e-6)
    # The summary reports the saved round even when a later (bisection) round missed the target.
    missed = {"budget": 0.5, "density": 0.1, "error": 0.9, "per_input": [0.8, 1.0]}
    validation["trials"].append(missed)
    _print_summary(profile)
    shown = capsys.readouterr().out
    assert f"{saved['error']:+.4f}" in shown and "+0.9000" not in shown
    assert f"round {validation['chosen'] + 1} of {len(validation['trials'])}" in shown
    assert "key lengths: calibrated 256-256, validated 384-384" in shown
    # A profile saved before the round was recorded: the last round with the profile's budget.
    del validation["chosen"]
    assert chosen_trial(validation, profile.search["budget"]) == saved


def test_window_density_is_the_share_of_causal_pairs():
    assert window_density(4, 4) == 1.0
    assert window_density(2, 4) == pytest.approx((1 + 2 + 2 + 2) / 10)
    assert 0.4 < window_density(512, 2048) < 0.45  # ~ 2w/S - (w/S)^2


def test_validated_target_holds_on_other_heldout_text_smollm2():
    """A profile fitted to perplexity change t on held-out windows far from the calibration text
    stays within 1.5 t on a different held-out window of the same length (real SmolLM2 weights)."""
    from autosparse.tools.zoo import SMOLLM2, fixture_text, load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(SMOLLM2)
    ids = tokenizer(fixture_text(), return_tensors="pt").input_ids
    total, length, target = ids.shape[-1], 512, 0.02
    spans = heldout_spans(total, length, length, 2)  # calibration: tokens [0, 512)
    assert len(spans) == 2
    config = SearchConfig(budget=0.1, query_rows=64, windows=(64, 128, 256, 384))
    calibration = calibrate(model, [ids[:, :length]], config, progress=False)
    profile = fit_to_target(calibration, [ids[:, a:b] for a, b in spans], target)
    assert profile.search["validation"]["met"]
    assert chosen_trial(profile.search["validation"])["density"] < 0.95  # something sparse to judge
    middle = total // 2  # neither the calibration window nor the validation windows
    other = ids[:, middle - length // 2 : middle + length // 2]
    assert middle + length // 2 <= spans[0][0]
    error = heldout_error(model, profile, Reference.of(model, [other]))
    assert error <= 1.5 * target, (error, profile.search["validation"])


def test_cli_target_validates_at_max_length_on_far_text(tmp_path, capsys):
    from autosparse.cli import main
    from autosparse.tools.zoo import SMOLLM2, load_causal_lm

    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer = load_causal_lm(SMOLLM2)[1]
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(str(i % 97) for i in range(3000)))  # token ids inside the tiny vocabulary
    total = tokenizer(text.read_text(), return_tensors="pt").input_ids.shape[-1]
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit):
        main(["profile", str(tmp_path / "model"), "--text", str(text), "--seq-len", "256", "--max-length", "128",
              "--target", "0.5", "--out", str(out)])
    assert "--max-length 128: expected at least --seq-len (256)" in capsys.readouterr().err
    main(["profile", str(tmp_path / "model"), "--text", str(text), "--seq-len", "256", "--max-length", "512",
          "--budget", "0.5", "--block-size", "32", "16", "--target", "0.5", "--out", str(out)])
    shown = capsys.readouterr().out
    profile = Profile.load(out)
    assert profile.lengths == {"calibrated": [256, 256], "validated": [512, 512]}
    validation = profile.search["validation"]
    first = total - 2 * 512
    assert validation["heldout"].startswith(f"2 window(s) of 512 tokens, tokens [{first}, {total}) of {text}")
    assert f"held out: 2 window(s) of 512 tokens, tokens [{first}, {total})" in shown
    assert "per held-out input" in shown and "key lengths: calibrated 256-256, validated 512-512" in shown
