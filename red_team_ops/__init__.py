"""Red-team attacks on erased models, as plain torch (no ComfyUI inside).

Attacks that check whether an erased concept can still be brought back, and the
text encoder they differentiate through:

- UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned
  Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now",
  ECCV 2024, arXiv 2310.11868): ``unlearndiff_attack`` searches ``k`` typed
  tokens that make the erased model denoise an image of the concept again.
  The model enters as two callables (``encode``, ``predict_noise``);
  ``typeable_token_ids`` picks candidate tokens a person could type.
- ``clip_text_forward``: the CLIP text transformer (CLIP-L, OpenCLIP ViT-H,
  bigG) written out of place over plain weight tensors, so gradients reach
  soft input tokens (ComfyUI's own forward adds in place).
- Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal
  Methods for Diffusion Models?", ICLR 2024, arXiv 2310.10012):
  ``concept_direction`` and ``apply_concept`` push a prompt's encoding along
  the concept's direction in text-encoder space.
"""
from .clip_text import ClipTextConfig, clip_text_forward
from .ring_a_bell import DEFAULT_ETA, NUDITY_PAIRS, apply_concept, concept_direction, parse_concept_pairs
from .simplex import project_to_simplex
from .unlearndiff import UnlearnDiffResult, evaluation_timesteps, straight_through_sample, unlearndiff_attack
from .vocabulary import typeable_token_ids

__all__ = [
    "ClipTextConfig", "DEFAULT_ETA", "clip_text_forward", "NUDITY_PAIRS", "UnlearnDiffResult", "apply_concept", "concept_direction", "evaluation_timesteps",
    "parse_concept_pairs", "project_to_simplex", "straight_through_sample", "typeable_token_ids",
    "unlearndiff_attack",
]
