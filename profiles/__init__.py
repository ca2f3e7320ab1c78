"""The profiles shipped with autosparse (installed as ``autosparse.profiles``): ``load(name)`` reads
one by name, ``names()`` lists them, ``matching(model)`` finds the one that fits a model, for ``torch.compile(model, backend="autosparse")`` without a profile.
``make_structural.py`` beside them writes the uncalibrated DiT ones."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

__all__ = ["load", "matching", "names", "shipped"]

log = logging.getLogger("autosparse")


def shipped() -> list[Path]:
    """Every shipped profile file, by name."""
    return sorted(Path(__file__).parent.glob("*.json"))


def names() -> list[str]:
    """The shipped profiles' names (file names without ``.json``), for ``load``."""
    return [path.stem for path in shipped()]


def load(name: str):
    """The shipped profile ``name`` (``autosparse show --list`` prints the names), from wherever
    autosparse is installed: no repository-relative path needed."""
    from autosparse.profile import Profile

    path = Path(__file__).parent / f"{name}.json"
    if name not in names():
        raise ValueError(f"no shipped profile {name!r}; the shipped ones: {', '.join(names())}")
    return Profile.load(path)


def matching(model: nn.Module) -> Path | None:
    """The first shipped profile (by name) that fits ``model`` (class, config, layer names, head
    counts), or None. Several can fit (one model, several resolutions): the others are logged."""
    from autosparse.profile import Profile

    fits = []
    for path in shipped():
        profile = Profile.load(path)
        if profile.model.get("class") != type(model).__name__:
            continue
        try:
            profile.check_model(model)
        except ValueError:
            continue
        fits.append(path)
    if len(fits) > 1:
        log.info("autosparse: shipped profiles %s fit %s; using %s (pass options={'profile': ...} to choose)",
                 [p.stem for p in fits], type(model).__name__, fits[0].stem)
    return fits[0] if fits else None
