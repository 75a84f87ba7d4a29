"""RECE concept erasure for ComfyUI (ComfyUI loads this file as the pack)."""
from .nodes import folders
from .nodes.adversarial import RECEDeriveAdversarialEmbedding
from .nodes.compare_weights import RECECompareKVWeights
from .nodes.erase_concept import RECEEraseConcept, UCEEraseConcept
from .nodes.erasure_files import RECELoadErasure, RECESaveErasure
from .nodes.lora_export import RECEExportErasureLoRA
from .nodes.published_erasure import RECELoadPublishedErasure
from .nodes.red_team.ring_a_bell_attack import RECERingABell
from .nodes.red_team.unlearndiff_attack import RECEUnlearnDiffAttack
from .nodes.web_api import register_routes

folders.register()
register_routes()

NODE_CLASS_MAPPINGS = {
    "RECEEraseConcept": RECEEraseConcept,
    "UCEEraseConcept": UCEEraseConcept,
    "RECEDeriveAdversarialEmbedding": RECEDeriveAdversarialEmbedding,
    "RECESaveErasure": RECESaveErasure,
    "RECELoadErasure": RECELoadErasure,
    "RECEExportErasureLoRA": RECEExportErasureLoRA,
    "RECELoadPublishedErasure": RECELoadPublishedErasure,
    "RECECompareKVWeights": RECECompareKVWeights,
    "RECEUnlearnDiffAttack": RECEUnlearnDiffAttack,
    "RECERingABell": RECERingABell,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RECEEraseConcept": "RECE Erase Concept",
    "UCEEraseConcept": "UCE Erase Concept",
    "RECEDeriveAdversarialEmbedding": "Derive Adversarial Embedding",
    "RECESaveErasure": "Save Erasure",
    "RECELoadErasure": "Load Erasure",
    "RECEExportErasureLoRA": "Export Erasure as LoRA",
    "RECELoadPublishedErasure": "Load Published Erasure",
    "RECECompareKVWeights": "Compare Cross-Attention Weights",
    "RECEUnlearnDiffAttack": "UnlearnDiff Attack",
    "RECERingABell": "Ring-A-Bell Attack",
}

# The page-side extension: the preset dropdown fills the number widgets.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
