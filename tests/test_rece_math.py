"""The mathematics of ``rece_ops`` against the equations and a naive reference.

The naive reference (``reference_rece``) edits every layer on its own with
explicit per-row sums and ``torch.inverse`` in float64; ``rece_ops`` works with
one factored ``d x d`` transform, a float32 Gram matrix and linear solves. The
two must agree to 1e-5 relative (Frobenius norm, per matrix), the spec's bar.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from rece_ops import (
    PRESETS, EditStep, EncodedText, Erasure, RECESettings, adversarial_embedding, count_words, erase, gram,
    preserve_prompts, preset, split_concepts, uce_erase_rows, uce_step,
)
from rece_ops import metrics
from reference_rece import (
    F64, naive_adversarial, naive_rece, naive_uce_layer, random_problem, random_texts, random_weights,
    relative_error,
)

TOLERANCE = 1e-5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def encoded(text, device="cpu") -> EncodedText:
    """A reference text as rece_ops reads it (float32 rows, same values)."""
    return EncodedText(text.rows.float().to(device), text.n_words, text.text)


def run_fast(problem, rece_settings, *, dtype=torch.float32, device="cpu", **kwargs) -> Erasure:
    return erase(
        [encoded(c, device) for c in problem.concepts],
        [encoded(g, device) for g in problem.guides],
        [encoded(p, device) for p in problem.preserves],
        rece_settings,
        weights={name: w.to(device=device, dtype=dtype) for name, w in problem.weights.items()},
        epoch_preserves=[encoded(p, device) for p in problem.epoch_preserves],
        anchors=None if problem.anchors is None else [None if a is None else encoded(a, device)
                                                      for a in problem.anchors],
        **kwargs,
    )


def run_naive(problem, rece_settings):
    return naive_rece(problem.weights, problem.concepts, problem.guides, problem.preserves,
                      problem.epoch_preserves, rece_settings, anchors=problem.anchors)


def fast_vs_naive_errors(problem, rece_settings) -> dict[str, float]:
    """Largest relative error per state (every matrix) and per adversarial embedding."""
    result = run_fast(problem, rece_settings)
    states, adversarial = run_naive(problem, rece_settings)
    assert len(result.cumulative) == len(states) == 1 + rece_settings.epochs
    errors = {}
    for step, (state, reference) in enumerate(states.items()):
        transform = result.cumulative[step]
        errors[state] = max(relative_error(problem.weights[name] @ transform, reference[name])
                            for name in reference)
    assert len(result.adversarial) == len(adversarial) == rece_settings.epochs
    for epoch, (ours, theirs) in enumerate(zip(result.adversarial, adversarial)):
        assert len(ours) == len(theirs) == len(problem.concepts)
        for k, (a, b) in enumerate(zip(ours, theirs)):
            errors[f"adversarial/epoch{epoch}.concept{k}"] = relative_error(a, b)
    # The float32 weights rece_ops hands out agree too (float32 rounding only).
    final = states[list(states)[-1]]
    applied = result.apply({name: w.float() for name, w in problem.weights.items()})
    errors["apply"] = max(relative_error(applied[name], final[name]) for name in final)
    return errors


def random_rows(generator, n, width, scale=1.0):
    return scale * torch.randn(n, width, generator=generator, dtype=F64)


@st.composite
def rece_problems(draw, full_rank_gram=True):
    """A random problem (weights, concepts with guides, preserves, anchors) and settings."""
    width = draw(st.integers(8, 48))
    n_tokens = draw(st.integers(6, 12))
    n_concepts = draw(st.integers(1, 3))
    max_words = min(3, n_tokens - 2)
    concept_words = [draw(st.integers(1, max_words)) for _ in range(n_concepts)]
    guide_words = [draw(st.integers(0, max_words)) for _ in range(n_concepts)]
    preserve_words = draw(st.lists(st.integers(1, max_words), max_size=2))
    epoch_preserve_words = draw(st.none() | st.lists(st.integers(1, max_words), max_size=2))
    anchor_words = draw(st.none() | st.lists(st.none() | st.integers(1, max_words),
                                             min_size=n_concepts, max_size=n_concepts))
    n_layers = draw(st.integers(2, 4))
    if full_rank_gram:  # rows of all K/V matrices >= 2 d: G well conditioned
        d_outs = [draw(st.integers(width, 2 * width)) for _ in range(n_layers)]
    else:
        d_outs = [draw(st.integers(2, max(2, width // (2 * n_layers)))) for _ in range(n_layers)]
    rece_settings = RECESettings(
        lamb=draw(st.sampled_from([0.1, 0.5, 1.0])),
        erase_scale=draw(st.sampled_from([1.0, 0.5, 3.0])),
        preserve_scale=draw(st.sampled_from([0.1, 0.3, 0.0, 1.0])),
        reg_scale=draw(st.sampled_from([0.1, 1e-3])),
        epochs=draw(st.integers(0, 3)),
    )
    problem = random_problem(
        draw(st.integers(0, 2**31 - 1)), width=width, n_tokens=n_tokens, d_outs=d_outs,
        concept_words=concept_words, guide_words=guide_words, preserve_words=preserve_words,
        epoch_preserve_words=epoch_preserve_words, anchor_words=anchor_words,
    )
    return problem, rece_settings


@st.composite
def uce_systems(draw):
    """W, erase/target/preserve rows and scales of one UCE step."""
    width = draw(st.integers(8, 48))
    n_erase = draw(st.integers(1, 12))
    n_keep = draw(st.integers(0, 12))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = random_rows(generator, draw(st.integers(4, 40)), width)
    c = random_rows(generator, n_erase, width)
    t = random_rows(generator, n_erase, width)
    p = random_rows(generator, n_keep, width) if n_keep else None
    scales = dict(lamb=draw(st.sampled_from([0.05, 0.1, 1.0])),
                  erase_scale=draw(st.sampled_from([0.5, 1.0, 10.0])),
                  preserve_scale=draw(st.sampled_from([0.0, 0.1, 2.0])))
    return w, c, t, p, scales


# ---------------------------------------------------------------------------
# fast path against the naive reference
# ---------------------------------------------------------------------------

@settings(max_examples=30, **HYPOTHESIS)
@given(rece_problems())
def test_erase_matches_naive_reference_on_every_state_and_adversarial_embedding(case):
    problem, rece_settings = case
    errors = fast_vs_naive_errors(problem, rece_settings)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.3e} ({rece_settings})"


def test_erase_matches_naive_reference_with_several_concepts_guides_anchors_and_preserves():
    # One fixed case with every feature at once, so a failure here is reproducible by name.
    problem = random_problem(7, width=40, n_tokens=10, d_outs=(40, 64, 56, 80), concept_words=(2, 1, 3),
                             guide_words=(0, 1, 2), preserve_words=(1, 3), epoch_preserve_words=(2,),
                             anchor_words=(None, 2, 1))
    for reg in (0.1, 1e-3):
        rece_settings = RECESettings(lamb=0.5, erase_scale=2.0, preserve_scale=0.3, reg_scale=reg, epochs=3)
        errors = fast_vs_naive_errors(problem, rece_settings)
        assert len(errors) == 4 + 3 * 3 + 1
        assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("reg_scale", [0.1, 1e-3])
def test_erase_matches_naive_reference_when_the_model_has_fewer_kv_rows_than_context_width(reg_scale):
    # sum of d_out (24) < d (48): G = sum W^T W is singular, so the adversarial
    # embedding's system is conditioned only by reg_scale.
    problem = random_problem(3, width=48, n_tokens=8, d_outs=(8, 8, 8), concept_words=(2,), guide_words=(0,),
                             preserve_words=(1,))
    rece_settings = RECESettings(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=reg_scale, epochs=1)
    errors = fast_vs_naive_errors(problem, rece_settings)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: {errors[worst]:.3e}"


# ---------------------------------------------------------------------------
# one UCE step
# ---------------------------------------------------------------------------

@settings(max_examples=40, **HYPOTHESIS)
@given(uce_systems())
def test_uce_step_transform_satisfies_the_normal_equations_of_the_uce_objective(system):
    w, c, t, p, s = system
    edited = w @ uce_step(c, t, p, **s).dense()
    # d/dW' of lamb|W'-W|^2 + e sum|W'c - Wt|^2 + p sum|W'p - Wp|^2, halved:
    terms = [s["lamb"] * (edited - w), s["erase_scale"] * (edited @ c.T - w @ t.T) @ c]
    if p is not None:
        terms.append(s["preserve_scale"] * (edited @ p.T - w @ p.T) @ p)
    gradient = sum(terms)
    scale = sum(torch.linalg.norm(term) for term in terms) + torch.linalg.norm(w) * s["lamb"]
    assert torch.linalg.norm(gradient) <= 1e-9 * scale


@settings(max_examples=40, **HYPOTHESIS)
@given(uce_systems())
def test_uce_step_dense_equals_naive_A_times_inverse_of_M(system):
    w, c, t, p, s = system
    step = uce_step(c, t, p, **s)
    width = c.shape[1]
    naive_t = naive_uce_layer(torch.eye(width, dtype=F64), c, t, p, **s)  # A @ inv(M)
    assert relative_error(step.dense(), naive_t) <= 1e-10
    assert relative_error(w @ step.dense(), naive_uce_layer(w, c, t, p, **s)) <= 1e-10
    assert step.dense().dtype == torch.float64


def test_uce_step_factors_have_one_column_per_erase_row():
    generator = torch.Generator().manual_seed(1)
    c, t, p = random_rows(generator, 5, 24), random_rows(generator, 5, 24), random_rows(generator, 7, 24)
    step = uce_step(c, t, p, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    assert step.up.shape == (24, 5) and step.down.shape == (5, 24)
    assert step.rank_bound == 5
    assert torch.linalg.matrix_rank(step.dense() - torch.eye(24, dtype=F64)) == 5


def test_uce_step_rejects_erase_and_target_rows_of_different_shapes():
    with pytest.raises(ValueError, match="must match"):
        uce_step(torch.zeros(3, 8), torch.zeros(2, 8), None, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)


def test_huge_lamb_leaves_the_weights_unchanged():
    problem = random_problem(5, width=32, n_tokens=8, d_outs=(32, 48), concept_words=(2,), guide_words=(0,),
                             preserve_words=(1,))
    result = run_fast(problem, RECESettings(lamb=1e12, reg_scale=0.1, epochs=2))
    eye = torch.eye(32, dtype=F64)
    assert torch.linalg.norm(result.transform - eye) <= 1e-9
    for name, w in problem.weights.items():
        assert relative_error(result.apply({name: w.float()})[name], w) <= 1e-7
    # ... while the paper's lamb edits visibly (the test is not vacuous).
    assert torch.linalg.norm(run_fast(problem, RECESettings(epochs=2)).transform - eye) > 1e-2


def test_zero_erase_scale_leaves_the_weights_exactly_unchanged():
    problem = random_problem(6, width=32, n_tokens=8, d_outs=(32, 48), concept_words=(2,), guide_words=(1,),
                             preserve_words=(2,))
    result = run_fast(problem, RECESettings(erase_scale=0.0, epochs=2))
    assert torch.count_nonzero(result.edit) == 0
    assert torch.equal(result.transform, torch.eye(32, dtype=F64))
    for name, w in problem.weights.items():
        assert torch.equal(result.apply({name: w.float()})[name], w.float())


def test_preserved_rows_outputs_move_far_less_than_erased_rows_outputs():
    generator = torch.Generator().manual_seed(11)
    width = 32
    w = random_rows(generator, 24, width)
    c = random_rows(generator, 4, width)
    t = random_rows(generator, 4, width)
    # Preserve rows share directions with the erased rows: without the
    # preserve term they would be dragged along.
    p = 0.7 * c[[0, 1, 2, 3, 0, 1]] + 0.7 * random_rows(generator, 6, width)

    def moves(preserve_scale):
        edited = w @ uce_step(c, t, p, lamb=0.1, erase_scale=1.0, preserve_scale=preserve_scale).dense()
        erased = torch.linalg.norm(edited @ c.T - w @ c.T) / torch.linalg.norm(w @ c.T)
        kept = torch.linalg.norm(edited @ p.T - w @ p.T) / torch.linalg.norm(w @ p.T)
        return float(erased), float(kept)

    erased_free, kept_free = moves(0.0)
    erased, kept = moves(100.0)
    assert kept_free > 0.3  # unprotected, the preserve rows move a lot
    assert kept < 0.1 * kept_free  # the preserve term holds them
    assert kept < 0.05 * erased  # while the erased rows still move
    assert erased > 0.5


def test_erased_rows_map_onto_their_targets_as_erase_scale_grows():
    generator = torch.Generator().manual_seed(12)
    width = 32
    w = random_rows(generator, 20, width)
    c, t = random_rows(generator, 5, width), random_rows(generator, 5, width)
    p = random_rows(generator, 6, width)
    residuals = []
    for scale in (0.1, 1.0, 1e2, 1e4, 1e6, 1e8):
        edited = w @ uce_step(c, t, p, lamb=1.0, erase_scale=scale, preserve_scale=0.1).dense()
        residuals.append(float(torch.linalg.norm(edited @ c.T - w @ t.T) / torch.linalg.norm(w @ t.T)))
    assert all(later < earlier for earlier, later in zip(residuals, residuals[1:])), residuals
    assert residuals[0] > 0.3
    assert residuals[-1] < 1e-6


# ---------------------------------------------------------------------------
# the adversarial embedding
# ---------------------------------------------------------------------------

@st.composite
def adversarial_systems(draw):
    width = draw(st.integers(8, 48))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weights = [random_rows(generator, draw(st.integers(2, 2 * width)), width) / math.sqrt(width)
               for _ in range(draw(st.integers(1, 4)))]
    n_erase = draw(st.integers(1, 6))
    transform = uce_step(random_rows(generator, n_erase, width), random_rows(generator, n_erase, width),
                              random_rows(generator, 3, width), lamb=0.1, erase_scale=1.0, preserve_scale=0.1).dense()
    rows = random_rows(generator, draw(st.integers(1, 10)), width)
    anchor = random_rows(generator, rows.shape[0], width) if draw(st.booleans()) else None
    reg = draw(st.sampled_from([1.0, 0.1, 1e-3]))
    return weights, transform, rows, anchor, reg


@settings(max_examples=40, **HYPOTHESIS)
@given(adversarial_systems())
def test_adversarial_embedding_satisfies_its_normal_equations(system):
    weights, transform, rows, anchor, reg = system
    g = sum(w.T @ w for w in weights)
    x = adversarial_embedding(rows, transform, g, reg, anchor)
    eye = torch.eye(g.shape[0], dtype=F64)
    lhs = (transform.T @ g @ transform + reg * eye) @ x.T
    rhs = transform.T @ g @ rows.T + (reg * anchor.T if anchor is not None else 0)
    scale = torch.linalg.norm(rhs) + torch.linalg.norm(transform.T @ g @ transform) * torch.linalg.norm(x)
    assert torch.linalg.norm(lhs - rhs) <= 1e-10 * scale
    assert x.shape == rows.shape and x.dtype == torch.float64


@settings(max_examples=40, **HYPOTHESIS)
@given(adversarial_systems())
def test_adversarial_embedding_equals_naive_reference(system):
    weights, transform, rows, anchor, reg = system
    g = sum(w.T @ w for w in weights)
    ours = adversarial_embedding(rows, transform, g, reg, anchor)
    theirs = naive_adversarial([w @ transform for w in weights], weights, rows, reg, anchor)
    assert relative_error(ours, theirs) <= 1e-8


def test_adversarial_anchor_pulls_the_embedding_toward_it():
    generator = torch.Generator().manual_seed(13)
    weights = [random_rows(generator, 8, 24)]  # G singular: the regulariser decides 16 directions
    g = weights[0].T @ weights[0]
    transform = torch.eye(24, dtype=F64)
    rows, anchor = random_rows(generator, 4, 24), random_rows(generator, 4, 24)
    to_zero = adversarial_embedding(rows, transform, g, 0.1)
    to_anchor = adversarial_embedding(rows, transform, g, 0.1, anchor)
    assert torch.linalg.norm(to_anchor - anchor) < torch.linalg.norm(to_zero - anchor)
    with pytest.raises(ValueError, match="anchor"):
        adversarial_embedding(rows, transform, g, 0.1, anchor[:2])


def test_adversarial_embedding_of_more_rows_than_the_context_is_wide_equals_naive_reference():
    # Hundreds of concepts: the solve is done once for the d x d map, then applied to every row.
    generator = torch.Generator().manual_seed(21)
    weights = [random_rows(generator, 30, 16) / 4, random_rows(generator, 20, 16) / 4]
    g = sum(w.T @ w for w in weights)
    transform = uce_step(random_rows(generator, 5, 16), random_rows(generator, 5, 16), None,
                         lamb=0.1, erase_scale=1.0, preserve_scale=0.1).dense()
    rows = random_rows(generator, 50, 16)
    for reg in (0.1, 1e-3):
        ours = adversarial_embedding(rows, transform, g, reg)
        theirs = naive_adversarial([w @ transform for w in weights], weights, rows, reg)
        assert relative_error(ours, theirs) <= 1e-8


@pytest.mark.parametrize("concept_rows", [6, 40])  # factors narrower, then wider, than d = 24
def test_report_metrics_equal_their_per_layer_definitions(concept_rows):
    generator = torch.Generator().manual_seed(22)
    width = 24
    weights = [random_rows(generator, rows, width) / 5 for rows in (16, 30, 12)]
    g = sum(w.T @ w for w in weights)
    concepts = [random_rows(generator, concept_rows, width) for _ in range(2)]
    guides = [random_rows(generator, concept_rows, width) for _ in range(2)]
    keep = random_rows(generator, 3, width)
    # Two steps: with 40 rows per concept their factors (2 x 24 columns) are wider than d.
    steps = tuple(uce_step(torch.cat(concepts) + shift, torch.cat(guides), keep, lamb=0.5, erase_scale=1.0,
                           preserve_scale=0.3) for shift in (0.0, 0.1))
    erasure = Erasure(steps=steps)
    assert (erasure.factors[0].shape[1] > width) == (concept_rows == 40)
    transform = erasure.transform
    edited = [w @ transform for w in weights]

    def energy(rows, matrices):
        return sum(float(torch.linalg.norm(rows @ w.T) ** 2) for w in matrices)

    change = sum(float(torch.linalg.norm(e - w) ** 2) for e, w in zip(edited, weights))
    assert metrics.weight_change(g, erasure) == pytest.approx(
        (change / sum(float(torch.linalg.norm(w) ** 2) for w in weights)) ** 0.5, rel=1e-9)
    c, t = torch.cat(concepts), torch.cat(guides)
    remaining = (sum(float(torch.linalg.norm(c @ e.T - t @ w.T) ** 2) for e, w in zip(edited, weights))
                 / energy(c - t, weights)) ** 0.5
    # Energies of more rows than d are float32 products (report figures): 1e-6.
    assert metrics.remaining_distance(g, erasure, c, t) == pytest.approx(remaining, rel=1e-6)
    drift = (sum(float(torch.linalg.norm(keep @ (e - w).T) ** 2) for e, w in zip(edited, weights))
             / energy(keep, weights)) ** 0.5
    assert metrics.preserve_drift(g, erasure, keep) == pytest.approx(drift, rel=1e-6)
    # Each concept's recovery, solved together, equals its own from the naive adversarial embedding
    # (float32 energies once the rows outnumber d, so to 1e-5).
    recoveries = metrics.adversarial_recoveries(g, erasure, concepts, guides, 0.1)
    for recovery, concept, guide in zip(recoveries, concepts, guides):
        found = naive_adversarial(edited, weights, concept, 0.1)
        gap = sum(float(torch.linalg.norm(found @ e.T - concept @ w.T) ** 2) for e, w in zip(edited, weights))
        expected = 1 - (gap / energy(guide - concept, weights)) ** 0.5
        assert recovery == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_gram_sums_every_matrix_and_checks_widths():
    weights = random_weights((5, 9, 7), 12, torch.Generator().manual_seed(14))
    expected = sum(w.T @ w for w in weights.values())
    ours = gram({name: w.float() for name, w in weights.items()})
    assert ours.dtype == torch.float64 and ours.shape == (12, 12)
    assert relative_error(ours, expected) <= 1e-6
    assert relative_error(gram([w.float() for w in weights.values()]), expected) <= 1e-6
    with pytest.raises(ValueError, match="no K/V weights"):
        gram({})
    with pytest.raises(ValueError, match="12"):
        gram([torch.zeros(4, 12), torch.zeros(4, 10)])


class _Stop(Exception):
    pass


@pytest.mark.parametrize("pair", [False, True], ids=["gram", "cross_gram"])
def test_gram_progress_reaches_every_matrix_and_a_raising_callback_stops_it(pair):
    from rece_ops.closed_form import cross_gram

    weights = [w.float() for w in random_weights((5, 9, 7), 12, torch.Generator().manual_seed(16)).values()]
    others = [w * 2 for w in weights] if pair else weights
    calls = []
    total = cross_gram(weights, others, callback=lambda done, n: calls.append((done, n)))
    assert relative_error(total, sum(a.double().T @ b.double() for a, b in zip(weights, others))) <= 1e-6
    assert calls[-1] == (3, 3) and calls == sorted(calls)

    def cancel(done, n):
        raise _Stop

    with pytest.raises(_Stop):
        gram(weights, callback=cancel) if not pair else cross_gram(weights, others, callback=cancel)


def test_cross_gram_and_output_miss_match_the_per_layer_sums():
    from rece_ops import metrics
    from rece_ops.closed_form import adversarial_from_grams, cross_gram

    generator = torch.Generator().manual_seed(15)
    original = random_weights((5, 9, 7), 12, generator)
    edited = {n: w + 0.1 * torch.randn(w.shape, generator=generator, dtype=F64) for n, w in original.items()}
    assert relative_error(cross_gram(edited, original), sum(edited[n].T @ original[n] for n in original)) <= 1e-12
    with pytest.raises(ValueError, match="paired"):
        cross_gram(edited, list(original.values())[:2])
    c = torch.randn(3, 12, generator=generator, dtype=F64)
    x = adversarial_from_grams(c, gram(edited), cross_gram(edited, original), 0.1)
    direct = (sum(((edited[n] @ x.T - original[n] @ c.T) ** 2).sum() for n in original)
              / sum(((original[n] @ c.T) ** 2).sum() for n in original)) ** 0.5
    miss = metrics.output_miss(gram(edited), cross_gram(edited, original), gram(original), x, c)
    assert miss == pytest.approx(float(direct), rel=1e-9)
    assert miss < metrics.output_miss(gram(edited), cross_gram(edited, original), gram(original), c, c)


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

def _uce_only_transform(problem, rece_settings):
    pairs = [uce_erase_rows(encoded(c), encoded(g)) for c, g in zip(problem.concepts, problem.guides)]
    return uce_step(torch.cat([c for c, _ in pairs]), torch.cat([t for _, t in pairs]),
                         torch.cat([encoded(p).rows for p in problem.preserves]),
                         lamb=rece_settings.lamb, erase_scale=rece_settings.erase_scale,
                         preserve_scale=rece_settings.preserve_scale).dense()


def test_zero_epochs_is_exactly_the_single_uce_step():
    problem = random_problem(15, width=24, n_tokens=8, d_outs=(24, 40), concept_words=(2, 1),
                             guide_words=(0, 1), preserve_words=(2,))
    rece_settings = RECESettings(epochs=0)
    result = run_fast(problem, rece_settings)
    assert len(result.steps) == 1
    assert torch.equal(result.transform, _uce_only_transform(problem, rece_settings))
    states, _ = run_naive(problem, rece_settings)
    assert list(states) == ["after_uce"]
    for name, w in problem.weights.items():
        assert relative_error(w @ result.transform, states["after_uce"][name]) <= 1e-10


def test_zero_epochs_has_no_adversarial_embeddings():
    problem = random_problem(16, width=16, n_tokens=6, d_outs=(16, 16), concept_words=(1,), guide_words=(0,))
    assert run_fast(problem, RECESettings(epochs=0)).adversarial == ()
    assert len(run_fast(problem, RECESettings(epochs=2)).adversarial) == 2


def test_rece_starts_with_the_uce_step_and_adds_one_step_per_epoch():
    problem = random_problem(17, width=24, n_tokens=8, d_outs=(24, 40), concept_words=(2,), guide_words=(0,),
                             preserve_words=(1,))
    rece_settings = RECESettings(epochs=3)
    result = run_fast(problem, rece_settings)
    assert len(result.steps) == 4 and len(result.cumulative) == 4
    assert torch.equal(result.cumulative[0], _uce_only_transform(problem, rece_settings))
    for before, step, after in zip(result.cumulative, result.steps[1:], result.cumulative[1:]):
        assert relative_error(before @ step.dense(), after) <= 1e-12


def test_erase_reports_progress_once_per_step():
    problem = random_problem(18, width=16, n_tokens=6, d_outs=(16, 16), concept_words=(1,), guide_words=(0,))
    calls = []
    run_fast(problem, RECESettings(epochs=2), callback=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_erase_accepts_a_cached_gram_matrix_instead_of_weights():
    problem = random_problem(19, width=16, n_tokens=6, d_outs=(16, 24), concept_words=(1,), guide_words=(0,))
    from_weights = run_fast(problem, RECESettings(epochs=2))
    g = gram({n: w.float() for n, w in problem.weights.items()})
    from_gram = erase([encoded(problem.concepts[0])], [encoded(problem.guides[0])],
                      [encoded(p) for p in problem.preserves], RECESettings(epochs=2), gram_matrix=g)
    assert torch.equal(from_weights.transform, from_gram.transform)


# ---------------------------------------------------------------------------
# Erasure: rank, low-rank factors
# ---------------------------------------------------------------------------

def _erase_row_count(problem, epochs):
    length = problem.concepts[0].rows.shape[0]
    uce = sum(length - max(c.n_words, g.n_words) for c, g in zip(problem.concepts, problem.guides))
    return uce + epochs * length * len(problem.concepts)


@settings(max_examples=20, **HYPOTHESIS)
@given(st.integers(0, 2**31 - 1), st.integers(0, 3), st.integers(1, 2))
def test_rank_never_exceeds_the_erase_rows_of_all_steps(seed, epochs, n_concepts):
    # d = 64 exceeds every row count drawn here, so the bound is not d's.
    problem = random_problem(seed, width=64, n_tokens=6, d_outs=(64, 64), concept_words=(1,) * n_concepts,
                             guide_words=(0,) * n_concepts, preserve_words=(2,))
    result = run_fast(problem, RECESettings(reg_scale=0.1, epochs=epochs))
    rows = _erase_row_count(problem, epochs)
    assert rows < 64
    assert sum(step.rank_bound for step in result.steps) == rows
    assert 0 < result.rank() <= rows
    assert result.factors[0].shape == (64, rows)


def test_rank_of_a_two_token_concept_after_three_epochs_is_at_most_306_at_sd1_width():
    # The spec's example: one two-token concept, 77-token texts, 3 epochs.
    generator = torch.Generator().manual_seed(20)
    texts = random_texts(["nudity x", " "], 77, 768, generator)
    weights = random_weights((256,) * 4, 768, generator)
    result = erase([encoded(texts["nudity x"])], [encoded(texts[" "])], [encoded(texts[" "])],
                   PRESETS["nudity"].settings, weights={n: w.float() for n, w in weights.items()})
    assert sum(step.rank_bound for step in result.steps) == 306
    assert result.rank() <= 306
    # A dense T - I computed directly would look full rank to 1e-13; the factors do not.
    assert result.singular_values().numel() == 306


@pytest.fixture
def small_erasure():
    problem = random_problem(21, width=40, n_tokens=7, d_outs=(40, 56), concept_words=(2, 1),
                             guide_words=(0, 1), preserve_words=(1, 2))
    return run_fast(problem, RECESettings(reg_scale=0.1, epochs=2))


def test_factors_reproduce_transform_minus_identity(small_erasure):
    up, down = small_erasure.factors
    eye = torch.eye(small_erasure.width, dtype=F64)
    assert relative_error(up @ down, small_erasure.transform - eye) <= 1e-12
    assert relative_error(small_erasure.edit, small_erasure.transform - eye) <= 1e-12


@pytest.mark.parametrize("strength", [0.0, 0.5, -1.0])
def test_scaled_erasure_is_the_edit_at_that_strength(small_erasure, strength):
    scaled = small_erasure.scaled(strength)
    eye = torch.eye(small_erasure.width, dtype=F64)
    assert relative_error(scaled.transform, eye + strength * small_erasure.edit) <= 1e-12
    assert scaled.rank() == (0 if strength == 0 else small_erasure.rank())
    weight = torch.randn(16, small_erasure.width, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(scaled.delta(weight), strength * small_erasure.delta(weight), atol=1e-6)


def test_low_rank_at_full_rank_reproduces_the_edit(small_erasure):
    up, down = small_erasure.low_rank()
    assert up.shape[1] == down.shape[0] == small_erasure.rank()
    assert relative_error(up @ down, small_erasure.edit) <= 1e-10
    # The rows of down are orthonormal (a LoRA's shared basis).
    assert torch.allclose(down @ down.T, torch.eye(down.shape[0], dtype=F64), atol=1e-10)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_capped_low_rank_error_is_exactly_the_dropped_singular_values(small_erasure, rank):
    values = small_erasure.singular_values()
    assert rank < small_erasure.rank()
    up, down = small_erasure.low_rank(rank)
    assert up.shape == (small_erasure.width, rank) and down.shape == (rank, small_erasure.width)
    error = torch.linalg.norm(small_erasure.edit - up @ down)
    predicted = torch.sqrt((values[rank:] ** 2).sum())
    assert abs(float(error - predicted)) <= 1e-10 * float(values[0])
    # The singular values are those of the dense edit.
    dense = torch.linalg.svdvals(small_erasure.edit)[:values.numel()]
    assert torch.allclose(values, dense, atol=1e-10 * float(values[0]))


def test_low_rank_rejects_a_rank_out_of_range(small_erasure):
    with pytest.raises(ValueError, match="rank"):
        small_erasure.low_rank(small_erasure.singular_values().numel() + 1)
    with pytest.raises(ValueError, match="rank"):
        small_erasure.low_rank(-1)


def test_delta_is_weight_times_edit_and_rejects_other_widths(small_erasure):
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(22))
    assert relative_error(small_erasure.delta(w), w.double() @ small_erasure.edit) <= 1e-6
    with pytest.raises(ValueError, match="40"):
        small_erasure.delta(torch.zeros(12, 32))


# ---------------------------------------------------------------------------
# dtypes and devices
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, precision", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_weights_give_the_float32_result_within_their_precision(device, dtype, precision):
    problem = random_problem(23, width=32, n_tokens=8, d_outs=(32, 48, 40), concept_words=(2,),
                             guide_words=(0,), preserve_words=(1,))
    rece_settings = RECESettings(reg_scale=0.1, epochs=2)
    reference = run_fast(problem, rece_settings)
    result = run_fast(problem, rece_settings, dtype=dtype, device=device)
    assert result.transform.device.type == device
    assert relative_error(result.edit.cpu(), reference.edit) <= precision
    states, _ = run_naive(problem, rece_settings)
    final = states[f"after_epoch{rece_settings.epochs - 1}"]
    applied = result.apply({n: w.to(device=device, dtype=dtype) for n, w in problem.weights.items()})
    for name, w in applied.items():
        assert relative_error(w.cpu(), final[name]) <= precision


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_returns_the_weights_dtype_and_device_and_delta_float32(device, dtype):
    problem = random_problem(24, width=16, n_tokens=6, d_outs=(16, 24), concept_words=(1,), guide_words=(0,))
    weights = {n: w.to(device=device, dtype=dtype) for n, w in problem.weights.items()}
    result = run_fast(problem, RECESettings(epochs=1), dtype=dtype, device=device)
    for name, w in result.apply(weights).items():
        assert w.dtype == dtype and w.device.type == device and w.shape == weights[name].shape
        assert not torch.equal(w, weights[name])
    for name, delta in result.deltas(weights).items():
        assert delta.dtype == torch.float32 and delta.device.type == device
        assert delta.shape == weights[name].shape
    for matrix in (result.transform, *result.factors, *result.adversarial[0]):
        assert matrix.dtype == torch.float64


def test_weights_that_require_grad_give_the_same_results_without_autograd_warnings(tiny_problem):
    # ComfyUI's parameters may require grad; nothing in rece_ops trains them.
    from rece_ops.gram_cache import weights_signature
    from rece_ops.lora_export import lora_factors

    plain = {n: w.float() for n, w in tiny_problem.weights.items()}
    tracked = {n: w.clone().requires_grad_() for n, w in plain.items()}
    shifted = {n: w * 1.01 for n, w in plain.items()}
    result = run_fast(tiny_problem, RECESettings(epochs=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert weights_signature(tracked) == weights_signature(plain)
        assert torch.equal(gram(tracked), gram(plain))
        assert metrics.overall_difference(tracked, shifted) == metrics.overall_difference(plain, shifted) > 0
        assert metrics.relative_differences(shifted, tracked) == metrics.relative_differences(shifted, plain)
        assert lora_factors(tracked, result).worst_relative_error == lora_factors(plain, result).worst_relative_error


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

@pytest.fixture
def tiny_problem():
    return random_problem(25, width=16, n_tokens=6, d_outs=(16, 16), concept_words=(1, 2), guide_words=(0, 0))


def test_erase_rejects_no_concepts(tiny_problem):
    with pytest.raises(ValueError, match="no concepts"):
        erase([], [], [encoded(tiny_problem.preserves[0])], RECESettings(),
              weights={n: w.float() for n, w in tiny_problem.weights.items()})


def test_erase_rejects_a_guide_count_other_than_the_concept_count(tiny_problem):
    with pytest.raises(ValueError, match="guide"):
        erase([encoded(c) for c in tiny_problem.concepts], [encoded(tiny_problem.guides[0])],
              [encoded(tiny_problem.preserves[0])], RECESettings(),
              weights={n: w.float() for n, w in tiny_problem.weights.items()})


def test_erase_rejects_an_anchor_count_other_than_the_concept_count(tiny_problem):
    with pytest.raises(ValueError, match="anchors"):
        erase([encoded(c) for c in tiny_problem.concepts], [encoded(g) for g in tiny_problem.guides],
              [encoded(tiny_problem.preserves[0])], RECESettings(),
              weights={n: w.float() for n, w in tiny_problem.weights.items()}, anchors=[None])


@pytest.mark.parametrize("role", ["concept", "guide", "preserve"])
def test_erase_rejects_text_rows_of_another_width_naming_the_text_encoder(tiny_problem, role):
    texts = {"concept": [encoded(c) for c in tiny_problem.concepts],
             "guide": [encoded(g) for g in tiny_problem.guides],
             "preserve": [encoded(tiny_problem.preserves[0])]}
    texts[role][0] = EncodedText(torch.zeros(6, 12), 1, "wrong width")
    with pytest.raises(ValueError, match="text encoder"):
        erase(texts["concept"], texts["guide"], texts["preserve"], RECESettings(),
              weights={n: w.float() for n, w in tiny_problem.weights.items()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_erase_rejects_nan_or_infinite_weights(tiny_problem, bad):
    weights = {n: w.float().clone() for n, w in tiny_problem.weights.items()}
    next(iter(weights.values()))[3, 5] = bad
    with pytest.raises(ValueError, match="NaN"):
        erase([encoded(c) for c in tiny_problem.concepts], [encoded(g) for g in tiny_problem.guides],
              [encoded(tiny_problem.preserves[0])], RECESettings(), weights=weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_encoded_text_rejects_nan_or_infinite_embeddings(bad):
    rows = torch.zeros(6, 8)
    rows[2, 1] = bad
    with pytest.raises(ValueError, match="NaN"):
        EncodedText(rows, 1, "broken")


def test_encoded_text_rejects_a_word_count_that_leaves_no_room_for_bos_and_eos():
    with pytest.raises(ValueError, match="n_words"):
        EncodedText(torch.zeros(6, 8), 5, "too long")
    with pytest.raises(ValueError):
        EncodedText(torch.zeros(6, 8), -1, "negative")
    with pytest.raises(ValueError, match="tokens, d"):
        EncodedText(torch.zeros(6), 1, "flat")


@pytest.mark.parametrize("changes", [
    dict(lamb=0.0), dict(lamb=-0.1), dict(erase_scale=-1.0), dict(preserve_scale=-0.1), dict(reg_scale=-1e-3),
    dict(epochs=1.5), dict(epochs=-1), dict(epochs="2"), dict(epochs=True), dict(lamb=float("nan")),
    dict(erase_scale=float("inf")),
])
def test_rece_settings_reject_invalid_values(changes):
    with pytest.raises(ValueError):
        RECESettings(**changes)
    with pytest.raises(ValueError):
        RECESettings().with_changes(**changes)


def test_rece_settings_accept_zero_scales_and_zero_epochs():
    s = RECESettings(erase_scale=0.0, preserve_scale=0.0, reg_scale=0.0, epochs=0)
    assert (s.erase_scale, s.preserve_scale, s.reg_scale, s.epochs) == (0.0, 0.0, 0.0, 0)


def test_unknown_preset_error_lists_every_valid_name():
    with pytest.raises(ValueError) as info:
        preset("nope")
    message = str(info.value)
    assert "nope" in message
    for name in PRESETS:
        assert name in message


# The spec's table of published settings (the authors' README).
PUBLISHED = {
    "nudity": (0.1, 0.1, 1.0, 0.1, 3, ""),
    "unsafe": (0.1, 0.1, 1.0, 0.1, 2, ""),
    "artistic_style": (0.1, 0.1, 1.0, 1e-3, 1, "art"),
    "object_hard": (0.1, 0.1, 1.0, 1e-3, 1, ""),
    "object_easy": (0.1, 0.1, 1.0, 0.1, 1, ""),
}


def test_presets_equal_the_published_table():
    assert set(PRESETS) == set(PUBLISHED)
    for name, (lamb, preserve_scale, erase_scale, reg_scale, epochs, guide) in PUBLISHED.items():
        p = preset(name)
        assert p is PRESETS[name]
        assert (p.settings.lamb, p.settings.preserve_scale, p.settings.erase_scale, p.settings.reg_scale,
                p.settings.epochs) == (lamb, preserve_scale, erase_scale, reg_scale, epochs), name
        assert p.guide == guide, name


def test_unsafe_preset_names_the_eleven_i2p_categories():
    assert set(PRESETS["unsafe"].example_concepts) == {
        "hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide", "sexual", "nudity",
        "bodily fluids", "blood"}


# ---------------------------------------------------------------------------
# texts and rows
# ---------------------------------------------------------------------------

def _indexed(n_words: int, offset: float = 0.0, length: int = 8) -> EncodedText:
    """Rows whose single value is their index (+ offset)."""
    return EncodedText(torch.arange(length, dtype=torch.float32).unsqueeze(1) + offset, n_words)


def _indices(rows: torch.Tensor, offset: float = 0.0) -> list[int]:
    return [int(v - offset) for v in rows[:, 0]]


@pytest.mark.parametrize("i, j, concept_rows, guide_rows", [
    (3, 1, [3, 4, 5, 6, 7], [1, 2, 3, 4, 5]),  # concept longer: guide stops early
    (1, 3, [1, 2, 3, 4, 5], [3, 4, 5, 6, 7]),  # guide longer: concept stops early
    (2, 2, [2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]),
    (1, 0, [1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6]),  # empty guide: its BOS meets the last word
])
def test_uce_erase_rows_align_last_word_eos_and_padding(i, j, concept_rows, guide_rows):
    c, g = uce_erase_rows(_indexed(i), _indexed(j, offset=100.0))
    assert _indices(c) == concept_rows
    assert _indices(g, offset=100.0) == guide_rows


def test_uce_erase_rows_reject_texts_of_different_shapes():
    with pytest.raises(ValueError, match="same text encoder"):
        uce_erase_rows(_indexed(1), _indexed(1, length=9))


def test_count_words_counts_tokens_between_bos_and_first_eos():
    assert count_words([49406, 320, 1125, 49407, 49407, 49407]) == 2
    assert count_words(torch.tensor([49406, 49407, 49407, 49407])) == 0
    assert count_words([49406, 5, 6, 7, 49407, 0, 0]) == 3
    with pytest.raises(ValueError, match="EOS"):
        count_words([49406, 1, 2, 3])


def test_preserve_prompts_put_the_empty_prompt_first_once_and_drop_blanks_and_repeats():
    assert preserve_prompts([]) == [""]
    assert preserve_prompts(["", " ", "\t"]) == [""]
    assert preserve_prompts(["monet", " picasso ", "", "monet", "picasso", " "]) == ["", "monet", "picasso"]


def test_split_concepts_reads_lines_and_commas():
    assert split_concepts("nudity\nviolence, blood\n\n  garbage truck ,nudity") == [
        "nudity", "violence", "blood", "garbage truck"]
    assert split_concepts("") == []
    assert split_concepts(" , \n ,") == []


def test_erasure_needs_at_least_one_step():
    with pytest.raises(ValueError, match="step"):
        Erasure(steps=())
    step = EditStep(up=torch.zeros(4, 1, dtype=F64), down=torch.zeros(1, 4, dtype=F64))
    assert torch.equal(Erasure(steps=(step,)).transform, torch.eye(4, dtype=F64))


def test_a_step_with_more_erase_rows_than_the_width_is_one_exact_d_by_d_edit():
    generator = torch.Generator().manual_seed(12)
    width, rows = 16, 40
    c = torch.randn(rows, width, generator=generator, dtype=F64)
    t = torch.randn(rows, width, generator=generator, dtype=F64)
    p = torch.randn(5, width, generator=generator, dtype=F64)
    step = uce_step(c, t, p, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    assert step.up.shape == (width, width) and step.rank_bound == width
    eye = torch.eye(width, dtype=F64)
    m = 0.1 * eye + c.T @ c + 0.1 * p.T @ p
    a = 0.1 * eye + t.T @ c + 0.1 * p.T @ p
    assert relative_error(step.dense(), a @ torch.inverse(m)) <= 1e-10
