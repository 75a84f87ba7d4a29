"""Erasure files, LoRA factors, fingerprints and safe tensor files (rece_ops, no ComfyUI)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rece_ops import RECESettings, metrics, chain, describe, kv_fingerprint, load_erasure_file, save_erasure_file
from rece_ops.erasure_file import DOWN_KEY, METADATA_KEY, UP_KEY
from rece_ops.fingerprint import fingerprint_difference, fingerprints_match
from rece_ops.lora_export import lora_factors, lora_state_dict
from rece_ops.parity import relative_error
from rece_ops.tensor_files import read_tensors, write_new_safetensors
from reference_rece import random_problem
from test_rece_math import run_fast

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    return random_problem(5, width=48, n_tokens=9, d_outs=(40, 64, 80), concept_words=(2,), guide_words=(0,),
                          preserve_words=(1,))


@pytest.fixture(scope="module")
def erasure(problem):
    return run_fast(problem, RECESettings(reg_scale=0.1, epochs=2))


def weights32(problem):
    return {k: w.float() for k, w in problem.weights.items()}


def save(path, erasure, weights, **overrides):
    options = dict(erasures=[describe(erasure, "RECE", 1.0)], fingerprint=kv_fingerprint(weights), family="SD15",
                   matrices=len(weights), pack_version="test")
    options.update(overrides)
    return save_erasure_file(path, erasure, **options)


def test_chain_applies_each_erasure_after_the_previous_at_its_strength(problem, erasure):
    other = run_fast(random_problem(6, width=48, n_tokens=9, d_outs=(40,), concept_words=(1,), guide_words=(1,)),
                     RECESettings(reg_scale=0.1, epochs=1))
    eye = torch.eye(48, dtype=F64)
    first = eye + 0.5 * (erasure.transform - eye)
    second = eye + 2.0 * (other.transform - eye)
    assert relative_error(chain([erasure, other], [0.5, 2.0]).transform, first @ second) <= 1e-12
    with pytest.raises(ValueError, match="nothing to chain"):
        chain([])


def test_erasure_file_round_trip_keeps_the_edit_and_its_description(tmp_path, problem, erasure):
    weights = weights32(problem)
    path = save(tmp_path / "e.safetensors", erasure, weights)
    loaded = load_erasure_file(path)
    assert relative_error(loaded.erasure.edit, erasure.edit) <= 1e-6
    applied = loaded.erasure.apply(weights)
    for name, expected in erasure.apply(weights).items():
        assert relative_error(applied[name], expected) <= 1e-6
    info = loaded.info
    assert info["context_width"] == 48 and info["rank"] == erasure.rank() and info["matrices"] == 3
    assert info["erasures"][0]["epochs"] == 2 and info["erasures"][0]["concepts"] == list(erasure.concepts)
    assert fingerprints_match(loaded.fingerprint, kv_fingerprint(weights))
    # Plain safetensors reads it: two float32 factors and JSON metadata.
    with safe_open(str(path), "pt") as handle:
        assert set(handle.keys()) == {UP_KEY, DOWN_KEY}
        assert handle.get_tensor(UP_KEY).dtype == torch.float32
        assert json.loads(handle.metadata()[METADATA_KEY])["format"] == "rece-erasure"


def test_saving_never_replaces_a_file_and_leaves_no_partial_file(tmp_path, problem, erasure):
    path = save(tmp_path / "e.safetensors", erasure, weights32(problem))
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save(path, erasure.scaled(0.5), weights32(problem))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["e.safetensors"]


DAMAGED_INFO = {  # hand-edited metadata with values of the wrong JSON type
    "null_rank": lambda info: dict(info, rank=None),
    "text_width": lambda info: dict(info, context_width="768"),
    "erasures_not_a_list": lambda info: dict(info, erasures={"concepts": ["nudity"]}),
    "entry_not_a_dict": lambda info: dict(info, erasures=["nudity"]),
    "concepts_not_texts": lambda info: dict(info, erasures=[dict(info["erasures"][0], concepts=[1, 2])]),
    "strength_not_a_number": lambda info: dict(info, erasures=[dict(info["erasures"][0], strength="full")]),
}


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, message", [
    ("not_tensors", "neither a safetensors file nor a PyTorch state dict"),
    ("no_metadata", "not an erasure file"),
    ("kv_weights", "load it as published UCE/RECE weights"),
    ("bad_json", "not valid JSON"),
    ("lacks_keys", "lacks .*fingerprint"),
    ("newer_format", "update the pack"),
    ("wrong_shape", "do not match its metadata"),
    ("nan", "NaN"),
    ("null_rank", "invalid rank"),
    ("text_width", "invalid context_width"),
    ("erasures_not_a_list", "invalid erasures"),
    ("entry_not_a_dict", "invalid erasures"),
    ("concepts_not_texts", "invalid erasures"),
    ("strength_not_a_number", "invalid erasures"),
])
def test_damaged_or_foreign_files_are_refused_with_the_reason(tmp_path, problem, erasure, case, message):
    good = save(tmp_path / "good.safetensors", erasure, weights32(problem))
    tensors, metadata = read_tensors(good)
    info = json.loads(metadata[METADATA_KEY])
    path = tmp_path / "bad.safetensors"
    if case == "not_tensors":
        path.write_bytes(b"this is a text file, not tensors\n" * 20)
    elif case == "no_metadata":
        _write(path, tensors)
    elif case == "kv_weights":
        _write(path, {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 4)})
    elif case == "bad_json":
        _write(path, tensors, {METADATA_KEY: "{not json"})
    elif case == "lacks_keys":
        _write(path, tensors, {METADATA_KEY: json.dumps({k: v for k, v in info.items() if k != "fingerprint"})})
    elif case == "newer_format":
        _write(path, tensors, {METADATA_KEY: json.dumps(dict(info, format_version=99))})
    elif case == "wrong_shape":
        _write(path, {UP_KEY: tensors[UP_KEY][:-1], DOWN_KEY: tensors[DOWN_KEY]}, metadata)
    elif case in DAMAGED_INFO:
        _write(path, tensors, {METADATA_KEY: json.dumps(DAMAGED_INFO[case](info))})
    elif case == "nan":
        up = tensors[UP_KEY].clone()
        up[0, 0] = float("nan")
        _write(path, {UP_KEY: up, DOWN_KEY: tensors[DOWN_KEY]}, metadata)
    with pytest.raises(ValueError, match=message):
        load_erasure_file(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_pickled_files_are_read_only_as_plain_tensors_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested.pt")
    tensors, metadata = read_tensors(tmp_path / "nested.pt")
    assert list(tensors) == ["w"] and metadata == {}
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"w": _RunsCode()}, handle, protocol=2)
    with pytest.raises(ValueError, match="not unpickled"):
        read_tensors(tmp_path / "evil.pt")
    assert not (tmp_path / "should-never-exist").exists()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="not unpickled"):
        read_tensors(tmp_path / "module.pt")


def test_write_new_safetensors_refuses_an_existing_name(tmp_path):
    path = write_new_safetensors(tmp_path / "sub" / "a.safetensors", {"x": torch.ones(3)}, {"k": "v"})
    assert read_tensors(path)[1] == {"k": "v"}
    with pytest.raises(FileExistsError):
        write_new_safetensors(path, {"x": torch.zeros(3)})
    assert torch.equal(read_tensors(path)[0]["x"], torch.ones(3))


def test_fingerprint_tolerates_rounding_but_not_a_changed_weight(problem):
    weights = weights32(problem)
    halved = {k: w.half().float() for k, w in weights.items()}
    assert fingerprints_match(kv_fingerprint(weights), kv_fingerprint(halved))
    changed = dict(weights)
    name = sorted(weights)[1]
    changed[name] = weights[name] * 1.001
    assert not fingerprints_match(kv_fingerprint(weights), kv_fingerprint(changed))
    fewer = dict(list(weights.items())[:2])
    assert fingerprint_difference(kv_fingerprint(weights), kv_fingerprint(fewer)) == float("inf")


def test_lora_at_the_exact_rank_reproduces_every_patch(problem, erasure):
    weights = weights32(problem)
    factors = lora_factors(weights, erasure)
    assert factors.rank == erasure.rank()
    for name, delta in erasure.deltas(weights).items():
        up, down = factors.layers[name]
        assert relative_error(up @ down, delta) <= 1e-5
    assert factors.relative_error <= 1e-5
    assert lora_factors(weights, erasure, rank=10_000).rank == erasure.rank()


@pytest.mark.parametrize("rank", [1, 5])
def test_capped_lora_reports_the_error_it_has(problem, erasure, rank):
    weights = weights32(problem)
    factors = lora_factors(weights, erasure, rank=rank)
    assert factors.rank == rank
    deltas = erasure.deltas(weights)
    miss = sum(float((deltas[k] - up @ down).norm()) ** 2 for k, (up, down) in factors.layers.items())
    total = sum(float(d.norm()) ** 2 for d in deltas.values())
    assert factors.relative_error == pytest.approx((miss / total) ** 0.5, rel=1e-4)
    assert 0 < factors.relative_error < 1
    assert factors.worst_relative_error >= factors.relative_error - 1e-12


def test_lora_state_dict_uses_kohya_names_and_alpha_equal_to_rank(problem, erasure):
    weights = weights32(problem)
    factors = lora_factors(weights, erasure, rank=3, dtype=torch.float16)
    tensors = lora_state_dict(factors, {k: f"lora_unet_{i}" for i, k in enumerate(sorted(weights))})
    assert len(tensors) == 3 * len(weights)
    assert tensors["lora_unet_0.lora_up.weight"].shape == (weights[sorted(weights)[0]].shape[0], 3)
    assert tensors["lora_unet_0.lora_down.weight"].dtype == torch.float16
    assert float(tensors["lora_unet_2.alpha"]) == 3.0


def test_lora_of_an_erasure_that_changes_nothing_is_refused(problem):
    weights = weights32(problem)
    nothing = run_fast(problem, RECESettings(erase_scale=0.0, epochs=0))
    with pytest.raises(ValueError, match="changes nothing"):
        lora_factors(weights, nothing)


def test_unexplained_change_is_zero_for_an_erasure_and_large_for_other_weights(problem, erasure):
    weights = weights32(problem)
    assert metrics.unexplained_change(weights, erasure.apply(weights)) < 1e-4
    generator = torch.Generator().manual_seed(9)
    other = {k: w + 0.1 * torch.randn(w.shape, generator=generator) for k, w in weights.items()}
    assert metrics.unexplained_change(weights, other) > 0.5
