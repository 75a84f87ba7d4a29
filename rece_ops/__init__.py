"""RECE concept erasure as plain-tensor algebra (no ComfyUI inside).

Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image
Diffusion Models", ECCV 2024 (arXiv 2407.12383); its erase step is UCE
(Gandikota et al., WACV 2024, arXiv 2308.14761).

Typical use::

    from rece_ops import EncodedText, erase, preset, preserve_prompts
    result = erase([concept], [guide], preserves, preset("nudity").settings, weights=kv_weights)
    patches = result.deltas(kv_weights)     # {name: W @ (T - I)}

Inputs are K/V weights ``{name: [d_out, d]}`` and encoded texts
(``EncodedText``: encoder rows plus word count). The result, ``Erasure``,
holds one ``d x d`` transform per step; every matrix of the model is
``W @ T`` afterwards. It can be saved as a small erasure file
(``save_erasure_file`` / ``load_erasure_file``) or exported as an exact LoRA
(``lora_factors``, ``lora_state_dict``).

SPEED's null-space step (Li et al., ICLR 2026) replaces UCE's when ``erase``
is given ``speed=SpeedSettings(...)``: the same Erasure value, with the edit
confined to what the preserve texts leave unused (``null_space_of``).
"""
__version__ = "0.2.0"

from .closed_form import EditStep, adversarial_embedding, gram, uce_step
from .erasure import Erasure, chain
from .erasure_file import ErasureFile, describe, load_erasure_file, save_erasure_file
from .fingerprint import fingerprints_match, kv_fingerprint
from .lora_export import LoraFactors, lora_factors, lora_state_dict
from .loop import erase
from .null_space import NullSpace, SpeedSettings, null_space_of, speed_layer_steps, speed_rows, speed_step
from .settings import I2P_CONCEPTS, PRESETS, Preset, RECESettings, preset
from .texts import EncodedText, count_words, preserve_prompts, split_concepts, uce_erase_rows

__all__ = [
    "__version__", "EditStep", "EncodedText", "Erasure", "ErasureFile", "I2P_CONCEPTS", "LoraFactors", "PRESETS", "Preset",
    "NullSpace", "RECESettings", "SpeedSettings", "adversarial_embedding", "chain", "count_words", "describe", "erase", "fingerprints_match",
    "gram", "kv_fingerprint", "load_erasure_file", "lora_factors", "lora_state_dict", "null_space_of", "preserve_prompts",
    "preset", "save_erasure_file", "speed_layer_steps", "speed_rows", "speed_step", "split_concepts",
    "uce_erase_rows", "uce_step",
]
