"""The benchmark's per-layer method computes the same erasure as rece_ops
(in float64 they agree to 1e-6 and better), so the speed ratio compares like with like."""
from __future__ import annotations

import torch

from benchmarks.per_layer import per_layer_rece
from rece_ops import EncodedText, RECESettings, erase, preserve_prompts, uce_erase_rows
from rece_ops.parity import relative_error


def test_per_layer_method_equals_rece_ops_in_float64():
    generator = torch.Generator().manual_seed(4)
    width = 24
    weights = {f"layer{i}": torch.randn(rows, width, generator=generator, dtype=torch.float64)
               for i, rows in enumerate((16, 32, 40))}
    table = {text: EncodedText(torch.randn(12, width, generator=generator, dtype=torch.float64), words, text)
             for text, words in (("nudity", 2), ("", 0), ("a portrait", 2))}
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return [table[t] for t in texts]

    settings = RECESettings(epochs=2, reg_scale=0.1)
    keep = preserve_prompts(["a portrait"])
    got = per_layer_rece(weights, encode, ["nudity"], "", keep, settings, dtype=torch.float64)
    expected = erase([table["nudity"]], [table[""]], [table[t] for t in keep], settings, weights=weights)
    for name, weight in expected.apply(weights).items():
        # Explicit inverses of ill-conditioned M cost a few digits even in float64.
        assert relative_error(got[name], weight) < 1e-6
    # The text encoder runs again for every layer of every step, once per concept and
    # preserve text, as in the authors' loop (plus once per epoch for the adversarial solve).
    assert len(calls) == len(weights) * (1 + len(keep)) * (1 + settings.epochs) + settings.epochs
    assert uce_erase_rows(table["nudity"], table[""])[0].shape[0] == 10
