"""RECE concept erasure for ComfyUI (ComfyUI loads this file as the pack).

The nodes arrive in a later step; an empty mapping lets ComfyUI load the pack
without warnings meanwhile.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
