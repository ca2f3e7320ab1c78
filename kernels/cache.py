"""Per-machine caches of measurements (the kernel's tile configs, layout costs): JSON objects in
``$AUTOSPARSE_CACHE_DIR`` (default ``~/.cache/autosparse``), re-read only when the file changes,
written atomically (a concurrent reader sees the old file or the new one, never half)."""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["entries", "path", "store"]

log = logging.getLogger("autosparse")


def path(name: str) -> Path:
    root = os.environ.get("AUTOSPARSE_CACHE_DIR") or Path.home() / ".cache" / "autosparse"
    return Path(root) / name


@functools.lru_cache(maxsize=8)
def _load(file: str, mtime: float) -> dict[str, Any]:
    try:
        data = json.loads(Path(file).read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        log.warning("ignoring the cache %s: %s", file, err)
        return {}


def entries(name: str) -> dict[str, Any]:
    """The cache's entries (empty if it does not exist or cannot be read). Do not modify."""
    file = path(name)
    try:
        mtime = file.stat().st_mtime
    except OSError:
        return {}
    return _load(str(file), mtime)


def store(name: str, key: str, entry: Any) -> None:
    file = path(name)
    file.parent.mkdir(parents=True, exist_ok=True)
    data = {**entries(name), key: entry}
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, file)
