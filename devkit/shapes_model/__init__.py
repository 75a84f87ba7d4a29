"""The shapes demo model: a miniature SD1.5-compatible model trained here.

No real weights reach these machines, so this package trains a model small
enough for a 2-core CPU on synthetic captioned shapes ("a red circle"), to
show on generated images that an erased concept disappears and how RECE and
UCE fare against the adversarial embedding.

- ``data``: the synthetic images and their captions.
- ``classify``: an analytic colour/shape classifier for generated images.
- ``frozen_clip``: the frozen, seeded text encoder and its checksum.
- ``train``: the training pipeline (one command, seeded, fixed iteration counts).
- ``assemble``: the SD1.5-format checkpoint from the shipped weights.
- ``measure``: erasure and red-teaming measured through the pack's nodes.
"""
