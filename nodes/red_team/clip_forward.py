"""A ComfyUI CLIP's text encoders as a differentiable function of a one-hot prompt prefix.

ComfyUI's own text encoder cannot be differentiated: its layers add in place
(``x += ...`` in ``comfy/clip_model.py``) and the weights a checkpoint loader
gives are inference tensors. ``DifferentiableTextEncoder`` clones the weights
once (float32, outside inference mode) and runs
``red_team_ops.clip_text.clip_text_forward`` over them, choosing the hidden
layer, the layer norm and the pooled output exactly as the CLIP's
``SDClipModel`` does, so that its context equals ``clip.encode_from_tokens``
for the same tokens. UnlearnDiffAtk (Zhang et al., ECCV 2024, arXiv
2310.11868) optimises ``k`` prefix tokens inserted after the start token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import comfy.clip_model
import torch

from ...red_team_ops.clip_text import ClipTextConfig, clip_text_forward
from ..model_weights import patched_weight

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
# The token ids of "*", the textual-inversion placeholder: what a layout's prefix slots hold.
PLACEHOLDER_ID = 265
# Text encoders per supported family: ComfyUI's cond_stage_model class -> its
# SDClipModel attributes in the order the context puts their rows side by side.
FAMILIES = {
    "SD1ClipModel": ("clip_l",),
    "SD2ClipModel": ("clip_h",),
    "SDXLClipModel": ("clip_l", "clip_g"),
}
# (width, layers) of each encoder, to tell these families from others built on the same classes.
SHAPES = {"clip_l": (768, 12), "clip_h": (1024, 24), "clip_g": (1280, 32)}
SUPPORTED = "SD1.x (CLIP-L), SD2.x (OpenCLIP ViT-H), SDXL (CLIP-L + OpenCLIP bigG)"


@dataclass(frozen=True)
class PrefixLayout:
    """A prompt tokenized with ``k`` prefix slots after the start token (UnlearnDiffAtk's prefix_k).

    ids: per tokenizer (``"l"``, ``"h"``, ``"g"``, as ``clip.tokenize`` names
        them) one chunk of token ids, ``[BOS, k slots, prompt..., EOS,
        padding]``, the slots holding ``PLACEHOLDER_ID``.
    eos: per tokenizer, the position of the EOS token (the pooled output's row).
    """

    prompt: str
    k: int
    ids: Mapping[str, tuple[int, ...]]
    eos: Mapping[str, int]

    def with_prefix(self, prefix_ids: Sequence[int]) -> dict[str, list[int]]:
        """The token ids with the slots filled: what ``clip.tokenize`` gives for the prefix words then the prompt."""
        if len(prefix_ids) != self.k:
            raise ValueError(f"{len(prefix_ids)} prefix ids for {self.k} slots")
        return {name: [ids[0], *map(int, prefix_ids), *ids[1 + self.k:]] for name, ids in self.ids.items()}


def _encoders(clip) -> dict[str, object]:
    """Tokenizer name -> SDClipModel of a supported CLIP, or a ValueError naming the supported ones."""
    model = getattr(clip, "cond_stage_model", None)
    kind = type(model).__name__
    names = FAMILIES.get(kind)
    if names is None or not all(hasattr(model, n) for n in names):
        raise ValueError(f"the differentiable text encoder does not know this CLIP ({kind}); supported: {SUPPORTED}")
    encoders = {n.removeprefix("clip_"): getattr(model, n) for n in names}
    for name, encoder in encoders.items():
        text_model = encoder.transformer.text_model
        shape = (text_model.final_layer_norm.weight.shape[0], len(text_model.encoder.layers))
        if shape != SHAPES[f"clip_{name}"] or encoder.enable_attention_masks or encoder.zero_out_masked:
            raise ValueError(f"this CLIP's clip_{name} (width {shape[0]}, {shape[1]} layers) is not the one of "
                             f"its family; supported: {SUPPORTED}")
    return encoders


def _config(encoder, activations: Mapping) -> ClipTextConfig:
    """The ClipTextConfig of one SDClipModel, with the options it has right after ``reset_clip_options``
    and the CLIP's ``layer_idx`` (CLIPSetLastLayer), as ``encode_from_tokens`` sets them."""
    text_model = encoder.transformer.text_model
    first = text_model.encoder.layers[0]
    activation = next((n for n, f in activations.items() if f is first.mlp.activation), None)
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported CLIP activation ({activation}); supported: {SUPPORTED}")
    if encoder.layer == "last":
        hidden = None
    elif encoder.layer == "hidden":
        hidden = encoder.layer_idx
    else:
        raise ValueError(f"the CLIP outputs the layers {encoder.layer!r}; the differentiable encoder needs one layer")
    return ClipTextConfig(
        layers=len(text_model.encoder.layers), heads=first.self_attn.heads, activation=activation,
        hidden_layer=hidden, hidden_layer_norm=bool(encoder.layer_norm_hidden_state),
        eos_token_id=int(text_model.eos_token_id), projected_pooled=bool(encoder.return_projected_pooled))


def _token_ids(chunk) -> list[int]:
    ids = []
    for token in chunk:
        value, weight = token[0], token[1]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("the prompt uses a textual-inversion embedding; the attack needs plain tokens")
        if weight != 1.0:
            raise ValueError("the prompt has weighted words like (word:1.2); the attack needs unweighted text")
        ids.append(value)
    return ids


def _effective_weights(clip, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Float32 copies of the CLIP's weights under ``prefix`` with its patches applied, keyed without the prefix.

    Read as ComfyUI's merging nodes read them (``get_key_patches``: the stored
    weight even while a patched copy is loaded) and patched as ``ModelPatcher``
    patches a weight (in float32, then rounded to the stored dtype). The copies
    are made outside inference mode, so autograd may save them.
    """
    out = {}
    with torch.inference_mode(False), torch.no_grad():
        for key, entries in clip.patcher.get_key_patches(prefix).items():
            weight = patched_weight(key, entries, device)
            if len(entries) > 1:  # rounded to the stored dtype, as the patched CLIP runs it
                weight = weight.to(entries[0][0].dtype).float()
            out[key.removeprefix(prefix)] = weight
    return out


class DifferentiableTextEncoder:
    """The text encoders of a ComfyUI CLIP (SD1.x, SD2.x or SDXL), differentiable w.r.t. prefix tokens.

    Holds one float32 copy of each text encoder's weights (``weight_bytes``),
    read through the CLIP's patcher so that patches on the CLIP (a LoRA's text
    part) are included and the CLIP's own tensors are never touched. The
    layer choice is the CLIP's at construction (its ``layer_idx`` included).

    device: where the copies live and the forward runs (default: the CLIP's load device).
    configs: per encoder (``names``) its ``ClipTextConfig``.
    weights: per encoder its float32 weights, keyed as ComfyUI's ``CLIPTextModel`` state dict.
    vocab_size: ``V``, the rows of each token embedding.
    """

    def __init__(self, clip, device: torch.device | str | None = None):
        encoders = _encoders(clip)
        self.device = torch.device(device) if device is not None else torch.device(clip.patcher.load_device)
        model = clip.cond_stage_model
        model.reset_clip_options()
        if clip.layer_idx is not None:
            model.set_clip_options({"layer": clip.layer_idx})
        try:
            self.configs = {name: _config(e, comfy.clip_model.ACTIVATIONS) for name, e in encoders.items()}
        finally:
            model.reset_clip_options()
        self.weights = {name: _effective_weights(clip, f"clip_{name}.transformer.", self.device) for name in encoders}
        sizes = {t[TOKEN_EMBEDDING].shape[0] for t in self.weights.values()}
        if len(sizes) != 1:
            raise ValueError(f"the text encoders' vocabularies differ ({sorted(sizes)})")
        self.vocab_size = sizes.pop()
        self._clip = clip
        self._candidate_rows: dict = {}
        empty = clip.tokenize("")
        self._pad = {name: empty[name][0][2][0] for name in encoders}

    @property
    def names(self) -> tuple[str, ...]:
        """Tokenizer names of the encoders, in the order the context puts their rows side by side."""
        return tuple(self.weights)

    @property
    def weight_bytes(self) -> int:
        """Memory of the float32 weight copies, in bytes."""
        return sum(t.numel() * t.element_size() for w in self.weights.values() for t in w.values())

    def token_embedding(self, name: str) -> torch.Tensor:
        """``[V, width]`` token embedding of encoder ``name`` (``"l"``, ``"h"`` or ``"g"``)."""
        return self.weights[name][TOKEN_EMBEDDING]

    def layout(self, prompt: str, k: int) -> PrefixLayout:
        """Token ids of ``[BOS, k prefix slots, prompt tokens, EOS, padding]`` per encoder, one 77-token chunk.

        The prompt is tokenized by ``clip.tokenize``; filled with ``k``
        single-token words, the ids are those of ``clip.tokenize(words + " " + prompt)``.
        """
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: the attack needs the prompt to put the prefix before")
        if k < 0:
            raise ValueError(f"k = {k} prefix tokens: it must be 0 or more")
        tokens = self._clip.tokenize(prompt)
        ids, eos = {}, {}
        for name in self.names:
            chunks = [_token_ids(chunk) for chunk in tokens[name]]
            end = self.configs[name].eos_token_id
            count = sum(c.index(end) - 1 if end in c else len(c) - 1 for c in chunks)
            length = len(chunks[0])
            if count == 0:
                raise ValueError(f"the prompt {prompt[:40]!r} has no tokens: the attack needs a prompt")
            if len(chunks) > 1 or k + count > length - 2:
                raise ValueError(f"{k} prefix tokens and the prompt's {count} tokens make {k + count}, more than "
                                 f"the {length - 2} one {length}-token chunk holds: shorten the prompt or k")
            chunk = chunks[0]
            body = chunk[:count + 2]  # BOS, prompt, EOS
            ids[name] = tuple([body[0], *[PLACEHOLDER_ID] * k, *body[1:]]
                              + [self._pad[name]] * (length - len(body) - k))
            eos[name] = count + 1 + k
        return PrefixLayout(prompt, k, ids, eos)

    def encode(self, layout: PrefixLayout, prefix_one_hot: torch.Tensor,
               candidate_ids: torch.Tensor | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context ``[1, 77, d]`` and pooled output of the layout with soft prefix tokens.

        prefix_one_hot: ``[k, V]`` rows over the full vocabulary, or ``[k, C]``
            over ``candidate_ids`` (C token ids); one-hot rows give exactly
            ComfyUI's encode of those tokens, and the result is differentiable
            with respect to it. The forward runs under
            ``torch.inference_mode(False)`` and ``torch.enable_grad()`` (entered
            here; a caller inside ComfyUI's inference mode must also create
            ``prefix_one_hot`` outside it).

        SDXL's context is CLIP-L's rows then bigG's per token, pooled from bigG
        (projected); SD2's pooled is projected, SD1's is not (as ComfyUI gives them).
        """
        with torch.inference_mode(False), torch.enable_grad():
            soft = {}
            for name in self.names:
                table = self.token_embedding(name) if candidate_ids is None else self._rows_of(candidate_ids, name)
                if prefix_one_hot.shape != (layout.k, table.shape[0]):
                    raise ValueError(f"prefix_one_hot is {tuple(prefix_one_hot.shape)}, expected "
                                     f"({layout.k}, {table.shape[0]})")
                soft[name] = prefix_one_hot.to(device=self.device, dtype=table.dtype) @ table
            embeds = {}
            for name in self.names:
                rows = self._embed(layout.ids[name], name)
                embeds[name] = torch.cat([rows[:1], soft[name], rows[1 + layout.k:]])
            return self._forward(embeds, layout.eos)

    def _rows_of(self, candidate_ids, name: str) -> torch.Tensor:
        """The token embedding's rows of ``candidate_ids``, gathered once per candidate list (the attack
        encodes every iteration with the same list: a copy of 100 MiB each time otherwise)."""
        cached = self._candidate_rows.get((id(candidate_ids), name))
        if cached is None or cached[0] is not candidate_ids:
            ids = torch.as_tensor(candidate_ids, device=self.device, dtype=torch.long)
            cached = (candidate_ids, self.token_embedding(name)[ids])
            self._candidate_rows[(id(candidate_ids), name)] = cached
        return cached[1]

    def encode_tokens(self, ids_per_encoder: Mapping[str, Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context ``[1, n, d]`` and pooled output of plain token ids per encoder (no gradient)."""
        eos = {}
        for name in self.names:
            ids = list(ids_per_encoder[name])
            end = self.configs[name].eos_token_id
            eos[name] = ids.index(end) if end in ids else len(ids) - 1  # ComfyUI's num_tokens - 1
        with torch.inference_mode(False), torch.no_grad():
            return self._forward({name: self._embed(ids_per_encoder[name], name) for name in self.names}, eos)

    def _embed(self, ids: Sequence[int], name: str) -> torch.Tensor:
        return self.token_embedding(name)[torch.tensor(list(ids), device=self.device, dtype=torch.long)]

    def _forward(self, embeds: Mapping[str, torch.Tensor], eos: Mapping[str, int]):
        contexts, pooled = [], None
        for i, name in enumerate(self.names):
            last = i == len(self.names) - 1  # SDXL's pooled is bigG's, the last encoder's
            context, p = clip_text_forward(self.weights[name], self.configs[name], embeds[name][None],
                                           torch.tensor([eos[name]], device=self.device), pooled=last)
            contexts.append(context)
            pooled = p
        return torch.cat(contexts, dim=-1), pooled
