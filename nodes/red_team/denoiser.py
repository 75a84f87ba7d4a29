"""A ComfyUI MODEL's denoiser as a function autograd can pass through.

The weights CheckpointLoaderSimple loads are inference tensors, which
autograd may not save for backward, and ComfyUI writes patches into the
shared weights only while a model is loaded for sampling. So the attack runs
the model's own ``apply_model`` with its parameters swapped (for the call
only, ``torch.func.functional_call``) for one copy of the *effective*
weights: the stored weights with every patch of the ModelPatcher applied
(the erasure, LoRAs), read as ComfyUI's merging nodes read them
(``get_key_patches``) and cast to the dtype the model runs in. Nothing of
the MODEL is changed; the copy is freed with this object.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_sampling

from ..model_weights import DIFFUSION_PREFIX, patched_weight


def check_latent(model, samples: torch.Tensor) -> None:
    """Refuse a LATENT that ``model`` (a ComfyUI MODEL) cannot denoise, saying why."""
    channels = model.model.latent_format.latent_channels
    if samples.ndim != 4:
        raise ValueError(f"the target LATENT has shape {tuple(samples.shape)}; expected [batch, {channels}, "
                         "height/8, width/8] from a KSampler or VAE Encode")
    if samples.shape[0] != 1:
        raise ValueError(f"the target LATENT holds {samples.shape[0]} images: the attack targets one; pick it "
                         "with Latent From Batch (length 1)")
    if samples.shape[1] != channels:
        raise ValueError(f"the target LATENT has {samples.shape[1]} channels but this model's latents have "
                         f"{channels}: make the target with this model's family (sample it with the original "
                         "model, or VAE Encode with its VAE)")
    if min(samples.shape[2:]) < 8:
        raise ValueError(f"the target LATENT is {samples.shape[3] * 8}x{samples.shape[2] * 8} pixels; the "
                         "UNet needs at least 64x64")
    if not torch.isfinite(samples).all():
        raise ValueError("the target LATENT has NaN or infinite values")


class _ApplyModel(torch.nn.Module):
    """``BaseModel.apply_model`` as a module call, so ``functional_call`` can
    swap the parameters of the BaseModel under it."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x, sigma, context, y=None):
        extra = {} if y is None else {"y": y}
        return self.base.apply_model(x, sigma, c_crossattn=context, **extra)


class DifferentiableDenoiser:
    """``predict_noise(context, x_t, t)`` of a ComfyUI MODEL, differentiable in the context.

    ``x_t`` is the DDPM-noised latent ``sqrt(a_t) x0 + sqrt(1 - a_t) eps``
    (the UnlearnDiffAtk loss's convention) in the model's latent space, ``t``
    an integer timestep; the result is the noise the model predicts, whatever
    its parametrisation (epsilon or v: ComfyUI's ``calculate_denoised``
    converts). ``context`` is ``(rows [1, n, d], pooled or None)``; the pooled
    output reaches SDXL's UNet through its ``encode_adm``, as a KSampler
    passes CLIPTextEncode's conditioning.
    """

    def __init__(self, model):
        base = model.model
        sampling = base.model_sampling
        if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
            raise ValueError(f"this MODEL samples with {type(sampling).__name__}; the attack needs a discrete "
                             "1000-step schedule (SD1.x, SD2.x, SDXL)")
        self.base = base
        self.device = comfy.model_management.get_torch_device()
        sigmas = sampling.sigmas.detach().to(device=self.device, dtype=torch.float64)
        # sigma = sqrt((1 - a) / a), ComfyUI's ModelSamplingDiscrete
        self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).float()
        self._sigmas = sigmas.float()
        self.uses_pooled = getattr(base, "adm_channels", 0) > 0
        self._module = _ApplyModel(base)
        self.params = self._effective_weights(model)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in self.params.values())

    def _effective_weights(self, model) -> dict[str, torch.Tensor]:
        """One non-inference copy of every denoiser weight with the MODEL's patches applied."""
        run_dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        params = {}
        with torch.inference_mode(False), torch.no_grad():
            for key, entries in model.get_key_patches(DIFFUSION_PREFIX).items():
                (stored, convert), *patches = entries
                stored = stored.detach()
                dtype = stored.dtype if stored.is_floating_point() else None
                if patches:
                    weight = patched_weight(key, entries, self.device)
                else:
                    weight = convert(stored.to(device=self.device, copy=True), inplace=True)
                if dtype is not None and dtype != weight.dtype:
                    # a manual-cast model stores e.g. fp8 and runs in bf16: keep the run dtype
                    weight = weight.to(run_dtype if dtype.itemsize < 2 else dtype)
                params[f"base.{key}"] = weight.clone() if weight.is_inference() else weight
        return params

    def target(self, samples: torch.Tensor) -> torch.Tensor:
        """The LATENT's samples in the space the model denoises (``process_latent_in``); see ``check_latent``."""
        with torch.inference_mode(False):
            return self.base.process_latent_in(samples.to(self.device, torch.float32).clone())

    def predict_noise(self, context, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows, pooled = context
        sigma = self._sigmas[t.to(self._sigmas.device).long()].to(x_t.device)
        scale = (1.0 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        x = x_t * scale  # ComfyUI's noisy latent is x0 + sigma eps; apply_model divides it back
        y = None
        if self.uses_pooled:
            if pooled is None:
                raise ValueError("this model reads the text encoder's pooled output, and the CLIP gave none")
            y = self.base.encode_adm(pooled_output=pooled)
        denoised = torch.func.functional_call(self._module, self.params, (x, sigma, rows, y), strict=False)
        return (x - denoised) / sigma.view(-1, 1, 1, 1)
