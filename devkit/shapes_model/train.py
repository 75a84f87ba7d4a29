"""Train the shapes demo model: its TAESD-shaped VAE, then its UNet.

One command, seeded, fixed iteration counts (never time limits, so a rerun
gives the same weights on the same machine):

    .venv/bin/python -m devkit.shapes_model.train [--out DIR]

writes ``DIR/shapes_vae_fp16.safetensors`` and ``DIR/shapes_unet_fp16.safetensors``
(default: the shipped ``demo_model/``; refuses to overwrite without
``--overwrite``) and ``DIR/training_log.json``. About 40 minutes on a 2-core
CPU. ``devkit.shapes_model.assemble`` turns them into an SD1.5 checkpoint.

The recipe (see the package docs): the frozen CLIP-L of ``frozen_clip``
encodes the 9 captions and "" once, through ComfyUI's own CLIPTextEncode;
the VAE (ComfyUI's TAESD classes) learns to reconstruct the synthetic images
with extra weight on the shape's pixels; its scale/shift are set so that
ComfyUI's VAEEncode output times SD1.5's 0.18215 has zero mean and unit
variance, and the UNet (ComfyUI's UNetModel, slimmest SD15 shape) learns
epsilon prediction on exactly those latents, SD1.5's scaled-linear schedule,
10% empty captions, AdamW, EMA. bf16 autocast: several times faster here.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from devkit import checkpoint_builder, host, paths
from devkit.shapes_model import data, frozen_clip

WEIGHTS_DIR = paths.REPO_ROOT / "demo_model"
VAE_FILE = "shapes_vae_fp16.safetensors"
UNET_FILE = "shapes_unet_fp16.safetensors"
LOG_FILE = "training_log.json"

SEED = 1234
THREADS = 2
SD15_LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor

VAE_STEPS = 800
VAE_BATCH = 32
VAE_LR = 1e-3
SHAPE_PIXEL_WEIGHT = 8.0  # without it the colours wash out

LATENT_POOL = 16384  # images encoded once; the UNet's training set
UNET_STEPS = 1800
UNET_BATCH = 48
UNET_LR = 5e-4
WARMUP_STEPS = 50
EMPTY_CAPTION_RATE = 0.1
# Tried, not shipped (README, the demo model's experiments); the defaults give the shipped model.
PARTIAL_CAPTION_RATE = 0.0  # half of it "a {shape}", half "a {colour} shape"
CLIP_TOKEN_SCALE = 1.0  # frozen_clip's token-embedding scale
EMA_MAX_DECAY = 0.999


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _reinit(module: torch.nn.Module) -> None:
    """ComfyUI's layers skip weight init (they expect a checkpoint): apply torch's defaults."""
    bases = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    for layer in module.modules():
        for base in bases:
            if isinstance(layer, base):
                base.reset_parameters(layer)
                break


def caption_contexts() -> dict[str, torch.Tensor]:
    """ComfyUI's CLIPTextEncode output [77, 768] for each caption and for "", with the frozen CLIP."""
    host.prepare_comfy_imports()
    import comfy.sd
    import nodes

    state_dict = checkpoint_builder.build_state_dict(frozen_clip.VARIANT, seed=0)
    state_dict.update(frozen_clip.checked_clip_state_dict(CLIP_TOKEN_SCALE))
    _, clip, _, _ = comfy.sd.load_state_dict_guess_config(state_dict, output_vae=False)
    encoder = nodes.CLIPTextEncode()
    with torch.inference_mode():
        return {text: encoder.encode(clip, text)[0][0][0][0].float().clone()
                for text in (*data.TRAINING_CAPTIONS, "")}


def new_vae() -> torch.nn.Module:
    host.prepare_comfy_imports()
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _reinit(vae)
    return vae


def new_unet() -> torch.nn.Module:
    host.prepare_comfy_imports()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**checkpoint_builder.unet_kwargs(frozen_clip.VARIANT), device="cpu",
                     operations=comfy.ops.disable_weight_init)
    _reinit(unet)
    # As in the original LDM code: every residual branch's last layer and the
    # output layer start at zero, so the untrained UNet is the identity path.
    for name, layer in unet.named_modules():
        if name == "out.2" or name.endswith(("out_layers.3", "proj_out")):
            for tensor in layer.parameters():
                torch.nn.init.zeros_(tensor)
    return unet


def train_vae(steps: int, generator: torch.Generator, log: list) -> torch.nn.Module:
    vae = new_vae()
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=VAE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    started = time.perf_counter()
    for step in range(steps):
        images, _, masks = data.sample_batch(VAE_BATCH, generator)
        x = images.permute(0, 3, 1, 2)
        weight = (1 + SHAPE_PIXEL_WEIGHT * masks)[:, None]
        with _autocast():
            decoded = vae.taesd_decoder(vae.taesd_encoder(x))
        error = decoded.float() - x
        loss = (weight * error.abs()).mean() + (weight * error.square()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"stage": "vae", "step": step, "loss": loss.item(), "seconds": time.perf_counter() - started})
            print(f"[vae] step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", flush=True)
    return vae.eval()


@torch.no_grad()
def encode_pool(vae: torch.nn.Module, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw encoder outputs [n, 4, 8, 8] of ``n`` fresh images and their caption indices."""
    latents, labels = [], []
    for start in range(0, n, 256):
        images, batch_labels, _ = data.sample_batch(min(256, n - start), generator)
        with _autocast():
            latents.append(vae.taesd_encoder(images.permute(0, 3, 1, 2)).float())
        labels.append(batch_labels)
    return torch.cat(latents), torch.cat(labels)


def set_latent_scale(vae: torch.nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """Set vae_scale/vae_shift so that ComfyUI's latents (VAEEncode times 0.18215)
    are standardised; return the pool as the UNet will see them."""
    mean, std = raw.mean().item(), raw.std().item()
    scale = SD15_LATENT_SCALE * std  # VAEEncode = raw / scale + shift
    with torch.no_grad():
        vae.vae_scale.fill_(scale)
        vae.vae_shift.fill_(-mean / scale)
    return (raw / scale + vae.vae_shift.item()) * SD15_LATENT_SCALE


def alphas_cumprod() -> torch.Tensor:
    """SD1.5's scaled-linear schedule, as ComfyUI's ModelSamplingDiscrete computes it."""
    host.prepare_comfy_imports()
    from comfy.ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    return torch.cumprod(1.0 - betas, dim=0).float()


def train_unet(latents: torch.Tensor, labels: torch.Tensor, contexts: dict[str, torch.Tensor], steps: int,
               generator: torch.Generator, log: list) -> torch.nn.Module:
    unet = new_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    caption_context = torch.stack([contexts[c] for c in data.TRAINING_CAPTIONS])
    empty_context = contexts[""]
    schedule_ab = alphas_cumprod()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.01)
    lr_at = lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    started = time.perf_counter()
    order = torch.randperm(len(latents), generator=generator)
    cursor = 0
    for step in range(steps):
        if cursor + UNET_BATCH > len(order):
            order, cursor = torch.randperm(len(latents), generator=generator), 0
        index = order[cursor:cursor + UNET_BATCH]
        cursor += UNET_BATCH
        x0 = latents[index]
        caption_index = labels[index]
        if PARTIAL_CAPTION_RATE > 0:  # drawn only then, so that rate 0 replays the shipped model's random stream
            partial = torch.rand(len(index), generator=generator)
            forms = torch.where(partial >= PARTIAL_CAPTION_RATE, 0, torch.where(partial < PARTIAL_CAPTION_RATE / 2, 1, 2))
            caption_index = data.training_caption_index(caption_index, forms)
        context = caption_context[caption_index].clone()
        drop = torch.rand(len(index), generator=generator) < EMPTY_CAPTION_RATE
        context[drop] = empty_context
        t = torch.randint(0, 1000, (len(index),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        ab = schedule_ab[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with _autocast():
            predicted = unet(noisy, timesteps=t.float(), context=context)
        loss = (predicted.float() - noise).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(EMA_MAX_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(current, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            log.append({"stage": "unet", "step": step, "loss": loss.item(), "seconds": time.perf_counter() - started})
            print(f"[unet] step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", flush=True)
    return ema


def _save(state_dict: dict[str, torch.Tensor], target: Path, metadata: dict, overwrite: bool) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp, metadata={"rece.shapes_model": json.dumps(metadata, sort_keys=True)})
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def settings() -> dict:
    return {"seed": SEED, "threads": THREADS, "vae_steps": VAE_STEPS, "vae_batch": VAE_BATCH, "vae_lr": VAE_LR,
            "shape_pixel_weight": SHAPE_PIXEL_WEIGHT, "latent_pool": LATENT_POOL, "unet_steps": UNET_STEPS,
            "unet_batch": UNET_BATCH, "unet_lr": UNET_LR, "warmup_steps": WARMUP_STEPS,
            "empty_caption_rate": EMPTY_CAPTION_RATE, "partial_caption_rate": PARTIAL_CAPTION_RATE,
            "ema_max_decay": EMA_MAX_DECAY,
            "clip_seed": frozen_clip.CLIP_SEED, "clip_token_scale": CLIP_TOKEN_SCALE,
            "clip_sha256": frozen_clip.CLIP_SHA256_BY_TOKEN_SCALE[CLIP_TOKEN_SCALE]}


def main(argv: list[str] | None = None) -> int:
    global VAE_STEPS, UNET_STEPS, LATENT_POOL, PARTIAL_CAPTION_RATE, CLIP_TOKEN_SCALE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the weights (default: demo_model/)")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already there")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--latent-pool", type=int, default=LATENT_POOL, help=argparse.SUPPRESS)
    parser.add_argument("--partial-caption-rate", type=float, default=PARTIAL_CAPTION_RATE, help=argparse.SUPPRESS)
    parser.add_argument("--clip-token-scale", type=float, default=CLIP_TOKEN_SCALE,
                        choices=sorted(frozen_clip.CLIP_SHA256_BY_TOKEN_SCALE), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    VAE_STEPS, UNET_STEPS, LATENT_POOL = args.vae_steps, args.unet_steps, args.latent_pool
    PARTIAL_CAPTION_RATE, CLIP_TOKEN_SCALE = args.partial_caption_rate, args.clip_token_scale
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [args.out / VAE_FILE, args.out / UNET_FILE]
    if not args.overwrite and any(t.exists() for t in targets):
        print(f"error: weights already in {args.out} (pass --overwrite to replace them)", file=sys.stderr)
        return 1
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)  # torch's default layer init draws from the global generator
    generator = torch.Generator().manual_seed(SEED)
    log: list = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    contexts = caption_contexts()
    spread = torch.stack([contexts[c] for c in data.CAPTIONS])
    relative = ((spread - spread.mean(0)).norm() / spread.norm()).item()
    print(f"[text] captions encoded; contexts differ by {relative:.1%} of their norm", flush=True)
    timings["text"] = time.perf_counter() - started

    mark = time.perf_counter()
    vae = train_vae(VAE_STEPS, generator, log)
    timings["vae"] = time.perf_counter() - mark
    mark = time.perf_counter()
    raw, labels = encode_pool(vae, LATENT_POOL, generator)
    latents = set_latent_scale(vae, raw)
    timings["latents"] = time.perf_counter() - mark
    print(f"[latents] {len(latents)} encoded in {timings['latents']:.0f} s; vae_scale {vae.vae_scale.item():.4f} "
          f"vae_shift {vae.vae_shift.item():.4f}", flush=True)
    mark = time.perf_counter()
    unet = train_unet(latents, labels, contexts, UNET_STEPS, generator, log)
    timings["unet"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    meta = {"settings": settings(), "seconds": {k: round(v, 1) for k, v in timings.items()}}
    _save({checkpoint_builder.VAE_PREFIX + k: v for k, v in vae.state_dict().items()}, targets[0], meta, args.overwrite)
    _save({checkpoint_builder.UNET_PREFIX + k: v for k, v in unet.state_dict().items()}, targets[1], meta, args.overwrite)
    (args.out / LOG_FILE).write_text(json.dumps({**meta, "context_spread": relative, "log": log}, indent=1) + "\n")
    print(f"[done] {timings['total'] / 60:.1f} min; wrote {targets[0]} and {targets[1]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
