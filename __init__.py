"""RECE concept erasure for ComfyUI (ComfyUI loads this file as the pack)."""
from .nodes.adversarial import RECEDeriveAdversarialEmbedding
from .nodes.erase_concept import RECEEraseConcept, UCEEraseConcept

NODE_CLASS_MAPPINGS = {
    "RECEEraseConcept": RECEEraseConcept,
    "UCEEraseConcept": UCEEraseConcept,
    "RECEDeriveAdversarialEmbedding": RECEDeriveAdversarialEmbedding,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RECEEraseConcept": "RECE Erase Concept",
    "UCEEraseConcept": "UCE Erase Concept",
    "RECEDeriveAdversarialEmbedding": "Derive Adversarial Embedding",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
