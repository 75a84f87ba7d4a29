"""ComfyUI glue: translation between ComfyUI objects and ``rece_ops``.

Only this package imports ``comfy``; the mathematics lives in ``rece_ops``.
"""
