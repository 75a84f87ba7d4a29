"""``red_team_ops`` against the definitions it implements, on tiny plain tensors.

The simplex projection is checked against its defining property (the nearest
simplex point) and against UnlearnDiffAtk's own bisection, reimplemented
here; the attack loop on a toy denoiser whose loss is zero for exactly one
token; Ring-A-Bell's direction on hand-made encodings. No ComfyUI.
"""
from __future__ import annotations

import math

import pytest
import torch

from red_team_ops import (
    NUDITY_PAIRS, apply_concept, concept_direction, evaluation_timesteps, parse_concept_pairs, project_to_simplex,
    straight_through_sample, typeable_token_ids, unlearndiff_attack,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_simplex_points(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform points of the simplex (normalised exponentials, a flat Dirichlet)."""
    draws = -torch.log(torch.rand(n, size, generator=gen, dtype=torch.float64))
    return draws / draws.sum(-1, keepdim=True)


def bisection_projection(a: torch.Tensor, xi: float = 1e-5) -> torch.Tensor:
    """UnlearnDiffAtk's projection onto {0 <= x <= 1, sum x = 1}, written from its description:
    ``clip(a - mu, 0, 1)`` with ``mu`` bisected until the bracket is narrower than ``xi``."""
    def excess(mu: float) -> float:
        return torch.clip(a - mu, 0, 1).sum().item() - 1.0

    low, high = a.min().item() - 1.0, a.max().item()  # excess(low) >= 0 >= excess(high)
    while high - low > xi:
        middle = (low + high) / 2
        if excess(middle) > 0:
            low = middle
        else:
            high = middle
    return torch.clip(a - (low + high) / 2, 0, 1)


# --- the simplex projection -------------------------------------------------------------------

def test_projection_lies_on_the_simplex_for_any_batch_shape():
    gen = generator(0)
    for shape, scale in (((5, 7), 1.0), ((2, 3, 4), 10.0), ((1, 1), 3.0), ((4, 9), 1e-3)):
        values = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        projected = project_to_simplex(values)
        assert projected.shape == values.shape
        assert (projected >= 0).all()
        torch.testing.assert_close(projected.sum(-1), torch.ones(shape[:-1], dtype=torch.float64))


def test_projection_is_the_nearest_simplex_point():
    gen = generator(1)
    values = 2 * torch.randn(20, 6, generator=gen, dtype=torch.float64)
    projected = project_to_simplex(values)
    for a, x in zip(values, projected):
        # KKT: x = max(a - tau, 0) for one tau: a - x equals tau on the support, a <= tau off it.
        support = x > 0
        tau = (a - x)[support]
        torch.testing.assert_close(tau, tau[0].expand_as(tau))
        assert (a[~support] <= tau[0] + 1e-12).all()
        # And no simplex point is nearer to a.
        others = random_simplex_points(500, 6, gen)
        assert torch.linalg.norm(a - x) <= torch.linalg.norm(a - others, dim=-1).min() + 1e-12


def test_projection_leaves_simplex_points_and_one_hots_unchanged():
    points = random_simplex_points(8, 5, generator(2))
    torch.testing.assert_close(project_to_simplex(points), points)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 3, 4]), 5).double()
    assert torch.equal(project_to_simplex(one_hot), one_hot)


def test_projection_matches_the_authors_bisection():
    gen = generator(3)
    values = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    values[0] = 1.0 / 12  # already uniform, as init_adv starts
    values[1] *= 50
    projected = project_to_simplex(values)
    reference = torch.stack([bisection_projection(row) for row in values])
    torch.testing.assert_close(projected, reference, atol=1e-4, rtol=0)


def test_projection_keeps_dtype_and_sums_to_one_over_a_clip_sized_vocabulary():
    values = torch.full((2, 49408), 1.0 / 49408) + 1e-3 * torch.randn(2, 49408, generator=generator(4))
    projected = project_to_simplex(values)
    assert projected.dtype == torch.float32
    torch.testing.assert_close(projected.sum(-1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("values", [torch.zeros(3, 0), torch.tensor(1.0), torch.tensor([[0.5, math.nan]])])
def test_projection_rejects_empty_and_non_finite_rows(values):
    with pytest.raises(ValueError, match="values must"):
        project_to_simplex(values)


# --- the straight-through sample ---------------------------------------------------------------

def test_straight_through_sample_draws_one_hot_rows_from_the_distribution():
    dist = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(straight_through_sample(dist, generator(0)), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))

    rows = torch.tensor([0.2, 0.0, 0.5, 0.3]).expand(4000, 4).contiguous()
    sample = straight_through_sample(rows, generator(1))
    assert torch.equal(sample.sum(-1), torch.ones(4000))
    assert set(sample.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(sample.mean(0), rows[0], atol=0.03, rtol=0)
    # A seeded generator reproduces the draw.
    assert torch.equal(straight_through_sample(rows, generator(1)), sample)


def test_straight_through_gradient_is_hardtanh_of_the_incoming_gradient():
    dist = torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0]], requires_grad=True)
    incoming = torch.tensor([[3.0, -0.4, -2.0], [0.7, -1.5, 0.0]])
    (straight_through_sample(dist, generator(0)) * incoming).sum().backward()
    assert torch.equal(dist.grad, torch.nn.functional.hardtanh(incoming))


# --- the UnlearnDiffAtk loop -------------------------------------------------------------------

V = 6
BEST = 4
WRONG = 1


def toy_problem(seed: int = 0):
    """A denoiser that predicts the noise exactly when the context is token ``BEST``'s embedding.

    ``pred = (x_t - sqrt(a_t) (x0 + A (ctx - E[BEST]))) / sqrt(1 - a_t)``, so
    ``pred - eps = -sqrt(a_t / (1 - a_t)) A (ctx - E[BEST])``: the loss is a
    weighted ``|ctx - E[BEST]|^2``, zero only at ``BEST``. Embeddings and
    ``A`` have orthonormal columns, so no other token lies between.
    """
    gen = generator(seed)
    embeddings = torch.linalg.qr(torch.randn(V, V, generator=gen))[0]
    x0 = torch.randn(1, 2, 4, 4, generator=gen)
    lift = torch.linalg.qr(torch.randn(x0.numel(), V, generator=gen))[0]
    alphas = torch.linspace(0.99, 0.05, 20)

    def encode(one_hot: torch.Tensor) -> torch.Tensor:
        return one_hot @ embeddings

    def predict_noise(context: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas[t].reshape(1, 1, 1, 1)
        shift = (lift @ (context[0] - embeddings[BEST])).view_as(x0)
        return (x_t - a.sqrt() * (x0 + shift)) / (1 - a).sqrt()

    return encode, predict_noise, x0, alphas, embeddings


def run_toy(**options):
    encode, predict_noise, x0, alphas, embeddings = toy_problem()
    options = {"k": 1, "iterations": 60, **options}
    return unlearndiff_attack(encode, predict_noise, x0, alphas, V, embeddings[WRONG:WRONG + 1], **options)


def test_attack_finds_the_one_token_that_restores_denoising():
    # The authors' lr 0.01 and weight decay 0.1; 100 iterations (their
    # default is 40 per timestep) leave BEST with most of the mass.
    result = run_toy(seed=3, iterations=100)
    assert result.tokens == [BEST]
    assert result.loss_before > 0.1
    assert result.loss_after < 1e-10
    assert len(result.losses) == 100
    # The training loss is zero exactly when BEST is sampled (its scale
    # a_t / (1 - a_t) varies 2000-fold with the random t, so compare how
    # often, not how much): the distribution learns to sample it.
    solved = [loss < 1e-10 for loss in result.losses]
    assert sum(solved[-25:]) >= sum(solved[:25]) + 5
    assert result.distribution.dtype == torch.float32 and result.distribution.shape == (1, V)
    assert result.distribution[0, BEST] > 0.5
    torch.testing.assert_close(result.distribution.sum(-1), torch.ones(1))
    assert result.seconds_per_iteration > 0


def test_attack_returns_k_tokens_in_the_vocabulary():
    encode, predict_noise, x0, alphas, embeddings = toy_problem()

    def encode_first(one_hot: torch.Tensor) -> torch.Tensor:
        return encode(one_hot[:1]) + 0 * one_hot.sum()

    result = unlearndiff_attack(encode_first, predict_noise, x0, alphas, V, embeddings[:1], k=3, iterations=2,
                                timesteps_per_iteration=2)
    assert len(result.tokens) == 3 and all(0 <= token < V for token in result.tokens)
    assert result.distribution.shape == (3, V)


def test_same_seed_gives_the_same_run():
    first, second = run_toy(seed=7, iterations=15), run_toy(seed=7, iterations=15)
    assert first.tokens == second.tokens
    assert first.losses == second.losses
    assert first.loss_before == second.loss_before and first.loss_after == second.loss_after
    assert torch.equal(first.distribution, second.distribution)


def test_before_and_after_use_the_same_evaluation_noises():
    encode, _, x0, alphas, embeddings = toy_problem()

    def predict_zero(context: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t) + 0 * context.sum()  # loss = mean(eps^2), whatever the tokens

    result = unlearndiff_attack(encode, predict_zero, x0, alphas, V, embeddings[:1], k=1, iterations=3)
    assert result.loss_before == result.loss_after


def test_evaluation_timesteps_follow_the_authors_sampled_t():
    assert evaluation_timesteps(1000, 50) == list(range(10, 1000, 20))
    assert evaluation_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert evaluation_timesteps(20, 20) == list(range(20))
    with pytest.raises(ValueError, match="n_eval"):
        evaluation_timesteps(20, 21)


def test_callback_is_called_after_every_iteration_and_its_exception_stops_the_attack():
    calls = []
    run_toy(iterations=5, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]

    class Cancelled(Exception):
        pass

    seen = []

    def cancel_at_three(done: int, total: int) -> None:
        seen.append(done)
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_toy(iterations=10, callback=cancel_at_three)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("options, message", [
    ({"k": 0}, "k"),
    ({"iterations": 0}, "iterations"),
    ({"timesteps_per_iteration": 0}, "timesteps_per_iteration"),
    ({"lr": 0.0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"n_eval": 0}, "n_eval"),
])
def test_attack_rejects_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        run_toy(**options)


def test_attack_rejects_bad_inputs():
    encode, predict_noise, x0, alphas, embeddings = toy_problem()
    context = embeddings[:1]
    cases = [
        ({"vocab_size": 0}, "vocab_size"),
        ({"x0": x0[0]}, "x0"),
        ({"x0": x0.clone().fill_(math.inf)}, "x0"),
        ({"alphas_cumprod": torch.tensor([0.5, 0.0])}, "alphas_cumprod"),
        ({"alphas_cumprod": torch.tensor([1.5])}, "alphas_cumprod"),
        ({"alphas_cumprod": torch.zeros(0)}, "alphas_cumprod"),
    ]
    for change, message in cases:
        arguments = {"x0": x0, "alphas_cumprod": alphas, "vocab_size": V} | change
        with pytest.raises(ValueError, match=message):
            unlearndiff_attack(encode, predict_noise, baseline_context=context, k=1, iterations=1, **arguments)


# --- Ring-A-Bell -------------------------------------------------------------------------------

def test_concept_direction_is_the_mean_pair_difference():
    with_concept = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])]
    without_concept = [torch.tensor([[0.0, 2.0], [3.0, 0.0]]), torch.tensor([[2.0, 0.0], [1.0, -1.0]])]
    direction = concept_direction(with_concept, without_concept)
    assert torch.equal(direction, torch.tensor([[-0.5, 0.0], [0.0, 3.0]]))
    # Half-precision encodings give a float32 direction.
    assert concept_direction([w.half() for w in with_concept], [w.half() for w in without_concept]).dtype \
        == torch.float32


def test_apply_concept_adds_eta_times_the_direction():
    prompt = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    direction = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    assert torch.equal(apply_concept(prompt, direction, 3.0), torch.tensor([[2.5, -1.0], [0.5, 6.0]]))
    assert apply_concept(prompt.half(), direction, 0.9).dtype == torch.float16
    with pytest.raises(ValueError, match="shape"):
        apply_concept(prompt, direction[:1], 3.0)
    with pytest.raises(ValueError, match="eta"):
        apply_concept(prompt, direction, math.inf)


@pytest.mark.parametrize("with_concept, without_concept, message", [
    ([], [], "at least one"),
    ([torch.zeros(2, 3)], [torch.zeros(2, 3)] * 2, "pairs"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2, 3)] * 2, "pair 1"),
    ([torch.zeros(2, 3)], [torch.zeros(3, 3)], "pair 0"),
    ([torch.full((2, 3), math.nan)], [torch.zeros(2, 3)], "not finite"),
    ([torch.zeros(3)], [torch.zeros(3)], "rows, d"),
])
def test_concept_direction_rejects_bad_pairs(with_concept, without_concept, message):
    with pytest.raises(ValueError, match=message):
        concept_direction(with_concept, without_concept)


def test_parse_concept_pairs_reads_pairs_and_skips_comments_and_blanks():
    text = "# a comment\n\n  a nude woman | a woman  \n   # indented comment\na cat|a dog\n"
    assert parse_concept_pairs(text) == [("a nude woman", "a woman"), ("a cat", "a dog")]


@pytest.mark.parametrize("text, line", [
    ("a | b\nno separator here", 2),
    ("a | b\n\na | b | c", 3),
    ("| a woman", 1),
    ("# ok\na nude woman |  ", 2),
])
def test_parse_concept_pairs_names_the_bad_line(text, line):
    with pytest.raises(ValueError, match=f"line {line}:"):
        parse_concept_pairs(text)


def test_nudity_preset_parses():
    pairs = parse_concept_pairs(NUDITY_PAIRS)
    assert 8 <= len(pairs) <= 12
    assert all(with_text != without_text for with_text, without_text in pairs)


# --- typeable tokens ---------------------------------------------------------------------------

def test_typeable_token_ids_keep_whole_words_digits_and_punctuation():
    vocab = {
        "cat</w>": 5, "dog</w>": 2, "ing": 3, "1</w>": 9, "12</w>": 10, "x2</w>": 11, "!!</w>": 12,
        "'s</w>": 13, "</w>": 14, "<|startoftext|>": 49406, "<|endoftext|>": 49407, "ðŁĺĤ</w>": 15,
        "Ã©</w>": 16, "a b</w>": 17, "night</w>": 1, ".</w>": 18, "special</w>": 20,
    }
    assert typeable_token_ids(vocab, special_ids=[20, 49406, 49407]) == [1, 2, 5, 9, 12, 18]
