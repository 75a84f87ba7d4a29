"""What the pack's web extension (``web/rece_presets.js``) reads from the server.

``GET /rece/presets`` (also ``/api/rece/presets``): the published presets'
numbers, straight from ``rece_ops.PRESETS``, so the page fills the number
widgets with exactly what a named preset runs with on the server.
"""
from __future__ import annotations

import logging
import sys

from ..rece_ops import PRESETS

ROUTE = "/rece/presets"
NUMBERS = ("lamb", "erase_scale", "preserve_scale", "reg_scale", "epochs")


def preset_table() -> dict[str, dict]:
    """Every published preset: its numbers (the erase nodes' widget names) and a one-line description."""
    return {
        name: {**{key: getattr(preset.settings, key) for key in NUMBERS}, "description": preset.description}
        for name, preset in PRESETS.items()
    }


def register_routes() -> bool:
    """Add the route to ComfyUI's running server; False (nothing done) when
    ComfyUI is imported without one, as the in-process tests do."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def rece_presets(request):  # noqa: ARG001 - aiohttp handler signature
        return web.json_response(preset_table())

    logging.debug("comfyui-rece: %s registered", ROUTE)
    return True
