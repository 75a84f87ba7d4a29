"""A naive RECE reference, written straight from the equations (the test oracle).

Nothing here imports ``rece_ops``: this module is the independent side of the
comparison. It follows the RECE spec (``rece-spec.md``) the way the authors'
code does, not the way the fast implementation does:

- every layer is edited on its own, from its *current* weights, with the
  sums over rows accumulated one outer product at a time;
- the normal equations are solved with an explicit ``torch.inverse`` in
  float64, mirroring the authors' ``mat1 @ torch.inverse(mat2)`` (allowed
  here only: this is the oracle);
- the adversarial embedding is recomputed from the edited and original
  weights of every layer, one row at a time.

It also writes reference fixtures in the spec's format (``write_fixture``),
from random weights and embeddings drawn with a seeded ``torch.Generator``.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import save_file

F64 = torch.float64
CLIP_BOS = 49406
CLIP_EOS = 49407


# --------------------------------------------------------------------------
# Texts as rows
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class RefText:
    """A text as the reference sees it: rows (one per token, BOS first) and the
    number of word tokens between BOS and the first EOS. ``rece_ops.EncodedText``
    has the same two attributes and can be passed wherever a ``RefText`` is."""

    rows: torch.Tensor
    n_words: int
    text: str = ""
    token_ids: torch.Tensor | None = field(default=None, compare=False)


def fake_token_ids(text: str, n_tokens: int = 77) -> torch.Tensor:
    """CLIP-shaped token ids: BOS, one id per whitespace-separated word, EOS,
    then EOS as padding (``''`` and ``' '`` give the same ids)."""
    words = text.split()
    if len(words) > n_tokens - 2:
        raise ValueError(f"{text!r} has {len(words)} words, more than {n_tokens - 2} fit")
    ids = [CLIP_BOS] + [1000 + zlib.crc32(w.encode()) % 48000 for w in words]
    ids += [CLIP_EOS] * (n_tokens - len(ids))
    return torch.tensor(ids, dtype=torch.int64)


def random_embedding(
    text: str, n_tokens: int, width: int, generator: torch.Generator, bos_row: torch.Tensor, pad_row: torch.Tensor
) -> RefText:
    """A CLIP-like encoder output for ``text``: the BOS row is shared by every
    text (CLIP's causal mask makes it so), word rows are random, and the EOS
    and padding rows are near copies of one text-dependent row (so erase and
    preserve rows are strongly correlated and ``M`` is badly conditioned,
    as with a real encoder)."""
    ids = fake_token_ids(text, n_tokens)
    n_words = len(text.split())
    rows = torch.empty(n_tokens, width, dtype=F64)
    rows[0] = bos_row
    if n_words:
        rows[1:1 + n_words] = torch.randn(n_words, width, generator=generator, dtype=F64)
    eos = 0.6 * pad_row + 0.8 * torch.randn(width, generator=generator, dtype=F64)
    tail = n_tokens - 1 - n_words
    rows[1 + n_words:] = eos + 0.05 * torch.randn(tail, width, generator=generator, dtype=F64)
    return RefText(rows.float().double(), n_words, text, ids)


def random_texts(
    texts: Sequence[str], n_tokens: int, width: int, generator: torch.Generator
) -> dict[str, RefText]:
    """One embedding per distinct text; blank texts (``''``, ``' '``) share one."""
    bos_row = 3.0 * torch.randn(width, generator=generator, dtype=F64)
    pad_row = torch.randn(width, generator=generator, dtype=F64)
    out: dict[str, RefText] = {}
    blank: RefText | None = None
    for text in texts:
        if text in out:
            continue
        if not text.strip():
            if blank is None:
                blank = random_embedding("", n_tokens, width, generator, bos_row, pad_row)
            out[text] = RefText(blank.rows, 0, text, blank.token_ids)
        else:
            out[text] = random_embedding(text, n_tokens, width, generator, bos_row, pad_row)
    return out


def random_weights(
    d_outs: Sequence[int], width: int, generator: torch.Generator, names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """K/V matrices ``[d_out, width]`` with entries ~ N(0, 1/width), rounded to
    float32 (stored as float64 so that both sides read the same numbers)."""
    names = list(names) if names is not None else layer_names(len(d_outs))
    return {
        name: (torch.randn(d_out, width, generator=generator, dtype=F64) / width ** 0.5).float().double()
        for name, d_out in zip(names, d_outs)
    }


def layer_names(count: int) -> list[str]:
    """Diffusers-style K/V names, key and value alternating."""
    names = []
    for i in range(count):
        block, kind = divmod(i, 2)
        names.append(f"down_blocks.{block}.attentions.0.transformer_blocks.0.attn2.to_{'kv'[kind]}.weight")
    return names


@dataclass
class Problem:
    """A random RECE problem: weights (float64 holding float32 values) and texts."""

    weights: dict[str, torch.Tensor]
    concepts: list[RefText]
    guides: list[RefText]
    preserves: list[RefText]
    epoch_preserves: list[RefText]
    anchors: list[RefText | None] | None


def _words(prefix: str, count: int) -> str:
    return " ".join(f"{prefix}w{m}" for m in range(count))


def random_problem(
    seed: int,
    *,
    width: int,
    n_tokens: int,
    d_outs: Sequence[int],
    concept_words: Sequence[int],
    guide_words: Sequence[int],
    preserve_words: Sequence[int] = (),
    epoch_preserve_words: Sequence[int] | None = None,
    anchor_words: Sequence[int | None] | None = None,
) -> Problem:
    """Seeded random weights and texts with the given word counts.

    Concept ``k`` has ``concept_words[k]`` (>= 1) words, its guide
    ``guide_words[k]`` (0 is the empty prompt). Preserves are the empty prompt
    followed by one text per entry of ``preserve_words`` (as
    ``rece_ops.preserve_prompts`` builds them); ``epoch_preserve_words=None``
    reuses the UCE step's preserves. ``anchor_words[k]`` None means no anchor
    for concept ``k``.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = random_weights(d_outs, width, generator)
    concept_texts = [_words(f"concept{k}", n) for k, n in enumerate(concept_words)]
    guide_texts = [_words(f"guide{k}", n) or " " for k, n in enumerate(guide_words)]
    preserve_texts = [" "] + [_words(f"keep{k}", n) for k, n in enumerate(preserve_words)]
    epoch_texts = (None if epoch_preserve_words is None
                   else [" "] + [_words(f"epochkeep{k}", n) for k, n in enumerate(epoch_preserve_words)])
    anchor_texts = (None if anchor_words is None
                    else [None if n is None else _words(f"anchor{k}", n) for k, n in enumerate(anchor_words)])
    if any(n < 1 for n in concept_words):
        raise ValueError("a concept needs at least one word")
    used = concept_texts + guide_texts + preserve_texts + (epoch_texts or []) + [
        a for a in anchor_texts or () if a is not None]
    texts = random_texts(used, n_tokens, width, generator)
    return Problem(
        weights=weights,
        concepts=[texts[t] for t in concept_texts],
        guides=[texts[t] for t in guide_texts],
        preserves=[texts[t] for t in preserve_texts],
        epoch_preserves=[texts[t] for t in (epoch_texts if epoch_texts is not None else preserve_texts)],
        anchors=None if anchor_texts is None else [None if a is None else texts[a] for a in anchor_texts],
    )


# --------------------------------------------------------------------------
# The equations, naively
# --------------------------------------------------------------------------

def _rows(rows) -> list[torch.Tensor]:
    """A ``[n, d]`` tensor or a sequence of ``[d]`` rows as a list of float64 rows."""
    if rows is None:
        return []
    return [r.to(F64) for r in rows]


def naive_uce_layer(
    W: torch.Tensor,
    erase_rows,
    target_rows,
    preserve_rows,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """One UCE edit of one matrix (RECE Eq. 3), the authors' way:

        mat1 = lamb*W + e*sum_r (W t_r) c_r^T + p*sum_s (W p_s) p_s^T
        mat2 = lamb*I + e*sum_r c_r c_r^T     + p*sum_s p_s p_s^T
        W_new = mat1 @ inv(mat2)

    with every outer product accumulated one row at a time, in float64.
    """
    W = W.to(F64)
    width = W.shape[1]
    mat1 = lamb * W.clone()
    mat2 = lamb * torch.eye(width, dtype=F64)
    erase = _rows(erase_rows)
    target = _rows(target_rows)
    if len(erase) != len(target):
        raise ValueError(f"{len(erase)} erase rows but {len(target)} target rows")
    for c, t in zip(erase, target):
        mat1.addr_(W @ t, c, alpha=erase_scale)
        mat2.addr_(c, c, alpha=erase_scale)
    for p in _rows(preserve_rows):
        mat1.addr_(W @ p, p, alpha=preserve_scale)
        mat2.addr_(p, p, alpha=preserve_scale)
    return mat1 @ torch.inverse(mat2)


def naive_adversarial(
    edited: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    concept_rows,
    reg: float,
    anchor=None,
) -> torch.Tensor:
    """RECE's closed-form adversarial embedding, from the weights themselves:

        c'_r = inv(reg*I + sum_l W'_l^T W'_l) @ (sum_l W'_l^T W_l c_r + reg*a_r)

    one row at a time (``a = 0`` unless ``anchor`` rows are given).
    """
    edited = [w.to(F64) for w in edited]
    original = [w.to(F64) for w in original]
    if len(edited) != len(original):
        raise ValueError("edited and original weights must pair up")
    width = edited[0].shape[1]
    hess = reg * torch.eye(width, dtype=F64)
    for w in edited:
        hess = hess + w.T @ w
    inverse = torch.inverse(hess)
    anchors = _rows(anchor) if anchor is not None else None
    out = []
    for r, c in enumerate(_rows(concept_rows)):
        rhs = torch.zeros(width, dtype=F64)
        for w_new, w_old in zip(edited, original):
            rhs += w_new.T @ (w_old @ c)
        if anchors is not None:
            rhs += reg * anchors[r]
        out.append(inverse @ rhs)
    return torch.stack(out)


def uce_pairs(concept, guide) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The UCE step's erase pairs of one concept, per the spec: concept rows
    ``i .. L-1-(f-i)`` against guide rows ``j .. L-1-(f-j)``, ``f = max(i, j)``."""
    length = concept.rows.shape[0]
    i, j = concept.n_words, guide.n_words
    f = max(i, j)
    erase = [concept.rows[r] for r in range(i, length - (f - i))]
    target = [guide.rows[r] for r in range(j, length - (f - j))]
    assert len(erase) == len(target) == length - f
    return erase, target


def _setting(settings, name: str):
    if isinstance(settings, Mapping):
        return settings[name]
    return getattr(settings, name)


def naive_rece(
    weights: Mapping[str, torch.Tensor],
    concepts: Sequence,
    guides: Sequence,
    uce_preserves: Sequence,
    epoch_preserves: Sequence | None,
    settings,
    anchors: Sequence | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[list[torch.Tensor]]]:
    """The whole RECE loop, layer by layer.

    Texts are anything with ``rows`` and ``n_words`` (``RefText`` or
    ``rece_ops.EncodedText``); ``settings`` anything with (or a mapping of)
    ``lamb``, ``erase_scale``, ``preserve_scale``, ``reg_scale``, ``epochs``.
    ``epoch_preserves=None`` reuses ``uce_preserves``.

    Returns ``(states, adversarial)``: ``states["after_uce"]`` and
    ``states[f"after_epoch{e}"]`` map every layer name to its float64 weights;
    ``adversarial[e][k]`` is concept ``k``'s ``c'`` of epoch ``e``.
    """
    lamb = float(_setting(settings, "lamb"))
    erase_scale = float(_setting(settings, "erase_scale"))
    preserve_scale = float(_setting(settings, "preserve_scale"))
    reg = float(_setting(settings, "reg_scale"))
    epochs = int(_setting(settings, "epochs"))
    if epoch_preserves is None:
        epoch_preserves = uce_preserves
    original = {name: w.to(F64) for name, w in weights.items()}
    names = list(original)

    def edit(current, erase, target, keep):
        return {
            name: naive_uce_layer(current[name], erase, target, keep, lamb, erase_scale, preserve_scale)
            for name in names
        }

    # 1. UCE step: word-aligned rows of every concept against its guide.
    erase, target = [], []
    for concept, guide in zip(concepts, guides, strict=True):
        e_rows, t_rows = uce_pairs(concept, guide)
        erase += e_rows
        target += t_rows
    keep = [row for text in uce_preserves for row in _rows(text.rows)]
    current = edit(original, erase, target, keep)
    states = {"after_uce": current}

    # 2. Epochs: every concept's c' from the current weights, then one edit.
    keep = [row for text in epoch_preserves for row in _rows(text.rows)]
    adversarial: list[list[torch.Tensor]] = []
    for epoch in range(epochs):
        found = []
        for k, concept in enumerate(concepts):
            anchor = None if anchors is None or anchors[k] is None else anchors[k].rows
            found.append(naive_adversarial(
                [current[n] for n in names], [original[n] for n in names], concept.rows, reg, anchor
            ))
        adversarial.append(found)
        erase = [row for c_new in found for row in c_new]
        target = [row for guide in guides for row in _rows(guide.rows)]
        current = edit(current, erase, target, keep)
        states[f"after_epoch{epoch}"] = current
    return states, adversarial


# --------------------------------------------------------------------------
# Fixtures in the spec's format
# --------------------------------------------------------------------------

@dataclass
class FixtureCase:
    """What ``write_fixture`` wrote: the inputs as the reference used them and
    the reference's results (float64)."""

    path: Path
    meta: dict
    weights: dict[str, torch.Tensor]
    texts: dict[str, RefText]
    states: dict[str, dict[str, torch.Tensor]]
    adversarial: list[list[torch.Tensor]]


def write_fixture(
    path: str | Path,
    *,
    concepts: Sequence[str],
    guides: Sequence[str] | None = None,
    uce_retain: Sequence[str] = (" ",),
    retain: Sequence[str] | None = None,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    regular_scale: float = 0.1,
    epochs: int = 3,
    anchors: Sequence[str | None] | None = None,
    d_outs: Sequence[int] = (64, 64, 128, 128),
    width: int = 768,
    n_tokens: int = 77,
    seed: int = 0,
    case: str = "heldout",
) -> FixtureCase:
    """Draw random weights and embeddings (seeded), run ``naive_rece`` and
    write a fixture in the spec's format:

    ``original/<layer>``, ``after_uce/<layer>``, ``after_epoch<e>/<layer>``
    for every epoch ``e``, ``adversarial/epoch<e>.concept<k>``,
    ``text/<repr>/embedding`` and ``text/<repr>/token_ids`` for every text
    used, and the ``rece_fixture`` JSON metadata (concepts, guides,
    uce_retain, retain, lamb, erase_scale, preserve_scale, regular_scale,
    epochs, layer_names, anchors). Tensors are float32, ids int64.

    A text's word count is its number of whitespace-separated words.
    """
    path = Path(path)
    guides = list(guides) if guides is not None else [" "] * len(concepts)
    retain = list(retain) if retain is not None else list(uce_retain)
    generator = torch.Generator().manual_seed(seed)
    names = layer_names(len(d_outs))
    weights = random_weights(d_outs, width, generator, names)
    used = list(concepts) + guides + list(uce_retain) + retain + [a for a in anchors or () if a is not None]
    texts = random_texts(used, n_tokens, width, generator)
    settings = dict(lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
                    reg_scale=regular_scale, epochs=epochs)
    states, adversarial = naive_rece(
        weights,
        [texts[t] for t in concepts],
        [texts[t] for t in guides],
        [texts[t] for t in uce_retain],
        [texts[t] for t in retain],
        settings,
        anchors=None if anchors is None else [None if a is None else texts[a] for a in anchors],
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        tensors[f"original/{name}"] = w.float().contiguous()
    for state, layers in states.items():
        for name, w in layers.items():
            tensors[f"{state}/{name}"] = w.float().contiguous()
    for epoch, found in enumerate(adversarial):
        for k, rows in enumerate(found):
            tensors[f"adversarial/epoch{epoch}.concept{k}"] = rows.float().contiguous()
    for text, encoded in texts.items():
        tensors[f"text/{text!r}/embedding"] = encoded.rows.float().contiguous()
        tensors[f"text/{text!r}/token_ids"] = encoded.token_ids.clone()
    meta = dict(
        case=case, concepts=list(concepts), guides=guides, uce_retain=list(uce_retain), retain=retain,
        lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale, regular_scale=regular_scale,
        epochs=epochs, layer_names=names, anchors=None if anchors is None else list(anchors), seed=seed,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"rece_fixture": json.dumps(meta)})
    return FixtureCase(path, meta, weights, texts, states, adversarial)


def read_fixture(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a fixture file, without ``rece_ops``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["rece_fixture"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return meta, tensors


def fixture_text(tensors: Mapping[str, torch.Tensor], text: str) -> RefText:
    """A stored text as a ``RefText`` (word count from its token ids; ``''``
    and ``' '`` stand for each other, as they tokenize identically)."""
    candidates = [text] + ([" ", ""] if not text.strip() else [])
    for candidate in candidates:
        key = f"text/{candidate!r}"
        if f"{key}/embedding" in tensors:
            ids = [int(i) for i in tensors[f"{key}/token_ids"]]
            return RefText(tensors[f"{key}/embedding"].to(F64), ids.index(CLIP_EOS, 1) - 1, text)
    raise KeyError(f"no stored embedding for {text!r}")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``|ours - ref|_F / |ref|_F`` in float64."""
    ref = reference.to(F64)
    return float(torch.linalg.norm(ours.to(F64) - ref) / torch.linalg.norm(ref))
