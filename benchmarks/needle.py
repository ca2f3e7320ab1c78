"""Needle retrieval on real weights: dense vs patched, exact match at several depths.

    python3 benchmarks/needle.py [--profile profiles/smollm2-135m.json] [--tokens 7500] --out DIR

SmolLM2-135M-Instruct or Gemma-3-270M (real trained weights) reads ``--tokens`` tokens of the shipped Jargon File
text with one sentence planted at each of ``--depths`` (fractions of the context), "The secret
passcode is NNNNNNN.", then "What is the secret passcode? The secret passcode is", and generates
greedily. A trial counts as found when the passcode's digits appear in the first ``--new`` tokens.
Each depth runs ``--trials`` passcodes. Variants: dense, the patched model (sparse prefill, dense
decode) and the patched model with ``decode="static"``. Runs on the CPU (minutes) or a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import autosparse
from autosparse.tools.zoo import GEMMA3, SMOLLM2, fixture_text, load_causal_lm

QUESTION = "\nWhat is the secret passcode? The secret passcode is"


def haystack(tokenizer, tokens: int, depth: float, code: str) -> torch.Tensor:
    """``tokens`` tokens of the text with the needle sentence at ``depth``, then the question."""
    ids = tokenizer(fixture_text(), return_tensors="pt").input_ids[0]
    needle = tokenizer(f" The secret passcode is {code}. ", return_tensors="pt").input_ids[0]
    question = tokenizer(QUESTION, return_tensors="pt").input_ids[0]
    body = tokens - len(needle) - len(question)
    cut = int(body * depth)
    return torch.cat([ids[:cut], needle, ids[cut:body], question])[None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SMOLLM2, choices=[SMOLLM2, GEMMA3])
    parser.add_argument("--profile", default="profiles/smollm2-135m.json")
    parser.add_argument("--variants", nargs="+", default=["dense", "patched", "patched + static decode"],
                        choices=["dense", "patched", "patched + static decode"])
    parser.add_argument("--tokens", type=int, default=7500)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--new", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(args.model)
    model = model.to(device)
    rng = random.Random(0)
    trials = [(depth, str(rng.randrange(10 ** 6, 10 ** 7))) for depth in args.depths for _ in range(args.trials)]
    found: dict[str, list[bool]] = {}
    counts: dict[str, str] = {}
    chosen = [(v, d) for v, d in (("dense", None), ("patched", None), ("patched + static decode", "static"))
              if v in args.variants]
    for variant, decode in chosen:
        if variant != "dense":
            autosparse.patch_model(model, args.profile, decode=decode)
        hits = []
        for depth, code in trials:
            ids = haystack(tokenizer, args.tokens, depth, code).to(device)
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=args.new, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
            answer = tokenizer.decode(out)
            hits.append(code in answer.replace(" ", ""))
            print(json.dumps(dict(variant=variant, depth=depth, code=code, answer=answer, found=hits[-1])), flush=True)
        found[variant] = hits
        if variant != "dense":
            counts[variant] = str(autosparse.stats(model))
            autosparse.unpatch_model(model)
    lines = [f"{args.model}, {args.tokens} tokens of the Jargon File, needle at depths {args.depths}, "
             f"{args.trials} passcodes each, greedy {args.new} tokens; profile {args.profile}", "",
             "| variant | " + " | ".join(f"depth {d}" for d in args.depths) + " | found | same as dense |",
             "|---|" + "---|" * (len(args.depths) + 2)]
    for variant, hits in found.items():
        per_depth = [sum(h for (d, _), h in zip(trials, hits) if d == depth) for depth in args.depths]
        same = sum(a == b for a, b in zip(hits, found.get("dense", hits)))
        lines.append(f"| {variant} | " + " | ".join(f"{n}/{args.trials}" for n in per_depth)
                     + f" | {sum(hits)}/{len(hits)} | {same}/{len(hits)} |")
    lines += ["", *(f"- {v}: {c}" for v, c in counts.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "needle.md").write_text(text)


if __name__ == "__main__":
    main()
