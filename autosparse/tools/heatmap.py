"""``autosparse show P.json --png out.png``: a profile as a picture, one cell per (layer, head).

The hue says the pattern kind, the shade its measured block density (pale: few blocks computed,
full colour: dense-like; dense heads grey); head numbers on top, each layer's mean density at the
right, a density scale and, for a diffusion profile, its denoising-step schedule. Written with
Pillow, which diffusers already requires.
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
_CELL, _GAP, _TOP, _LINE = 18, 2, 58, 16  # cell size, space between cells, title band, text line height
_CHAR = 6  # Pillow's default font: about 6 px a character


def _shade(colour: tuple[int, int, int], density: float | None) -> tuple[int, int, int]:
    """Mix with white: density 1 is the full colour, density 0 nearly white; unknown: half way."""
    d = 0.5 if density is None else 0.15 + 0.85 * min(max(density, 0.0), 1.0)
    return tuple(round(255 - (255 - c) * d) for c in colour)


def save_heatmap(profile: Profile, path: str | Path) -> None:
    """Layers down, heads across (head numbers on top), each layer's mean density at the right; a
    legend of the pattern kinds, the density scale, and a diffusion profile's step schedule."""
    from PIL import Image, ImageDraw

    layers = list(profile.layers.items())
    heads = max(layer.num_heads for _, layer in layers)
    kinds = sorted({p.to_spec()["kind"] for _, layer in layers for p in layer.heads})
    names = [name for name, _ in layers]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1] if len(names) > 1 else ""
    labels = [name[len(prefix):len(name) - len(suffix)][-30:] or name for name in names]
    left = 8 + _CHAR * max(len(label) for label in labels) + 8
    grid_right = left + heads * _CELL
    legend_x = grid_right + 8 + _CHAR * 7 + 16  # after the density column
    measured = any(layer.measured for _, layer in layers)
    schedule = [f"steps {r}: {'dense' if r.dense else f'own patterns ({len(r.layers)} layers)'}" for r in profile.steps]
    if schedule:
        schedule.append("other steps: the patterns drawn")
    legend_lines = len(kinds) + 4 + len(schedule)
    width = max(legend_x + _CHAR * max([26, *map(len, schedule)]) + 8, 8 + _CHAR * 70)
    height = max(_TOP + len(layers) * _CELL, _TOP + legend_lines * _LINE) + 16
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    model = profile.model.get("class", "?")
    draw.text((8, 6), f"{model}: {len(layers)} layers ({prefix}*{suffix}) x {heads} heads, "
                      f"blocks {profile.block_size[0]}x{profile.block_size[1]}", fill="black")
    draw.text((8, 22), "cell: a head's pattern (hue) and measured block density (shade)", fill="black")
    step = 1 if heads <= 16 else 4
    for h in range(0, heads, step):  # head numbers
        draw.text((left + h * _CELL + 2, _TOP - 16), str(h), fill="black")
    draw.text((grid_right + 8, _TOP - 16), "density", fill="black")
    label_every = max(1, len(layers) // 60)
    for row, (label, (_, layer)) in enumerate(zip(labels, layers)):
        y = _TOP + row * _CELL
        if row % label_every == 0:
            draw.text((8, y + 3), label, fill="black")
        measured_row = layer.measured or [None] * layer.num_heads
        for h, (pattern, m) in enumerate(zip(layer.heads, measured_row)):
            x = left + h * _CELL
            colour = _shade(KIND_COLOURS.get(pattern.to_spec()["kind"], (0, 0, 0)), m and m.get("density"))
            draw.rectangle([x, y, x + _CELL - _GAP, y + _CELL - _GAP], fill=colour)
        densities = [m["density"] for m in measured_row if m and m.get("density") is not None]
        if densities:
            draw.text((grid_right + 8, y + 3), f"{sum(densities) / len(densities):.2f}", fill="black")
    y = _TOP
    for kind in kinds:
        draw.rectangle([legend_x, y, legend_x + _CELL - _GAP, y + _CELL - _GAP], fill=KIND_COLOURS.get(kind, (0, 0, 0)))
        draw.text((legend_x + _CELL + 6, y + 3), kind, fill="black")
        y += _LINE + 2
    y += _LINE
    if measured:  # the scale: one hue from density 0 to 1
        draw.text((legend_x, y), "block density", fill="black")
        y += _LINE
        for i in range(11):
            colour = _shade(KIND_COLOURS["window"], i / 10)
            draw.rectangle([legend_x + i * 12, y, legend_x + i * 12 + 11, y + 11], fill=colour)
        draw.text((legend_x, y + 14), "0", fill="black")
        draw.text((legend_x + 10 * 12 - 2, y + 14), "1", fill="black")
        y += 2 * _LINE + 4
    else:
        draw.text((legend_x, y), "density not measured", fill="black")
        draw.text((legend_x, y + _LINE), "(uncalibrated): half shade", fill="black")
        y += 2 * _LINE + 4
    for line in schedule:  # a diffusion profile's denoising-step ranges
        draw.text((legend_x, y), line, fill="black")
        y += _LINE
    image.save(path)
