"""Sharing erasures in a real ComfyUI (in-process, slim SD1.5): Save/Load Erasure,
Export Erasure as LoRA with the stock LoRA loaders, Load Published Erasure."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rece_ops
from rece_ops import metrics
from devkit import host
from rece_ops.parity import relative_error
from test_nodes import kohya_lora, rece_node, uce_node, worst_error


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


@pytest.fixture
def folders(comfy_nodes, tmp_path, monkeypatch):
    """The pack's erasure folder and ComfyUI's loras folder, empty, in tmp_path."""
    import folder_paths

    for name in ("rece_erasures", "loras"):
        paths, extensions = folder_paths.folder_names_and_paths[name]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(tmp_path / name)], extensions))
        folder_paths.filename_list_cache.pop(name, None)
    yield tmp_path
    for name in ("rece_erasures", "loras"):
        folder_paths.filename_list_cache.pop(name, None)


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def save_erasure(pack, model, prefix="test/erasure"):
    (report,) = node(pack, "RECESaveErasure").save(model, prefix)
    return report


def saved_name(report):
    return re.search(r"saved (\S+\.safetensors)", report).group(1)


def load_erasure(pack, model, name, strength=1.0):
    return node(pack, "RECELoadErasure").load(model, name, strength)


def export_lora(pack, model, rank=0, precision="float32", prefix="rece/test"):
    return node(pack, "RECEExportErasureLoRA").export(model, prefix, rank, precision)


def change_error(got, erased, original):
    """``sqrt(sum |got - erased|^2 / sum |erased - original|^2)``: error relative to the erasure's change."""
    miss = sum(float((got[k] - erased[k]).detach().norm()) ** 2 for k in erased)
    change = sum(float((erased[k] - original[k]).detach().norm()) ** 2 for k in erased)
    return (miss / change) ** 0.5


# --------------------------------------------------------------------------- Save / Load Erasure

def test_erase_save_load_on_a_fresh_model_gives_the_erased_weights(pack, glue, slim_sd15, folders, model_fingerprint):
    model, clip, _ = slim_sd15
    before = model_fingerprint(model)
    erased, _ = rece_node(pack, model, clip, concepts="nudity\nblood", preserve="a portrait")
    report = save_erasure(pack, erased)
    name = saved_name(report)
    assert name == "test/erasure_00001_.safetensors"
    assert "rank" in report and "'nudity', 'blood'" in report
    assert (folders / "rece_erasures" / name).stat().st_size < 4 * 2**20

    loaded, load_report = load_erasure(pack, model, name)
    assert worst_error(glue.weights.effective_kv_weights(loaded), glue.weights.effective_kv_weights(erased)) < 1e-6
    assert "computed on these very weights" in load_report
    assert model_fingerprint(model) == before


def test_the_erasure_file_holds_factors_and_every_setting_for_plain_safetensors(pack, glue, slim_sd15, folders):
    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip, concepts="Van Gogh", guide="art", preserve="Monet\nPicasso",
                          preset="artistic_style")
    path = folders / "rece_erasures" / saved_name(save_erasure(pack, erased, "style"))
    with safe_open(str(path), "pt") as handle:
        info = json.loads(handle.metadata()["rece_erasure"])
        up, down = handle.get_tensor("erasure.up"), handle.get_tensor("erasure.down")
    weights = glue.weights.effective_kv_weights(model)
    assert up.shape == (768, info["rank"]) and down.shape == (info["rank"], 768)
    assert info["context_width"] == 768 and info["family"] == "SD15" and info["matrices"] == len(weights)
    assert info["pack_version"] == rece_ops.__version__
    assert rece_ops.fingerprints_match(info["fingerprint"], rece_ops.kv_fingerprint(weights))
    (entry,) = info["erasures"]
    assert entry["method"] == "RECE" and entry["concepts"] == ["Van Gogh"] and entry["guide"] == "art"
    assert entry["preserve"] == ["", "Monet", "Picasso"]
    settings = rece_ops.preset("artistic_style").settings
    assert (entry["lamb"], entry["erase_scale"], entry["preserve_scale"], entry["reg_scale"], entry["epochs"]) == (
        settings.lamb, settings.erase_scale, settings.preserve_scale, settings.reg_scale, settings.epochs)
    assert entry["strength"] == 1.0


def test_saving_twice_writes_two_numbered_files(pack, slim_sd15, folders):
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    first, second = saved_name(save_erasure(pack, erased, "twice")), saved_name(save_erasure(pack, erased, "twice"))
    assert (first, second) == ("twice_00001_.safetensors", "twice_00002_.safetensors")
    assert sorted(os.listdir(folders / "rece_erasures")) == [first, second]


def test_chained_erasures_at_strengths_save_and_load_as_one(pack, glue, slim_sd15, folders):
    model, clip, _ = slim_sd15
    first, _ = rece_node(pack, model, clip, strength=0.7)
    second, _ = uce_node(pack, first, clip, concepts="blood", strength=1.5)
    name = saved_name(save_erasure(pack, second))
    loaded, report = load_erasure(pack, model, name)
    assert worst_error(glue.weights.effective_kv_weights(loaded), glue.weights.effective_kv_weights(second)) < 1e-6
    assert "strength 0.7" in report and "strength 1.5" in report


def test_load_at_a_strength_equals_erasing_at_that_strength(pack, glue, slim_sd15, folders):
    model, clip, _ = slim_sd15
    full, _ = rece_node(pack, model, clip)
    half, _ = rece_node(pack, model, clip, strength=0.5)
    loaded, _ = load_erasure(pack, model, saved_name(save_erasure(pack, full)), strength=0.5)
    assert worst_error(glue.weights.effective_kv_weights(loaded), glue.weights.effective_kv_weights(half)) < 1e-6


def test_a_file_applied_to_other_weights_transfers_the_transform_and_says_so(pack, glue, slim_sd15, folders):
    import comfy.sd

    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    name = saved_name(save_erasure(pack, erased))
    with torch.inference_mode():
        other, _ = comfy.sd.load_lora_for_models(model, None, kohya_lora(model, glue.weights.kv_keys(model)), 1.0, 0)
    loaded, report = load_erasure(pack, other, name)
    assert "computed on other weights" in report and "RECE epochs were derived against that model" in report
    transform = rece_ops.load_erasure_file(folders / "rece_erasures" / name).erasure
    expected = transform.apply(glue.weights.effective_kv_weights(other))
    assert worst_error(glue.weights.effective_kv_weights(loaded), expected) < 1e-6


def test_load_erasure_refuses_a_file_for_another_context_width(pack, slim_sd15, folders):
    model, _, _ = slim_sd15
    width = 1024
    info = {"format": "rece-erasure", "format_version": 1, "context_width": width, "rank": 2, "matrices": 4,
            "family": "SD21UnclipH", "fingerprint": [1.0] * 8, "pack_version": "0.2.0", "erasures": []}
    (folders / "rece_erasures").mkdir()
    save_file({"erasure.up": torch.randn(width, 2), "erasure.down": torch.randn(2, width)},
              str(folders / "rece_erasures" / "wide.safetensors"), metadata={"rece_erasure": json.dumps(info)})
    with pytest.raises(ValueError, match="1024-wide text context .* reads a 768-wide context"):
        load_erasure(pack, model, "wide.safetensors")


def test_load_erasure_refuses_a_file_that_is_not_one(pack, slim_sd15, folders):
    model, _, _ = slim_sd15
    (folders / "rece_erasures").mkdir()
    (folders / "rece_erasures" / "notes.safetensors").write_text("not tensors at all " * 10)
    with pytest.raises(ValueError, match="neither a safetensors file"):
        load_erasure(pack, model, "notes.safetensors")
    with pytest.raises(ValueError, match="refresh the page"):
        load_erasure(pack, model, "gone.safetensors")


def test_save_and_export_refuse_a_model_without_erasures(pack, slim_sd15, folders):
    model, _, _ = slim_sd15
    with pytest.raises(ValueError, match="carries no erasure from this pack"):
        save_erasure(pack, model)
    with pytest.raises(ValueError, match="carries no erasure from this pack"):
        export_lora(pack, model)
    assert not (folders / "rece_erasures").exists() and not (folders / "loras").exists()


def test_saving_a_model_with_a_lora_after_its_erasure_says_the_lora_is_not_in_the_file(pack, glue, slim_sd15, folders):
    import comfy.sd

    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    with torch.inference_mode():
        both, _ = comfy.sd.load_lora_for_models(erased, None, kohya_lora(model, glue.weights.kv_keys(model)[:2]), 1.0, 0)
    assert "not from its erasures" in save_erasure(pack, both)
    assert "not from its erasures" not in save_erasure(pack, erased)


# --------------------------------------------------------------------------- Export Erasure as LoRA

def test_exported_lora_in_the_stock_lora_loader_reproduces_the_erased_model(pack, glue, comfy_nodes, slim_sd15, folders):
    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip, concepts="nudity\nblood")
    lora, report = export_lora(pack, erased)
    name = re.search(r"saved LoRA (\S+\.safetensors)", report).group(1)
    assert name == "rece/test_00001_.safetensors" and "exact" in report
    with torch.inference_mode():
        from_file, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
        (from_output,) = comfy_nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"]().execute(model, lora, 1.0)
    target = glue.weights.effective_kv_weights(erased)
    original = glue.weights.effective_kv_weights(model)
    for loaded in (from_file, from_output):
        got = glue.weights.effective_kv_weights(loaded)
        assert worst_error(got, target) < 1e-6
        assert change_error(got, target, original) < 1e-4
        # Only the K/V weights are patched.
        assert set(loaded.patches) == set(glue.weights.kv_keys(model))
    with safe_open(str(folders / "loras" / name), "pt") as handle:
        keys = set(handle.keys())
        rank = int(handle.metadata()["ss_network_dim"])
    assert len(keys) == 3 * len(target)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.alpha" in keys
    assert f"full rank {rank} (= the edit's numerical rank" in report


@pytest.mark.parametrize("rank, precision", [(8, "float32"), (64, "float16")])
def test_a_capped_lora_reports_the_error_the_loader_gives(pack, glue, comfy_nodes, slim_sd15, folders, rank, precision):
    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    _, report = export_lora(pack, erased, rank=rank, precision=precision)
    name = re.search(r"saved LoRA (\S+\.safetensors)", report).group(1)
    reported = float(re.search(r"relative error of the K/V change (\S+) overall", report).group(1))
    with torch.inference_mode():
        loaded, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    measured = change_error(glue.weights.effective_kv_weights(loaded), glue.weights.effective_kv_weights(erased),
                            glue.weights.effective_kv_weights(model))
    assert f"rank {rank} of the edit's" in report
    assert measured == pytest.approx(reported, abs=1e-4 + 1e-3 * reported)


def test_a_loaded_erasure_file_exports_as_a_lora_too(pack, glue, comfy_nodes, slim_sd15, folders):
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    loaded, _ = load_erasure(pack, model, saved_name(save_erasure(pack, erased)))
    _, report = export_lora(pack, loaded)
    name = re.search(r"saved LoRA (\S+\.safetensors)", report).group(1)
    with torch.inference_mode():
        lora_model, _ = comfy_nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    assert worst_error(glue.weights.effective_kv_weights(lora_model), glue.weights.effective_kv_weights(erased)) < 1e-6


def test_export_refuses_a_bad_rank_or_precision(pack, slim_sd15, folders):
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    with pytest.raises(ValueError, match="rank must be 0"):
        export_lora(pack, erased, rank=-1)
    with pytest.raises(ValueError, match="precision must be one of"):
        export_lora(pack, erased, precision="int8")


# --------------------------------------------------------------------------- Load Published Erasure

def diffusers_names(model) -> dict[str, str]:
    """``{ComfyUI key: diffusers UNet name}`` as diffusers saves a UNet."""
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {"diffusion_model." + ldm: name for name, ldm in to_ldm.items()}


def uce_style_file(model, weights, path):
    """The UCE authors' format: only the edited K/V weights, diffusers names, safetensors."""
    names = diffusers_names(model)
    save_file({names[k]: w.cpu().contiguous() for k, w in weights.items()}, str(path))


def rece_style_file(model, weights, path, prefix=""):
    """The RECE authors' format: a whole diffusers UNet state dict saved with torch.save."""
    from conftest import stored_weights

    names = diffusers_names(model)
    state = {prefix + names[k]: v.clone() for k, v in stored_weights(model, "diffusion_model.").items() if k in names}
    for key, weight in weights.items():
        state[prefix + names[key]] = weight.cpu().clone()
    torch.save(state, path)


@pytest.mark.parametrize("style", ["uce_safetensors", "rece_pt", "rece_pt_unet_prefix"])
def test_published_files_apply_only_their_kv_weights(pack, glue, slim_sd15, folders, model_fingerprint, style):
    model, clip, _ = slim_sd15
    before = model_fingerprint(model)
    erased, _ = rece_node(pack, model, clip)
    target = glue.weights.effective_kv_weights(erased)
    (folders / "rece_erasures").mkdir()
    path = folders / "rece_erasures" / ("published.safetensors" if style == "uce_safetensors" else "published.pt")
    if style == "uce_safetensors":
        uce_style_file(model, target, path)
    else:
        rece_style_file(model, target, path, prefix="unet." if style.endswith("prefix") else "")
    patched, report = node(pack, "RECELoadPublishedErasure").load(model, path.name, 1.0)
    assert worst_error(glue.weights.effective_kv_weights(patched), target) < 1e-6
    assert set(patched.patches) == set(glue.weights.kv_keys(model))
    n = len(target)
    assert f"{n} of {n} K/V matrices" in report
    assert ("other" in report) == (style != "uce_safetensors")
    assert "another base model" not in report
    assert model_fingerprint(model) == before


def test_published_file_at_half_strength_blends_toward_the_model(pack, glue, slim_sd15, folders):
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    (folders / "rece_erasures").mkdir()
    uce_style_file(model, glue.weights.effective_kv_weights(erased), folders / "rece_erasures" / "uce.safetensors")
    patched, _ = node(pack, "RECELoadPublishedErasure").load(model, "uce.safetensors", 0.5)
    half, _ = uce_node(pack, model, clip, strength=0.5)
    assert worst_error(glue.weights.effective_kv_weights(patched), glue.weights.effective_kv_weights(half)) < 1e-5


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code-from-a-file",))


def test_published_loader_refuses_files_it_cannot_use(pack, glue, slim_sd15, folders, monkeypatch):
    model, clip, _ = slim_sd15
    monkeypatch.chdir(folders)
    root = folders / "rece_erasures"
    root.mkdir()
    keys = glue.weights.kv_keys(model)
    names = diffusers_names(model)
    stored = glue.weights.stored_kv_weights(model, torch.device("cpu"))
    torch.save({names[keys[0]]: _RunsCode()}, root / "code.pt")
    save_file({"conv_in.weight": torch.zeros(3)}, str(root / "no_kv.safetensors"))
    save_file({names[keys[0]]: torch.zeros(5, 5)}, str(root / "shape.safetensors"))
    nan = stored[keys[0]].clone()
    nan[0, 0] = float("nan")
    save_file({names[keys[0]]: nan}, str(root / "nan.safetensors"))
    erased, _ = uce_node(pack, model, clip)
    save_erasure(pack, erased, "ours")
    load = node(pack, "RECELoadPublishedErasure").load
    for name, message in [("code.pt", "not unpickled"), ("no_kv.safetensors", "holds no cross-attention"),
                          ("shape.safetensors", "another model family"), ("nan.safetensors", "NaN"),
                          ("ours_00001_.safetensors", "apply it with Load Erasure")]:
        with pytest.raises(ValueError, match=message):
            load(model, name, 1.0)
    assert not (folders / "ran-code-from-a-file").exists()


def test_loaders_refuse_a_strength_that_is_not_a_finite_number(pack, glue, slim_sd15, folders, model_fingerprint):
    model, clip, _ = slim_sd15
    before = model_fingerprint(model)
    erased, _ = uce_node(pack, model, clip)
    name = saved_name(save_erasure(pack, erased, "strength"))
    uce_style_file(model, glue.weights.effective_kv_weights(erased), folders / "rece_erasures" / "uce.safetensors")
    for strength in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength must be a finite number"):
            load_erasure(pack, model, name, strength)
        with pytest.raises(ValueError, match="strength must be a finite number"):
            node(pack, "RECELoadPublishedErasure").load(model, "uce.safetensors", strength)
    assert model_fingerprint(model) == before


def test_loaders_tell_comfyui_when_the_file_behind_a_name_changed(pack, glue, slim_sd15, folders):
    # ComfyUI caches a node by its inputs; the file name alone would reuse a replaced file's result.
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    name = saved_name(save_erasure(pack, erased, "versioned"))
    path = folders / "rece_erasures" / name
    for node_name, argument in (("RECELoadErasure", "erasure"), ("RECELoadPublishedErasure", "file")):
        version = pack.NODE_CLASS_MAPPINGS[node_name].IS_CHANGED(**{argument: name, "strength": 1.0})
        assert version and version == pack.NODE_CLASS_MAPPINGS[node_name].IS_CHANGED(**{argument: name})
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert pack.NODE_CLASS_MAPPINGS[node_name].IS_CHANGED(**{argument: name}) != version
        assert pack.NODE_CLASS_MAPPINGS[node_name].IS_CHANGED(**{argument: "gone.safetensors"}) == ""


def test_published_weights_from_another_base_model_are_flagged(pack, glue, slim_sd15, folders):
    model, _, _ = slim_sd15
    (folders / "rece_erasures").mkdir()
    stored = glue.weights.stored_kv_weights(model, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    other_base = {k: w + 0.5 * w.std() * torch.randn(w.shape, generator=generator) for k, w in list(stored.items())[:3]}
    uce_style_file(model, other_base, folders / "rece_erasures" / "far.safetensors")
    patched, report = node(pack, "RECELoadPublishedErasure").load(model, "far.safetensors", 1.0)
    assert f"3 of {len(stored)} K/V matrices" in report
    assert "another base model" in report and "they are unchanged" in report


def test_compare_node_reports_zero_for_the_same_weights_and_the_change_otherwise(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    (same,) = node(pack, "RECECompareKVWeights").compare(model, model)
    assert "0.000e+00 overall" in same
    (changed,) = node(pack, "RECECompareKVWeights").compare(erased, model)
    overall = float(re.search(r"difference (\S+) overall", changed).group(1))
    weights = glue.weights.effective_kv_weights(model)
    expected = metrics.overall_difference(glue.weights.effective_kv_weights(erased), weights)
    assert overall == pytest.approx(expected, rel=1e-3) and overall > 1e-4
