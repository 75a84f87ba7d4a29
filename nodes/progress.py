"""ComfyUI's progress bar and cancel button for long node work."""
from __future__ import annotations

import comfy.model_management
import comfy.utils

from ..rece_ops.closed_form import StepCallback


class StepProgress:
    """One progress bar over a node's phases (encoding, G, the algebra ...),
    each an equal share of the bar. A phase's callback matches
    ``rece_ops``' ``StepCallback`` and checks cancel on every call, so the
    node stops within one step of the user pressing cancel."""

    UNITS = 100  # bar units per phase: a phase of many small steps still moves the bar smoothly

    def __init__(self, phases: int):
        self.total = phases * self.UNITS
        self.bar = comfy.utils.ProgressBar(self.total)
        self._phases_started = 0

    def phase(self) -> StepCallback:
        """The (done, total) callback of the next phase."""
        start = self._phases_started * self.UNITS
        self._phases_started += 1

        def report(done: int, total: int) -> None:
            check_cancel()
            self.bar.update_absolute(start + self.UNITS * done // max(total, 1), self.total)

        return report

    def step(self) -> None:
        """A phase with no steps of its own: check cancel and mark it done."""
        self.phase()(1, 1)


def check_cancel() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()
