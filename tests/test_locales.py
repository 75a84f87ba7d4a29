"""The pack's Japanese and Simplified Chinese translations (``locales/``).

ComfyUI serves a custom node folder's ``locales/<lang>/main.json`` with
``nodeDefs.json`` (and ``commands.json``, ``settings.json``) merged in under
their own key, at ``GET /i18n`` (``app/custom_node_manager.py``,
``build_translations``; the same in 0.3.75 and 0.33). The web page merges that
into its vue-i18n messages and reads, for each node type,
``nodeDefs.<type>.display_name``, ``.description``,
``.inputs.<input>.name`` / ``.tooltip`` and ``.outputs.<index>.name`` /
``.tooltip``, each falling back to the node's own English from
``/object_info`` when the active language has no entry. Neither frontend
(1.32.9, 1.48.7) has a key for a node's combo option labels, so the preset
choices are translated in ``main.json`` under the pack's own key
(``receConceptErasure.presetChoices``), where the page does not show them.

English stays in the code (no ``locales/en``): an English file would only
replace the code's strings in the English page and drift from them.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from devkit import host, paths

LOCALES = paths.REPO_ROOT / "locales"
LANGUAGES = ("ja", "zh")
FILES = ("main.json", "nodeDefs.json")
PACK_KEY = "receConceptErasure"  # the pack's own top-level key in main.json
CUSTOM = "custom"

# Input/output names kept as they are (technical names, like ComfyUI's own
# translations keep "cfg"): a translated name must otherwise be in the language.
KEPT_NAMES = {"lamb", "CLIP", "LoRA"}
# Technical terms, paths and literal values a translation keeps verbatim
# wherever the English has them.
KEPT_TERMS = (
    "MODEL", "CONDITIONING", "KSampler", "LoraLoader", "LoRA", "RECE", "UCE", "K/V", "SD1.x", "SD2.x", "SDXL",
    "SD 1.4", "UNet", "diffusers", "kohya", "safetensors", ".pt/.pth", "attn2.to_k/to_v", "float32",
    "float16/bfloat16", "I2P", "ECCV", "WACV", "Gong et al.", "Gandikota et al.", "models/rece_erasures/",
    "models/loras/", "'custom'", "'art'", "'nudity/sd15'", "lora", "SPEED", "'paper'", "'SPEED null space'",
    "'SPEED null space, every token kept'",
    "ICLR", "Li et al.", "preserve_mode",
)
# Characters vue-i18n's message compiler treats as syntax (interpolation,
# linked messages, plurals): a translation holding one would not show as written.
MESSAGE_SYNTAX = re.compile(r"[{}@|]")
# A number standing on its own: "0.1", "77", "1e-3", "2024"; not the digits of
# names such as SD1.x, attn2, float16, sd15 or I2P.
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d+(?:\.\d+)?(?:e-?\d+)?(?![A-Za-z0-9_])")
KANA = re.compile(r"[\u3040-\u30ff]")
HAN = re.compile(r"[\u4e00-\u9fff]")
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def read_locale(lang: str) -> dict[str, dict]:
    return {name: json.loads((LOCALES / lang / name).read_text(encoding="utf-8")) for name in FILES}


def combo_choices(spec: tuple) -> list[str] | None:
    """A combo input's choices, in the classic form (a list) or the newer one ("COMBO", {"options": [...]})."""
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1:
        return list(spec[1].get("options", []))
    return None


def english_definitions(comfy_nodes, pack) -> dict[str, dict]:
    """Each pack node as ComfyUI loaded it: English display name, description,
    visible inputs (required and optional) and outputs, with their tooltips."""
    definitions = {}
    for node_type in pack.NODE_CLASS_MAPPINGS:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_type]
        inputs = {}
        for section, entries in cls.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for name, spec in entries.items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                inputs[name] = {"tooltip": options.get("tooltip"), "choices": combo_choices(spec)}
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None) or [None] * len(cls.RETURN_TYPES)
        definitions[node_type] = {
            "display_name": comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type),
            "description": getattr(cls, "DESCRIPTION", ""),
            "inputs": inputs,
            "outputs": [{"name": n, "type": t, "tooltip": tip} for n, t, tip in zip(names, cls.RETURN_TYPES, tooltips)],
        }
    return definitions


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


@pytest.fixture(scope="module")
def english(comfy_nodes, pack) -> dict[str, dict]:
    definitions = english_definitions(comfy_nodes, pack)
    assert len(definitions) == 10, sorted(definitions)
    return definitions


@pytest.fixture(scope="module")
def preset_descriptions(comfy_nodes) -> dict[str, str]:
    """The published presets' English descriptions (``rece_ops.PRESETS``), as the pack loaded it."""
    return {name: preset.description for name, preset in host.pack_module("rece_ops").PRESETS.items()}


@pytest.fixture(scope="module")
def preset_choices(english, preset_descriptions) -> list[str]:
    """The choices of every erase node's preset combo: the published presets, then 'custom'."""
    seen = [d["inputs"]["preset"]["choices"] for d in english.values() if "preset" in d["inputs"]]
    assert len(seen) == 2, "both erase nodes have a preset input"
    assert all(choices == [*preset_descriptions, CUSTOM] for choices in seen), seen
    return seen[0]


def translated_pairs(english: dict, locale: dict, preset_descriptions: dict) -> list[tuple[str, str, str]]:
    """``(where, English, translation)`` for every translated sentence: descriptions,
    tooltips and the preset descriptions (only those the locale has)."""
    pairs = []
    node_defs = locale["nodeDefs.json"]
    for node_type, definition in english.items():
        entry = node_defs.get(node_type, {})
        if definition["description"] and "description" in entry:
            pairs.append((f"{node_type}.description", definition["description"], entry["description"]))
        for name, spec in definition["inputs"].items():
            tip = entry.get("inputs", {}).get(name, {}).get("tooltip")
            if spec["tooltip"] and tip is not None:
                pairs.append((f"{node_type}.inputs.{name}.tooltip", spec["tooltip"], tip))
        for index, output in enumerate(definition["outputs"]):
            tip = entry.get("outputs", {}).get(str(index), {}).get("tooltip")
            if output["tooltip"] and tip is not None:
                pairs.append((f"{node_type}.outputs.{index}.tooltip", output["tooltip"], tip))
    presets = locale["main.json"].get(PACK_KEY, {}).get("presetChoices", {})
    for name, description in preset_descriptions.items():
        if "description" in presets.get(name, {}):
            pairs.append((f"{PACK_KEY}.presetChoices.{name}.description", description, presets[name]["description"]))
    return pairs


def all_strings(value, where: str = ""):
    """Every string in a JSON value, with its key path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from all_strings(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from all_strings(item, f"{where}[{index}]")
    elif isinstance(value, str):
        yield where, value


# --------------------------------------------------------------------------- the files


@pytest.mark.parametrize("lang", LANGUAGES)
def test_locale_files_are_json_objects_written_as_the_project_writes_json(lang):
    for name in FILES:
        path = LOCALES / lang / name
        assert path.is_file(), f"{path} is missing"
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        assert isinstance(data, dict) and data, f"{path}: not a JSON object, or empty"
        assert text == json.dumps(data, ensure_ascii=False, indent=2) + "\n", (
            f"{path}: write it with ensure_ascii=False, a 2-space indent and a trailing newline")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_main_json_holds_only_the_packs_own_key(lang):
    # ComfyUI puts nodeDefs.json's content under "nodeDefs", replacing a
    # "nodeDefs" of main.json; every pack's main.json keys share one namespace.
    main = read_locale(lang)["main.json"]
    assert set(main) == {PACK_KEY}, sorted(main)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_no_translation_holds_message_syntax(lang):
    for name, data in read_locale(lang).items():
        for where, text in all_strings(data):
            assert text.strip(), f"{lang}/{name}: {where} is empty"
            assert not MESSAGE_SYNTAX.search(text), f"{lang}/{name}: {where} has one of {{ }} @ |: {text!r}"


# --------------------------------------------------------------------------- completeness


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_node_input_and_output_has_a_translation_and_nothing_else(lang, english):
    node_defs = read_locale(lang)["nodeDefs.json"]
    problems = []
    missing_nodes = sorted(set(english) - set(node_defs))
    stale_nodes = sorted(set(node_defs) - set(english))
    problems += [f"node {n} has no translation" for n in missing_nodes]
    problems += [f"node {n} is translated but the pack has no such node" for n in stale_nodes]
    for node_type in sorted(set(english) & set(node_defs)):
        definition, entry = english[node_type], node_defs[node_type]
        extra_keys = set(entry) - {"display_name", "description", "inputs", "outputs"}
        if extra_keys:
            problems.append(f"{node_type}: keys the page does not read: {sorted(extra_keys)}")
        for key in ("display_name", "description"):
            if definition[key] and not entry.get(key):
                problems.append(f"{node_type}: no {key}")
        inputs = entry.get("inputs", {})
        for name in definition["inputs"]:
            if name not in inputs:
                problems.append(f"{node_type}: input {name} has no translation")
        for name in sorted(set(inputs) - set(definition["inputs"])):
            problems.append(f"{node_type}: input {name} is translated but no longer exists")
        for name, translated in inputs.items():
            if name not in definition["inputs"]:
                continue
            if set(translated) - {"name", "tooltip"}:
                problems.append(f"{node_type}.inputs.{name}: keys the page does not read: {sorted(translated)}")
            if not translated.get("name"):
                problems.append(f"{node_type}.inputs.{name}: no name")
            if bool(definition["inputs"][name]["tooltip"]) != bool(translated.get("tooltip")):
                problems.append(f"{node_type}.inputs.{name}: a tooltip in one language only")
        outputs = entry.get("outputs", {})
        expected = {str(i) for i in range(len(definition["outputs"]))}
        for index in sorted(expected - set(outputs)):
            problems.append(f"{node_type}: output {index} ({definition['outputs'][int(index)]['name']}) has no translation")
        for index in sorted(set(outputs) - expected):
            problems.append(f"{node_type}: output {index} is translated but the node has {len(expected)} outputs")
        for index in sorted(expected & set(outputs)):
            translated, output = outputs[index], definition["outputs"][int(index)]
            if set(translated) - {"name", "tooltip"}:
                problems.append(f"{node_type}.outputs.{index}: keys the page does not read: {sorted(translated)}")
            if not translated.get("name"):
                problems.append(f"{node_type}.outputs.{index}: no name")
            if bool(output["tooltip"]) != bool(translated.get("tooltip")):
                problems.append(f"{node_type}.outputs.{index}: a tooltip in one language only")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_preset_choice_has_a_translated_label(lang, preset_choices, preset_descriptions):
    table = read_locale(lang)["main.json"][PACK_KEY]
    assert set(table) == {"presetChoices"}, sorted(table)
    presets = table["presetChoices"]
    assert set(presets) == set(preset_choices), (
        f"missing {sorted(set(preset_choices) - set(presets))}, stale {sorted(set(presets) - set(preset_choices))}")
    for name in preset_choices:
        entry = presets[name]
        expected_keys = {"label", "description"} if name in preset_descriptions else {"label"}
        assert set(entry) == expected_keys, f"{name}: {sorted(entry)}"
        assert CJK.search(entry["label"]), f"{name}: label {entry['label']!r} is not translated"
        assert entry["label"] != name


# --------------------------------------------------------------------------- faithfulness


@pytest.mark.parametrize("lang", LANGUAGES)
def test_numbers_and_equations_are_kept(lang, english, preset_descriptions):
    pairs = translated_pairs(english, read_locale(lang), preset_descriptions)
    assert len(pairs) > 60, len(pairs)  # every description and tooltip of the 10 nodes, and the presets
    problems = []
    for where, source, translation in pairs:
        want, got = Counter(NUMBER.findall(source)), Counter(NUMBER.findall(translation))
        if want != got:
            problems.append(f"{where}: numbers {sorted(want.elements())} in English, "
                            f"{sorted(got.elements())} in {lang}: {translation!r}")
        for symbol in ("=", ">"):
            if source.count(symbol) != translation.count(symbol):
                problems.append(f"{where}: {source.count(symbol)} '{symbol}' in English, "
                                f"{translation.count(symbol)} in {lang}: {translation!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_technical_names_and_literal_values_are_kept(lang, english, preset_descriptions):
    problems = []
    for where, source, translation in translated_pairs(english, read_locale(lang), preset_descriptions):
        for term in KEPT_TERMS:
            if term in source and term not in translation:
                problems.append(f"{where}: {term!r} is in the English but not in {lang}: {translation!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_translations_are_in_the_language(lang, english, preset_descriptions):
    node_defs = read_locale(lang)["nodeDefs.json"]
    problems = []
    for where, _, translation in translated_pairs(english, read_locale(lang), preset_descriptions):
        if lang == "ja" and not KANA.search(translation):
            problems.append(f"{where}: no kana, so not Japanese: {translation!r}")
        if lang == "zh" and (KANA.search(translation) or not HAN.search(translation)):
            problems.append(f"{where}: not Simplified Chinese: {translation!r}")
    for node_type, entry in node_defs.items():
        if not CJK.search(entry.get("display_name", "")):
            problems.append(f"{node_type}.display_name is not translated: {entry.get('display_name')!r}")
        named = [(f"inputs.{k}", k, v) for k, v in entry.get("inputs", {}).items()]
        if node_type in english:
            named += [(f"outputs.{k}", english[node_type]["outputs"][int(k)]["name"], v)
                      for k, v in entry.get("outputs", {}).items() if int(k) < len(english[node_type]["outputs"])]
        for where, source_name, translated in named:
            name = translated.get("name", "")
            if name in KEPT_NAMES:
                if name.casefold() != source_name.casefold():
                    problems.append(f"{node_type}.{where}: {name!r} is kept only as the name {name.casefold()!r}")
            elif not CJK.search(name):
                problems.append(f"{node_type}.{where}.name {name!r} is neither translated nor a kept technical name")
            if lang == "zh" and KANA.search(name):
                problems.append(f"{node_type}.{where}.name {name!r} has kana")
    assert not problems, "\n".join(problems)


def test_the_two_languages_share_the_same_keys():
    ja, zh = read_locale("ja"), read_locale("zh")
    for name in FILES:
        assert sorted(w for w, _ in all_strings(ja[name])) == sorted(w for w, _ in all_strings(zh[name])), name


# --------------------------------------------------------------------------- served by ComfyUI


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME).exists():
        pytest.fail(f"{paths.SLIM_SD15_NAME} is missing: run scripts/setup.sh before the tests")
    with host.server(tmp_path_factory.mktemp("comfy_i18n_server")) as running:
        yield running


def test_server_serves_the_ja_and_zh_translations_for_every_input_and_output_it_lists(server, english):
    """One test for the server (xdist could otherwise start one per worker).

    ``/i18n`` is read as the page reads it (``/api/i18n``), and checked against
    ``/object_info``, the English the page falls back to."""
    served = server.get("/api/i18n", timeout=60)
    assert server.get("/i18n", timeout=60) == served
    object_info = server.get("/object_info", timeout=120)
    pack_types = sorted(english)
    assert set(pack_types) <= set(object_info), sorted(set(pack_types) - set(object_info))
    problems = []
    for lang in LANGUAGES:
        files = read_locale(lang)
        if lang not in served:
            problems.append(f"/i18n has no {lang!r}: {sorted(served)}")
            continue
        messages = served[lang]
        if messages.get(PACK_KEY) != files["main.json"][PACK_KEY]:
            problems.append(f"{lang}: /i18n's {PACK_KEY} differs from main.json")
        node_defs = messages.get("nodeDefs", {})
        for node_type in pack_types:
            info, entry = object_info[node_type], node_defs.get(node_type)
            if entry != files["nodeDefs.json"].get(node_type):
                problems.append(f"{lang}: /i18n's nodeDefs.{node_type} differs from nodeDefs.json")
            if not entry:
                continue
            if entry["display_name"] == info["display_name"] or entry["description"] == info["description"]:
                problems.append(f"{lang}: {node_type}'s display name or description is served in English")
            for section in ("required", "optional"):
                for name, spec in info["input"].get(section, {}).items():
                    translated = entry["inputs"].get(name, {})
                    tooltip = spec[1].get("tooltip") if len(spec) > 1 and isinstance(spec[1], dict) else None
                    if not translated.get("name") or (tooltip and not translated.get("tooltip")):
                        problems.append(f"{lang}: {node_type} input {name} ({section}) is not served translated")
                    if tooltip and translated.get("tooltip") == tooltip:
                        problems.append(f"{lang}: {node_type} input {name}'s tooltip is served in English")
            for index, name in enumerate(info["output_name"]):
                translated = entry["outputs"].get(str(index), {})
                if not translated.get("name") or not translated.get("tooltip"):
                    problems.append(f"{lang}: {node_type} output {index} ({name}) is not served translated")
            if len(entry["outputs"]) != len(info["output_name"]):
                problems.append(f"{lang}: {node_type} has {len(info['output_name'])} outputs, "
                                f"{len(entry['outputs'])} translated")
            preset = info["input"]["required"].get("preset")
            if preset is not None:
                labels = messages.get(PACK_KEY, {}).get("presetChoices", {})
                missing = [c for c in combo_choices(preset) if not labels.get(c, {}).get("label")]
                if missing:
                    problems.append(f"{lang}: {node_type}'s preset choices {missing} have no served label")
    assert not problems, "\n".join(problems)
