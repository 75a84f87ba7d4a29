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
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = ["RECEEraseConcept", "UCEEraseConcept"];
const NUMBERS = ["lamb", "erase_scale", "preserve_scale", "reg_scale", "epochs"];
const CUSTOM = "custom";

let presets = null; // name -> {lamb, erase_scale, preserve_scale, reg_scale, epochs, description}

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
    try {
      const response = await api.fetchApi("/rece/presets");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      presets = await response.json();
    } catch (error) {
      console.warn("comfyui-rece: could not read the presets; the preset dropdown will not fill the numbers", error);
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.includes(nodeData.name)) return;

    after(nodeType.prototype, "onNodeCreated", function () {
      const node = this;
      const preset = widget(node, "preset");
      if (!preset) return;
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
