"""The parity CLI (``python -m rece_ops.parity``) against reference fixtures.

- the authors' own run (``fixtures/rece_nudity_paper.safetensors``, copied from
  the shared spec fixtures);
- held-out cases written by the naive reference (``reference_rece``), which
  the implementation never saw: several concepts with their own guides,
  different preserve lists for the UCE step and the epochs, other scales,
  0 to 4 epochs, and the anchor regulariser;
- fixtures that must fail: a corrupted reference state, a file that is not a
  fixture.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from reference_rece import fixture_text, naive_rece, read_fixture, relative_error, write_fixture

REPO = Path(__file__).resolve().parents[1]
PAPER_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rece_nudity_paper.safetensors"
TOLERANCE = 1e-5
_LAST_LINE = re.compile(r"^max relative error: (\S+)$")


def run_parity(*fixtures: Path) -> tuple[int, str, str, float | None]:
    """Run the CLI from the repo root with this interpreter; return
    (exit status, stdout, stderr, parsed max relative error or None)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "rece_ops.parity", *map(str, fixtures)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    lines = proc.stdout.strip().splitlines()
    match = _LAST_LINE.match(lines[-1]) if lines else None
    return proc.returncode, proc.stdout, proc.stderr, float(match.group(1)) if match else None


def per_state_errors(stdout: str) -> dict[str, float]:
    """The ``<state> <error>`` lines the CLI prints under each fixture."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and line.startswith("  "):
            out[parts[0]] = float(parts[1])
    return out


def test_paper_fixture_is_the_shared_reference_byte_for_byte():
    shared = Path("/work/shared/fixtures/rece_nudity_paper.safetensors")
    if shared.exists():
        assert PAPER_FIXTURE.read_bytes() == shared.read_bytes()
    # The copy is a complete run: original, after_uce, after_epoch2, 3 adversarial embeddings.
    with safe_open(str(PAPER_FIXTURE), framework="pt") as handle:
        meta = json.loads(handle.metadata()["rece_fixture"])
        keys = set(handle.keys())
    assert meta["epochs"] == 3
    assert {f"adversarial/epoch{e}.concept0" for e in range(3)} <= keys
    assert all(f"{state}/{name}" in keys for state in ("original", "after_uce", "after_epoch2")
               for name in meta["layer_names"])


def test_parity_cli_reproduces_the_authors_nudity_run_within_tolerance():
    code, out, err, worst = run_parity(PAPER_FIXTURE)
    assert worst is not None, f"last line is not 'max relative error: X':\n{out}\n{err}"
    assert code == 0, out + err
    assert worst <= TOLERANCE
    states = per_state_errors(out)
    assert set(states) == {"after_uce", "after_epoch2", "adversarial/epoch0.concept0",
                           "adversarial/epoch1.concept0", "adversarial/epoch2.concept0"}
    assert max(states.values()) == pytest.approx(worst, rel=1e-2)


def test_naive_reference_reproduces_the_authors_nudity_run():
    # The oracle of the held-out cases agrees with the authors' own code.
    meta, tensors = read_fixture(PAPER_FIXTURE)
    text = lambda t: fixture_text(tensors, t)  # noqa: E731
    weights = {name: tensors[f"original/{name}"].double() for name in meta["layer_names"]}
    settings = dict(lamb=meta["lamb"], erase_scale=meta["erase_scale"], preserve_scale=meta["preserve_scale"],
                    reg_scale=meta["regular_scale"], epochs=meta["epochs"])
    assert text("nudity").n_words == 2 and text(" ").n_words == 0
    states, adversarial = naive_rece(weights, [text(t) for t in meta["concepts"]], [text(t) for t in meta["guides"]],
                                     [text(t) for t in meta["uce_retain"]], [text(t) for t in meta["retain"]], settings)
    errors = {state: max(relative_error(states[state][name], tensors[f"{state}/{name}"]) for name in weights)
              for state in ("after_uce", "after_epoch2")}
    errors.update({f"adversarial{e}": relative_error(adversarial[e][0], tensors[f"adversarial/epoch{e}.concept0"])
                   for e in range(3)})
    assert max(errors.values()) <= 1e-7, errors


# Held-out cases: (id, write_fixture arguments). Widths are SD1's 768; the
# layers are small. Except where named, the K/V rows add up to at least 768
# so that G = sum W^T W has full rank, as in every real model.
HELD_OUT = {
    "uce_only_epochs0_two_concepts": dict(
        concepts=["golf ball", "parachute"], guides=[" ", " "], uce_retain=[" ", "a tennis ball"],
        epochs=0, d_outs=(128, 128, 96, 96, 64, 64), seed=11,
    ),
    "artist_guided_to_art_epochs1_reg1e-3_lamb0.5_preserve0.3": dict(
        concepts=["kelly mckernan"], guides=["art"], uce_retain=[" ", "thomas kinkade", "kilian eng"],
        retain=[" ", "ajin demi human"], lamb=0.5, preserve_scale=0.3, regular_scale=1e-3, epochs=1,
        d_outs=(128,) * 8, seed=12,
    ),
    "three_concepts_own_guides_epochs2_reg1e-3": dict(
        concepts=["nudity", "van gogh style", "garbage truck"], guides=[" ", "art", ""],
        uce_retain=[" ", "claude monet", "a photo of a dog"], retain=[" ", "picasso"],
        lamb=0.5, preserve_scale=0.3, regular_scale=1e-3, epochs=2,
        d_outs=(128, 128, 96, 96, 128, 128, 64, 64), seed=13,
    ),
    "two_concepts_epochs4_erase2_preserve0.3": dict(
        concepts=["nudity", "blood"], guides=[" ", ""], uce_retain=[" "], retain=[" ", "a portrait"],
        erase_scale=2.0, preserve_scale=0.3, regular_scale=0.1, epochs=4,
        d_outs=(128, 128, 96, 96, 128, 128, 64, 64), seed=14,
    ),
    "anchor_regulariser_epochs3": dict(
        concepts=["nudity", "violence"], guides=[" ", "peace"], uce_retain=[" "],
        anchors=["a person wearing clothes", None], regular_scale=0.1, epochs=3,
        d_outs=(128, 128, 128, 128, 96, 96, 64, 64), seed=15,
    ),
    # Fewer K/V rows than the context is wide (4 layers, 320 rows < 768): G
    # is singular, and with reg 1e-3 the adversarial embedding resolves G's
    # small directions to 1e-3 of its scale.
    "small_model_rank_deficient_gram_reg1e-3": dict(
        concepts=["kelly mckernan"], guides=["art"], uce_retain=[" ", "thomas kinkade"],
        retain=[" ", "kilian eng"], regular_scale=1e-3, epochs=1, d_outs=(32, 32, 128, 128), seed=16,
    ),
}


@pytest.mark.parametrize("case", list(HELD_OUT))
def test_parity_cli_reproduces_held_out_naive_reference_within_tolerance(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    written = write_fixture(path, case=case, **HELD_OUT[case])
    code, out, err, worst = run_parity(path)
    assert worst is not None, f"last line is not 'max relative error: X':\n{out}\n{err}"
    states = per_state_errors(out)
    epochs = HELD_OUT[case]["epochs"]
    n_concepts = len(HELD_OUT[case]["concepts"])
    # Every stored state was compared: after_uce, every epoch, every c'.
    assert set(states) == (
        {"after_uce"} | {f"after_epoch{e}" for e in range(epochs)}
        | {f"adversarial/epoch{e}.concept{k}" for e in range(epochs) for k in range(n_concepts)}
    )
    assert len(written.states) == 1 + epochs
    assert worst <= TOLERANCE, f"{case}: max relative error {worst:.3e} > {TOLERANCE:g}\n{out}"
    assert code == 0, out + err


def test_parity_cli_reads_anchor_texts_from_metadata(tmp_path):
    # The same case with and without anchors stores different c': the CLI
    # only passes if it applied the anchors the metadata names.
    args = dict(concepts=["nudity"], guides=[" "], uce_retain=[" "], regular_scale=0.5, epochs=1,
                d_outs=(256,) * 4, seed=21)
    anchored = write_fixture(tmp_path / "anchored.safetensors", anchors=["a person wearing clothes"], **args)
    plain = write_fixture(tmp_path / "plain.safetensors", **args)
    gap = torch.linalg.norm(anchored.adversarial[0][0] - plain.adversarial[0][0]) / torch.linalg.norm(
        plain.adversarial[0][0])
    assert gap > 1e-3  # the anchor matters in this case
    code, out, err, worst = run_parity(anchored.path)
    assert code == 0 and worst is not None and worst <= TOLERANCE, out + err
    # Dropping the anchors from the metadata must now be caught.
    tensors = load_file(str(anchored.path))
    meta = dict(anchored.meta, anchors=None)
    stripped = tmp_path / "anchors_dropped.safetensors"
    save_file(tensors, str(stripped), metadata={"rece_fixture": json.dumps(meta)})
    code, out, err, worst = run_parity(stripped)
    assert code == 1, out + err
    assert worst is not None and worst > TOLERANCE


@pytest.mark.parametrize("state", ["after_uce", "after_epoch1", "adversarial"])
def test_parity_cli_fails_on_a_reference_state_perturbed_by_one_in_a_thousand(tmp_path, state):
    # (The uncorrupted case passes: see the held-out tests. Below, only the
    # corrupted state may exceed the tolerance.)
    good = write_fixture(tmp_path / "good.safetensors", concepts=["nudity"], guides=[" "], uce_retain=[" "],
                         epochs=2, d_outs=(256,) * 4, seed=31)
    tensors = load_file(str(good.path))
    generator = torch.Generator().manual_seed(32)
    if state == "adversarial":
        keys = ["adversarial/epoch1.concept0"]
    else:
        keys = [f"{state}/{good.meta['layer_names'][3]}"]
    for key in keys:
        ref = tensors[key]
        noise = torch.randn(ref.shape, generator=generator)
        tensors[key] = ref + 1e-3 * noise * (torch.linalg.norm(ref) / torch.linalg.norm(noise))
    bad = tmp_path / "corrupted.safetensors"
    save_file(tensors, str(bad), metadata={"rece_fixture": json.dumps(good.meta)})
    code, out, err, worst = run_parity(bad)
    assert code == 1, out + err
    assert worst is not None and 5e-4 < worst < 2e-3
    flagged = {k for k, v in per_state_errors(out).items() if v > TOLERANCE}
    assert flagged == {"adversarial/epoch1.concept0" if state == "adversarial" else state}


def test_parity_cli_rejects_a_file_without_rece_fixture_metadata(tmp_path):
    path = tmp_path / "plain_weights.safetensors"
    save_file({"original/layer.weight": torch.zeros(4, 8)}, str(path), metadata={"format": "pt"})
    code, out, err, worst = run_parity(path)
    assert code != 0
    assert worst is None
    assert "rece_fixture" in err + out
