"""SPEED's null-space edit (``rece_ops.null_space``) against the authors' code.

The reference, ``_authors_edit_model``, follows ``edit_model`` (and
``generate_perturbed_embs``) of ``train_erase_null.py`` in
github.com/Ouxiang-Li/SPEED line by line, in float64 and per layer: their
explicit ``.inverse()`` calls, ``torch.svd``, their 128-row chunks and 8-row
mini-batches, the ``norm > mean`` filters, one ``randperm`` shuffle of the
retained rows before the layer loop and ``P0_min`` from the weight's last
right singular vector. The only change: every random call takes an explicit
``torch.Generator`` (``randn`` in place of ``randn_like``), so that both sides
draw the same numbers in the authors' order. The k-means of ``K2`` is not part
of the reference; ``K2`` is passed in.

``rece_ops`` works with one factored ``T_l = I + up @ down`` per layer and
linear solves; ``W @ (T_l - I)`` must equal the authors' ``delta_weight`` to
1e-6 relative (Frobenius norm, per matrix).
"""
from __future__ import annotations

import re

import pytest
import torch

from rece_ops.null_space import (
    NullSpace, SpeedSettings, invariant_rows, kmeans_centres, null_space_of, null_space_projector, second_moment,
    speed_layer_steps, speed_rows, speed_step,
)
from rece_ops.texts import EncodedText

F64 = torch.float64
D = 64
PARITY = 1e-6
EXACT = 1e-9
# The authors' argparse defaults.
AUTHORS = dict(aug_num=10, threshold=0.1, retain_scale=1.0, lamb=0.0, disable_filter=False)


# ---------------------------------------------------------------------------
# the authors' edit_model, per layer, float64, seeded
# ---------------------------------------------------------------------------

def _authors_generate_perturbed_embs(ret_embs, P, erase_weight, num_per_sample, generator, mini_batch=8):
    ret_embs = ret_embs.squeeze(1)
    out_embs, norm_list = [], []
    for i in range(0, ret_embs.size(0), mini_batch):
        mini_ret_embs = ret_embs[i:i + mini_batch]
        for _ in range(num_per_sample):
            noise = torch.randn(mini_ret_embs.shape, generator=generator, dtype=F64)  # randn_like
            perturbed_embs = mini_ret_embs + noise @ P
            out_embs.append(perturbed_embs)
            norm_list.append(torch.matmul(perturbed_embs, erase_weight.T).norm(dim=1))
    out_embs = torch.cat(out_embs, dim=0)
    norm_list = torch.cat(norm_list, dim=0)
    return out_embs[norm_list > norm_list.mean()].unsqueeze(1)  # shape: [Num, 1, d]


def _authors_edit_model(weights, target_embs_list, anchor_embs_list, retain_embs, K2, *, aug_num, threshold,
                        retain_scale, lamb, disable_filter, generator, chunk_size=128, mini_batch=8, record=None):
    """``{name: W + delta_weight}`` as ``edit_model`` computes it (baseline 'SPEED').

    ``target_embs_list``/``anchor_embs_list``: each concept's rows ``[n_i, d]``
    (already the last subject token, or all rows but the first for 'nudity');
    ``retain_embs``: ``[N, d]`` (their ``last_ret_embs`` before the shuffle);
    ``K2``: ``[d, m]``. ``record``, if given, collects per layer the spectrum
    of ``sum_ret_ret``, the number of chunks and the rank of ``P``.
    """
    emb_size = retain_embs.shape[1]
    I = torch.eye(emb_size, dtype=F64)
    edit_dict = dict(weights)
    I2 = torch.eye(len(K2.T), dtype=F64)

    # region [Target and Anchor]
    sum_anchor_target, sum_target_target = [], []
    for target_embs, anchor_embs in zip(target_embs_list, anchor_embs_list):
        sum_target_target.append(target_embs.T @ target_embs)
        sum_anchor_target.append(anchor_embs.T @ target_embs)
    sum_target_target, sum_anchor_target = torch.stack(sum_target_target).mean(0), torch.stack(sum_anchor_target).mean(0)
    # endregion

    # region [Retain]
    last_ret_embs = retain_embs.unsqueeze(1)  # [N, 1, d]
    last_ret_embs = last_ret_embs[torch.randperm(last_ret_embs.size(0), generator=generator)]  # shuffle
    # endregion

    for (layer_name, layer_weight) in edit_dict.items():
        erase_weight = layer_weight @ (sum_anchor_target - sum_target_target) @ (I + sum_target_target).inverse()
        (U0, S0, V0) = torch.svd(layer_weight)
        P0_min = V0[:, -1:] @ V0[:, -1:].T

        if aug_num > 0 and not disable_filter:
            weight_norm_init = torch.matmul(last_ret_embs.squeeze(1), erase_weight.T).norm(dim=1)
            layer_ret_embs = last_ret_embs[weight_norm_init > weight_norm_init.mean()]
        else:
            layer_ret_embs = last_ret_embs

        sum_ret_ret, valid_num, chunks = [], 0, 0
        for j in range(0, len(layer_ret_embs), chunk_size):
            chunk_ret_embs = layer_ret_embs[j:j + chunk_size]
            if aug_num > 0:
                chunk_ret_embs = torch.cat(
                    [chunk_ret_embs, _authors_generate_perturbed_embs(chunk_ret_embs, P0_min, erase_weight,
                                                                      num_per_sample=aug_num, generator=generator,
                                                                      mini_batch=mini_batch)], dim=0
                )
            valid_num += chunk_ret_embs.shape[0]
            sum_ret_ret.append((chunk_ret_embs.transpose(1, 2) @ chunk_ret_embs).sum(0))
            chunks += 1
        sum_ret_ret = torch.stack(sum_ret_ret, dim=0).sum(0) / valid_num

        U, S, V = torch.svd(sum_ret_ret)
        P = U[:, S < threshold] @ U[:, S < threshold].T
        M = (sum_target_target @ P + retain_scale * I).inverse()
        delta_weight = layer_weight @ (sum_anchor_target - sum_target_target) @ P @ (
            I - M @ K2 @ (K2.T @ P @ M @ K2 + lamb * I2).inverse() @ K2.T @ P) @ M

        if record is not None:
            record[layer_name] = dict(spectrum=S, chunks=chunks, rank=int((S < threshold).sum()))
        edit_dict[layer_name] = layer_weight + delta_weight
    return edit_dict


# ---------------------------------------------------------------------------
# fixtures: fixed float64 data
# ---------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# 32 eigenvalues well below 0.1 and 32 well above 0.5: thresholds 0.1 and 0.5
# both split the retained rows' directions in half, far from any eigenvalue.
SPECTRUM = torch.cat([torch.logspace(-3, -2, 32, dtype=F64), torch.linspace(1.0, 4.0, 32, dtype=F64)])


def _retained(n: int, seed: int) -> torch.Tensor:
    """``[n, D]`` rows whose second moment ``rows^T rows / n`` is exactly
    ``O diag(SPECTRUM) O^T`` for a random orthogonal ``O`` (``n >= D``)."""
    g = _gen(seed)
    columns, _ = torch.linalg.qr(torch.randn(n, D, generator=g, dtype=F64))   # orthonormal columns
    return (n ** 0.5) * columns @ torch.diag(SPECTRUM.sqrt()) @ _orthogonal(D, g).T


def _weights() -> dict[str, torch.Tensor]:
    g = _gen(11)
    shapes = {"down.attn2.to_v": (40, D), "mid.attn2.to_v": (96, D), "up.attn2.to_v": (D, D)}
    return {name: torch.randn(shape, generator=g, dtype=F64) / D ** 0.5 for name, shape in shapes.items()}


def _concepts(n_concepts: int, rows: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = _gen(seed)
    targets = [torch.randn(rows, D, generator=g, dtype=F64) for _ in range(n_concepts)]
    anchors = [torch.randn(rows, D, generator=g, dtype=F64) for _ in range(n_concepts)]
    return targets, anchors


@pytest.fixture(scope="module")
def weights():
    return _weights()


@pytest.fixture(scope="module")
def empty_rows():
    """77 rows standing in for the empty prompt's encoder output."""
    return torch.randn(77, D, generator=_gen(5), dtype=F64)


@pytest.fixture(scope="module")
def k2_rows(empty_rows):
    return invariant_rows(empty_rows, 3, seed=0)


@pytest.fixture(scope="module")
def retained_76():
    return _retained(76, seed=21)


@pytest.fixture(scope="module")
def retained_320():
    # ~half survive the per-layer filter: still more than one 128-row chunk.
    return _retained(320, seed=22)


@pytest.fixture(scope="module")
def two_concepts():
    return _concepts(2, 1, seed=31)


@pytest.fixture(scope="module")
def nudity_concept():
    return _concepts(1, 76, seed=32)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _parity(weights, targets, anchors, retained, k2_rows, *, seed, aug_num, threshold=0.1, retain_scale=1.0,
            lamb=0.0, disable_filter=False):
    """(max relative difference over the matrices, the reference's per-layer record)."""
    record = {}
    reference = _authors_edit_model(weights, targets, anchors, retained, k2_rows.T, aug_num=aug_num,
                                    threshold=threshold, retain_scale=retain_scale, lamb=lamb,
                                    disable_filter=disable_filter, generator=_gen(seed), record=record)
    steps = speed_layer_steps(weights, targets, anchors, retained, k2_rows,
                              SpeedSettings(threshold=threshold, retain_scale=retain_scale, lamb=lamb),
                              aug_num=aug_num, filter_retained=not disable_filter, generator=_gen(seed))
    assert set(steps) == set(weights)
    worst = 0.0
    eye = torch.eye(D, dtype=F64)
    for name, w in weights.items():
        delta_ref = reference[name] - w
        assert delta_ref.norm() > 1e-3 * w.norm(), f"{name}: the authors' edit is trivial, the check would be vacuous"
        worst = max(worst, _relative(w @ (steps[name].dense() - eye), delta_ref))
    for name, entry in record.items():
        # The per-layer null space is a proper, well-separated part of the space.
        assert 0 < entry["rank"] < D, (name, entry["rank"])
        assert (entry["spectrum"] - threshold).abs().min() > 1e-3 * threshold, name
    return worst, record


# ---------------------------------------------------------------------------
# the fixture is what it claims
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["retained_76", "retained_320"])
def test_retained_fixture_spectrum_straddles_threshold(request, fixture):
    values = torch.linalg.eigvalsh(second_moment(request.getfixturevalue(fixture)))
    below = int((values < 0.1).sum())
    assert 24 <= below <= 40
    assert (values - 0.1).abs().min() > 1e-3
    assert (values - 0.5).abs().min() > 1e-3


# ---------------------------------------------------------------------------
# parity with the authors' edit_model
# ---------------------------------------------------------------------------

def test_layer_steps_match_authors_defaults_two_concepts_76_retained(weights, two_concepts, retained_76, k2_rows):
    worst, _ = _parity(weights, *two_concepts, retained_76, k2_rows, seed=101, **AUTHORS)
    assert worst <= PARITY


def test_layer_steps_match_authors_defaults_two_concepts_320_retained_in_chunks(
        weights, two_concepts, retained_320, k2_rows):
    worst, record = _parity(weights, *two_concepts, retained_320, k2_rows, seed=102, **AUTHORS)
    assert worst <= PARITY
    assert all(entry["chunks"] >= 2 for entry in record.values()), "the 128-row chunking was not exercised"


def test_layer_steps_match_authors_defaults_nudity_76_rows(weights, nudity_concept, retained_76, k2_rows):
    worst, _ = _parity(weights, *nudity_concept, retained_76, k2_rows, seed=103, **AUTHORS)
    assert worst <= PARITY


def test_layer_steps_match_authors_non_default_settings(weights, two_concepts, retained_320, k2_rows):
    worst, record = _parity(weights, *two_concepts, retained_320, k2_rows, seed=104, aug_num=4, threshold=0.5,
                            retain_scale=0.3, lamb=0.01, disable_filter=True)
    assert worst <= PARITY
    assert all(entry["chunks"] == 3 for entry in record.values())   # 320 unfiltered rows


def test_layer_steps_match_authors_non_default_settings_nudity(weights, nudity_concept, retained_76, k2_rows):
    worst, _ = _parity(weights, *nudity_concept, retained_76, k2_rows, seed=105, aug_num=4, threshold=0.5,
                       retain_scale=0.3, lamb=0.01, disable_filter=True)
    assert worst <= PARITY


def test_layer_steps_depend_on_the_noise_so_parity_checks_its_order(weights, two_concepts, retained_76, k2_rows):
    one = speed_layer_steps(weights, *two_concepts, retained_76, k2_rows, generator=_gen(1))
    other = speed_layer_steps(weights, *two_concepts, retained_76, k2_rows, generator=_gen(2))
    shared = speed_layer_steps(weights, *two_concepts, retained_76, k2_rows, aug_num=0, generator=_gen(1))
    eye = torch.eye(D, dtype=F64)
    for name in weights:
        delta = one[name].dense() - eye
        assert _relative(other[name].dense() - eye, delta) > 1e3 * PARITY, name
        assert _relative(shared[name].dense() - eye, delta) > 1e3 * PARITY, name


def test_aug_num_zero_gives_the_shared_step_for_every_layer(weights, two_concepts, retained_320, k2_rows):
    targets, anchors = two_concepts
    worst, _ = _parity(weights, targets, anchors, retained_320, k2_rows, seed=106, **{**AUTHORS, "aug_num": 0})
    assert worst <= PARITY
    shared = speed_step(targets, anchors, null_space_projector(second_moment(retained_320), 0.1), k2_rows,
                        retain_scale=1.0, lamb=0.0).dense()
    steps = speed_layer_steps(weights, targets, anchors, retained_320, k2_rows, aug_num=0, generator=_gen(106))
    for name, step in steps.items():
        assert (step.dense() - shared).norm() <= PARITY * (shared - torch.eye(D, dtype=F64)).norm(), name


def test_aug_num_zero_nudity_matches_authors(weights, nudity_concept, retained_76, k2_rows):
    worst, _ = _parity(weights, *nudity_concept, retained_76, k2_rows, seed=107, **{**AUTHORS, "aug_num": 0})
    assert worst <= PARITY


# ---------------------------------------------------------------------------
# defining properties of the shared step
# ---------------------------------------------------------------------------

def _shared_step(concepts, retained, k2_rows, *, threshold=0.1, lamb=0.0):
    targets, anchors = concepts
    projector = null_space_projector(second_moment(retained), threshold)
    return speed_step(targets, anchors, projector, k2_rows, retain_scale=1.0, lamb=lamb).dense()


@pytest.mark.parametrize("concepts", ["two_concepts", "nudity_concept"])
def test_invariant_rows_keep_their_outputs_when_lamb_is_zero(request, concepts, retained_76, k2_rows):
    change = _shared_step(request.getfixturevalue(concepts), retained_76, k2_rows) - torch.eye(D, dtype=F64)
    assert change.norm() > 1e-2
    moved = (k2_rows @ change.T).norm() / (k2_rows.norm() * change.norm())
    assert moved < EXACT


@pytest.mark.parametrize("lamb", [0.01, 1.0])
def test_invariant_rows_move_when_lamb_is_positive(two_concepts, retained_76, k2_rows, lamb):
    change = _shared_step(two_concepts, retained_76, k2_rows, lamb=lamb) - torch.eye(D, dtype=F64)
    moved = (k2_rows @ change.T).norm() / (k2_rows.norm() * change.norm())
    assert moved > 1e3 * EXACT


@pytest.mark.parametrize("threshold", [0.1, 0.5])
@pytest.mark.parametrize("lamb", [0.0, 0.01])
def test_retained_directions_above_threshold_are_unchanged(two_concepts, retained_76, k2_rows, threshold, lamb):
    values, vectors = torch.linalg.eigh(second_moment(retained_76))
    kept = vectors[:, values >= threshold]                       # [d, 32]
    assert kept.shape[1] == 32
    change = _shared_step(two_concepts, retained_76, k2_rows, threshold=threshold, lamb=lamb) - torch.eye(D, dtype=F64)
    assert change.norm() > 1e-2
    assert (change @ kept).norm() / (change.norm() * kept.norm()) < EXACT
    # ... while the null-space directions are used.
    assert (change @ vectors[:, values < threshold]).norm() > 1e-2 * change.norm()


def test_kept_basis_spans_the_directions_above_threshold(retained_76, empty_rows):
    projector = null_space_projector(second_moment(retained_76), 0.1)
    space = NullSpace(projector=projector, invariants=empty_rows[:1], retained_rows=retained_76,
                      retained_texts=("",), dropped=(), settings=SpeedSettings())
    values, vectors = torch.linalg.eigh(second_moment(retained_76))
    kept = vectors[:, values >= 0.1]
    basis = space.kept_basis()
    assert space.free_dimensions == 32 and basis.shape == (32, D)
    assert torch.allclose(basis.T @ basis, kept @ kept.T, atol=EXACT)


# ---------------------------------------------------------------------------
# k-means and K2
# ---------------------------------------------------------------------------

CENTRES = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, -10.0]], dtype=F64)


def _clustered_rows() -> torch.Tensor:
    g = _gen(7)
    rows = torch.cat([centre + 1e-3 * torch.randn(25, 4, generator=g, dtype=F64) for centre in CENTRES])
    return rows[torch.randperm(rows.shape[0], generator=g)]


def test_kmeans_finds_well_separated_centres():
    found = kmeans_centres(_clustered_rows(), 3, _gen(0))
    assert found.shape == (3, 4)
    nearest = torch.cdist(CENTRES, found)
    assert sorted(nearest.argmin(dim=1).tolist()) == [0, 1, 2]   # one found centre per true one
    assert nearest.min(dim=1).values.max() < 1e-2


def test_kmeans_same_seed_gives_same_centres():
    rows = _clustered_rows()
    assert torch.equal(kmeans_centres(rows, 3, _gen(3)), kmeans_centres(rows, 3, _gen(3)))


def test_invariant_rows_are_start_token_then_centres(empty_rows):
    k2 = invariant_rows(empty_rows, 3, seed=0)
    assert k2.shape == (4, D) and k2.dtype == F64
    assert torch.equal(k2[0], empty_rows[0])
    assert torch.equal(k2[1:], kmeans_centres(empty_rows[1:], 3, _gen(0)))
    assert torch.equal(k2, invariant_rows(empty_rows, 3, seed=0))
    assert torch.equal(invariant_rows(empty_rows, 0), empty_rows[:1])


# ---------------------------------------------------------------------------
# which rows: speed_rows and null_space_of
# ---------------------------------------------------------------------------

def _text(text: str, n_words: int, seed: int) -> EncodedText:
    return EncodedText(torch.randn(77, D, generator=_gen(seed), dtype=F64), n_words, text)


def test_speed_rows_take_the_last_word_token_and_the_empty_prompts_start_token():
    concepts = [_text("cat", 1, 1), _text("a red car", 3, 2)]
    anchors = [_text("", 0, 3), _text("a vehicle", 2, 4)]
    targets, kept_anchors = speed_rows(concepts, anchors)
    assert [t.shape for t in targets] == [(1, D), (1, D)]
    assert torch.equal(targets[0], concepts[0].rows[1:2]) and torch.equal(targets[1], concepts[1].rows[3:4])
    assert torch.equal(kept_anchors[0], anchors[0].rows[0:1]) and torch.equal(kept_anchors[1], anchors[1].rows[2:3])


def test_speed_rows_take_every_row_but_the_first_when_the_only_concept_is_nudity():
    concept, anchor = _text("nudity", 1, 1), _text("", 0, 2)
    targets, anchors = speed_rows([concept], [anchor])
    assert torch.equal(targets[0], concept.rows[1:]) and torch.equal(anchors[0], anchor.rows[1:])
    assert targets[0].shape == (76, D)


def test_speed_rows_take_last_word_for_nudity_among_other_concepts():
    concepts = [_text("nudity", 1, 1), _text("cat", 1, 2)]
    anchors = [_text("", 0, 3), _text("", 0, 4)]
    targets, kept_anchors = speed_rows(concepts, anchors)
    assert torch.equal(targets[0], concepts[0].rows[1:2]) and torch.equal(kept_anchors[0], anchors[0].rows[0:1])


def test_null_space_drops_preserve_texts_naming_a_concept_as_a_whole_word():
    empty = _text("", 0, 1)
    preserves = [empty, _text("a blue circle", 3, 2), _text("circles", 1, 3), _text("a square", 2, 4),
                 _text("A Circle, drawn", 3, 5)]
    # The authors' filter, for the record: \bcircle\b on the lowered text.
    authors_kept = [p.text for p in preserves[1:] if not re.search(r"\bcircle\b", p.text.lower())]
    assert authors_kept == ["circles", "a square"]
    space = null_space_of([_text("circle", 1, 6)], preserves)
    assert space.dropped == ("a blue circle", "A Circle, drawn")
    assert space.retained_texts == tuple(authors_kept)
    rows = torch.cat([preserves[2].rows[1:2], preserves[3].rows[2:3]])
    assert torch.equal(space.retained_rows, rows)
    assert torch.allclose(space.projector, null_space_projector(second_moment(rows), 0.1), atol=EXACT)
    assert torch.equal(space.invariants, invariant_rows(empty.rows, 3, seed=0))


def test_null_space_uses_the_empty_prompts_rows_when_no_other_preserve_text_remains():
    empty = _text("", 0, 1)
    for preserves in ([empty], [empty, _text("one circle", 2, 2)]):
        space = null_space_of([_text("circle", 1, 3)], preserves)
        assert space.retained_texts == ("",)
        assert torch.equal(space.retained_rows, empty.rows[1:])
        assert torch.allclose(space.projector, null_space_projector(second_moment(empty.rows[1:]), 0.1), atol=EXACT)


def test_null_space_requires_the_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        null_space_of([_text("circle", 1, 1)], [_text("a square", 2, 2)])
