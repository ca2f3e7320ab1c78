"""Patch a real LLM with the shipped SmolLM2 profile, generate from a long prompt, show the counts.

    python examples/quickstart.py
"""

from pathlib import Path

import torch

import autosparse
from autosparse.tools.zoo import SMOLLM2, fixture_text, load_causal_lm

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "smollm2-135m.json"


def main() -> None:
    model, tokenizer = load_causal_lm(SMOLLM2)
    prompt = tokenizer(fixture_text(), return_tensors="pt").input_ids[:, :3000]
    autosparse.patch_model(model, PROFILE)
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    print(tokenizer.decode(out[0, prompt.shape[1] :]))
    print(autosparse.stats(model))  # prefill sparse, decode steps dense
    autosparse.unpatch_model(model)


if __name__ == "__main__":
    main()
