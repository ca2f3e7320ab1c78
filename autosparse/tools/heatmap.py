"""``autosparse show P.json --png out.png``: a profile as a picture, one cell per (layer, head).

The hue says the pattern kind, the shade its measured block density (pale: few blocks computed,
full colour: dense-like; dense heads grey). Written with Pillow, which diffusers already requires.
"""

from __future__ import annotations

import os
from pathlib import Path

from autosparse.profile import Profile

__all__ = ["KIND_COLOURS", "save_heatmap"]

KIND_COLOURS = {
    "dense": (110, 110, 110),
    "window": (31, 119, 180),
    "sink_local": (23, 190, 207),
    "blocks": (255, 127, 14),
    "global": (148, 103, 189),
    "union": (227, 119, 194),
    "neighborhood": (44, 160, 44),
    "spatial": (188, 189, 34),
    "temporal": (140, 86, 75),
    "stripes": (214, 39, 40),
}
_CELL, _LEFT, _TOP, _LEGEND_ROW = 12, 200, 40, 16


def _shade(colour: tuple[int, int, int], density: float | None) -> tuple[int, int, int]:
    """Mix with white: density 1 is the full colour, density 0 white; unknown: half way."""
    d = 0.5 if density is None else 0.15 + 0.85 * min(max(density, 0.0), 1.0)
    return tuple(round(255 - (255 - c) * d) for c in colour)


def save_heatmap(profile: Profile, path: str | Path) -> None:
    from PIL import Image, ImageDraw

    layers = list(profile.layers.items())
    heads = max(layer.num_heads for _, layer in layers)
    kinds = sorted({p.to_spec()["kind"] for _, layer in layers for p in layer.heads})
    width = _LEFT + heads * _CELL + 20
    height = _TOP + len(layers) * _CELL + 20 + _LEGEND_ROW * (len(kinds) + 2)
    image = Image.new("RGB", (max(width, 420), height), "white")
    draw = ImageDraw.Draw(image)
    model = profile.model.get("class", "?")
    names = [name for name, _ in layers]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1] if len(names) > 1 else ""
    draw.text((8, 8), f"{model}: {len(layers)} layers ({prefix}*{suffix}) x {heads} heads", fill="black")
    label_every = max(1, len(layers) // 30)
    for row, (name, layer) in enumerate(layers):
        y = _TOP + row * _CELL
        if row % label_every == 0:
            draw.text((8, y), name[len(prefix):len(name) - len(suffix)][-30:], fill="black")
        measured = layer.measured or [None] * layer.num_heads
        for h, (pattern, m) in enumerate(zip(layer.heads, measured)):
            x = _LEFT + h * _CELL
            colour = _shade(KIND_COLOURS.get(pattern.to_spec()["kind"], (0, 0, 0)), m and m.get("density"))
            draw.rectangle([x, y, x + _CELL - 2, y + _CELL - 2], fill=colour)
    y = _TOP + len(layers) * _CELL + 12
    for kind in kinds:
        draw.rectangle([8, y, 8 + _CELL - 2, y + _CELL - 2], fill=KIND_COLOURS.get(kind, (0, 0, 0)))
        draw.text((8 + _CELL + 6, y), kind, fill="black")
        y += _LEGEND_ROW
    measured = any(layer.measured for _, layer in layers)
    draw.text((8, y), "shade: measured block density (pale = sparse)" if measured
              else "density not measured (uncalibrated profile): half shade", fill="black")
    image.save(path)
