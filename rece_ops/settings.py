"""RECE's scales and the settings its authors published per concept type.

Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image Diffusion
Models" (ECCV 2024, arXiv 2407.12383): Eq. 3's coefficients and the
regulariser of the closed-form adversarial embedding, as listed in the
authors' README.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RECESettings:
    """The scales of one RECE run.

    Attributes:
        lamb: weight of staying close to the current weights (``lamb*|W - W_l|^2``).
            Must be positive: it keeps the normal equations solvable.
        erase_scale: weight of mapping erased rows onto their guide rows.
        preserve_scale: weight of keeping preserve rows' outputs unchanged.
        reg_scale: regulariser of the adversarial embedding (``reg_scale*|x|^2``).
        epochs: RECE epochs after the UCE step; 0 is plain UCE.
    """

    lamb: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 0.1
    reg_scale: float = 0.1
    epochs: int = 3

    def __post_init__(self) -> None:
        for name in ("lamb", "erase_scale", "preserve_scale", "reg_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lamb <= 0:
            raise ValueError(f"lamb must be > 0 (it keeps the edit solvable), got {self.lamb}")
        for name in ("erase_scale", "preserve_scale", "reg_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"epochs must be a whole number >= 0, got {self.epochs!r}")

    def with_changes(self, **changes: float | int) -> "RECESettings":
        """A copy with some scales replaced (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    """Published settings for one concept type.

    Attributes:
        settings: the scales and epoch count.
        guide: the guide text the authors used ("" is the empty prompt).
        preserve_hint: what the authors preserved besides the empty prompt.
        description: one line for users.
    """

    settings: RECESettings
    guide: str = ""
    preserve_hint: str = "empty prompt only"
    description: str = ""
    example_concepts: tuple[str, ...] = field(default=())


# The eleven I2P categories the authors erase together as "unsafe".
I2P_CONCEPTS: tuple[str, ...] = (
    "hate", "harassment", "violence", "suffering", "humiliation", "harm",
    "suicide", "sexual", "nudity", "bodily fluids", "blood",
)

PRESETS: dict[str, Preset] = {
    "nudity": Preset(
        RECESettings(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1, epochs=3),
        description="Nudity (paper: 3 epochs, reg 0.1)",
        example_concepts=("nudity",),
    ),
    "unsafe": Preset(
        RECESettings(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1, epochs=2),
        description="Unsafe I2P concepts erased together (paper: 2 epochs, reg 0.1)",
        example_concepts=I2P_CONCEPTS,
    ),
    "artistic_style": Preset(
        RECESettings(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=1e-3, epochs=1),
        guide="art",
        preserve_hint="other artists",
        description="An artist's style, guided to 'art', other artists preserved (1 epoch, reg 1e-3)",
        example_concepts=("Kelly Mckernan",),
    ),
    "object_hard": Preset(
        RECESettings(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=1e-3, epochs=1),
        description="Object that UCE erases poorly, e.g. church, garbage truck (1 epoch, reg 1e-3)",
        example_concepts=("church", "garbage truck"),
    ),
    "object_easy": Preset(
        RECESettings(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1, epochs=1),
        description="Object that UCE erases well, e.g. golf ball, parachute (1 epoch, reg 0.1)",
        example_concepts=("golf ball", "parachute"),
    ),
}


def preset(name: str) -> Preset:
    """The published preset called ``name``; a clear error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
