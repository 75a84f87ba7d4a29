"""An analytic colour and shape classifier for generated shape images.

Generated images are imperfect: soft or slightly concave edges, tinted
backgrounds, a decoded green that is darker than the training green. So the
classifier reads coarse, robust features:

- the shape's pixels: those clearly coloured (far from white and grey);
- colour: which of R, G, B stands out most over the other two, averaged
  over the shape's pixels;
- shape: a triangle is much narrower in its top quarter than in its bottom
  quarter (a fill-ratio rule alone miscounts concave triangles); of the
  rest, a square fills its bounding box, a circle fills about pi/4 of it.

Too few coloured pixels means no shape at all (``None``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import COLOURS

MIN_PIXELS = 60  # a 26 px triangle covers about 340
SATURATION = 0.25  # max - min channel of a shape pixel
TRIANGLE_WIDTH_RATIO = 0.6  # top-quarter / bottom-quarter mean width
SQUARE_FILL = 0.89  # between pi/4 (circle) and 1 (square)


@dataclass(frozen=True)
class Reading:
    """What the classifier sees in one image; ``None`` where nothing is drawn."""

    colour: str | None
    shape: str | None
    pixels: int


def shape_mask(image: torch.Tensor) -> torch.Tensor:
    """Pixels of the drawn shape [H, W] (bool) of an image [H, W, 3] in [0, 1]."""
    spread = image.max(dim=-1).values - image.min(dim=-1).values
    return spread > SATURATION


def _classify_shape(mask: torch.Tensor) -> str:
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    top, bottom, left, right = rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()
    box = mask[top:bottom + 1, left:right + 1].float()
    height = box.shape[0]
    quarter = max(1, height // 4)
    widths = box.sum(dim=1)
    top_width, bottom_width = widths[:quarter].mean().item(), widths[-quarter:].mean().item()
    if top_width < TRIANGLE_WIDTH_RATIO * bottom_width:
        return "triangle"
    return "square" if box.mean().item() >= SQUARE_FILL else "circle"


def classify(image: torch.Tensor) -> Reading:
    """Read one image [H, W, 3] (ComfyUI's IMAGE layout, values in [0, 1])."""
    image = image.float()
    mask = shape_mask(image)
    pixels = int(mask.sum().item())
    if pixels < MIN_PIXELS:
        return Reading(None, None, pixels)
    mean = image[mask].mean(dim=0)
    excess = torch.stack([mean[i] - (mean.sum() - mean[i]) / 2 for i in range(3)])
    colour = list(COLOURS)[int(excess.argmax())]
    return Reading(colour, _classify_shape(mask), pixels)


def classify_batch(images: torch.Tensor) -> list[Reading]:
    """Read a batch [B, H, W, 3]."""
    return [classify(image) for image in images]


def accuracy_on_synthetic(n: int = 900, seed: int = 12345) -> dict[str, float]:
    """Colour, shape and both-right accuracy on ``n`` held-out synthetic images
    (a seed the training never uses)."""
    from .data import label_names, sample_batch

    generator = torch.Generator().manual_seed(seed)
    images, labels, _ = sample_batch(n, generator)
    readings = classify_batch(images)
    colour_ok = shape_ok = both_ok = 0
    for reading, label in zip(readings, labels.tolist()):
        colour, shape = label_names(label)
        colour_ok += reading.colour == colour
        shape_ok += reading.shape == shape
        both_ok += reading.colour == colour and reading.shape == shape
    return {"colour": colour_ok / n, "shape": shape_ok / n, "both": both_ok / n, "n": n}

