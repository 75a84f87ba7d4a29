"""The pack's example workflows and node definitions, as ComfyUI's server and web page see them.

One ComfyUI server for the whole module, used by one test: with ``pytest -n 2``
xdist may send tests of a module to both workers, and each would start its
own server. The checks in that test are collected and reported together.
The pure tests of ``devkit.workflows`` below need no ComfyUI.
"""
from __future__ import annotations

import copy
import glob
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devkit import host, paths, workflows

EXAMPLES = paths.REPO_ROOT / "example_workflows"
EXAMPLE_NAMES = ["rece_erase_compare_same_seed", "rece_red_team_uce_vs_rece", "rece_erase_nudity_save_checkpoint",
                 "rece_share_erasure_and_lora", "rece_red_team_prompt_attacks"]
SHIPPED_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
TEST_SIZE, TEST_STEPS = 64, 2
TEST_ATTACK_ITERATIONS = 2  # UnlearnDiff's budget in the example runs: each step is a CLIP and UNet backward
PRESETS = ["nudity", "unsafe", "artistic_style", "object_hard", "object_easy", "custom"]
PRESERVE_MODES = ["paper", "SPEED null space", "SPEED null space, every token kept"]
NUMBERS = ["lamb", "erase_scale", "preserve_scale", "reg_scale", "strength"]
SPEED_INPUTS = ["preserve_mode", "threshold", "retain_scale"]  # optional: graphs saved before them still run
# (class, display name, required inputs in order, optional inputs, outputs)
PACK_NODES = [
    ("RECEEraseConcept", "RECE Erase Concept",
     ["model", "clip", "concepts", "guide", "preserve", "preset", "epochs", *NUMBERS], SPEED_INPUTS, ["MODEL", "STRING"]),
    ("UCEEraseConcept", "UCE Erase Concept",
     ["model", "clip", "concepts", "guide", "preserve", "preset", *NUMBERS], SPEED_INPUTS, ["MODEL", "STRING"]),
    ("RECEDeriveAdversarialEmbedding", "Derive Adversarial Embedding",
     ["model", "clip", "concept", "reg_scale"], ["original_model"], ["CONDITIONING", "STRING"]),
    ("RECESaveErasure", "Save Erasure", ["model", "filename_prefix"], [], ["STRING"]),
    ("RECELoadErasure", "Load Erasure", ["model", "erasure", "strength"], [], ["MODEL", "STRING"]),
    ("RECEExportErasureLoRA", "Export Erasure as LoRA", ["model", "filename_prefix", "rank", "precision"], [],
     ["LORA_MODEL", "STRING"]),
    ("RECELoadPublishedErasure", "Load Published Erasure", ["model", "file", "strength"], [], ["MODEL", "STRING"]),
    ("RECECompareKVWeights", "Compare Cross-Attention Weights", ["model_a", "model_b"], [], ["STRING"]),
    ("RECEUnlearnDiffAttack", "UnlearnDiff Attack",
     ["model", "clip", "prompt", "target", "prefix_tokens", "iterations", "timesteps_per_iteration", "lr",
      "weight_decay", "seed"], [], ["STRING", "CONDITIONING", "STRING"]),
    ("RECERingABell", "Ring-A-Bell Attack", ["clip", "prompt", "concept_pairs", "eta"], [], ["CONDITIONING", "STRING"]),
]
DEFAULTS = {"concepts": "nudity", "guide": "", "preserve": "", "preset": "nudity", "epochs": 3, "lamb": 0.1,
            "erase_scale": 1.0, "preserve_scale": 0.1, "reg_scale": 0.1, "strength": 1.0, "concept": "nudity",
            "rank": 0, "precision": "float32", "preserve_mode": "paper", "threshold": 0.1, "retain_scale": 1.0}


class Checks:
    """Soft assertions: every failed check is kept, the test fails once at the end with all of them."""

    def __init__(self):
        self.failures: list[str] = []

    def that(self, condition: object, message: str) -> bool:
        if not condition:
            self.failures.append(message)
        return bool(condition)

    def none(self, problems: list[str], what: str) -> None:
        for problem in problems:
            self.failures.append(f"{what}: {problem}")


def test_examples_and_nodes_on_a_comfyui_server(tmp_path_factory):
    if not (paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME).exists():
        pytest.fail(f"{paths.SLIM_SD15_NAME} is missing: run scripts/setup.sh before the tests")
    check = Checks()
    workdir = tmp_path_factory.mktemp("example_workflows")
    with host.server(workdir, extra_model_paths=model_paths_in(workdir)) as server:
        object_info = server.get("/object_info", timeout=120)
        check_pack_nodes(check, object_info)
        check_templates_route(check, server)
        for name in EXAMPLE_NAMES:
            workflow = workflows.load_workflow(EXAMPLES / f"{name}.json")
            if check_example_file(check, name, workflow, object_info):
                entry, graph = run_example(check, server, name, workflow, object_info)
                if entry is not None:
                    CHECK_OUTPUTS[name](check, server, entry, graph)
        check_converter_on_a_template_the_web_page_wrote(check, server, object_info)
    assert not check.failures, "\n".join(check.failures) + "\n--- server log ---\n" + server.log()[-3000:]


def model_paths_in(workdir: Path) -> Path:
    """The project's model paths plus empty, first-listed loras and rece_erasures
    folders in ``workdir``: what the workflows save stays in the test's folder."""
    path = workdir / "extra_model_paths.yaml"
    path.write_text(paths.EXTRA_PATHS_FILE.read_text() + (
        f"\nrece_test_outputs:\n    base_path: {workdir}\n    is_default: true\n"
        "    loras: loras\n    rece_erasures: rece_erasures\n"))
    return path


OTHER_FAMILIES = ["sd2", "sd2-v", "sdxl"]


# Four minutes on this CPU: the second host's CI run leaves it out for time;
# there every example runs on SD1.5 (above) and test_families.py erases,
# samples, saves and reloads each family through the same nodes.
@pytest.mark.repeats_on_second_host
def test_examples_run_on_sd2_and_sdxl_checkpoints(tmp_path_factory):
    """Every example workflow's pattern on the other families' slim checkpoints, through one server."""
    check = Checks()
    workdir = tmp_path_factory.mktemp("example_workflows_families")
    with host.server(workdir, extra_model_paths=model_paths_in(workdir)) as server:
        object_info = server.get("/object_info", timeout=120)
        for family in OTHER_FAMILIES:
            checkpoint = paths.SLIM_CHECKPOINTS[family][1]
            if not check.that((paths.CHECKPOINT_DIR / checkpoint).exists(), f"{checkpoint} missing: run scripts/setup.sh"):
                continue
            for name in EXAMPLE_NAMES:
                workflow = workflows.load_workflow(EXAMPLES / f"{name}.json")
                before = len(check.failures)
                entry, graph = run_example(check, server, name, workflow, object_info, checkpoint)
                if entry is not None:
                    CHECK_OUTPUTS[name](check, server, entry, graph)
                check.failures[before:] = [f"[{family}] {f}" for f in check.failures[before:]]
    assert not check.failures, "\n".join(check.failures) + "\n--- server log ---\n" + server.log()[-3000:]


def check_pack_nodes(check: Checks, object_info: dict) -> None:
    for kind, display, required, optional, outputs in PACK_NODES:
        info = object_info.get(kind)
        if not check.that(info is not None, f"/object_info has no {kind}"):
            continue
        check.that(info["category"] == "RECE", f"{kind}: category {info['category']!r}")
        check.that(info["display_name"] == display, f"{kind}: display name {info['display_name']!r}")
        check.that(len(info.get("description", "")) > 40, f"{kind}: no description")
        check.that(list(info["output"]) == outputs, f"{kind}: outputs {info['output']}")
        order = info["input_order"]
        check.that(order.get("required") == required, f"{kind}: required inputs {order.get('required')}")
        check.that((order.get("optional") or []) == optional, f"{kind}: optional inputs {order.get('optional')}")
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        for name, spec in specs.items():
            options = spec[1] if len(spec) > 1 else {}
            check.that(len(options.get("tooltip", "")) > 10, f"{kind}.{name}: no tooltip")
            if name in DEFAULTS:
                check.that(options.get("default") == DEFAULTS[name], f"{kind}.{name}: default {options.get('default')!r}")
        for name in ("concepts", "preserve", "concept"):
            if name in specs:
                check.that(specs[name][1].get("multiline"), f"{kind}.{name}: not multiline")
        if "preset" in specs:
            check.that(specs["preset"][0] == PRESETS, f"{kind}.preset: choices {specs['preset'][0]}")
        if "preserve_mode" in specs:
            check.that(specs["preserve_mode"][0] == PRESERVE_MODES,
                       f"{kind}.preserve_mode: choices {specs['preserve_mode'][0]}")
        check.that(len(info.get("output_tooltips", [])) == len(outputs), f"{kind}: output tooltips missing")


def check_templates_route(check: Checks, server: host.Server) -> None:
    listed = server.get("/workflow_templates").get(paths.PACK_LINK_NAME, [])
    check.that(sorted(listed) == sorted(EXAMPLE_NAMES), f"/workflow_templates lists {listed} for {paths.PACK_LINK_NAME}")
    for name in EXAMPLE_NAMES:
        # The web page opens a template from this route.
        served = server.get(f"/api/workflow_templates/{paths.PACK_LINK_NAME}/{name}.json")
        check.that(served == json.loads((EXAMPLES / f"{name}.json").read_text()), f"{name}: served file differs")


def check_example_file(check: Checks, name: str, workflow: dict, object_info: dict) -> bool:
    """Checks that need no run. True when the workflow can be converted and run."""
    missing = workflows.missing_node_types(workflow, object_info)
    check.that(not missing, f"{name}: node types missing from the server: {missing}")
    check.none(workflows.structure_errors(workflow), name)
    check.none(workflows.link_type_errors(workflow, object_info), name)
    check.none(workflows.widget_count_errors(workflow, object_info), name)
    check.none(workflows.overlapping_nodes(workflow), name)
    notes = [n for n in workflow["nodes"] if n["type"] in workflows.NOTE_TYPES]
    check.that(len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 80, f"{name}: needs one explaining note")
    untitled = [n["type"] for n in workflow["nodes"] if not n.get("title")]
    check.that(not untitled, f"{name}: nodes without a title: {untitled}")
    xs = [n["pos"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    check.that(xs and min(xs) == min(n["pos"][0] for n in workflow["nodes"]), f"{name}: the loader is not leftmost")
    loaders = [n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    check.that([n["widgets_values"] for n in loaders] == [[SHIPPED_CHECKPOINT]], f"{name}: checkpoint {loaders}")
    return not missing


def run_example(check: Checks, server: host.Server, name: str, workflow: dict, object_info: dict,
                checkpoint: str = paths.SLIM_SD15_NAME):
    graph = workflows.with_checkpoint(workflows.to_api(workflow, object_info), checkpoint)
    check_graph_shape(check, name, graph)
    if workflows.api_nodes(graph, "EmptyLatentImage"):
        graph = workflows.with_inputs(graph, class_type="EmptyLatentImage", width=TEST_SIZE, height=TEST_SIZE)
    if workflows.api_nodes(graph, "KSampler"):
        graph = with_latent_checks(workflows.with_inputs(graph, class_type="KSampler", steps=TEST_STEPS))
    if workflows.api_nodes(graph, "RECEUnlearnDiffAttack"):
        graph = workflows.with_inputs(graph, class_type="RECEUnlearnDiffAttack", iterations=TEST_ATTACK_ITERATIONS)
    entry = server.run_prompt(graph)
    if not check.that(entry["status"]["status_str"] == "success", f"{name}: {json.dumps(entry['status'])[:2000]}"):
        return None, graph
    for node_id in workflows.api_nodes(graph, "PreviewAny", title=LATENT_CHECK):
        text = "".join(entry["outputs"].get(node_id, {}).get("text", []))
        check.that("tensor(" in text and "nan" not in text and "inf" not in text,
                   f"{name}: sampled latents are not finite: {text[:300]}")
    return entry, graph


LATENT_CHECK = "test: sampled latent"


def with_latent_checks(graph: dict) -> dict:
    """``graph`` with a Preview as Text on every KSampler's LATENT: it prints
    the tensor, so a NaN shows even where random weights decode to black."""
    out = copy.deepcopy(graph)
    for node_id in workflows.api_nodes(graph, "KSampler"):
        out[f"9{node_id}0"] = {"class_type": "PreviewAny", "inputs": {"source": [node_id, 0]},
                               "_meta": {"title": LATENT_CHECK}}
    return out


def inputs_of(graph: dict, kind: str) -> list[dict]:
    return [graph[i]["inputs"] for i in workflows.api_nodes(graph, kind)]


def check_graph_shape(check: Checks, name: str, graph: dict) -> None:
    """What each example is meant to wire, as the brief describes it."""
    (loader,) = workflows.api_nodes(graph, "CheckpointLoaderSimple")
    samplers = inputs_of(graph, "KSampler")
    if samplers:
        expected = 5 if name == "rece_red_team_prompt_attacks" else 2
        check.that(len({s["seed"] for s in samplers}) == 1 and len(samplers) == expected,
                   f"{name}: {len(samplers)} samplers (expected {expected}) or their seeds differ")
    if name == "rece_red_team_prompt_attacks":
        check_prompt_attacks_shape(check, name, graph, loader)
    if name == "rece_erase_compare_same_seed":
        (erase,) = inputs_of(graph, "RECEEraseConcept")
        check.that((erase["concepts"], erase["guide"], erase["preset"]) == ("Van Gogh", "art", "artistic_style"),
                   f"{name}: erase settings {erase}")
        (eraser,) = workflows.api_nodes(graph, "RECEEraseConcept")
        check.that(sorted(s["model"][0] for s in samplers) == sorted([loader, eraser]), f"{name}: sampler models")
        check.that(len({(tuple(s["positive"]), tuple(s["negative"]), tuple(s["latent_image"])) for s in samplers}) == 1,
                   f"{name}: samplers do not share prompt, negative and latent")
        texts = {graph[s["positive"][0]]["inputs"]["text"] for s in samplers}
        check.that(texts == {"The Starry Night by Van Gogh"}, f"{name}: prompt {texts}")
        check.that(inputs_of(graph, "SaveImage")[0]["filename_prefix"] == "rece_compare", f"{name}: prefix")
        check.that(inputs_of(graph, "ImageStitch")[0]["direction"] == "right", f"{name}: stitch direction")
    if name == "rece_red_team_uce_vs_rece":
        attackers = inputs_of(graph, "RECEDeriveAdversarialEmbedding")
        erasers = workflows.api_nodes(graph, "UCEEraseConcept") + workflows.api_nodes(graph, "RECEEraseConcept")
        check.that(sorted(a["model"][0] for a in attackers) == sorted(erasers), f"{name}: attacked models")
        check.that(all(a["original_model"] == [loader, 0] and a["concept"] == "nudity" for a in attackers),
                   f"{name}: attackers' original_model/concept")
        attack_ids = workflows.api_nodes(graph, "RECEDeriveAdversarialEmbedding")
        check.that(sorted(s["positive"][0] for s in samplers) == sorted(attack_ids), f"{name}: positives")
        for sampler in samplers:
            attacked = graph[sampler["positive"][0]]["inputs"]["model"]
            check.that(sampler["model"] == attacked, f"{name}: a sampler draws from another model than its attack's")
        check.that(inputs_of(graph, "SaveImage")[0]["filename_prefix"] == "rece_red_team", f"{name}: prefix")
    if name == "rece_erase_nudity_save_checkpoint":
        (save,) = inputs_of(graph, "CheckpointSave")
        (eraser,) = workflows.api_nodes(graph, "RECEEraseConcept")
        check.that(save["model"] == [eraser, 0] and save["clip"] == [loader, 1] and save["vae"] == [loader, 2],
                   f"{name}: CheckpointSave inputs {save}")
        check.that(save["filename_prefix"] == "checkpoints/rece_nudity", f"{name}: prefix")
    if name == "rece_share_erasure_and_lora":
        (eraser,) = workflows.api_nodes(graph, "RECEEraseConcept")
        (exporter,) = workflows.api_nodes(graph, "RECEExportErasureLoRA")
        (applier,) = workflows.api_nodes(graph, "LoraModelLoader")
        check.that(inputs_of(graph, "RECESaveErasure")[0]["model"] == [eraser, 0], f"{name}: Save Erasure input")
        check.that(inputs_of(graph, "RECEExportErasureLoRA")[0]["rank"] == 0, f"{name}: export is not exact")
        lora_inputs = inputs_of(graph, "LoraModelLoader")[0]
        check.that(lora_inputs["model"] == [loader, 0] and lora_inputs["lora"] == [exporter, 0]
                   and lora_inputs["strength_model"] == 1.0, f"{name}: Load LoRA Model inputs {lora_inputs}")
        check.that(sorted(s["model"][0] for s in samplers) == sorted([eraser, applier]), f"{name}: sampler models")
        compare = inputs_of(graph, "RECECompareKVWeights")[0]
        check.that({compare["model_a"][0], compare["model_b"][0]} == {eraser, applier}, f"{name}: compared models")


def check_prompt_attacks_shape(check: Checks, name: str, graph: dict, loader: str) -> None:
    """The original samples the target; each erased model is attacked by UnlearnDiff (its own) and
    Ring-A-Bell, and samples each attack."""
    (uce,) = workflows.api_nodes(graph, "UCEEraseConcept")
    (rece,) = workflows.api_nodes(graph, "RECEEraseConcept")
    unlearn = workflows.api_nodes(graph, "RECEUnlearnDiffAttack")
    (bell,) = workflows.api_nodes(graph, "RECERingABell")
    (target,) = [i for i in workflows.api_nodes(graph, "KSampler") if graph[i]["inputs"]["model"] == [loader, 0]]
    check.that(sorted(graph[i]["inputs"]["model"][0] for i in unlearn) == sorted([uce, rece]), f"{name}: attacked models")
    check.that(all(graph[i]["inputs"]["target"] == [target, 0] for i in unlearn), f"{name}: attack targets")
    prompt = graph[graph[target]["inputs"]["positive"][0]]["inputs"]["text"]
    check.that(all(graph[i]["inputs"]["prompt"] == prompt for i in unlearn + [bell]), f"{name}: attack prompts")
    pairs = {(graph[i]["inputs"]["model"][0], graph[i]["inputs"]["positive"][0]) for i in workflows.api_nodes(graph, "KSampler")
             if i != target}
    expected = {(graph[a]["inputs"]["model"][0], a) for a in unlearn} | {(uce, bell), (rece, bell)}
    check.that(pairs == expected, f"{name}: (model, attack) of the samplers {pairs}")
    check.that(inputs_of(graph, "SaveImage")[0]["filename_prefix"] == "rece_prompt_attacks", f"{name}: prefix")


def preview_texts(check: Checks, name: str, entry: dict, graph: dict, expected: int) -> list[str]:
    ids = [i for i in workflows.api_nodes(graph, "PreviewAny") if graph[i]["_meta"]["title"] != LATENT_CHECK]
    texts = [t for i in ids for t in entry["outputs"].get(i, {}).get("text", [])]
    check.that(len(texts) == expected and all(t.strip() for t in texts), f"{name}: preview texts {texts}")
    return texts


def saved_stitch(check: Checks, server: host.Server, name: str, entry: dict, graph: dict) -> None:
    (save,) = workflows.api_nodes(graph, "SaveImage")
    images = entry["outputs"].get(save, {}).get("images", [])
    if not check.that(len(images) == 1, f"{name}: SaveImage outputs {images}"):
        return
    path = server.output_dir / images[0].get("subfolder", "") / images[0]["filename"]
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    spacing = inputs_of(graph, "ImageStitch")[0]["spacing_width"]
    check.that(pixels.shape == (TEST_SIZE, 2 * TEST_SIZE + spacing, 3), f"{name}: image shape {pixels.shape}")
    left, right = pixels[:, :TEST_SIZE], pixels[:, TEST_SIZE + spacing:]
    if visible_images(graph):
        check.that(np.isfinite(pixels).all() and left.std() > 0 and right.std() > 0, f"{name}: a flat half in {path}")
        check.that(not np.array_equal(left, right), f"{name}: both halves are identical")


def visible_images(graph: dict) -> bool:
    """Whether the checkpoint's random TAESD shows anything at 8 bits: the
    SD1.5 one does; the SD2/SDXL ones decode these latents to black, where
    only the latent checks can tell a NaN."""
    return inputs_of(graph, "CheckpointLoaderSimple")[0]["ckpt_name"] == paths.SLIM_SD15_NAME


def outputs_compare(check, server, entry, graph):
    name = "rece_erase_compare_same_seed"
    saved_stitch(check, server, name, entry, graph)
    text = (preview_texts(check, name, entry, graph, 1) or [""])[0]
    check.that(text.startswith("RECE erased 'Van Gogh' -> 'art'"), f"{name}: report {text!r}")


def outputs_red_team(check, server, entry, graph):
    name = "rece_red_team_uce_vs_rece"
    saved_stitch(check, server, name, entry, graph)
    texts = preview_texts(check, name, entry, graph, 2)
    check.that(all(t.startswith("adversarial embedding of 'nudity'") for t in texts), f"{name}: reports {texts}")


def outputs_save_checkpoint(check, server, entry, graph):
    name = "rece_erase_nudity_save_checkpoint"
    text = (preview_texts(check, name, entry, graph, 1) or [""])[0]
    check.that(text.startswith("RECE erased 'nudity'") and "rank" in text, f"{name}: report {text!r}")
    saved = sorted((server.output_dir / "checkpoints").glob("rece_nudity_*.safetensors"))
    if not check.that(saved, f"{name}: saved {saved}"):
        return
    from safetensors import safe_open

    original_path = paths.CHECKPOINT_DIR / inputs_of(graph, "CheckpointLoaderSimple")[0]["ckpt_name"]
    with safe_open(str(saved[-1]), framework="pt") as erased, safe_open(str(original_path), framework="pt") as original:
        keys = set(erased.keys())
        unet = [k for k in keys if k.startswith("model.diffusion_model.")]
        check.that(len(unet) > 100 and any(k.startswith("first_stage_model.") for k in keys)
                   and any(k.startswith(("cond_stage_model.", "conditioner.")) for k in keys), f"{name}: keys of {saved[-1]}")
        for key in sorted(keys):
            if not torch.isfinite(erased.get_tensor(key).float()).all():
                check.that(False, f"{name}: {key} is not finite")
                break
        kv = [k for k in unet if ".attn2.to_k." in k or ".attn2.to_v." in k]
        others = [k for k in unet if ".attn1.to_q." in k]
        expected_kv = [k for k in original.keys() if ".attn2.to_k." in k or ".attn2.to_v." in k]
        check.that(len(kv) == len(expected_kv) > 0, f"{name}: {len(kv)} K/V weights, the original has {len(expected_kv)}")
        for key in kv[:2] + others[:2]:
            before, after = original.get_tensor(key).float(), erased.get_tensor(key).float()
            changed = not torch.allclose(before, after, rtol=0, atol=1e-3)
            check.that(changed == (key in kv), f"{name}: {key} {'unchanged' if key in kv else 'changed'} by the erasure")


def outputs_share(check, server, entry, graph):
    name = "rece_share_erasure_and_lora"
    texts = preview_texts(check, name, entry, graph, 3)
    saved = [t for t in texts if re.match(r"saved rece_nudity_\d{5}_\.safetensors", t)]
    exported = [t for t in texts if re.match(r"saved LoRA rece/nudity_\d{5}_\.safetensors", t) and "exact" in t]
    compared = [t for t in texts if t.startswith("K/V weights of model_a vs model_b")]
    check.that(len(saved) == len(exported) == len(compared) == 1, f"{name}: reports {texts}")
    if compared:
        overall = float(compared[0].split("relative difference ")[1].split()[0])
        check.that(overall < 1e-5, f"{name}: the LoRA model's K/V weights differ from the erased model's: {compared[0]}")
    workdir = server.output_dir.parent
    from safetensors import safe_open

    files = []
    if saved and exported:
        files = [(workdir / "rece_erasures" / saved[0].split()[1], "erasure.up"),
                 (workdir / "loras" / exported[0].split()[2],
                  "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight")]
    for path, key in files:
        if check.that(path.is_file(), f"{name}: {path} was not written"):
            with safe_open(str(path), framework="pt") as handle:
                check.that(key in handle.keys() and torch.isfinite(handle.get_tensor(key)).all(), f"{name}: {path}")
    (save,) = workflows.api_nodes(graph, "SaveImage")
    images = entry["outputs"].get(save, {}).get("images", [])
    if check.that(len(images) == 1, f"{name}: SaveImage outputs {images}"):
        pixels = np.asarray(Image.open(server.output_dir / images[0]["subfolder"] / images[0]["filename"]).convert("RGB"))
        spacing = inputs_of(graph, "ImageStitch")[0]["spacing_width"]
        left, right = pixels[:, :TEST_SIZE].astype(int), pixels[:, TEST_SIZE + spacing:].astype(int)
        check.that((left.std() > 0 or not visible_images(graph)) and np.abs(left - right).max() <= 2,
                   f"{name}: the LoRA model's image differs from the erased model's")


def outputs_prompt_attacks(check, server, entry, graph):
    name = "rece_red_team_prompt_attacks"
    texts = preview_texts(check, name, entry, graph, 5)
    reports = [t for t in texts if t.startswith("UnlearnDiff attack on")]
    bells = [t for t in texts if t.startswith("Ring-A-Bell on")]
    prompt = inputs_of(graph, "RECERingABell")[0]["prompt"]
    adversarial = [t for t in texts if t.endswith(prompt) and t != prompt]
    check.that(len(reports) == 2 and len(bells) == 1 and len(adversarial) == 2, f"{name}: previews {texts}")
    (save,) = workflows.api_nodes(graph, "SaveImage")
    images = entry["outputs"].get(save, {}).get("images", [])
    if check.that(len(images) == 1, f"{name}: SaveImage outputs {images}"):
        pixels = np.asarray(Image.open(server.output_dir / images[0]["subfolder"] / images[0]["filename"]).convert("RGB"))
        spacing = inputs_of(graph, "ImageStitch")[0]["spacing_width"]
        side = 2 * TEST_SIZE + spacing
        check.that(pixels.shape == (side, side, 3), f"{name}: grid shape {pixels.shape}")


CHECK_OUTPUTS = {
    "rece_red_team_prompt_attacks": outputs_prompt_attacks,
    "rece_share_erasure_and_lora": outputs_share,
    "rece_erase_compare_same_seed": outputs_compare,
    "rece_red_team_uce_vs_rece": outputs_red_team,
    "rece_erase_nudity_save_checkpoint": outputs_save_checkpoint,
}


def check_converter_on_a_template_the_web_page_wrote(check: Checks, server: host.Server, object_info: dict) -> None:
    """ComfyUI's own SD1.5 template, saved by the web page, converts and runs."""
    found = glob.glob(str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "comfyui_workflow_templates_media_other"
                          / "templates" / "default.json"))
    if not found:
        return  # templates package not installed (e.g. another ComfyUI via COMFYUI_PATH)
    workflow = workflows.load_workflow(found[0])
    check.none(workflows.link_type_errors(workflow, object_info), "default template")
    graph = workflows.to_api(workflow, object_info)
    sampler = inputs_of(graph, "KSampler")[0]
    check.that({k: sampler[k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")}
               == {"steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1},
               f"default template: KSampler widgets read as {sampler}")
    graph = workflows.with_checkpoint(graph, paths.SLIM_SD15_NAME)
    graph = workflows.with_inputs(graph, class_type="EmptyLatentImage", width=TEST_SIZE, height=TEST_SIZE)
    graph = workflows.with_inputs(graph, class_type="KSampler", steps=TEST_STEPS)
    entry = server.run_prompt(graph)
    check.that(entry["status"]["status_str"] == "success", f"default template: {json.dumps(entry['status'])[:2000]}")


# --- devkit.workflows without ComfyUI -------------------------------------------------------------

OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
                               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP", "VAE"],
                               "output_name": ["MODEL", "CLIP", "VAE"], "output_node": False},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
                       "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"], "output_node": False},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]}},
                         "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"],
                         "output_node": False},
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
        "cfg": ["FLOAT", {}], "sampler_name": [["euler", "dpmpp_2m"], {}], "scheduler": [["normal", "karras"], {}],
        "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "output_node": False},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
                  "input_order": {"required": ["samples", "vae"]}, "output": ["IMAGE"], "output_node": False},
    "ImageStitch": {"input": {"required": {"image1": ["IMAGE"], "direction": [["right", "down"], {}],
                                           "spacing_width": ["INT", {}]},
                              "optional": {"image2": ["IMAGE"]}},
                    "input_order": {"required": ["image1", "direction", "spacing_width"], "optional": ["image2"]},
                    "output": ["IMAGE"], "output_node": False},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]},
                            "hidden": {"prompt": "PROMPT"}},
                  "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt"]},
                  "output": [], "output_node": True},
    "PreviewAny": {"input": {"required": {"source": ["*", {}]}}, "input_order": {"required": ["source"]},
                   "output": [], "output_node": True},
    "OldSeeded": {"input": {"required": {"seed": ["INT", {}], "text": ["STRING", {}]}},
                  "input_order": {"required": ["seed", "text"]}, "output": ["STRING"], "output_node": False},
}


def ui_node(node_id, kind, inputs=(), outputs=(), widgets=(), **extra):
    node = {"id": node_id, "type": kind, "pos": [300 * node_id, 0], "size": [280, 100], "flags": {}, "order": node_id,
            "mode": 0, "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": links} for t, links in outputs],
            "properties": {}, "widgets_values": list(widgets)}
    node.update(extra)
    return node


def txt2img_ui() -> dict:
    """A txt2img workflow as the web page saves it, with a note, a reroute and a seed control value."""
    nodes = [
        ui_node(1, "CheckpointLoaderSimple", outputs=[("MODEL", [1]), ("CLIP", [2, 3]), ("VAE", [9])],
                widgets=["a.safetensors"]),
        ui_node(2, "CLIPTextEncode", [("clip", "CLIP", 2)], [("CONDITIONING", [4])], ["a red circle"], title="Prompt"),
        ui_node(3, "CLIPTextEncode", [("clip", "CLIP", 3)], [("CONDITIONING", [5])], [""], title="Negative"),
        ui_node(4, "EmptyLatentImage", outputs=[("LATENT", [6])], widgets=[512, 512, 1]),
        ui_node(5, "KSampler", [("model", "MODEL", 1), ("positive", "CONDITIONING", 4),
                                ("negative", "CONDITIONING", 5), ("latent_image", "LATENT", 6)],
                [("LATENT", [7])], [42, "fixed", 20, 7.5, "euler", "normal", 1.0]),
        ui_node(6, "VAEDecode", [("samples", "LATENT", 7), ("vae", "VAE", 10)], [("IMAGE", [8])]),
        ui_node(7, "SaveImage", [("images", "IMAGE", 8)], widgets=["txt2img"]),
        ui_node(8, "Reroute", [("", "*", 9)], [("VAE", [10])]),
        ui_node(9, "MarkdownNote", widgets=["**txt2img**"]),
    ]
    links = [[1, 1, 0, 5, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"], [4, 2, 0, 5, 1, "CONDITIONING"],
             [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"], [7, 5, 0, 6, 0, "LATENT"],
             [8, 6, 0, 7, 0, "IMAGE"], [9, 1, 2, 8, 0, "VAE"], [10, 8, 0, 6, 1, "VAE"]]
    return {"last_node_id": 9, "last_link_id": 10, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def test_to_api_maps_widgets_by_input_order_and_skips_the_seed_control_value():
    graph = workflows.to_api(txt2img_ui(), OBJECT_INFO)
    assert graph["5"] == {"class_type": "KSampler", "_meta": {"title": "KSampler"}, "inputs": {
        "seed": 42, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}}
    assert graph["2"]["inputs"] == {"text": "a red circle", "clip": ["1", 1]}
    assert graph["2"]["_meta"]["title"] == "Prompt"
    # The reroute is followed to the loader; the note and the reroute are not sent.
    assert graph["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert set(graph) == {"1", "2", "3", "4", "5", "6", "7"}
    assert workflows.output_ids(graph, OBJECT_INFO) == ["7"]
    assert workflows.link_type_errors(txt2img_ui(), OBJECT_INFO) == []
    assert workflows.widget_count_errors(txt2img_ui(), OBJECT_INFO) == []
    assert workflows.structure_errors(txt2img_ui()) == []


def test_a_seed_saved_without_its_control_value_is_reported():
    workflow = txt2img_ui()
    workflow["nodes"][4]["widgets_values"] = [42, 20, 7.5, "euler", "normal", 1.0]  # "fixed" lost
    (problem,) = workflows.widget_count_errors(workflow, OBJECT_INFO)
    assert "KSampler" in problem
    # A plain INT named 'seed' (older nodes) takes a control value only when one is stored.
    node = ui_node(1, "OldSeeded", widgets=[7, "hello"])
    assert workflows.widget_values(node, OBJECT_INFO["OldSeeded"]) == {"seed": 7, "text": "hello"}
    node["widgets_values"] = [7, "randomize", "hello"]
    assert workflows.widget_values(node, OBJECT_INFO["OldSeeded"]) == {"seed": 7, "text": "hello"}


def test_a_link_of_the_wrong_type_is_reported():
    workflow = txt2img_ui()
    # CLIP output into the sampler's model input, link stored as CLIP.
    workflow["links"][0] = [1, 1, 1, 5, 0, "CLIP"]
    loader_outputs = workflow["nodes"][0]["outputs"]
    loader_outputs[0]["links"], loader_outputs[1]["links"] = [], [1, 2, 3]
    (problem,) = workflows.link_type_errors(workflow, OBJECT_INFO)
    assert "output type CLIP does not fit input 'model' of type MODEL" in problem
    workflow = txt2img_ui()
    workflow["links"][0][5] = "LATENT"  # right slots, wrong stored type
    (problem,) = workflows.link_type_errors(workflow, OBJECT_INFO)
    assert "stored as type 'LATENT'" in problem


def test_any_type_and_optional_inputs():
    b = workflows.WorkflowBuilder(OBJECT_INFO)
    loader = b.add("CheckpointLoaderSimple", (0, 0), ["a.safetensors"])
    stitch = b.add("ImageStitch", (400, 0), ["down", 4], title="Stitch")
    decode = b.add("VAEDecode", (0, 200), [])
    preview = b.add("PreviewAny", (800, 0), [])
    b.link(decode, 0, stitch, "image1")
    b.link(decode, 0, stitch, "image2")
    b.link(loader, 2, decode, "vae")
    b.link(stitch, 0, preview, "source")  # IMAGE into "*"
    workflow = b.build("test")
    assert workflows.link_type_errors(workflow, OBJECT_INFO) == []
    assert workflows.structure_errors(workflow) == []
    stitch_node = workflow["nodes"][stitch - 1]
    assert [s["name"] for s in stitch_node["inputs"]] == ["image1", "image2"] and stitch_node["inputs"][1]["shape"] == 7
    graph = workflows.to_api(workflow, OBJECT_INFO)
    assert graph[str(stitch)]["inputs"] == {"direction": "down", "spacing_width": 4, "image1": ["3", 0], "image2": ["3", 0]}
    with pytest.raises(workflows.WorkflowError, match="no socket 'samples'"):
        b.link(loader, 0, stitch, "samples")
    # Bypassed, the stitch passes its first IMAGE input straight to the preview.
    workflow["nodes"][stitch - 1]["mode"] = 4
    graph = workflows.to_api(workflow, OBJECT_INFO)
    assert str(stitch) not in graph and graph[str(preview)]["inputs"] == {"source": [str(decode), 0]}


def test_missing_node_types_ignore_notes_and_conversion_refuses_them():
    workflow = txt2img_ui()
    workflow["nodes"].append(ui_node(10, "SomePackNode"))
    assert workflows.missing_node_types(workflow, OBJECT_INFO) == ["SomePackNode"]
    assert workflows.missing_node_types(txt2img_ui(), OBJECT_INFO) == []
    with pytest.raises(workflows.WorkflowError, match="SomePackNode"):
        workflows.to_api(workflow, OBJECT_INFO)


def test_muted_and_bypassed_nodes_are_left_out_as_the_web_page_does():
    workflow = txt2img_ui()
    workflow["nodes"][6]["mode"] = 2  # SaveImage muted
    workflow["nodes"][5]["mode"] = 4  # VAEDecode bypassed: nothing of type IMAGE passes through
    graph = workflows.to_api(workflow, OBJECT_INFO)
    assert "6" not in graph and "7" not in graph


def test_checkpoint_and_input_helpers_copy_the_graph():
    graph = workflows.to_api(txt2img_ui(), OBJECT_INFO)
    before = copy.deepcopy(graph)
    swapped = workflows.with_checkpoint(graph, "b.safetensors")
    assert swapped["1"]["inputs"]["ckpt_name"] == "b.safetensors" and graph == before
    changed = workflows.with_inputs(graph, title="Prompt", text="a blue square")
    assert changed["2"]["inputs"]["text"] == "a blue square" and changed["3"]["inputs"]["text"] == ""
    assert workflows.with_inputs(graph, class_type="KSampler", steps=2)["5"]["inputs"]["steps"] == 2
    with pytest.raises(workflows.WorkflowError, match="no input"):
        workflows.with_inputs(graph, class_type="KSampler", stpes=2)
    with pytest.raises(workflows.WorkflowError, match="no node"):
        workflows.with_inputs(graph, title="Nope", text="")
    with pytest.raises(workflows.WorkflowError, match="no checkpoint loader"):
        workflows.with_checkpoint({"1": {"class_type": "VAEDecode", "inputs": {}}}, "b.safetensors")
    assert sorted(workflows.iter_links(graph))[0] == ("2", "clip", "1", 1)


def test_example_files_are_ui_workflows_with_readable_layout():
    """Structure only (the server test checks them against ComfyUI's nodes)."""
    for name in EXAMPLE_NAMES:
        workflow = workflows.load_workflow(EXAMPLES / f"{name}.json")
        assert workflow["version"] == 0.4
        assert workflows.structure_errors(workflow) == [], name
        assert workflows.overlapping_nodes(workflow) == [], name
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(EXAMPLE_NAMES)


def test_a_file_saved_before_the_host_added_a_widget_opens_with_its_default():
    """As both web pages do (0.33 added LoraModelLoader's 'bypass' after 0.3.75)."""
    info = {"input": {"required": {"model": ["MODEL", {}], "strength_model": ["FLOAT", {"default": 1.0}],
                                   "bypass": ["BOOLEAN", {"default": False}]}},
            "input_order": {"required": ["model", "strength_model", "bypass"]}, "output": ["MODEL"]}
    older = {"nodes": [ui_node(1, "LoraModelLoader", widgets=[0.75])], "links": []}
    assert workflows.widget_values(older["nodes"][0], info) == {"strength_model": 0.75, "bypass": False}
    assert workflows.widget_count_errors(older, {"LoraModelLoader": info}) == []
    # A value shifted into the wrong widget is no older file: still reported.
    shifted = {"nodes": [ui_node(1, "LoraModelLoader", widgets=[True])], "links": []}
    assert workflows.widget_count_errors(shifted, {"LoraModelLoader": info})
    # Nor is a missing widget without a default.
    del info["input"]["required"]["bypass"][1]["default"]
    assert workflows.widget_count_errors(older, {"LoraModelLoader": info})


def test_a_seed_saved_without_its_control_value_is_reported_even_where_later_widgets_have_defaults():
    info = {"input": {"required": {
        "seed": ["INT", {"control_after_generate": True, "default": 0}], "steps": ["INT", {"default": 20}],
        "cfg": ["FLOAT", {"default": 8.0}], "sampler_name": [["euler"], {"default": "euler"}],
        "scheduler": [["normal"], {"default": "normal"}], "denoise": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]}, "output": ["LATENT"]}
    workflow = {"nodes": [ui_node(1, "KSampler", widgets=[42, 20, 7.5, "euler", "normal", 1.0])], "links": []}
    (problem,) = workflows.widget_count_errors(workflow, {"KSampler": info})
    assert "KSampler" in problem
