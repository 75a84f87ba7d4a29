"""The pack in ComfyUI's web page, in headless Chromium, as a new user meets it.

One ComfyUI server on 127.0.0.1 and one fresh Chromium profile (a first
visit) for the whole test, so xdist never starts two. Like
test_example_workflows.py, every check is collected and the test fails once
with all of them. It drives whichever host runs it, each with its own
frontend: ComfyUI 0.3.75 (frontend 1.32, the default) and 0.33 (frontend
1.48, ``RECE_HOST=0.33`` with ``.venv-0.33``); devkit/browser.py describes
what differs between the two pages. Screenshots go to
output/browser/<ComfyUI version>/ (the server's /system_stats
comfyui_version, e.g. output/browser/0.3.75/, output/browser/0.33.0/; the
folder is printed at the end):

    01_first_visit.png   the page as a new user first sees it
    02_templates.png     the templates browser on the pack's entry, with thumbnails
    03_<workflow>.png    each example workflow as it opens from there
    04_search.png        the node search box finding a node by its display name
    05_presets.png       RECE and UCE Erase Concept after choosing presets in the page
    06_node_library.png  the node library's RECE folder
    07_run.png           the run's output image on the Save Image node
    08_japanese.png      the page in Japanese (Settings > Language): RECE Erase Concept
                         by its Japanese name (locales/ja/nodeDefs.json) with its preset
                         tooltip showing, on both frontends (on 1.32 web/rece_i18n.js
                         merges the strings the frontend drops, see
                         CUSTOM_NODE_LOCALES_DROPPED_BEFORE)
    09_preset_labels_ja.png  RECE Erase Concept's preset menu in Japanese (locales/ja/main.json labels)
    10_preset_labels_en.png  the same menu back in English (raw choices, the frontend's filter box)

Skipped, with the reason, only outside CI on a machine without Chromium or
the playwright package; under CI (CI=true) that is a failure.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest

from devkit import browser, host, paths
from rece_ops import PRESETS

ARTIFACTS_ROOT = paths.REPO_ROOT / "output" / "browser"  # one folder per ComfyUI version below it
EXAMPLES = paths.REPO_ROOT / "example_workflows"
EXAMPLE_NAMES = sorted(path.stem for path in EXAMPLES.glob("*.json"))
DISPLAY_NAMES = {
    "RECEEraseConcept": "RECE Erase Concept",
    "UCEEraseConcept": "UCE Erase Concept",
    "RECEDeriveAdversarialEmbedding": "Derive Adversarial Embedding",
    "RECESaveErasure": "Save Erasure",
    "RECELoadErasure": "Load Erasure",
    "RECEExportErasureLoRA": "Export Erasure as LoRA",
    "RECELoadPublishedErasure": "Load Published Erasure",
    "RECECompareKVWeights": "Compare Cross-Attention Weights",
    "RECEUnlearnDiffAttack": "UnlearnDiff Attack",
    "RECERingABell": "Ring-A-Bell Attack",
}
ERASE_NODES = ("RECEEraseConcept", "UCEEraseConcept")
NUMBERS = ("lamb", "erase_scale", "preserve_scale", "reg_scale", "epochs")
# 1.32's dialog "This workflow has missing nodes", 1.48's error overlay "Missing node: <type>".
MISSING_NODES_TEXT = "missing node"
RUN_WORKFLOW = "rece_erase_compare_same_seed"
RUN_SIZE, RUN_STEPS = 64, 2
JA_NODE_DEFS = paths.REPO_ROOT / "locales" / "ja" / "nodeDefs.json"
JA_LANGUAGE = ("日本語", "ja")  # the settings dialog's Language entry, and the Comfy.Locale it sets
JA_NODE, JA_TOOLTIP_INPUT = "RECEEraseConcept", "preset"
# Frontends before 1.33 (ComfyUI 0.3.75 pins 1.32.9) replace a locale's messages when they
# load it lazily, which drops the custom nodes' translations merged at start-up: the page is in
# Japanese but a pack's nodes keep their English names and tooltips (Comfy-Org/ComfyUI_frontend
# issue #6748, fixed by pull request #7214, which merges them again after the load). There the
# pack's web/rece_i18n.js merges its own strings again and says so on the console; later
# frontends keep them and it does nothing.
CUSTOM_NODE_LOCALES_DROPPED_BEFORE = (1, 33)
RESTORED_MESSAGE = "comfyui-rece: merged the pack's 'ja' translations again"
I18N_WARNING = "comfyui-rece: could not read the translations"
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # kana or kanji


class Checks:
    """Soft assertions: every failed check is kept, the test fails once at the end with all of them."""

    def __init__(self):
        self.failures: list[str] = []

    def that(self, condition: object, message: str) -> bool:
        if not condition:
            self.failures.append(message)
        return bool(condition)


def preset_numbers(name: str, node_type: str) -> dict:
    settings = PRESETS[name].settings
    keys = NUMBERS if node_type == "RECEEraseConcept" else NUMBERS[:-1]
    return {key: getattr(settings, key) for key in keys}


def numbers_of(widgets: dict, node_type: str) -> dict:
    keys = NUMBERS if node_type == "RECEEraseConcept" else NUMBERS[:-1]
    return {key: widgets.get(key) for key in keys}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        isinstance(a[k], (int, float)) and abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(b[k])) for k in a)


def test_the_pack_in_a_real_browser(tmp_path_factory):
    reason = browser.unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the browser test, but {reason}")
        pytest.skip(f"no browser test on this machine: {reason}")
    if not (paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME).exists():
        pytest.fail(f"{paths.SLIM_SD15_NAME} is missing: run scripts/setup.sh before the tests")
    check = Checks()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    workdir = tmp_path_factory.mktemp("browser")
    started = time.perf_counter()
    with host.server(workdir) as server, browser.chromium() as page:
        seconds["start"] = time.perf_counter() - started
        version = server.get("/system_stats")["system"]["comfyui_version"]
        artifacts = ARTIFACTS_ROOT / version
        artifacts.mkdir(parents=True, exist_ok=True)
        for old in artifacts.glob("*.png"):
            old.unlink()
        object_info = server.get("/object_info", timeout=120)
        comfy = browser.ComfyPage(page, server.base, shots=artifacts)
        steps = [
            ("first visit", lambda: first_visit(check, comfy)),
            ("templates", lambda: templates_browser(check, comfy)),
            ("workflows", lambda: open_every_workflow(check, comfy, object_info)),
            ("search", lambda: node_search(check, comfy)),
            ("presets", lambda: preset_dropdowns(check, comfy, object_info)),
            ("library", lambda: node_library(check, comfy)),
            ("run", lambda: run_from_the_page(check, comfy, server)),
            ("japanese", lambda: japanese(check, comfy, server, object_info, notes)),  # the page stays in Japanese
            ("preset labels", lambda: preset_labels_in_japanese(check, comfy)),  # back in English at its end
        ]
        for name, step in steps:
            before = time.perf_counter()
            try:
                step()
            except Exception as error:  # noqa: BLE001 - one broken step must not hide the others' results
                check.that(False, f"{name}: {type(error).__name__}: {error}")
                comfy.screenshot(f"failed_{name.replace(' ', '_')}.png")
                comfy.close_dialogs()
            seconds[name] = time.perf_counter() - before
        check.that(not comfy.errors, f"uncaught errors in the page: {comfy.errors}")
        frontend = ".".join(map(str, comfy.frontend_version()))
    print(f"\nComfyUI {version}, frontend {frontend}: browser test screenshots in {artifacts}: "
          f"{sorted(p.name for p in artifacts.glob('*.png'))}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    for note in notes:
        print("NOTE:", note)
    for failure in check.failures:
        print("FAILED CHECK:", failure[:600])
    assert not check.failures, "\n".join(check.failures) + "\n--- server log ---\n" + server.log()[-3000:]


def first_visit(check: Checks, comfy: browser.ComfyPage) -> None:
    """A new user's first page: ComfyUI opens its templates browser, where the pack has an entry."""
    comfy.open()
    try:
        comfy.page.get_by_text(browser.PACK_MODULE, exact=True).first.wait_for(timeout=15000)
    except Exception:  # noqa: BLE001 - ComfyUI may not open it by itself; the next step opens it
        pass
    comfy.screenshot("01_first_visit.png")
    extensions = comfy.js("() => app.extensionManager && app.extensions?.map(e => e.name)") or []
    check.that("comfyui-rece.presets" in extensions, f"the pack's web extension is not loaded: {extensions}")


def templates_browser(check: Checks, comfy: browser.ComfyPage) -> None:
    """The pack's entry lists every example workflow, each with its thumbnail."""
    comfy.open_templates()  # the one the first visit opened, else from the sidebar
    comfy.page.locator(f"[data-testid=template-workflow-{EXAMPLE_NAMES[0]}] img").first.wait_for(timeout=15000)
    comfy.page.wait_for_function(
        "(names) => names.every(n => document.querySelector(`[data-testid=template-workflow-${n}] img`)?.complete)",
        arg=EXAMPLE_NAMES, timeout=15000)
    cards = comfy.js("""() => [...document.querySelectorAll('[data-testid^=template-workflow-]')]
        .filter(e => e.querySelector('h3')).map(e => ({
            name: e.getAttribute('data-testid').replace('template-workflow-', ''),
            title: e.querySelector('h3').innerText,
            thumbnail: [...e.querySelectorAll('img')].map(i => ({alt: i.alt, width: i.naturalWidth}))}))""")
    comfy.screenshot("02_templates.png")
    listed = sorted(card["name"] for card in cards)
    check.that(listed == EXAMPLE_NAMES, f"templates browser lists {listed} under {browser.PACK_MODULE}")
    for card in cards:
        shown = [image for image in card["thumbnail"] if image["width"] > 0]
        check.that(shown, f"template {card['name']}: no thumbnail shown ({card['thumbnail']})")
    for name in EXAMPLE_NAMES:
        thumbnail = EXAMPLES / f"{name}.jpg"
        check.that(thumbnail.is_file() and thumbnail.stat().st_size < 100_000,
                   f"{thumbnail.name}: missing or over 100 KB (python -m devkit.browser --thumbnails)")


def missing_nodes_shown(comfy: browser.ComfyPage) -> bool:
    return MISSING_NODES_TEXT in comfy.text().lower()


def absent_checkpoints(workflow: dict, object_info: dict) -> set[str]:
    """The checkpoints the workflow's loaders name that the server does not have
    (the examples name SD1.5's, the test server has only its own)."""
    have = set(object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0])
    return {n["widgets_values"][0] for n in workflow["nodes"]
            if n["type"] == "CheckpointLoaderSimple" and n["widgets_values"][0] not in have}


def expected_warning(text: str, workflow: dict, object_info: dict) -> bool:
    """1.48 warns "<file> is missing" (and marks the loader with errors) when a loader
    names a checkpoint the server lacks: that warning, for exactly such a file, is what
    a user meets before choosing their checkpoint in the loader."""
    return any(text.startswith(f"{name} is missing") for name in absent_checkpoints(workflow, object_info))


def open_every_workflow(check: Checks, comfy: browser.ComfyPage, object_info: dict) -> None:
    """Each example opens from the templates browser with every node known and
    no "missing nodes" warning; a named preset shows its own numbers."""
    # The warning this looks for does show for a node type the server lacks.
    broken = json.loads((EXAMPLES / f"{EXAMPLE_NAMES[0]}.json").read_text())
    broken["nodes"][1]["type"] = "NoSuchNodeType"
    comfy.close_dialogs()
    comfy.js("(w) => app.loadGraphData(w, true, true, 'missing-node self-check')", broken)
    comfy.settle(1.5)
    check.that(missing_nodes_shown(comfy), "self-check: a workflow with an unknown node type showed no missing-nodes warning")
    comfy.close_dialogs()
    # A file whose numbers disagree with its named preset opens showing the preset's numbers (what runs).
    stale = json.loads((EXAMPLES / f"{RUN_WORKFLOW}.json").read_text())
    (eraser,) = [n for n in stale["nodes"] if n["type"] == "RECEEraseConcept"]
    preset = eraser["widgets_values"][3]
    eraser["widgets_values"][0] = "stale numbers"  # concepts: tells this graph from the one before
    eraser["widgets_values"][4:9] = [7, 0.5, 2.0, 0.3, 0.05]  # epochs, lamb, erase_scale, preserve_scale, reg_scale
    comfy.js("(w) => app.loadGraphData(w, true, true, 'stale preset numbers')", stale)
    comfy.settle(1.0)
    (opened,) = [n for n in comfy.nodes() if n["type"] == "RECEEraseConcept"]
    shown, expected = numbers_of(opened["widgets"], "RECEEraseConcept"), preset_numbers(preset, "RECEEraseConcept")
    check.that(opened["widgets"]["concepts"] == "stale numbers" and opened["widgets"]["preset"] == preset
               and close(shown, expected),
               f"a file with preset {preset!r} and other numbers opens showing {opened['widgets']}, expected {expected}")
    for name in EXAMPLE_NAMES:
        workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
        comfy.open_template(name)
        comfy.screenshot(f"03_{name}.png")
        check.that(not missing_nodes_shown(comfy), f"{name}: the page warns of missing nodes")
        warnings = [text for text in comfy.warnings() if not expected_warning(text, workflow, object_info)]
        check.that(not warnings, f"{name}: the page shows warnings {warnings}")
        nodes = comfy.nodes()
        check.that(len(nodes) == len(workflow["nodes"]), f"{name}: {len(nodes)} nodes open, the file has {len(workflow['nodes'])}")
        unknown = [n["type"] for n in nodes if not n["known"]]
        check.that(not unknown, f"{name}: node types the page does not know: {unknown}")
        absent = absent_checkpoints(workflow, object_info)
        flagged = [n["title"] for n in nodes if n["has_errors"]
                   and not (n["type"] == "CheckpointLoaderSimple" and n["widgets"].get("ckpt_name") in absent)]
        check.that(not flagged, f"{name}: the page marks nodes with errors: {flagged}")
        for node in nodes:
            if node["type"] in ERASE_NODES and node["widgets"].get("preset") in PRESETS:
                shown = numbers_of(node["widgets"], node["type"])
                expected = preset_numbers(node["widgets"]["preset"], node["type"])
                check.that(close(shown, expected), f"{name}: {node['title']} shows {shown}, its preset runs with {expected}")
        comfy.close_dialogs()


def node_search(check: Checks, comfy: browser.ComfyPage) -> None:
    """The node search box finds every node by its display name (first result,
    in category RECE); Enter adds the two erase nodes to a blank workflow."""
    comfy.command("Comfy.NewBlankWorkflow")
    comfy.command("Comfy.Canvas.ResetView")  # 100 %: 1.48 keeps the fitted zoom of the last example
    spots = {"RECEEraseConcept": (0.25, 0.4), "UCEEraseConcept": (0.55, 0.4)}
    for node_type, display in DISPLAY_NAMES.items():
        results = comfy.search_nodes(display, at=(0.5, 0.85))
        first = results[0].split(" | ") if results else []
        check.that(first[:2] == [display, "RECE"], f"search {display!r}: first result {results[:1]} (all: {results[:5]})")
        if node_type == "RECEEraseConcept":
            comfy.screenshot("04_search.png")
        comfy.page.keyboard.press("Escape")
        comfy.settle(0.3)
    for node_type, spot in spots.items():
        comfy.add_node(DISPLAY_NAMES[node_type], at=spot)
        check.that(len(comfy.node_ids(node_type)) == 1, f"choosing {DISPLAY_NAMES[node_type]!r} in the search added "
                                                        f"{[n['type'] for n in comfy.nodes()]}")


def preset_dropdowns(check: Checks, comfy: browser.ComfyPage, object_info: dict) -> None:
    """Choosing a preset in the page fills the numbers with rece_ops.PRESETS';
    typing a number switches to custom and keeps four decimals; tooltips show."""
    for node_type in ERASE_NODES:
        ids = comfy.node_ids(node_type)
        if not check.that(len(ids) == 1, f"presets: no {node_type} on the canvas (the search step failed)"):
            continue
        node_id = ids[0]
        for name in [*(n for n in PRESETS if n != "nudity"), "nudity"]:
            comfy.choose(node_id, "preset", name)
            widgets = comfy.widgets(node_id)
            check.that(widgets["preset"] == name, f"{node_type}: preset reads {widgets['preset']!r} after choosing {name!r}")
            shown, expected = numbers_of(widgets, node_type), preset_numbers(name, node_type)
            check.that(close(shown, expected), f"{node_type}: preset {name!r} filled {shown}, expected {expected}")
        comfy.choose(node_id, "preset", "artistic_style")
        comfy.type_number(node_id, "reg_scale", "0.0001")
        widgets = comfy.widgets(node_id)
        check.that(widgets["preset"] == "custom" and abs(widgets["reg_scale"] - 0.0001) < 1e-12,
                   f"{node_type}: typing reg_scale 0.0001 gave preset {widgets['preset']!r}, reg_scale {widgets['reg_scale']}")
        tooltip = comfy.hover_tooltip(node_id, "preset")
        expected_tooltip = object_info[node_type]["input"]["required"]["preset"][1]["tooltip"]
        check.that(tooltip.strip() == expected_tooltip, f"{node_type}: preset tooltip in the page {tooltip!r}")
    (uce,) = comfy.node_ids("UCEEraseConcept") or [None]
    if uce is not None:
        comfy.choose(uce, "preset", "object_hard")
    comfy.screenshot("05_presets.png")


def node_library(check: Checks, comfy: browser.ComfyPage) -> None:
    """The node library's RECE folder holds the eight nodes by display name."""
    comfy.sidebar("Nodes")
    listed = sorted(comfy.library_folder("RECE") or [])
    comfy.screenshot("06_node_library.png")
    check.that(listed == sorted(DISPLAY_NAMES.values()), f"node library's RECE folder lists {listed}")
    comfy.sidebar("Nodes")  # close it again


def run_from_the_page(check: Checks, comfy: browser.ComfyPage, server: host.Server) -> None:
    """Open the first example, pick the test checkpoint in its loader, make it
    small (64x64, 2 steps: a CPU), press Run: the image and the report appear."""
    comfy.open_template(RUN_WORKFLOW)
    (loader,) = comfy.node_ids("CheckpointLoaderSimple")
    comfy.choose(loader, "ckpt_name", paths.SLIM_SD15_NAME)
    (latent,) = comfy.node_ids("EmptyLatentImage")
    comfy.type_number(latent, "width", str(RUN_SIZE))
    comfy.type_number(latent, "height", str(RUN_SIZE))
    for sampler in comfy.node_ids("KSampler"):
        comfy.type_number(sampler, "steps", str(RUN_STEPS))
    values = {n["type"]: n["widgets"] for n in comfy.nodes()}
    check.that(values["CheckpointLoaderSimple"]["ckpt_name"] == paths.SLIM_SD15_NAME
               and values["EmptyLatentImage"]["width"] == RUN_SIZE and values["KSampler"]["steps"] == RUN_STEPS,
               f"run: the widgets read {values['CheckpointLoaderSimple']}, {values['EmptyLatentImage']}, {values['KSampler']}")
    (save,) = comfy.node_ids("SaveImage")
    (report,) = comfy.node_ids("PreviewAny")
    comfy.page.get_by_role("button", name="Run", exact=True).first.click()
    comfy.page.wait_for_function("(id) => app.nodeOutputs?.[String(id)]?.images?.length", arg=save, timeout=240_000)
    comfy.show_node(save)
    comfy.page.wait_for_function(
        "(id) => { const n = app.graph.getNodeById(id); return n.imgs?.length && n.imgs[0].complete && n.imgs[0].naturalWidth }",
        arg=save, timeout=30_000)
    comfy.settle(0.5)
    comfy.screenshot("07_run.png")
    image = comfy.js("(id) => { const i = app.graph.getNodeById(id).imgs[0]; return {src: i.src, width: i.naturalWidth, height: i.naturalHeight} }", save)
    check.that("/view?filename=rece_compare_" in image["src"], f"run: the Save Image node shows {image['src']}")
    check.that(image["height"] == RUN_SIZE and image["width"] > 2 * RUN_SIZE,
               f"run: the image in the page is {image['width']}x{image['height']}, expected two {RUN_SIZE}px images side by side")
    filename = image["src"].split("filename=")[1].split("&")[0]
    check.that((server.output_dir / filename).is_file(), f"run: {filename} is not in the server's output folder")
    with urllib.request.urlopen(image["src"], timeout=30) as response:
        check.that(response.read(8) == b"\x89PNG\r\n\x1a\n", f"run: {image['src']} is not a PNG")
    in_dom = comfy.js("(name) => [...document.querySelectorAll('img')].some(i => i.src.includes('filename=' + name) && i.naturalWidth)",
                      filename)
    check.that(in_dom, f"run: no <img> of {filename} in the page (queue / job panel)")
    text = comfy.js("(id) => app.graph.getNodeById(id).widgets?.map(w => w.element?.value ?? w.value).join('\\n')", report)
    check.that(text and text.startswith("RECE erased 'Van Gogh' -> 'art'"), f"run: the report in the page reads {text!r:.200}")


def japanese(check: Checks, comfy: browser.ComfyPage, server: host.Server, object_info: dict, notes: list[str]) -> None:
    """Switch the page to Japanese in the settings dialog (Settings > Language, reloading
    the page if the node names do not follow), add RECE Erase Concept from the node
    search by its Japanese name and check its title and preset tooltip on the canvas
    against locales/ja/nodeDefs.json (the server's /i18n must serve them too), on every
    frontend. Before CUSTOM_NODE_LOCALES_DROPPED_BEFORE that is web/rece_i18n.js's doing,
    which must say it merged the strings again there, and nowhere else."""
    if not check.that(JA_NODE_DEFS.is_file(), f"japanese: {JA_NODE_DEFS.relative_to(paths.REPO_ROOT)} is not there (yet)"):
        return
    entry = json.loads(JA_NODE_DEFS.read_text(encoding="utf-8")).get(JA_NODE, {})
    name = entry.get("display_name")
    tooltip = entry.get("inputs", {}).get(JA_TOOLTIP_INPUT, {}).get("tooltip")
    if not check.that(name and tooltip, f"japanese: {JA_NODE_DEFS.name} has no {JA_NODE} display_name and "
                                        f"{JA_TOOLTIP_INPUT} tooltip: {entry}"):
        return
    served = server.get("/i18n").get("ja", {}).get("nodeDefs", {}).get(JA_NODE, {})
    check.that(served.get("display_name") == name
               and served.get("inputs", {}).get(JA_TOOLTIP_INPUT, {}).get("tooltip") == tooltip,
               f"japanese: the server's /i18n does not serve {JA_NODE_DEFS.name}'s strings for {JA_NODE}: {served}")
    extensions = comfy.js("() => app.extensions?.map(e => e.name)") or []
    check.that("comfyui-rece.i18n" in extensions, f"japanese: the pack's web/rece_i18n.js is not loaded: {extensions}")

    comfy.set_language(*JA_LANGUAGE)
    check.that(comfy.setting("Comfy.Locale") == JA_LANGUAGE[1],
               f"japanese: Comfy.Locale reads {comfy.setting('Comfy.Locale')!r} after choosing {JA_LANGUAGE[0]}")

    def search_japanese() -> list[str]:
        comfy.command("Comfy.NewBlankWorkflow")
        comfy.command("Comfy.Canvas.ResetView")
        results = comfy.search_nodes(name, at=(0.3, 0.4))
        return results[0].split(" | ") if results else []

    first = search_japanese()
    reloaded = first[:1] != [name]
    if reloaded:  # the node names follow the language only from the next page load here
        comfy.page.keyboard.press("Escape")
        comfy.open()
        comfy.close_dialogs()
        first = search_japanese()
    labels = comfy.js("() => [...document.querySelectorAll('.side-bar-button')].map(b => b.innerText.trim())")
    check.that(any(JAPANESE.search(label) for label in labels), f"japanese: the sidebar is not in Japanese: {labels}")
    how = "after a reload" if reloaded else "without a reload"
    found = first[:2] == [name, "RECE"]
    if not check.that(found, f"japanese: searching {name!r} ({how}) finds {first} first"):
        comfy.page.keyboard.press("Escape")
        comfy.settle(0.3)
        comfy.add_node(JA_NODE, at=(0.3, 0.4))  # the type name finds it in any language: see what the canvas shows
    else:
        comfy.add_first_result(at=(0.3, 0.4))
    ids = comfy.node_ids(JA_NODE)
    if not check.that(len(ids) == 1, f"japanese: no {JA_NODE} on the canvas: {[n['type'] for n in comfy.nodes()]}"):
        return
    (node,) = [n for n in comfy.nodes() if n["id"] == ids[0]]
    shown_tooltip = comfy.hover_tooltip(ids[0], JA_TOOLTIP_INPUT, keep=True).strip()
    comfy.screenshot("08_japanese.png")
    comfy.page.mouse.move(*comfy.canvas_point(0.98, 0.5))
    check.that(node["title"] == name, f"japanese: the node on the canvas is titled {node['title']!r}, expected {name!r}")
    check.that(shown_tooltip == tooltip, f"japanese: the {JA_TOOLTIP_INPUT} tooltip in the page reads {shown_tooltip!r}, "
                                         f"expected {tooltip!r}")

    frontend = comfy.frontend_version()
    restored = [m for m in comfy.console if RESTORED_MESSAGE in m]
    warned = [m for m in comfy.console if I18N_WARNING in m]
    check.that(not warned, f"japanese: the page warns {warned}")
    drops = frontend < CUSTOM_NODE_LOCALES_DROPPED_BEFORE
    check.that(bool(restored) == drops,
               f"japanese: frontend {'.'.join(map(str, frontend))} "
               + (f"drops the pack's strings, but web/rece_i18n.js did not merge them again ({restored})" if drops
                  else f"keeps the pack's strings, yet web/rece_i18n.js merged them again: {restored}"))
    notes.append(f"japanese: the node search finds {name!r} (category RECE), the canvas titles it so and its "
                 f"{JA_TOOLTIP_INPUT} tooltip is the Japanese one, {how}; web/rece_i18n.js "
                 + ("merged the strings the frontend dropped (#6748)" if restored else "had nothing to do"))


def preset_labels_in_japanese(check: Checks, comfy: browser.ComfyPage) -> None:
    """In Japanese, RECE Erase Concept's preset dropdown shows locales/ja/main.json's
    labels (receConceptErasure.presetChoices.<choice>.label) on the canvas and in its
    menu, while the widget keeps the raw choice, which workflows save and the server
    runs; back in English it shows the raw choices and the frontend's usual menu."""
    main = json.loads((paths.REPO_ROOT / "locales" / "ja" / "main.json").read_text(encoding="utf-8"))
    labels = {choice: entry.get("label") for choice, entry in
              main.get("receConceptErasure", {}).get("presetChoices", {}).items()}
    choices = [*PRESETS, "custom"]
    if not check.that(sorted(labels) == sorted(choices) and all(labels.values()),
                      f"preset labels: locales/ja/main.json labels {labels}, the choices are {choices}"):
        return
    # The strings the canvas draws (fillText) in one full redraw.
    drawn_js = """async () => {
      if (!window.__receDrawn) {
        window.__receDrawn = [];
        const fill = CanvasRenderingContext2D.prototype.fillText;
        CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
          window.__receDrawn.push(String(text));
          return fill.call(this, text, ...rest);
        };
      }
      window.__receDrawn.length = 0;
      app.canvas.draw(true, true);
      await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
      return [...window.__receDrawn];
    }"""
    shown_js = "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'preset')._displayValue"
    menu = ".litecontextmenu .litemenu-entry"

    def set_locale(locale: str) -> None:
        # What the settings dialog's Language entry sets; devkit's set_language looks for
        # the dialog's English texts, which a page in Japanese does not show.
        comfy.js("(l) => app.extensionManager.setting.set('Comfy.Locale', l)", locale)
        comfy.page.wait_for_function("(l) => app.extensionManager.setting.get('Comfy.Locale') === l", arg=locale,
                                     timeout=15000)
        comfy.settle(2.0)  # the page refreshes the node definitions and reloads the workflow

    def open_menu(node_id: int) -> list[list[str]]:
        """Click the preset widget: its menu entries as [text, value]."""
        comfy.show_node(node_id, 1.0)
        comfy.page.mouse.click(*comfy.reach_widget(node_id, "preset"))
        comfy.page.locator(menu).first.wait_for(timeout=10000)
        comfy.settle(0.3)
        return comfy.js(f"() => [...document.querySelectorAll('{menu}')].map(e => [e.textContent, e.dataset.value])")

    def pick(text: str) -> None:
        entries = comfy.page.locator(menu)
        exact = [i for i in range(entries.count()) if entries.nth(i).inner_text().strip() == text]
        if check.that(exact, f"preset labels: no menu entry reads {text!r}"):
            entries.nth(exact[0]).click()
            comfy.settle(0.5)

    if comfy.setting("Comfy.Locale") != "ja":
        comfy.set_language("日本語", "ja")
    comfy.command("Comfy.NewBlankWorkflow")
    comfy.command("Comfy.Canvas.ResetView")
    comfy.add_node("RECEEraseConcept", at=(0.3, 0.4))  # the type name finds it in any language
    ids = comfy.node_ids("RECEEraseConcept")
    if not check.that(len(ids) == 1, f"preset labels: no RECE Erase Concept added: {[n['type'] for n in comfy.nodes()]}"):
        return
    node_id = ids[0]
    comfy.show_node(node_id, 1.0)
    value = comfy.widgets(node_id)["preset"]
    shown, drawn = comfy.js(shown_js, node_id), comfy.js(drawn_js)
    check.that(shown == labels[value] and labels[value] in drawn,
               f"preset labels: in Japanese the canvas shows {shown!r} for {value!r} (drew {drawn}), expected {labels[value]!r}")
    entries = open_menu(node_id)
    check.that(entries == [[labels[c], c] for c in choices],
               f"preset labels: the Japanese menu lists {entries}, expected {[[labels[c], c] for c in choices]}")
    comfy.screenshot("09_preset_labels_ja.png")
    target = next(c for c in PRESETS if c != value)
    pick(labels[target])
    widgets = comfy.widgets(node_id)
    shown_numbers, expected = numbers_of(widgets, "RECEEraseConcept"), preset_numbers(target, "RECEEraseConcept")
    check.that(widgets["preset"] == target and close(shown_numbers, expected),
               f"preset labels: choosing {labels[target]!r} gave preset {widgets['preset']!r}, numbers {shown_numbers}, "
               f"expected {target!r}, {expected}")
    shown, drawn = comfy.js(shown_js, node_id), comfy.js(drawn_js)
    check.that(shown == labels[target] and labels[target] in drawn,
               f"preset labels: after choosing {labels[target]!r} the canvas shows {shown!r}")
    saved = comfy.js("(id) => app.graph.serialize().nodes.find(n => String(n.id) === String(id)).widgets_values", node_id)
    queued = comfy.js("async (id) => (await app.graphToPrompt()).output[String(id)].inputs.preset", node_id)
    check.that(target in saved and labels[target] not in saved and queued == target,
               f"preset labels: the workflow saves {saved} and queues preset {queued!r}, expected the raw {target!r}")

    set_locale("en")
    ids = comfy.node_ids("RECEEraseConcept")
    if not check.that(len(ids) == 1, f"preset labels: back in English the node is gone: {comfy.nodes()}"):
        return
    node_id = ids[0]
    comfy.show_node(node_id, 1.0)
    value = comfy.widgets(node_id)["preset"]
    shown, drawn = comfy.js(shown_js, node_id), comfy.js(drawn_js)
    check.that(value == target and shown == target and target in drawn and labels[target] not in drawn,
               f"preset labels: back in English the widget holds {value!r} and the canvas shows {shown!r}, expected {target!r}")
    entries = open_menu(node_id)
    filter_box = comfy.page.locator(".comfy-context-menu-filter:visible").count()
    check.that(entries == [[c, c] for c in choices] and filter_box == 1,
               f"preset labels: the English menu lists {entries} ({filter_box} filter box), expected the raw choices")
    comfy.screenshot("10_preset_labels_en.png")
    pick("object_easy")
    widgets = comfy.widgets(node_id)
    check.that(widgets["preset"] == "object_easy"
               and close(numbers_of(widgets, "RECEEraseConcept"), preset_numbers("object_easy", "RECEEraseConcept")),
               f"preset labels: choosing object_easy in English gave {widgets}")
