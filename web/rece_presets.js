// comfyui-rece: the erase nodes' `preset` dropdown fills the number widgets.
//
// Choosing a published preset (nudity, unsafe, artistic_style, ...) writes its
// numbers into lamb, erase_scale, preserve_scale, reg_scale (and epochs on
// RECE Erase Concept), so the page shows what the node will run with.
// Changing one of those numbers by hand switches the preset to `custom`, the
// only preset that runs with the numbers as typed. A workflow opened with a
// named preset shows that preset's numbers (the server uses them whatever the
// file says).
//
// The numbers come from the server (GET /rece/presets, built from
// rece_ops.PRESETS): the page never keeps its own copy.
//
// The dropdown shows the choices in the page's language (setting Comfy.Locale)
// when the pack has labels for it (locales/<lang>/main.json,
// receConceptErasure.presetChoices.<choice>.label, read from GET /i18n), and
// the plain choice names otherwise. Only what is drawn changes: the widget's
// value, saved in workflows and sent to the server, stays the choice name
// ("nudity"). The frontend draws a combo's value and menu entries through
// widget.options.getOptionLabel(value); it is there only while the page's
// language has labels, so English keeps the frontend's usual menu (with its
// filter box). ComfyUI reloads the workflow when the language changes, and
// the labels follow it at once.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = ["RECEEraseConcept", "UCEEraseConcept"];
const NUMBERS = ["lamb", "erase_scale", "preserve_scale", "reg_scale", "epochs"];
const CUSTOM = "custom";

let presets = null; // name -> {lamb, erase_scale, preserve_scale, reg_scale, epochs, description}
let presetLabels = {}; // locale -> {choice -> label}, from GET /i18n (the pack's locales/*/main.json)

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function differs(a, b) {
  return Math.abs(Number(a) - Number(b)) > 1e-9 * Math.max(1, Math.abs(Number(b)));
}

// Write preset `name`'s numbers into the node's widgets; true when one changed.
function fillNumbers(node, name) {
  const numbers = presets?.[name];
  if (!numbers) return false;
  let changed = false;
  for (const key of NUMBERS) {
    const w = widget(node, key);
    if (w && key in numbers && differs(w.value, numbers[key])) {
      w.value = numbers[key];
      changed = true;
    }
  }
  if (changed) node.setDirtyCanvas?.(true, true);
  return changed;
}

// A number was edited by hand: if it no longer matches the named preset, the
// node now runs with the typed numbers, i.e. the `custom` preset.
function numberEdited(node) {
  const preset = widget(node, "preset");
  const numbers = presets?.[preset?.value];
  if (!numbers) return;
  const edited = NUMBERS.some((key) => {
    const w = widget(node, key);
    return w && key in numbers && differs(w.value, numbers[key]);
  });
  if (edited) {
    preset.value = CUSTOM;
    node.setDirtyCanvas?.(true, true);
  }
}

// The page's language, as ComfyUI's own translations use it (e.g. "ja", "zh", "en").
function pageLocale() {
  try {
    return app.extensionManager?.setting?.get?.("Comfy.Locale") ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale");
  } catch {
    return undefined;
  }
}

// The labels of the page's language, or null when the pack has none for it.
// An exact match, as the frontend's te()/st() look up a custom node's
// translations (zh-TW does not borrow zh's).
function currentLabels() {
  const labels = presetLabels[pageLocale()];
  return labels && Object.keys(labels).length ? labels : null;
}

function presetLabel(value) {
  if (value == null) return "";
  return currentLabels()?.[value] || String(value);
}

// GET /i18n: {locale: {receConceptErasure: {presetChoices: {choice: {label}}}, ...}}.
function readLabels(messages) {
  const labels = {};
  for (const [locale, message] of Object.entries(messages ?? {})) {
    const choices = message?.receConceptErasure?.presetChoices;
    if (!choices || typeof choices !== "object") continue;
    labels[locale] = {};
    for (const [choice, entry] of Object.entries(choices)) {
      if (typeof entry?.label === "string" && entry.label) labels[locale][choice] = entry.label;
    }
  }
  return labels;
}

// What the frontend reads as the preset widget's options.getOptionLabel: the
// label function while the page's language has labels, else nothing (the
// frontend then shows the raw choices, as without this extension).
function labelGetter() {
  return currentLabels() ? presetLabel : undefined;
}

// The preset dropdown draws its value and menu entries in the page's language.
// A getter, so a language change needs no new widget; whatever assigns its own
// getOptionLabel later replaces it.
function translateChoices(preset) {
  const options = preset.options;
  if (!options || Object.getOwnPropertyDescriptor(options, "getOptionLabel")?.get === labelGetter) return;
  Object.defineProperty(options, "getOptionLabel", {
    get: labelGetter,
    set(value) {
      Object.defineProperty(options, "getOptionLabel", { value, writable: true, enumerable: true, configurable: true });
    },
    enumerable: true,
    configurable: true,
  });
}

async function loadLabels() {
  try {
    const response = await api.fetchApi("/i18n");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    presetLabels = readLabels(await response.json());
  } catch (error) {
    presetLabels = {};
    console.warn("comfyui-rece: could not read the translations; the preset dropdown shows its choices in English", error);
  }
}

function after(object, method, extra) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    extra.call(this, ...args);
    return result;
  };
}

app.registerExtension({
  name: "comfyui-rece.presets",

  async init() {
    const labels = loadLabels();
    try {
      const response = await api.fetchApi("/rece/presets");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      presets = await response.json();
    } catch (error) {
      console.warn("comfyui-rece: could not read the presets; the preset dropdown will not fill the numbers", error);
    }
    await labels;
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.includes(nodeData.name)) return;

    after(nodeType.prototype, "onNodeCreated", function () {
      const node = this;
      const preset = widget(node, "preset");
      if (!preset) return;
      translateChoices(preset);
      after(preset, "callback", function () {
        fillNumbers(node, preset.value);
      });
      for (const key of NUMBERS) {
        const w = widget(node, key);
        if (w) after(w, "callback", () => numberEdited(node));
      }
    });

    // Opening a workflow: show the numbers a named preset really runs with.
    after(nodeType.prototype, "onConfigure", function () {
      const preset = widget(this, "preset");
      if (preset && preset.value !== CUSTOM) fillNumbers(this, preset.value);
    });
  },
});
