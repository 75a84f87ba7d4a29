"""SPEED's null-space preserve mode on the erase nodes, in a real ComfyUI
(in-process, slim SD1.5): the nodes equal rece_ops, keep what SPEED promises,
and every sharing node works on the result."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import rece_ops
from devkit import host
from rece_ops import SpeedSettings
from test_nodes import rece_node, uce_node, worst_error
from test_share_nodes import export_lora, folders, load_erasure, node, save_erasure, saved_name  # noqa: F401 (fixture)

SPEED = "SPEED null space"


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


def expected_speed(glue, weights, clip, concepts, preserve=(), settings=None, speed=SpeedSettings()):
    settings = settings or rece_ops.preset("nudity").settings
    encoded = glue.text.encode_texts(clip, list(concepts))
    guides = glue.text.encode_texts(clip, [""] * len(concepts))
    preserves = glue.text.encode_texts(clip, rece_ops.preserve_prompts(preserve))
    return rece_ops.erase(encoded, guides, preserves, settings, weights=weights, speed=speed)


def output_change(weights, erased, rows) -> float:
    """``max_l |(W'_l - W_l) x| / |W_l x|`` over the rows ``x``."""
    worst = 0.0
    for key, w in weights.items():
        x = rows.to(torch.float32)
        worst = max(worst, float(((erased[key] - w) @ x.T).norm() / (w @ x.T).norm()))
    return worst


@pytest.mark.parametrize("node_name", ["RECE", "UCE"])
def test_speed_mode_on_both_erase_nodes_equals_rece_ops_with_speed(pack, glue, slim_sd15, node_name):
    model, clip, _ = slim_sd15
    run = rece_node if node_name == "RECE" else uce_node
    erased, report = run(pack, model, clip, concepts="nudity", preserve="a portrait\na landscape",
                         preserve_mode=SPEED, threshold=0.2, retain_scale=0.5)
    weights = glue.weights.effective_kv_weights(model)
    settings = rece_ops.preset("nudity").settings
    settings = settings if node_name == "RECE" else settings.with_changes(epochs=0)
    expected = expected_speed(glue, weights, clip, ["nudity"], ["a portrait", "a landscape"], settings,
                              SpeedSettings(threshold=0.2, retain_scale=0.5))
    assert worst_error(glue.weights.effective_kv_weights(erased), expected.apply(weights)) < 1e-6
    assert "preserve mode: SPEED null space" in report and "threshold 0.2, retain_scale 0.5" in report
    assert ("SPEED step + 3 RECE epochs" if node_name == "RECE" else "SPEED step only") in report
    assert report.startswith("SPEED + RECE erased 'nudity'" if node_name == "RECE" else "SPEED erased 'nudity'")
    assert "the last word of 'a portrait', 'a landscape' (2 rows)" in report


def test_paper_mode_is_the_default_and_unchanged(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    default, report = rece_node(pack, model, clip, preserve="a portrait")
    paper, _ = rece_node(pack, model, clip, preserve="a portrait", preserve_mode="paper", threshold=5.0,
                         retain_scale=3.0)
    got, want = glue.weights.effective_kv_weights(paper), glue.weights.effective_kv_weights(default)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert report.startswith("RECE erased 'nudity'") and "UCE step + 3 RECE epochs" in report
    assert "SPEED" not in report


def test_speed_keeps_the_start_token_and_the_retained_words_where_the_paper_moves_them(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    weights = glue.weights.effective_kv_weights(model)
    preserve = ["a portrait", "a landscape"]
    rows = {}
    for text in preserve:
        (encoded,) = glue.text.encode_texts(clip, [text])
        rows[text] = encoded.rows[encoded.n_words]   # SPEED retains each text's last word token
    (empty,) = glue.text.encode_texts(clip, [""])
    retained, start = torch.stack(list(rows.values())), empty.rows[:1]
    moved = {}
    for mode in ("paper", SPEED):
        erased, report = rece_node(pack, model, clip, preserve="\n".join(preserve), preserve_mode=mode)
        after = glue.weights.effective_kv_weights(erased)
        moved[mode] = (output_change(weights, after, retained), output_change(weights, after, start))
    # Float32 patches: rounding near 1e-7 of the weights.
    assert moved[SPEED][0] < 1e-5 and moved[SPEED][1] < 1e-5
    assert moved["paper"][0] > 1e-3 and moved["paper"][1] > 1e-3
    assert "retained rows" in report and re.search(r"the edit may use \d+ of 768 directions", report)


def test_every_token_mode_keeps_every_preserved_token_and_the_whole_empty_prompt(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    weights = glue.weights.effective_kv_weights(model)
    preserve = ["a portrait", "a landscape"]
    rows = []
    for text in preserve:
        (encoded,) = glue.text.encode_texts(clip, [text])
        rows.append(encoded.rows[1:encoded.n_words + 2])   # every word and the EOS
    (empty,) = glue.text.encode_texts(clip, [""])
    kept = torch.cat(rows + [empty.rows[1:]]).double()
    # What SPEED keeps exactly: the directions in which these rows' mean
    # second moment reaches the threshold (rows' small components in other
    # directions are free, by SPEED's design).
    values, vectors = torch.linalg.eigh(kept.T @ kept / kept.shape[0])
    span = vectors[:, values >= 0.1].T
    moved = {}
    for mode in (SPEED, "SPEED null space, every token kept"):
        erased, report = rece_node(pack, model, clip, preserve="\n".join(preserve), preserve_mode=mode)
        after = glue.weights.effective_kv_weights(erased)
        moved[mode] = (output_change(weights, after, span), output_change(weights, after, kept))
    assert moved["SPEED null space, every token kept"][0] < 1e-5 < 1e-3 < moved[SPEED][0]
    assert moved["SPEED null space, every token kept"][1] < moved[SPEED][1] / 2
    assert "retained rows: every token" in report
    assert "the empty prompt's rows and every token of 'a portrait', 'a landscape'" in report


def test_speed_erasure_saves_loads_exports_and_compares_like_the_papers(pack, glue, comfy_nodes, slim_sd15, folders,
                                                                         model_fingerprint):
    model, clip, _ = slim_sd15
    before = model_fingerprint(model)
    erased, _ = rece_node(pack, model, clip, concepts="nudity", preserve="a portrait", preserve_mode=SPEED)
    save_report = save_erasure(pack, erased, "speed")
    name = saved_name(save_report)
    assert ("RECE with SPEED's null space 'nudity' -> the empty prompt: threshold 0.1, retain_scale 1.0, "
            "retained rows: last word") in save_report
    with safe_open(str(folders / "rece_erasures" / name), "pt") as handle:
        (entry,) = json.loads(handle.metadata()["rece_erasure"])["erasures"]
    assert entry["preserve_mode"] == "SPEED" and entry["threshold"] == 0.1 and entry["retain_scale"] == 1.0
    assert entry["method"] == "RECE" and entry["epochs"] == 3 and entry["invariant_lamb"] == 0.0
    assert entry["retained_rows"] == "last word"

    erased_weights = glue.weights.effective_kv_weights(erased)
    loaded, _ = load_erasure(pack, model, name)
    assert worst_error(glue.weights.effective_kv_weights(loaded), erased_weights) < 1e-6

    _, lora_report = export_lora(pack, erased, prefix="rece/speed")
    lora_name = re.search(r"saved LoRA (\S+\.safetensors)", lora_report).group(1)
    with torch.inference_mode():
        (with_lora,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)
    assert worst_error(glue.weights.effective_kv_weights(with_lora), erased_weights) < 1e-6

    (compared,) = node(pack, "RECECompareKVWeights").compare(erased, model)
    assert float(re.search(r"difference (\S+) overall", compared).group(1)) > 1e-4
    assert model_fingerprint(model) == before


def test_a_threshold_that_frees_no_direction_erases_nothing_and_says_so(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    erased, report = uce_node(pack, model, clip, preserve_mode=SPEED, threshold=0.0)
    weights = glue.weights.effective_kv_weights(model)
    after = glue.weights.effective_kv_weights(erased)
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert "the edit may use 0 of 768 directions" in report and "nothing was erased" in report


@pytest.mark.parametrize("changes, message", [
    ({"preserve_mode": "SPEED", "threshold": 0.1}, "unknown preserve_mode"),
    ({"preserve_mode": SPEED, "retain_scale": 0.0}, "retain_scale must be > 0"),
    ({"preserve_mode": SPEED, "threshold": float("nan")}, "threshold must be a finite number"),
])
def test_bad_speed_settings_are_refused_and_the_model_is_unchanged(pack, slim_sd15, model_fingerprint, changes,
                                                                     message):
    model, clip, _ = slim_sd15
    before = model_fingerprint(model)
    with pytest.raises(ValueError, match=message):
        rece_node(pack, model, clip, **changes)
    assert model_fingerprint(model) == before
