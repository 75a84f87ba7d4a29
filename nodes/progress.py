"""ComfyUI's progress bar and cancel button for long node work."""
from __future__ import annotations

import comfy.model_management
import comfy.utils


class StepProgress:
    """Progress over ``total`` steps; ``__call__(done, total)`` matches
    ``rece_ops.loop.StepCallback`` and raises if the user cancelled."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int, total: int) -> None:
        check_cancel()
        self.bar.update_absolute(done, total)


def check_cancel() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()
