"""The UnlearnDiffAtk optimisation loop, as plain torch over two callables.

Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models
Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024
(arXiv 2310.11868), Sec. 4; the authors' code is OPTML-Group/Diffusion-MU-Attack,
``src/attackers/text_grad_.py`` (``TextGrad``, ``STERandSelect``) and
``src/tasks/classifier_.py`` (``get_loss``, ``sampled_t``).

The attack looks for ``k`` discrete tokens that, added to a prompt, make the
*erased* model denoise an image of the erased concept (its latent ``x0``)
well again: it minimises the denoising error of ``x0`` under the erased
model. Each of the ``k`` tokens is relaxed to a probability vector over the
vocabulary; every iteration samples one-hot tokens from it with a
straight-through estimator, takes the denoising loss, an Adam step, and
projects back onto the simplex. The final tokens are the rows' argmax.

The model stays outside: ``encode`` turns ``[k, V]`` one-hot rows (with
gradient) into whatever context ``predict_noise`` reads, and the loop never
looks inside that context.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .simplex import project_to_simplex

# encode(one_hot [k, V] float32, with grad) -> the denoiser's context.
Encode = Callable[[torch.Tensor], Any]
# predict_noise(context, x_t shaped like x0, t: long tensor [1]) -> predicted noise shaped like x0.
PredictNoise = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
# Progress hook: called as (iterations done, iterations); may raise to cancel.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class UnlearnDiffResult:
    """What one UnlearnDiffAtk run found.

    Attributes:
        tokens: ``k`` indices into the candidate vocabulary (argmax of each
            row of ``distribution``, the authors' ``argmax_project``).
        distribution: the final ``[k, V]`` float32 distribution, on x0's device.
        losses: the training loss of every iteration (sampled tokens).
        loss_before: mean denoising error on the fixed evaluation set with
            the caller's ``baseline_context`` (the plain prompt).
        loss_after: the same with the found tokens' context.
        seconds_per_iteration: mean wall time of one iteration (callback excluded).
    """

    tokens: list[int]
    distribution: torch.Tensor
    losses: list[float]
    loss_before: float
    loss_after: float
    seconds_per_iteration: float


class _StraightThroughSample(torch.autograd.Function):
    """The authors' ``STERandSelect``: sample forward, clipped identity backward."""

    @staticmethod
    def forward(ctx: Any, dist: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        picks = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
        return F.one_hot(picks, num_classes=dist.shape[-1]).to(dist.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        # hardtanh clips the gradient to [-1, 1]: at small t the loss is
        # scaled by a_t / (1 - a_t), and Adam then sees bounded steps.
        return F.hardtanh(grad_output), None


def straight_through_sample(dist: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One-hot tokens sampled from ``dist`` with a straight-through gradient.

    Forward: one ``torch.multinomial`` draw per row of ``dist`` (``[k, V]``,
    rows non-negative with positive sums), as float one-hot rows. Backward:
    ``hardtanh(grad_output)`` passed to ``dist`` unchanged otherwise
    (UnlearnDiffAtk's ``STERandSelect``, ``src/attackers/text_grad_.py``).
    """
    if dist.ndim != 2:
        raise ValueError(f"dist must be [k, V], got shape {tuple(dist.shape)}")
    return _StraightThroughSample.apply(dist, generator)


def evaluation_timesteps(n_timesteps: int, n_eval: int) -> list[int]:
    """``n_eval`` timesteps evenly spaced over a schedule of ``n_timesteps``.

    The authors' ``sampled_t`` (``src/tasks/classifier_.py``): start at
    ``T // n // 2`` and step ``T // n``.
    """
    if not 1 <= n_eval <= n_timesteps:
        raise ValueError(f"n_eval must be between 1 and the schedule's {n_timesteps} timesteps, got {n_eval}")
    step = n_timesteps // n_eval
    return list(range(step // 2, n_timesteps, step))[:n_eval]


def _noisy(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (DDPM forward process, as ``get_loss``)."""
    return (alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise).to(x0.dtype)


def _denoising_error(predict_noise: PredictNoise, context: Any, x0: torch.Tensor, noise: torch.Tensor,
                     alphas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true noise at ``t`` (``get_loss``, criterion MSELoss)."""
    prediction = predict_noise(context, _noisy(x0, noise, alphas[t].reshape(1, 1, 1, 1)), t)
    if prediction.shape != x0.shape:
        raise ValueError(f"predict_noise returned shape {tuple(prediction.shape)}, expected {tuple(x0.shape)}")
    return F.mse_loss(prediction.float(), noise.float())


def _check_arguments(x0: torch.Tensor, alphas_cumprod: torch.Tensor, vocab_size: int, k: int, iterations: int,
                     timesteps_per_iteration: int, lr: float, weight_decay: float) -> None:
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    if k < 1:
        raise ValueError(f"k (tokens to find) must be at least 1, got {k}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if timesteps_per_iteration < 1:
        raise ValueError(f"timesteps_per_iteration must be at least 1, got {timesteps_per_iteration}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be zero or positive, got {weight_decay}")
    if x0.ndim != 4:
        raise ValueError(f"x0 must be a latent [1, C, H, W], got shape {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 must be finite")
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D schedule, got shape {tuple(alphas_cumprod.shape)}")
    if not (torch.isfinite(alphas_cumprod).all() and (alphas_cumprod > 0).all() and (alphas_cumprod <= 1).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")


def unlearndiff_attack(
    encode: Encode,
    predict_noise: PredictNoise,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    vocab_size: int,
    baseline_context: Any,
    *,
    k: int = 5,
    iterations: int = 40,
    timesteps_per_iteration: int = 1,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    seed: int = 0,
    n_eval: int = 8,
    callback: StepCallback | None = None,
) -> UnlearnDiffResult:
    """Find ``k`` tokens that make the erased model denoise ``x0`` again (UnlearnDiffAtk).

    Zhang et al., ECCV 2024, Sec. 4; faithful to ``TextGrad.run`` in
    OPTML-Group/Diffusion-MU-Attack: uniform initial distribution projected
    onto the simplex (``init_adv``), straight-through multinomial samples
    (``STERandSelect``), MSE between predicted and true noise (``get_loss``),
    ``Adam(lr, weight_decay)`` and a simplex projection after every step,
    argmax tokens at the end (``argmax_project``). One difference: the
    authors walk their 50 ``sampled_t`` in order, ``iterations`` steps each;
    here each iteration draws its timesteps uniformly from the schedule.

    Args:
        encode: ``[k, V]`` float32 one-hot rows (carrying gradient) -> the
            context ``predict_noise`` takes (e.g. the prompt's text-encoder
            output with the ``k`` token rows inserted).
        predict_noise: ``(context, x_t, t)`` -> predicted noise shaped like
            ``x0``; ``t`` is a long tensor ``[1]`` on x0's device. The erased
            model, with its weights frozen.
        x0: the target image's latent ``[1, C, H, W]``, finite.
        alphas_cumprod: the model's ``[T]`` cumulative alphas, in ``(0, 1]``.
        vocab_size: ``V``, the number of candidate tokens.
        baseline_context: the plain prompt's context, for ``loss_before``.
        k: tokens to find (the authors' default 5).
        iterations: optimisation steps.
        timesteps_per_iteration: timesteps averaged in each step's loss.
        lr, weight_decay: Adam's (the authors' 0.01 and 0.1).
        seed: seeds every random draw (evaluation noise, samples,
            timesteps, noise), so a seed reproduces the run.
        n_eval: timesteps of the fixed evaluation set (``evaluation_timesteps``).
        callback: called as ``(done, iterations)`` after every iteration; an
            exception it raises stops the attack and propagates.

    Returns:
        An ``UnlearnDiffResult``.
    """
    _check_arguments(x0, alphas_cumprod, vocab_size, k, iterations, timesteps_per_iteration, lr, weight_decay)
    device = x0.device
    n_timesteps = alphas_cumprod.shape[0]
    eval_t = evaluation_timesteps(n_timesteps, n_eval)
    alphas = alphas_cumprod.to(device=device, dtype=torch.float32)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    # Drawn first, once: before and after are measured on the same noises.
    eval_noises = [torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype) for _ in eval_t]

    def evaluate(context: Any) -> float:
        with torch.no_grad():
            errors = [_denoising_error(predict_noise, context, x0, noise, alphas,
                                       torch.tensor([t], device=device, dtype=torch.long))
                      for t, noise in zip(eval_t, eval_noises)]
            return torch.stack(errors).mean().item()

    loss_before = evaluate(baseline_context)

    dist = project_to_simplex(torch.full((k, vocab_size), 1.0 / vocab_size, device=device, dtype=torch.float32))
    dist.requires_grad_(True)
    # Adam's weight_decay is an L2 term added to the gradient, as in the authors' code.
    optimizer = torch.optim.Adam([dist], lr=lr, weight_decay=weight_decay)

    losses: list[float] = []
    seconds = 0.0
    for done in range(1, iterations + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        context = encode(straight_through_sample(dist, generator))
        total = torch.zeros((), device=device)
        for _ in range(timesteps_per_iteration):
            t = torch.randint(n_timesteps, (1,), generator=generator, device=device)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            total = total + _denoising_error(predict_noise, context, x0, noise, alphas, t)
        loss = total / timesteps_per_iteration
        # autograd.grad, as the authors do: gradients reach only the
        # distribution, never the caller's model parameters.
        dist.grad = torch.autograd.grad(loss, [dist])[0]
        optimizer.step()
        with torch.no_grad():
            dist.copy_(project_to_simplex(dist))
        losses.append(loss.item())  # .item() waits for the device, so the time is the step's own
        seconds += time.perf_counter() - started
        if callback is not None:
            callback(done, iterations)

    final = dist.detach().clone()
    tokens = final.argmax(dim=-1)
    with torch.no_grad():
        found_context = encode(F.one_hot(tokens, num_classes=vocab_size).to(torch.float32))
    loss_after = evaluate(found_context)
    return UnlearnDiffResult(
        tokens=[int(i) for i in tokens.tolist()],
        distribution=final,
        losses=losses,
        loss_before=loss_before,
        loss_after=loss_after,
        seconds_per_iteration=seconds / iterations,
    )
