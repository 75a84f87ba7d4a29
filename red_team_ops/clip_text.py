"""A differentiable forward of the CLIP text transformer over given weights.

The text tower of CLIP (Radford et al., *Learning Transferable Visual Models
From Natural Language Supervision*, ICML 2021, arXiv 2103.00020, Sec. 2.4):
token plus position embeddings, a stack of pre-norm transformer layers under a
causal mask, a final layer norm, and the pooled feature read at the end-of-text
token, optionally projected. This reproduces, step for step, the forward of
ComfyUI's ``comfy/clip_model.py`` (``CLIPTextModel_`` and ``CLIPLayer``) and the
output choice of ``comfy/sd1_clip.py``'s ``SDClipModel``, but out of place and
as a plain function of a weight mapping, so that autograd can run through it
(ComfyUI's layers add in place, and its loaded weights are inference tensors).

Prompt-space attacks (UnlearnDiffAtk) feed it token embeddings mixed from
one-hot rows, ``one_hot @ token_embedding.weight``, and differentiate the text
context with respect to those rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F

# ComfyUI's LayerNorm is torch's with its default epsilon (the configs' layer_norm_eps is not read).
LAYER_NORM_EPS = 1e-5

# ComfyUI's ``ACTIVATIONS`` for the names its CLIP configs give as ``hidden_act``.
_ACTIVATIONS = {
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),  # OpenAI CLIP's approximation (SD1.x CLIP-L)
    "gelu": F.gelu,                                         # OpenCLIP ViT-H and bigG (SD2.x, SDXL)
}


@dataclass(frozen=True)
class ClipTextConfig:
    """What the forward needs beyond the weights' shapes, as ComfyUI sets it per text encoder.

    layers: encoder layers (``num_hidden_layers``): 12 for CLIP-L, 24 for
        OpenCLIP ViT-H, 32 for bigG.
    heads: attention heads (``num_attention_heads``).
    activation: the MLP's ``hidden_act``: ``"quick_gelu"`` or ``"gelu"``.
    hidden_layer: which hidden state is the text context. ``None`` is ComfyUI's
        ``layer="last"``: the last layer's output after the final layer norm.
        An index (negative counts from the end, -2 is the penultimate layer,
        ``CLIPSetLastLayer``'s and SD2/SDXL's default) is ComfyUI's
        ``layer="hidden"``: that layer's output.
    hidden_layer_norm: whether the final layer norm is applied to that hidden
        state (``layer_norm_hidden_state``: True for SD1/SD2, False for SDXL).
    eos_token_id: the end-of-text token, where the pooled output is read.
    projected_pooled: whether the pooled output goes through
        ``text_projection`` (ComfyUI's ``return_projected_pooled``: False for
        SD1 checkpoints, True for SD2 and SDXL's bigG).
    """

    layers: int
    heads: int
    activation: Literal["quick_gelu", "gelu"]
    hidden_layer: int | None = None
    hidden_layer_norm: bool = True
    eos_token_id: int = 49407
    projected_pooled: bool = False

    def __post_init__(self):
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(_ACTIVATIONS)}")
        if self.hidden_layer is not None and not -self.layers <= self.hidden_layer < self.layers:
            raise ValueError(f"hidden_layer {self.hidden_layer} is outside the {self.layers} layers")

    @property
    def hidden_index(self) -> int | None:
        """The 0-based layer whose output is the context, or None for the last (normed) output."""
        if self.hidden_layer is None:
            return None
        return self.hidden_layer % self.layers


def _linear(weights: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias"))


def _layer_norm(weights: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weights[name + ".weight"], weights[name + ".bias"], LAYER_NORM_EPS)


def causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """ComfyUI's additive causal mask: ``-finfo.max`` above the diagonal, 0 elsewhere."""
    return torch.full((n, n), -torch.finfo(dtype).max, dtype=dtype, device=device).triu(1)


def _attention(weights: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, heads: int,
               mask: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention as ComfyUI's ``attention_pytorch`` runs it (SDPA, additive mask)."""
    b, n, width = x.shape
    q, k, v = (_linear(weights, f"{name}.{p}_proj", x).view(b, n, heads, width // heads).transpose(1, 2)
               for p in ("q", "k", "v"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return _linear(weights, f"{name}.out_proj", out.transpose(1, 2).reshape(b, n, width))


def _layer(weights: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, config: ClipTextConfig,
           mask: torch.Tensor) -> torch.Tensor:
    """One pre-norm layer, ComfyUI's ``CLIPLayer`` with its ``x += ...`` written out of place."""
    x = x + _attention(weights, f"{name}.self_attn", _layer_norm(weights, f"{name}.layer_norm1", x), config.heads, mask)
    h = _linear(weights, f"{name}.mlp.fc1", _layer_norm(weights, f"{name}.layer_norm2", x))
    return x + _linear(weights, f"{name}.mlp.fc2", _ACTIVATIONS[config.activation](h))


def clip_text_forward(
    weights: Mapping[str, torch.Tensor],
    config: ClipTextConfig,
    token_embeds: torch.Tensor,
    eos_positions: torch.Tensor,
    pooled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text context and pooled output ComfyUI's ``SDClipModel`` returns, differentiably.

    weights: ComfyUI's ``CLIPTextModel`` state dict names
        (``text_model.encoder.layers.0.self_attn.q_proj.weight``,
        ``text_model.embeddings.position_embedding.weight``,
        ``text_model.final_layer_norm.weight``, ``text_projection.weight``),
        float32 tensors that may require grad or not; none is changed.
    token_embeds: ``[B, n, width]`` token embeddings *before* the position
        embeddings (rows of ``token_embedding.weight``, or mixtures of them).
    eos_positions: ``[B]`` index of each sequence's first end-of-text token
        (ComfyUI's ``num_tokens - 1``), where the pooled output is read.
    pooled: False skips the pooled output (and the layers after the context's
        layer), returning None in its place.

    Returns ``(context [B, n, width], pooled [B, width] or None)``: the context is
    the hidden state ``config`` names; pooled is the final layer norm's output at
    the EOS position, through ``text_projection`` when ``config.projected_pooled``.
    """
    n = token_embeds.shape[1]
    position = weights["text_model.embeddings.position_embedding.weight"]
    x = token_embeds + position[:n].to(token_embeds.dtype)
    mask = causal_mask(n, x.dtype, x.device)
    final_norm = "text_model.final_layer_norm"
    target = config.hidden_index
    last = config.layers - 1 if pooled or target is None else target
    context = None
    for i in range(last + 1):
        x = _layer(weights, f"text_model.encoder.layers.{i}", x, config, mask)
        if i == target:
            context = _layer_norm(weights, final_norm, x) if config.hidden_layer_norm else x
    if target is None:
        x = _layer_norm(weights, final_norm, x)
        context = x
    elif pooled:
        x = _layer_norm(weights, final_norm, x)
    if not pooled:
        return context, None
    rows = x[torch.arange(x.shape[0], device=x.device), eos_positions.to(device=x.device, dtype=torch.long)]
    if config.projected_pooled:
        rows = F.linear(rows, weights["text_projection.weight"])
    return context, rows
