"""Sparse decode: tokens/s against dense at long context, and fidelity on real weights.

    python3 benchmarks/decode.py --out $OUT                 # H200: speed, Llama-3.1-8B-shaped, bf16
    python3 benchmarks/decode.py --fidelity --out $OUT      # SmolLM2-135M real weights (CPU or GPU)
    python3 benchmarks/decode.py --quick                    # CPU: tiny shapes, the code paths

Speed: a random-weight Llama-3.1-8B-shaped model with ``--layers`` layers is prefilled densely to
each context length once (the cache is then repeated to the batch size); each variant then runs
``--steps`` decode steps (``model(token, past_key_values=cache)``, the cache cropped back after
each variant), timed between CUDA events after two warm-up steps: dense decode (SDPA reads the whole
cache), ``StaticDecode`` with a sink + local profile and ``PageTopK``. Also one layer's attention
alone (SDPA decode vs ``runtime.decode.attend`` on the same cache), with the fraction of K/V bytes
each policy keeps: the memory-bound limit of a decode step's attention.

Fidelity: SmolLM2-135M-Instruct (real trained weights) on the shipped Jargon File text: prompt of
``--prompt`` tokens, greedy generation of ``--new`` tokens by dense, by the patched model with dense
decode (the profile's sparse prefill only), and with each decode policy: tokens until the first
divergence from dense; and the perplexity of the next ``--teacher`` real tokens fed one decode step
at a time (teacher forcing), dense vs each variant.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

import autosparse
from autosparse import PageTopK, Profile, StaticDecode
from autosparse.runtime import decode
from autosparse.runtime.heads import HeadSet
from autosparse.testing.llms import llama
from autosparse.patterns import SinkLocal
from autosparse.tools.timing import median_ms


# Dense decode as users get it (the default SDPA choice, cuDNN on Hopper: a new plan per cache length)
# and with flash / memory-efficient attention only (the best dense decode here).
ALL = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLASH = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def policies(args: argparse.Namespace) -> dict[str, object]:
    return {"static": StaticDecode(), "page_topk": PageTopK(pages=args.pages, page_size=args.page_size)}


def speed(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu" if args.quick else "cuda")
    model = llama(args.layers, tiny=args.quick, device=device)
    profile = Profile.uniform(model, {"kind": "sink_local", "sinks": args.sinks, "window": args.window})
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for context in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=device, generator=gen)
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for batch in args.batches:
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device, generator=gen)
            row = dict(context=context, batch=batch)
            for name in ("dense", "dense_flash", *policies(args)):
                if name in policies(args):
                    autosparse.patch_model(model, profile, decode=policies(args)[name])

                def step():
                    with torch.inference_mode(), sdpa_kernel(FLASH if name == "dense_flash" else ALL):
                        model(token, past_key_values=cache, use_cache=True)

                ms = median_ms(step, args.steps, device, 2)
                cache.crop(context - cache.get_seq_length())  # negative: drop the tokens the steps added
                if name in policies(args):
                    stats = autosparse.stats(model)
                    row[f"{name}_calls"] = str(stats)
                    autosparse.unpatch_model(model)
                row[f"{name}_ms"] = ms
                row[f"{name}_tokens_per_s"] = batch * 1e3 / ms
            row.update(attention_alone(cache, profile, args, batch, device, gen))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if batch > 1:
                cache.batch_select_indices(torch.arange(0, batch, batch, device=device))
        cache = None  # the next context prefills anew
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def attention_alone(cache: DynamicCache, profile: Profile, args, batch: int, device, gen) -> dict:
    """Layer 0's decode attention on the cache as it is: SDPA over all keys vs each policy."""
    layer = cache.layers[0]
    key, value = layer.keys, layer.values
    hq = key.shape[1] * (4 if not args.quick else 2)
    query = torch.randn(batch, hq, 1, key.shape[-1], device=device, dtype=key.dtype, generator=gen)
    scale = key.shape[-1] ** -0.5
    heads = HeadSet.of((SinkLocal(sinks=args.sinks, window=args.window),) * hq)
    def sdpa(backends):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    out = {"attention_dense_ms": median_ms(lambda: sdpa(ALL), 20, device, 3),
           "attention_dense_flash_ms": median_ms(lambda: sdpa(FLASH), 20, device, 3)}
    for name, policy in policies(args).items():
        pages: dict = {}
        out[f"attention_{name}_ms"] = median_ms(
            lambda: decode.attend(policy, pages, "l0", heads, profile.block_size, query, key, value, None, scale),
            20, device, 3)
        if name == "static":
            kept = min(key.shape[2], args.sinks + args.window + 2 * profile.block_size[1])
        else:
            kept = min(key.shape[2], (args.pages + 2) * args.page_size)
        out[f"{name}_kept_fraction"] = kept / key.shape[2]
    return out


def fidelity(args: argparse.Namespace) -> list[dict]:
    from autosparse.tools.zoo import SMOLLM2, fixture_text, load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(SMOLLM2)
    model = model.to(device)
    ids = tokenizer(fixture_text(), return_tensors="pt").input_ids.to(device)
    prompt, follow = ids[:, :args.prompt], ids[:, args.prompt:args.prompt + args.teacher]
    profile = Profile.uniform(model, {"kind": "sink_local", "sinks": args.sinks, "window": args.window})

    def greedy():
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=args.new, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0, args.prompt:]

    def teacher_ppl():
        cache, nll = DynamicCache(config=model.config), 0.0
        with torch.inference_mode():
            logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            for i in range(follow.shape[1]):
                nll += float(F.cross_entropy(logits.float(), follow[:, i]))
                logits = model(follow[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        return math.exp(nll / follow.shape[1])

    dense_tokens, dense_ppl = greedy(), teacher_ppl()
    rows = [dict(variant="dense", first_divergence=None, teacher_ppl=dense_ppl, change=0.0)]
    for name, policy in (("sparse prefill, dense decode", None), *((f"sparse prefill + {n} decode", p)
                                                                   for n, p in policies(args).items())):
        autosparse.patch_model(model, profile, decode=policy)
        tokens, ppl = greedy(), teacher_ppl()
        stats = str(autosparse.stats(model))
        autosparse.unpatch_model(model)
        differ = (tokens != dense_tokens).nonzero()
        rows.append(dict(variant=name, first_divergence=int(differ[0]) if len(differ) else None, teacher_ppl=ppl,
                         change=ppl / dense_ppl - 1, stats=stats))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def speed_table(rows: list[dict], args) -> str:
    shape = "tiny Llama, fp32, CPU" if args.quick else "Llama-3.1-8B-shaped (32 q / 8 kv heads, d=128), bf16"
    lines = [f"{args.layers}-layer {shape}; static: sink_local(sinks={args.sinks}, window={args.window}); "
             f"page_topk: {args.pages} pages of {args.page_size} + first + last", "",
             "| context | batch | ms/step: dense (default SDPA) / dense (flash) / static / page top-k "
             "| tokens/s: dense flash / static / page | attention alone ms: dense / dense flash / static / page "
             "| K/V kept: static / page |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['dense_ms']:.2f} / {r['dense_flash_ms']:.2f} / {r['static_ms']:.2f} / "
            f"{r['page_topk_ms']:.2f} | {r['dense_flash_tokens_per_s']:.0f} / {r['static_tokens_per_s']:.0f} / "
            f"{r['page_topk_tokens_per_s']:.0f} | {r['attention_dense_ms']:.3f} / {r['attention_dense_flash_ms']:.3f} / "
            f"{r['attention_static_ms']:.3f} / {r['attention_page_topk_ms']:.3f} | "
            f"{r['static_kept_fraction']:.3f} / {r['page_topk_kept_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def fidelity_table(rows: list[dict], args) -> str:
    lines = [f"SmolLM2-135M-Instruct, prompt {args.prompt} tokens of the Jargon File, greedy {args.new} new tokens, "
             f"teacher-forced perplexity of the next {args.teacher} tokens", "",
             "| variant | tokens until first divergence from dense | teacher-forced ppl | change |", "|---|---|---|---|"]
    for r in rows:
        div = "none (identical)" if r["first_divergence"] is None else str(r["first_divergence"])
        lines.append(f"| {r['variant']} | {div} | {r['teacher_ppl']:.3f} | {100 * r['change']:+.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--teacher", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts = args.contexts or [600]
        args.batches, args.steps, args.sinks, args.window, args.pages, args.page_size = [1, 2], 3, 16, 128, 4, 32
    args.contexts = args.contexts or [32768, 65536, 131072]
    start = time.time()
    if args.fidelity:
        text = fidelity_table(fidelity(args), args)
    else:
        text = speed_table(speed(args), args)
    print(text, f"\n({time.time() - start:.0f} s)", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ("decode_fidelity.md" if args.fidelity else "decode_speed.md")).write_text(text)


if __name__ == "__main__":
    main()
