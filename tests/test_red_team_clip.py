"""The differentiable CLIP text forward against ComfyUI's own encode, per family:
SD1.5, SD2 and SDXL on their slim random-weight checkpoints, and the demo model."""
from __future__ import annotations

import hashlib

import pytest
import torch

from devkit import host, paths
from rece_ops.parity import relative_error

PREFIX = "red fast dog"  # three single-token words
PROMPT = "a photo of a cat"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def clip_forward(comfy_nodes):
    return host.pack_module("nodes.red_team.clip_forward")


@pytest.fixture(scope="module")
def load(comfy_nodes):
    """``load(name) -> CLIP`` of a slim checkpoint (by family) or the demo checkpoint, once per module."""
    loaded: dict[str, object] = {}

    def load_clip(name: str):
        if name not in loaded:
            file = paths.DEMO_NAME if name == "demo" else paths.SLIM_CHECKPOINTS[name][1]
            if not (paths.CHECKPOINT_DIR / file).exists():
                pytest.fail(f"{file} is missing: run scripts/setup.sh before the tests")
            with torch.inference_mode():
                loaded[name] = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(file)[1]
        return loaded[name]

    yield load_clip
    loaded.clear()


def clip_hash(clip) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(clip.cond_stage_model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def comfy_encode(clip, text: str):
    with torch.inference_mode():
        tokens = clip.tokenize(text)
        context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return tokens, context, pooled


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl", "demo"])
def test_one_hot_prefix_encode_equals_comfyui_and_is_differentiable(load, clip_forward, name):
    clip = load(name)
    before = clip_hash(clip)
    encoder = clip_forward.DifferentiableTextEncoder(clip, device="cpu")
    layout = encoder.layout(PROMPT, 3)
    tokens, want_context, want_pooled = comfy_encode(clip, f"{PREFIX} {PROMPT}")
    prefix_ids = [tokens[encoder.names[0]][0][i][0] for i in (1, 2, 3)]
    assert layout.with_prefix(prefix_ids) == {n: [t[0] for t in tokens[n][0]] for n in encoder.names}
    assert set(layout.ids) == set(tokens)
    assert all(ids[1:4] == (clip_forward.PLACEHOLDER_ID,) * 3 for ids in layout.ids.values())

    one_hot = torch.nn.functional.one_hot(torch.tensor(prefix_ids), encoder.vocab_size).float().requires_grad_()
    context, pooled = encoder.encode(layout, one_hot)
    assert context.shape == want_context.shape and pooled.shape == want_pooled.shape
    errors = relative_error(context, want_context), relative_error(pooled, want_pooled)
    worst = float((context.detach() - want_context).abs().max() / want_context.abs().max())
    print(f"{name}: relative error context {errors[0]:.1e} (largest entry {worst:.1e}), pooled {errors[1]:.1e}; "
          f"weights {encoder.weight_bytes / 2**20:.0f} MiB")
    assert max(errors) < TOLERANCE

    # The same tokens as plain ids, and the prefix over candidate ids only.
    plain = encoder.encode_tokens(layout.with_prefix(prefix_ids))
    assert relative_error(plain[0], want_context) < TOLERANCE and relative_error(plain[1], want_pooled) < TOLERANCE
    candidates = torch.tensor(sorted(set(prefix_ids)) + [0, 1000])
    picks = torch.stack([(candidates == i).float() for i in prefix_ids])
    assert relative_error(encoder.encode(layout, picks, candidate_ids=candidates)[0], want_context) < TOLERANCE

    (context.square().sum() + pooled.sum()).backward()
    assert one_hot.grad is not None and torch.isfinite(one_hot.grad).all() and one_hot.grad.abs().sum() > 0
    assert clip_hash(clip) == before


def test_weights_are_float32_copies_outside_inference_mode(load, clip_forward):
    clip = load("sdxl")
    encoder = clip_forward.DifferentiableTextEncoder(clip, device="cpu")
    assert encoder.names == ("l", "g") and encoder.vocab_size == 49408
    assert encoder.token_embedding("g").shape == (49408, 1280)
    tensors = [t for w in encoder.weights.values() for t in w.values()]
    assert all(t.dtype == torch.float32 and not t.is_inference() for t in tensors)
    assert encoder.weight_bytes == sum(t.numel() * 4 for t in tensors)
    own = {id(p) for p in clip.cond_stage_model.parameters()}
    assert not own & {id(t) for t in tensors}


def test_last_layer_choice_and_clip_patches_follow_comfyui(load, clip_forward):
    clip = load("sd15").clone()
    clip.clip_layer(-2)  # what CLIPSetLastLayer does
    key = "clip_l.transformer.text_model.encoder.layers.3.mlp.fc2.weight"
    with torch.inference_mode():
        shape = clip.get_key_patches()[key][0][0].shape
        clip.add_patches({key: (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05,)})
    encoder = clip_forward.DifferentiableTextEncoder(clip, device="cpu")
    assert encoder.configs["l"].hidden_layer == -2
    tokens, want_context, want_pooled = comfy_encode(clip, PROMPT)
    context, pooled = encoder.encode_tokens({"l": [t[0] for t in tokens["l"][0]]})
    assert relative_error(context, want_context) < TOLERANCE and relative_error(pooled, want_pooled) < TOLERANCE


def test_placeholder_is_the_token_of_a_star(load, clip_forward):
    assert load("sd15").tokenize("*")["l"][0][1][0] == clip_forward.PLACEHOLDER_ID


@pytest.mark.parametrize("prompt, k, message", [
    ("", 3, "empty"),
    ("   ", 3, "empty"),
    (" ".join(["cat"] * 70), 6, "6 prefix tokens and the prompt's 70 tokens make 76"),
    (" ".join(["cat"] * 80), 0, "the prompt's 80 tokens"),
    ("a (cat:1.3)", 2, "weighted"),
])
def test_layout_refuses_empty_or_too_long_prompts(load, clip_forward, prompt, k, message):
    encoder = clip_forward.DifferentiableTextEncoder(load("sd15"), device="cpu")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        encoder.layout(prompt, k)


def test_refuses_a_clip_of_an_unknown_family(clip_forward):
    class Other:
        cond_stage_model = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="supported: SD1.x"):
        clip_forward.DifferentiableTextEncoder(Other())
