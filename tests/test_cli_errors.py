"""Bad invocations of the ``autosparse`` command: every one ends within a second, before any model
loads, with exit code 2 and one line on stderr that names the flag, and no traceback."""

from __future__ import annotations

import time

import pytest
import torch

from autosparse import cli
from autosparse.tools import zoo


def _profile_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{}")
    return path


CASES = [
    # (argv, words the one line must contain); {tmp} is a fresh folder
    (["profile", "no-such-model", "--out", "{tmp}/p.json"], ["unknown model 'no-such-model'", "smollm2-135m"]),
    (["profile", "smollm2-135m", "--seq-len", "0", "--out", "{tmp}/p.json"], ["--seq-len 0", "positive"]),
    (["profile", "smollm2-135m", "--budget", "2", "--out", "{tmp}/p.json"], ["--budget 2", "(0, 1]"]),
    (["profile", "smollm2-135m", "--budget", "-1", "--out", "{tmp}/p.json"], ["--budget -1"]),
    (["profile", "smollm2-135m", "--budget", "0", "--out", "{tmp}/p.json"], ["--budget 0"]),
    (["profile", "smollm2-135m", "--target", "0", "--out", "{tmp}/p.json"], ["--target 0"]),
    (["profile", "smollm2-135m", "--block-size", "7", "13", "--out", "{tmp}/p.json"], ["--block-size 7 13", "(16, 32, 64, 128)"]),
    (["profile", "smollm2-135m", "--out", "{tmp}/missing/p.json"], ["--out", "does not exist"]),
    (["profile", "smollm2-135m", "--out", "{tmp}"], ["--out", "a folder"]),
    (["profile", "smollm2-135m", "--text", "{tmp}/none.txt", "--out", "{tmp}/p.json"], ["--text", "no such file"]),
    (["profile", "--factory", "no_such_module:make", "--out", "{tmp}/p.json"], ["--factory", "no_such_module"]),
    (["profile", "--factory", "nocolon", "--out", "{tmp}/p.json"], ["--factory nocolon", "module:function"]),
    (["profile", "smollm2-135m", "--factory", "examples.dit_factory:wan", "--out", "{tmp}/p.json"], ["not both"]),
    (["profile", "smollm2-135m", "--seq-len", "512", "--max-length", "256", "--out", "{tmp}/p.json"],
     ["--max-length 256"]),
    (["show", "{tmp}"], ["profile", "a folder"]),
    (["show", "{tmp}/none.json"], ["no such file"]),
    (["bench", "smollm2-135m", "{tmp}/none.json"], ["no such file"]),
    (["bench", "smollm2-135m", "{profile}", "--reps", "0"], ["--reps 0"]),
    (["demo", "--seq-len", "-5"], ["--seq-len -5"]),
    (["demo", "--budget", "3"], ["--budget 3"]),
    (["demo", "--out", "{tmp}/missing/p.json"], ["--out", "does not exist"]),
]
if not torch.cuda.is_available():
    CASES += [(["profile", "smollm2-135m", "--device", "cuda", "--out", "{tmp}/p.json"], ["--device cuda", "--device cpu"]),
              (["tune"], ["CUDA GPU"])]


@pytest.mark.parametrize("argv,words", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_a_bad_invocation_is_one_line_before_any_work(argv, words, tmp_path, capsys, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "load_causal_lm", no_model)
    monkeypatch.setattr("autosparse.tools.demo.run_demo", no_model)
    profile = _profile_file(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{profile}", str(profile)) for a in argv]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"autosparse {argv[0]}: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        cli.main(["--debug", "profile", "no-such-model", "--out", str(tmp_path / "p.json")])


def test_an_unexpected_error_is_one_line_too(tmp_path, capsys, monkeypatch):
    def broken(_args):
        raise RuntimeError("disk on fire\nsecond line")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["show"].set_defaults(run=broken)
    profile = _profile_file(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["show", str(profile)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["autosparse show: error: disk on fire (--debug for the traceback)"]


def test_shipped_profiles_by_name(capsys):
    from autosparse import profiles

    assert "smollm2-135m" in profiles.names()
    assert profiles.load("smollm2-135m").model["class"] == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="no shipped profile 'nope'; the shipped ones: .*smollm2-135m"):
        profiles.load("nope")
    cli.main(["show", "--list"])
    listed = capsys.readouterr().out
    assert "smollm2-135m  (LlamaForCausalLM)" in listed and "wan2.1-t2v-1.3b-480p" in listed
    cli.main(["show", "smollm2-135m"])
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_show_groups_identical_layers(capsys):
    cli.main(["show", "wan2.1-t2v-1.3b-480p"])
    out = capsys.readouterr().out
    assert "blocks.0.attn1 .. blocks.29.attn1 (30 layers)" in out and "blocks.5.attn1 " not in out
