"""The erasure's weight patch on every path by which ComfyUI applies it, on the CPU.

Dynamic VRAM (0.33's ``ModelPatcherDynamic``) and lowvram loading call the
patch through ``LowVramPatch`` with ``intermediate_dtype`` set to the weight's
dtype (fp16, bf16), and 0.33 first rebuilds the patch from its tensors
(``comfy.lora.prefetch_prepared_value``). These tests call the host's own
``LowVramPatch``, ``comfy.lora.calculate_weight`` / ``calculate_shape`` and its
bypass machinery on a real K/V weight with the patch a real erase made, and
compare with a float64 reference of ``W @ (I + s (T - I))``. The tolerance is
the dtype's rounding of the final weight (half a unit in the last place) plus
a bound on float32 arithmetic error, which matters only where ``W`` and the
edit nearly cancel; computing the edit in fp16 or bf16 exceeds it several
times over (checked too). Features a host lacks are checked to be
absent only on a host older than the one that brought them, never skipped.

The CUDA side (``ModelPatcherDynamic`` itself, CheckpointSave on the GPU) is
``python -m devkit.gpu_dynamic_vram_check``.
"""
from __future__ import annotations

import re

import pytest
import torch

import comfy.lora
import comfy.model_patcher
from devkit import host
from devkit.rounding import float32_error_bound, ulp

# The ComfyUI release that brought dynamic VRAM (LowVramPatch.prepare,
# comfy.lora.calculate_shape) and adapter bypass mode; 0.3.75 has none of it.
DYNAMIC_VRAM_RELEASE = (0, 33, 0)


def host_version() -> tuple[int, ...]:
    import comfyui_version

    return tuple(int(part) for part in re.findall(r"\d+", comfyui_version.__version__)[:3])


def must_have(feature: bool, what: str) -> bool:
    """Whether to test ``feature``: a host from the dynamic-VRAM release on must have it."""
    if not feature:
        assert host_version() < DYNAMIC_VRAM_RELEASE, f"ComfyUI {host_version()} should have {what}"
    return feature


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


@pytest.fixture(scope="module")
def patch_class(comfy_nodes):
    return host.pack_module("nodes.transform_patch").KVTransformPatch


@pytest.fixture(scope="module")
def erased(pack, slim_sd15):
    """(key, stored float32 weight of that key, the erase node's patch (thin factors))."""
    model, clip, _ = slim_sd15
    out, _ = pack.NODE_CLASS_MAPPINGS["UCEEraseConcept"]().erase(
        model, clip, "nudity", "", "", "nudity", strength=1.0, lamb=0.1, erase_scale=1.0, preserve_scale=0.1,
        reg_scale=0.1)
    key = sorted(out.patches)[0]
    ((_, patch, _, _, _),) = out.patches[key]
    weight = model.get_key_patches("diffusion_model.")[key][0][0].detach().float()
    return key, weight, patch


def patch_of(patch_class, erased, form: str):
    _, _, patch = erased
    if form == "factors":
        assert len(patch.weights) == 2, "the erase node's patch should hold thin factors"
        return patch
    up, down = (w.double() for w in patch.weights)
    return patch_class.from_edit(up @ down)


def edit64(patch) -> torch.Tensor:
    """``T - I`` in float64 from the patch's own (float32) tensors."""
    product = patch.weights[0].double()
    for factor in patch.weights[1:]:
        product = product @ factor.double()
    return product


def host_patches(slim_sd15, key, patch, strength: float, offset=None) -> dict:
    """The patch list the host's ``add_patches`` makes, on a clone (the shared model is untouched)."""
    clone = slim_sd15[0].clone()
    added = clone.add_patches({key if offset is None else (key, offset): patch}, strength)
    assert len(added) == 1
    return clone.patches


def reference(weight: torch.Tensor, edit: torch.Tensor, strength: float) -> torch.Tensor:
    w = weight.double()
    return w @ (torch.eye(edit.shape[0], dtype=torch.float64) + strength * edit)


def check_rounding_only(got: torch.Tensor, weight: torch.Tensor, patch, strength: float) -> float:
    """Assert ``got`` (dtype of ``weight``) is the reference up to its own rounding;
    returns the worst error in units of the allowed bound."""
    assert got.dtype == weight.dtype and got.shape == weight.shape
    ref = reference(weight, edit64(patch), strength)
    err = (got.double() - ref).abs()
    allowed = 0.5 * ulp(torch.maximum(ref.abs(), got.double().abs()), got.dtype) + float32_error_bound(
        weight, patch.weights, strength, ref)
    worst = float((err / allowed).max())
    assert worst <= 1.0, f"{got.dtype}: error {float(err.max()):.3e} is {worst:.2f}x its rounding bound"
    return worst


LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("form", ["factors", "dense"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_lowvram_patch_in_the_weights_dtype_rounds_only_the_result(patch_class, slim_sd15, erased, dtype, form,
                                                                   strength):
    """The host's LowVramPatch (lowvram, and 0.33's dynamic VRAM) asks for
    ``intermediate_dtype`` = the weight's dtype."""
    key, stored, _ = erased
    patch = patch_of(patch_class, erased, form)
    before = [w.clone() for w in patch.weights]
    weight = stored.to(dtype)
    lowvram = comfy.model_patcher.LowVramPatch(key, host_patches(slim_sd15, key, patch, strength))
    got = lowvram(weight.clone())
    check_rounding_only(got, weight, patch, strength)
    # The shared patch is left as it was: float32 on the CPU, same values.
    assert all(w.dtype == torch.float32 and w.device.type == "cpu" and torch.equal(w, b)
               for w, b in zip(patch.weights, before))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_a_low_precision_weight_with_float32_intermediate_rounds_once(pack, slim_sd15, erased, dtype):
    """A full load on a GPU (``patch_weight_to_device``) patches a copy in
    ``lora_compute_dtype``, fp16 there, with the default float32 intermediate."""
    key, stored, patch = erased
    weight = stored.to(dtype)
    got = comfy.lora.calculate_weight(host_patches(slim_sd15, key, patch, 1.0)[key], weight.clone(), key)
    check_rounding_only(got, weight, patch, 1.0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_the_bound_catches_the_edit_computed_in_the_weights_dtype(erased, dtype):
    """The tolerance has teeth: ``W @ (T - I)`` in fp16/bf16 (what a
    ``cast_to_device(factor, device, intermediate_dtype)`` adapter computes
    under LowVramPatch) breaks it."""
    _, stored, patch = erased
    weight = stored.to(dtype)
    change = weight.clone()
    for factor in patch.weights:
        change = change @ factor.to(dtype)
    naive = weight + change
    with pytest.raises(AssertionError, match="rounding bound"):
        check_rounding_only(naive, weight, patch, 1.0)


def test_the_float32_path_is_plain_float32_arithmetic_bit_for_bit(slim_sd15, erased):
    """CPU loads, ``get_key_patches`` readers and CheckpointSave on the CPU
    patch a float32 weight: unchanged from the adapter's first version."""
    key, stored, patch = erased
    up, down = patch.weights
    expected = stored + 0.6 * ((stored @ up) @ down)
    got = comfy.lora.calculate_weight(host_patches(slim_sd15, key, patch, 0.6)[key], stored.clone(), key)
    assert torch.equal(got, expected)


def test_an_offset_patch_changes_its_rows_in_place_and_nothing_else(slim_sd15, erased):
    """``calculate_weight`` narrows the weight for an offset patch and keeps the
    whole, so the fp16 result must be written into the narrowed view."""
    key, stored, patch = erased
    weight = stored.half()
    rows = weight.shape[0] // 2
    lowvram = comfy.model_patcher.LowVramPatch(key, host_patches(slim_sd15, key, patch, 1.0, offset=(0, 0, rows)))
    got = lowvram(weight.clone())
    assert torch.equal(got[rows:], weight[rows:])
    check_rounding_only(got[:rows], weight[:rows], patch, 1.0)


def test_the_patch_never_changes_the_weights_shape(slim_sd15, erased):
    """0.33's dynamic VRAM loads a weight in full (no LowVramPatch) when
    ``comfy.lora.calculate_shape`` differs from the weight's shape."""
    key, stored, patch = erased
    assert patch.calculate_shape(key) is None
    if must_have(hasattr(comfy.lora, "calculate_shape"), "comfy.lora.calculate_shape"):
        patches = host_patches(slim_sd15, key, patch, 1.0)
        assert comfy.lora.calculate_shape(patches[key], stored, key) == stored.shape


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_dynamic_vram_staging_rebuilds_the_patch_and_applies_it(pack, slim_sd15, erased, dtype):
    """0.33's dynamic VRAM sizes and stages a LowVramPatch's tensors
    (``memory_required``, ``prepare``): ``prefetch_prepared_value`` rebuilds
    the adapter as ``type(p)(p.loaded_keys, staged tensors)``. Here the
    staging buffer is in CPU memory; on a GPU it is VRAM."""
    key, stored, patch = erased
    lowvram = comfy.model_patcher.LowVramPatch(key, host_patches(slim_sd15, key, patch, 1.0))
    if not must_have(hasattr(lowvram, "prepare"), "LowVramPatch.prepare (dynamic VRAM staging)"):
        return
    size = lowvram.memory_required()
    assert size >= sum(w.numel() * w.element_size() for w in patch.weights)
    buffer = torch.zeros(size, dtype=torch.uint8)
    ((_, staged, _, _, _),) = lowvram.prepare(buffer, None, copy=True, commit=True)
    assert type(staged) is type(patch) and staged is not patch
    assert all(torch.equal(s, w) and s.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for s, w in zip(staged.weights, patch.weights))
    weight = stored.to(dtype)
    check_rounding_only(lowvram(weight.clone()), weight, patch, 1.0)
    lowvram.clear_prepared()


def test_bypass_mode_is_refused_before_it_touches_the_shared_patch(pack, slim_sd15, erased):
    """Bypass mode (0.33: LoraLoaderBypass, training) would move and cast the
    adapter's tensors to each layer's dtype, and the base class's default
    bypass would run the layer unerased: the patch refuses it instead."""
    key, _, patch = erased
    before = list(patch.weights)
    match = "has no bypass mode"
    with pytest.raises(NotImplementedError, match=match):
        patch.bypass_forward(lambda x: x, torch.zeros(1, patch.width))
    with pytest.raises(NotImplementedError, match=match):
        patch.h(torch.zeros(1, patch.width), torch.zeros(1, 4))
    import comfy.weight_adapter

    if must_have(hasattr(comfy.weight_adapter, "BypassInjectionManager"), "adapter bypass mode"):
        manager = comfy.weight_adapter.BypassInjectionManager()
        manager.add_adapter(key, patch, strength=1.0)
        with pytest.raises(NotImplementedError, match=match):
            manager.create_injections(slim_sd15[0].model)
    assert patch.multiplier == 1.0
    assert all(w is b for w, b in zip(patch.weights, before))


def test_the_patch_is_made_of_a_dense_edit_or_thin_factors_only(patch_class):
    cls = patch_class
    assert [tuple(w.shape) for w in cls.from_edit(torch.zeros(4, 2, dtype=torch.float64),
                                                   torch.zeros(2, 4)).weights] == [(4, 2), (2, 4)]
    for bad in ([torch.zeros(4, 3)], [torch.zeros(4, 2), torch.zeros(3, 4)], [torch.zeros(4)], []):
        with pytest.raises(ValueError, match="the edit must be d x d or factors"):
            cls(set(), bad)
