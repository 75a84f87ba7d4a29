"""Synthetic training images: one shape in one colour on white, with its caption.

64x64 RGB in [0, 1]; a circle, square or upright triangle of side 26-44 px at
a random position, filled with red, green or blue; caption
``"a {colour} {shape}"``. Edges are anti-aliased by 4x supersampling so the
VAE learns smooth outlines. Everything is drawn from a ``torch.Generator``,
so a seed gives the same images on every machine.
"""
from __future__ import annotations

import torch

SIZE = 64
COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.1, 0.2, 0.9)}
SHAPES = ("circle", "square", "triangle")
SIDE_RANGE = (26, 44)
SUPERSAMPLE = 4


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


CAPTIONS: tuple[str, ...] = tuple(caption(c, s) for c in COLOURS for s in SHAPES)

# Captions that name one attribute, for training only (the experiment of
# train.PARTIAL_CAPTION_RATE; the shipped model never saw them): an erasure
# names one word ("circle", "red"), so the model might learn what each word
# means on its own, not only inside the full caption.
SHAPE_CAPTIONS: tuple[str, ...] = tuple(f"a {s}" for s in SHAPES)
COLOUR_CAPTIONS: tuple[str, ...] = tuple(f"a {c} shape" for c in COLOURS)
TRAINING_CAPTIONS: tuple[str, ...] = CAPTIONS + SHAPE_CAPTIONS + COLOUR_CAPTIONS


def training_caption_index(labels: torch.Tensor, forms: torch.Tensor) -> torch.Tensor:
    """Indices into TRAINING_CAPTIONS: form 0 the full caption of ``labels``
    (indices into CAPTIONS), 1 its shape alone, 2 its colour alone."""
    shape_only = len(CAPTIONS) + labels % len(SHAPES)
    colour_only = len(CAPTIONS) + len(SHAPES) + labels // len(SHAPES)
    return torch.where(forms == 0, labels, torch.where(forms == 1, shape_only, colour_only))


def shape_coverage(shape: str, centre_x: float, centre_y: float, side: float, size: int = SIZE) -> torch.Tensor:
    """The fraction of each pixel a shape covers, [size, size], by supersampling."""
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - centre_x, y - centre_y
    half = side / 2
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":  # apex up, base at the bottom; as tall as wide
        t = (dy + half) / side  # 0 at the apex row, 1 at the base
        inside = (t >= 0) & (t <= 1) & (dx.abs() <= half * t)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.float().reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(dim=(1, 3))


def render(colour: str, shape: str, centre_x: float, centre_y: float, side: float) -> torch.Tensor:
    """One image [SIZE, SIZE, 3] (ComfyUI's IMAGE layout) in [0, 1]."""
    cover = shape_coverage(shape, centre_x, centre_y, side)[..., None]
    fill = torch.tensor(COLOURS[colour])
    return (1 - cover) + cover * fill


def sample_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` random images [B, SIZE, SIZE, 3], their caption indices into
    CAPTIONS [B] and their shape coverage masks [B, SIZE, SIZE]."""
    labels = torch.randint(len(CAPTIONS), (batch,), generator=generator)
    sides = torch.randint(SIDE_RANGE[0], SIDE_RANGE[1] + 1, (batch,), generator=generator).float()
    room = (SIZE - sides) / 2  # keep the whole shape inside the image
    offsets = torch.rand(batch, 2, generator=generator) * 2 - 1
    images, masks = [], []
    for i in range(batch):
        colour, shape = list(COLOURS)[labels[i] // len(SHAPES)], SHAPES[labels[i] % len(SHAPES)]
        cx = SIZE / 2 + offsets[i, 0].item() * room[i].item()
        cy = SIZE / 2 + offsets[i, 1].item() * room[i].item()
        cover = shape_coverage(shape, cx, cy, sides[i].item())
        fill = torch.tensor(COLOURS[colour])
        images.append((1 - cover[..., None]) + cover[..., None] * fill)
        masks.append(cover)
    return torch.stack(images), labels, torch.stack(masks)


def label_names(label: int) -> tuple[str, str]:
    """(colour, shape) of a caption index."""
    return list(COLOURS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
