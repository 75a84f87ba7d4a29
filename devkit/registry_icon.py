"""Draw the pack's Comfy Registry icon (``docs/icon.png``, 256x256 PNG).

    .venv/bin/python -m devkit.registry_icon [--out docs/icon.png]

The registry wants a square SVG/PNG/JPG/GIF of at most 400x400 px, named by
URL in pyproject.toml's ``[tool.comfy] Icon`` (the raw URL of this file on the
repository). The picture is the demo model's story: a blue circle whose right
half dissolves into fading dots, erased. Deterministic: no randomness, and
Pillow writes no timestamp into a PNG, so the same Pillow gives the same bytes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from devkit import paths

SIZE = 256
SCALE = 4  # drawn 4x larger, then downsampled: smooth edges without anti-aliasing support in ImageDraw
BACKGROUND = (31, 36, 48, 255)
CIRCLE = (59, 130, 246)
DEFAULT_OUT = paths.REPO_ROOT / "docs" / "icon.png"


def draw() -> Image.Image:
    big = SIZE * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    canvas = ImageDraw.Draw(image)
    canvas.rounded_rectangle((0, 0, big - 1, big - 1), radius=big // 6, fill=BACKGROUND)

    centre, radius = big / 2, big * 0.34
    # The left half: the circle as it was.
    disk = Image.new("L", (big, big), 0)
    ImageDraw.Draw(disk).ellipse((centre - radius, centre - radius, centre + radius, centre + radius), fill=255)
    left = Image.new("L", (big, big), 0)
    ImageDraw.Draw(left).rectangle((0, 0, int(centre), big), fill=255)
    solid = Image.new("L", (big, big), 0)
    solid.paste(disk, mask=left)
    image.paste(Image.new("RGBA", (big, big), CIRCLE + (255,)), mask=solid)

    # The right half: a grid of dots inside the circle, smaller and fainter
    # towards the edge, as if wiped away.
    step = big // 16
    dots = ImageDraw.Draw(image)
    for row in range(16):
        for column in range(8, 16):
            x, y = (column + 0.5) * step, (row + 0.5) * step
            if (x - centre) ** 2 + (y - centre) ** 2 > radius ** 2:
                continue
            fade = 1 - (x - centre) / radius  # 1 at the middle, 0 at the right edge
            half = step * 0.42 * fade
            if half < step * 0.06:
                continue
            alpha = int(255 * (0.25 + 0.75 * fade))
            dots.rectangle((x - half, y - half, x + half, y + half), fill=CIRCLE + (alpha,))
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw().save(args.out, optimize=True)
    print(f"wrote {args.out} ({SIZE}x{SIZE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
