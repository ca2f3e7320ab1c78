"""The CLI: profile a model directory and the SmolLM2 alias, show the result, clear errors."""

import json
from pathlib import Path

import pytest

from autosparse import Profile
from autosparse.cli import main
from autosparse.tools.zoo import SMOLLM2, load_causal_lm

from conftest import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return load_causal_lm(SMOLLM2)[1]


def test_profile_model_directory_then_show(tmp_path, tokenizer, capsys):
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "calib.txt"
    # Token ids must stay inside the tiny model's vocabulary: digits and spaces tokenize low.
    text.write_text(" ".join(str(i % 97) for i in range(3000)))
    out = tmp_path / "p.json"
    main(["profile", str(tmp_path / "model"), "--text", str(text), "--seq-len", "256", "--inputs", "2",
          "--budget", "0.2", "--block-size", "32", "16", "--out", str(out)])
    profile = Profile.load(out)
    assert profile.block_size == (32, 16)
    assert profile.search["calibration"] == {**profile.search["calibration"], "inputs": 2, "tokens": 512}
    assert list(profile.layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    capsys.readouterr()
    main(["show", str(out)])
    shown = capsys.readouterr().out
    assert "LlamaForCausalLM" in shown and "model.layers.1.self_attn" in shown and "mean attention density" in shown


def test_profile_smollm2_alias(tmp_path, capsys):
    out = tmp_path / "smol.json"
    main(["profile", SMOLLM2, "--seq-len", "512", "--budget", "0.1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["model"]["config"]["num_attention_heads"] == 9 and len(data["layers"]) == 30
    assert "saved" in capsys.readouterr().out


def test_errors_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["show", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit):
        main(["show", str(bad)])
    assert "not valid JSON" in capsys.readouterr().err


def test_show_a_structural_dit_profile(capsys):
    from pathlib import Path

    main(["show", str(Path(__file__).resolve().parents[1] / "profiles" / "flux.1-dev-2048.json")])
    shown = capsys.readouterr().out
    assert "FluxTransformer2DModel" in shown and "neighborhood(window=[24, 48],stride=[8, 16]" in shown
    assert "denoising steps [0, 7): dense" in shown and "Uncalibrated" in shown


def test_profile_a_diffusion_transformer_from_a_factory(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # examples/ importable, as from the repo root
    out = tmp_path / "wan.json"
    main(["profile", "--factory", "examples.dit_factory:wan", "--budget", "0.5", "--dense-steps", "1",
          "--block-size", "16", "32", "--target", "0.01", "--out", str(out)])
    profile = Profile.load(out)
    assert profile.model["class"] == "WanTransformer3DModel"
    assert profile.search["calibration"]["grid"] == [2, 16, 48] and profile.steps[0].dense
    validation = profile.search["validation"]
    assert validation["heldout_inputs"] == 4 and validation["target"] == 0.01
    assert validation["met"] == (validation["trials"][-1]["error"] <= 0.01)
    shown = capsys.readouterr().out
    assert "blocks.1.attn1" in shown and "denoising steps [0, 1): dense" in shown and "held-out inputs" in shown
    with pytest.raises(SystemExit):
        main(["profile", "--out", str(out)])  # neither a model nor a factory


def test_show_png_and_bench_from_a_factory(tmp_path, capsys, monkeypatch):
    """The profile -> show -> bench workflow on a diffusion transformer (tiny Wan factory)."""
    from pathlib import Path

    from PIL import Image

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out, png = tmp_path / "wan.json", tmp_path / "wan.png"
    main(["profile", "--factory", "examples.dit_factory:wan", "--budget", "0.5", "--block-size", "16", "32",
          "--out", str(out)])
    main(["show", str(out), "--png", str(png)])
    image = Image.open(png)
    assert image.format == "PNG" and image.size[0] >= 2 * 12 and image.size[1] >= 2 * 12
    capsys.readouterr()
    main(["bench", str(out), "--factory", "examples.dit_factory:wan", "--reps", "1"])
    table = capsys.readouterr().out
    row = [line for line in table.splitlines() if line.startswith("| cpu |")]
    assert row, table
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1] == "4" and float(cells[5]) > 0.0  # 4 held-out steps; sparse heads change the output
    assert "AttentionStats(sparse=" in table


def test_show_png_of_an_uncalibrated_profile(tmp_path):
    from PIL import Image

    from autosparse.tools.heatmap import save_heatmap

    profile = Profile.load(Path(__file__).resolve().parents[1] / "profiles" / "hunyuanvideo-720p.json")
    save_heatmap(profile, tmp_path / "h.png")
    assert Image.open(tmp_path / "h.png").size[0] >= 24 * 12  # 24 heads


def test_heatmap_draws_every_head_with_its_kind(tmp_path):
    """SmolLM2's shipped profile: a cell per (layer, head) in its kind's colour (dense heads at full
    grey: measured density 1), every kind in the legend, the scale drawn."""
    from PIL import Image

    from autosparse.tools.heatmap import KIND_COLOURS, _shade, save_heatmap

    profile = Profile.load(Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m.json")
    save_heatmap(profile, tmp_path / "h.png")
    image = Image.open(tmp_path / "h.png").convert("RGB")
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert KIND_COLOURS["dense"] in colours  # the dense heads, and the legend
    for name, layer in profile.layers.items():
        for pattern, measured in zip(layer.heads, layer.measured):
            kind = pattern.to_spec()["kind"]
            assert _shade(KIND_COLOURS[kind], measured["density"]) in colours, (name, kind)
