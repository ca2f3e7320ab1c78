"""End to end on real weights: the demo's search on SmolLM2-135M keeps held-out perplexity within
2% of dense while computing well under all of the attention."""

from autosparse.tools.demo import run_demo


def test_demo_fidelity(tmp_path, capsys):
    result = run_demo(out=tmp_path / "smollm2.json")
    assert (tmp_path / "smollm2.json").is_file()
    assert result["patched_ppl"] <= 1.02 * result["dense_ppl"]
    assert result["density"] < 0.6
    assert result["stats"].sparse == 30 and not result["stats"].fallback
    report = capsys.readouterr().out
    assert "perplexity" in report and "attention density" in report
