// comfyui-rece: the pack's nodes in the page's language on frontends that lose
// custom nodes' translations.
//
// ComfyUI's frontend merges every pack's translations (GET /i18n, the pack's
// locales/<lang>/nodeDefs.json and main.json) into its vue-i18n messages at
// start-up. Frontends before 1.33 (ComfyUI 0.3.75 pins 1.32.9) then load their
// own language file for the chosen language (src/i18n.ts loadLocale) with
// i18n.global.setLocaleMessage(locale, ...), which replaces that language's
// messages and so drops the packs' strings: the page turns Japanese, the pack's
// nodes stay English (Comfy-Org/ComfyUI_frontend#6748; #7214 merges them again
// after the load, as 1.48 does).
//
// This does what #7214 does, for this pack only: whenever the frontend replaces
// a language's messages, it checks them once the frontend is done (a
// microtask later) and, only if this pack's strings are missing, merges them
// again from GET /i18n (the page never keeps its own copy). It also checks
// before the frontend translates the node definitions (app.getNodeDefs reads
// them through api.getNodeDefs: start-up, Refresh, a language change), which
// covers a language the frontend loaded before this extension was there (a
// page opened in Japanese), and is where it learns the pack's node types
// (python_module custom_nodes.<this folder>). Node search, node library,
// canvas titles, input names and tooltips then all read the strings as on 1.48.
//
// On frontends that keep the strings (1.48) every check finds them there and
// nothing is merged; English has no pack translations and is never touched; if
// /i18n cannot be read, one console.warn and nothing else. The frontend's
// vue-i18n instance is not exported to extensions: it is the one the Vue app
// (#vue-app's __vue_app__) provides under vue-i18n's __VUE_I18N_SYMBOL__; where
// that cannot be found this does nothing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NAMESPACE = "receConceptErasure"; // the pack's key in locales/<lang>/main.json
// ComfyUI names both after the pack's folder in custom_nodes: /extensions/<folder>/ and
// the nodes' python_module custom_nodes.<folder>.
const FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2)[0]);
const PYTHON_MODULE = `custom_nodes.${FOLDER}`;

let composer = null; // the frontend's i18n.global
let served = null; // GET /i18n: {locale: {nodeDefs: {...}, [NAMESPACE]: {...}, ...}}
const packTypes = new Set(); // the pack's node types, from the node definitions

function frontendI18n() {
  try {
    const vueApp = document.getElementById("vue-app")?.__vue_app__;
    const key = vueApp?.__VUE_I18N_SYMBOL__;
    const global = key ? vueApp._context?.provides?.[key]?.global : null;
    const methods = ["getLocaleMessage", "setLocaleMessage", "mergeLocaleMessage"];
    return global && methods.every((m) => typeof global[m] === "function") ? global : null;
  } catch {
    return null;
  }
}

// The pack's part of GET /i18n for one language, or null when it has none.
function packStrings(locale) {
  const message = served?.[locale];
  if (!message || typeof message !== "object") return null;
  const strings = {};
  const nodeDefs = {};
  for (const type of packTypes) {
    if (message.nodeDefs?.[type]) nodeDefs[type] = message.nodeDefs[type];
  }
  if (Object.keys(nodeDefs).length) strings.nodeDefs = nodeDefs;
  if (message[NAMESPACE]) strings[NAMESPACE] = message[NAMESPACE];
  return Object.keys(strings).length ? strings : null;
}

// Merge the pack's strings for `locale` again if the frontend has messages for it
// (it loaded its own file for that language) but they lack the pack's. A language
// the frontend has not loaded yet holds nothing, or (1.32) only the packs' strings.
function restore(locale, when) {
  if (!composer || !locale || locale === "en") return;
  const strings = packStrings(locale);
  if (!strings) return;
  const held = composer.getLocaleMessage(locale) ?? {};
  if (!Object.keys(held).length) return;
  const dropped =
    Object.keys(strings.nodeDefs ?? {}).some((type) => !held.nodeDefs?.[type]) ||
    (NAMESPACE in strings && !held[NAMESPACE]);
  if (!dropped) return;
  composer.mergeLocaleMessage(locale, strings);
  console.info(`comfyui-rece: merged the pack's '${locale}' translations again, which the frontend had dropped (seen at ${when})`);
}

function pageLocales() {
  const locales = new Set();
  try {
    locales.add(app.extensionManager?.setting?.get?.("Comfy.Locale"));
  } catch {
    // no settings yet: the frontend's own locale below
  }
  locales.add(composer?.locale?.value);
  return [...locales].filter(Boolean);
}

app.registerExtension({
  name: "comfyui-rece.i18n",

  async init() {
    composer = frontendI18n();
    if (!composer) return;
    try {
      const response = await api.fetchApi("/i18n");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      served = await response.json();
    } catch (error) {
      served = null;
      console.warn("comfyui-rece: could not read the translations (GET /i18n); nothing to restore", error);
      return;
    }

    // The frontend replaces a language's messages when it loads its own file for it.
    const setLocaleMessage = composer.setLocaleMessage;
    composer.setLocaleMessage = function (locale, ...rest) {
      const result = setLocaleMessage.call(this, locale, ...rest);
      queueMicrotask(() => restore(locale, "setLocaleMessage"));
      return result;
    };

    // The node definitions, before the frontend translates them (start-up, Refresh,
    // a language change): learn the pack's node types, then check the strings.
    const getNodeDefs = api.getNodeDefs;
    if (typeof getNodeDefs === "function") {
      api.getNodeDefs = async function (...args) {
        const defs = await getNodeDefs.apply(this, args);
        try {
          for (const [type, def] of Object.entries(defs ?? {})) {
            if (def?.python_module === PYTHON_MODULE) packTypes.add(type);
          }
          pageLocales().forEach((l) => restore(l, "getNodeDefs"));
        } catch (error) {
          console.warn("comfyui-rece: could not check the translations", error);
        }
        return defs;
      };
    }
  },

  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.python_module === PYTHON_MODULE) packTypes.add(nodeData.name);
  },
});
