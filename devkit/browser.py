"""Drive ComfyUI's web page in headless Chromium, as a user would.

Debian's ``chromium`` (installed by ``scripts/setup.sh``) driven through
Playwright's Python library, never a browser download of Playwright's own.
Each launch gets a fresh profile folder, so every run is a first visit.

    .venv/bin/python -m devkit.browser --thumbnails   # rewrite example_workflows/*.jpg

The helpers find things the way a person does (sidebar buttons, the node
search box, the templates browser, the widgets on the canvas, the settings
dialog) and read the page's state through ComfyUI's ``window.app`` only to
check what they did.

Two generations of ComfyUI's frontend are driven by the same helpers:
comfyui-frontend-package 1.32 (ComfyUI 0.3.75) and 1.48 (ComfyUI 0.33).
Where they differ the helpers look for what a user sees (a button's label, a
dialog holding the pack's name, the search box's combobox) and fall back to
each version's own markup:

- sidebar labels: 1.48 puts soft hyphens (U+00AD) in them ("Templates"),
  which Playwright's text match looks through;
- the templates browser: 1.32 a PrimeVue dialog with a card grid, 1.48 a
  dialog that shows no card grid until a category (the pack's entry) is chosen;
- the node search: 1.32 a PrimeVue AutoComplete ("Search Nodes...", options
  name / category / source), 1.48 its own dialog ("Add a node...", options
  name + source badge, then category | description);
- warnings: 1.32 toasts and dialogs, 1.48 also an error overlay at the top
  right (``role=status``, a Close button) for missing nodes and models;
- opening a template: 1.48 fits the whole graph in view, where the canvas
  draws nodes without their widgets (low quality) and ignores clicks on them,
  so the widget helpers first bring the node into view at 100 %;
- adding a node from the search: 1.48 lets it follow the mouse until a click
  drops it (Comfy.NodeSearchBoxImpl.FollowCursor), so add_node clicks;
- the node library: 1.32 a PrimeVue tree (a folder's nodes nested in it), 1.48
  a flat, virtualised tree (rows in view only), both with treeitem roles and
  aria-level, which library_folder reads;
- the Run button: 1.48 has a second button labelled "Run" (its mode menu) after it;
- dialogs: Escape closes them, except where nothing in them has the focus
  (1.32's templates browser on a first visit): then their X button;
- the page's language (set_language): the same settings dialog in both; 1.32
  drops custom node packs' translations when it loads a language, which the
  pack's web/rece_i18n.js merges again (see tests/test_browser.py).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
VIEWPORT = {"width": 1600, "height": 1000}
PACK_MODULE = "comfyui-rece"  # the templates browser's name for the pack (its folder in custom_nodes)


def chromium_path() -> str | None:
    """The system Chromium, or None. ``CHROMIUM`` may name another binary."""
    override = os.environ.get("CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable_reason() -> str | None:
    """Why no browser test can run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (scripts/setup.sh installs it)"
    if chromium_path() is None:
        return "no chromium binary (scripts/setup.sh installs Debian's chromium with apt-get)"
    return None


@contextlib.contextmanager
def chromium(viewport: dict | None = None) -> Iterator[object]:
    """A Playwright page in a fresh headless Chromium profile; closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="rece-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True,
            viewport=viewport or VIEWPORT,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


# The canvas position of a widget's middle, in page pixels (where a click lands on it).
_WIDGET_POINT = """([nodeId, name, across]) => {
  const node = app.graph.getNodeById(nodeId);
  const w = node.widgets.find(w => w.name === name);
  const y = node.pos[1] + (w.last_y ?? w.y) + (w.computedHeight ?? 20) / 2;
  return app.canvasPosToClientPos([node.pos[0] + node.size[0] * across, y]);
}"""

# Whether a click at a widget would reach it: the canvas draws widgets in full
# (not its low-quality sketch of far-out zoom, which ignores widget clicks) and
# the canvas, not a panel, minimap or overlay, is what lies under that point.
_WIDGET_REACHABLE = """([[x, y], inside]) => !app.canvas.low_quality
  && document.elementFromPoint(x, y) === app.canvas.canvas
  && document.elementFromPoint(inside[0], inside[1]) === app.canvas.canvas"""

# The node search's results, best first, each as [display name, category, source badge...].
# 1.32: PrimeVue AutoComplete options (name, category below it, badges at the right).
# 1.48: result items of a first row (name, source badge) and a second (category | description).
_SEARCH_RESULTS = """() => {
  const text = e => (e?.innerText ?? '').replace(/\\u00a0/g, ' ').replace(/\\s+/g, ' ').trim();
  const options = [...document.querySelectorAll('.p-autocomplete-option, [data-testid=result-item]')];
  return options.map(o => {
    const category = o.querySelector('.option-category');
    if (category) return [text(o.querySelector('.option-display-name > :first-child')), text(category),
                          ...[...o.querySelectorAll('.option-badges > *')].map(text)].filter(Boolean);
    const [first, second] = o.querySelector('.option-container > div')?.children ?? [];
    if (!first || !second) return text(o).split(' | ');
    const [name, ...badges] = [...first.querySelectorAll('span')].filter(e => !e.querySelector('span')).map(text).filter(Boolean);
    return [name, text(second.firstElementChild), ...badges];
  }).filter(parts => parts.length && parts[0]);
}"""

# The names a node library folder shows, in order: the tree items one level below it.
# 1.32 nests them in the folder's element, 1.48 lists every row flat (and draws only
# the rows in view), both with aria-level.
_FOLDER_ITEMS = """(name) => {
  const label = e => (e.getAttribute('aria-label') || e.innerText.split('\\n')[0] || '').trim();
  const items = [...document.querySelectorAll('[role=treeitem]')];
  const at = items.findIndex(e => label(e) === name);
  if (at < 0) return null;
  const level = +items[at].getAttribute('aria-level'), names = [];
  for (const item of items.slice(at + 1)) {
    const l = +item.getAttribute('aria-level');
    if (l <= level) break;
    if (l === level + 1) names.push(label(item));
  }
  return names;
}"""

DIALOG = "[role=dialog]"  # PrimeVue's and reka-ui's dialogs alike (templates, settings, node search, warnings)
NODE_SEARCH_BOX = ", ".join((
    "[role=dialog] input[role=combobox]",                   # what a user sees: the dialog's search field
    ".comfy-vue-node-search-container input",               # 1.32 ("Search Nodes...")
    "[role=search] input[role=combobox]",                   # 1.48 ("Add a node...")
))
# A dialog's unlabelled X button: 1.32 (PrimeIcons), 1.48 (Lucide).
DIALOG_CLOSE_ICON = "button:has(> i.pi-times), button:has(> i[class*='lucide--x'])"
ERROR_OVERLAY = "[data-testid=error-overlay]"  # 1.48: missing nodes / models, run errors (top right)


class ComfyPage:
    """ComfyUI's page at ``base`` in a Playwright ``page``."""

    def __init__(self, page, base: str, shots: Path | None = None):
        self.page = page
        self.base = base
        self.shots = shots  # where screenshot() writes
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.console: list[str] = []  # the page's console messages, as "<type>: <text>"
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))

    def screenshot(self, name: str) -> Path:
        """The whole page as ``<shots>/<name>``."""
        path = Path(self.shots or ".") / name
        self.page.screenshot(path=str(path))
        return path

    # --- reading the page ------------------------------------------------------------------------

    def js(self, expression: str, arg: object = None) -> object:
        return self.page.evaluate(expression, arg)

    def text(self) -> str:
        return self.page.evaluate("() => document.body.innerText")

    def nodes(self) -> list[dict]:
        """The open graph's nodes: id, type, title, widgets' values, whether the page knows
        the type, and whether it marks the node with errors (1.48 also marks a loader whose
        model file the server lacks)."""
        return self.js("""() => app.graph.nodes.map(n => ({
            id: n.id, type: n.type, title: n.title,
            known: !!LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors,
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])),
        }))""")

    def warnings(self) -> list[str]:
        """The warnings and errors the page shows: toasts, and 1.48's error overlay."""
        return self.js("(overlay) => [...document.querySelectorAll(`.p-toast-message-warn, .p-toast-message-error, ${overlay}`)]"
                       ".map(e => e.innerText.replace(/\\s*\\n\\s*/g, ' ').trim())", ERROR_OVERLAY)

    def frontend_version(self) -> tuple[int, ...]:
        """The page's frontend release (comfyui-frontend-package), e.g. (1, 48, 7)."""
        version = self.js("() => window.__COMFYUI_FRONTEND_VERSION__ ?? ''") or "0"
        return tuple(int(part) for part in re.findall(r"\d+", version)[:3])

    def setting(self, key: str) -> object:
        return self.js("(key) => app.extensionManager.setting.get(key)", key)

    def node_ids(self, node_type: str) -> list[int]:
        return [n["id"] for n in self.nodes() if n["type"] == node_type]

    def widgets(self, node_id: int) -> dict:
        return self.js("(id) => Object.fromEntries(app.graph.getNodeById(id).widgets.map(w => [w.name, w.value]))", node_id)

    # --- doing what a user does --------------------------------------------------------------------

    def open(self, timeout: float = 90) -> None:
        """Load the page and wait until the graph and every extension are ready."""
        self.page.goto(self.base + "/", timeout=timeout * 1000)
        self.page.wait_for_function(
            "() => window.app && app.graph && app.canvas && app.extensionManager"
            " && document.querySelector('.side-bar-button, [class*=sidebar]')",
            timeout=timeout * 1000)
        self.settle(1.0)

    def settle(self, seconds: float = 0.5) -> None:
        time.sleep(seconds)

    def sidebar(self, label: str) -> None:
        """Click a button of the left sidebar (Nodes, Templates, Queue, ...)."""
        self.page.locator(".side-bar-button", has_text=label).first.click()
        self.settle()

    def library_folder(self, name: str) -> list[str] | None:
        """In the open node library (sidebar Nodes): expand folder ``name`` (a click
        on its name) and return the names it lists, as shown; None without that folder."""
        folder = self.page.get_by_role("treeitem", name=name, exact=True).first
        folder.wait_for(timeout=15000)
        if folder.get_attribute("aria-expanded") != "true":
            folder.get_by_text(name, exact=True).first.click()
            self.settle(0.8)
        folder.evaluate("e => e.scrollIntoView({block: 'start'})")  # scroll down to it: 1.48 draws the rows in view
        self.settle(0.5)
        return self.js(_FOLDER_ITEMS, name)

    def command(self, command_id: str) -> None:
        """Run one of the page's own commands (what a menu entry or a shortcut runs)."""
        self.js("(id) => app.extensionManager.command.execute(id)", command_id)
        self.settle()

    def dismiss_errors(self) -> None:
        """Close 1.48's error overlays (missing nodes, missing models) with their Close button."""
        overlays = self.page.locator(f"{ERROR_OVERLAY}:visible")
        for _ in range(5):
            if not overlays.count():
                return
            close = overlays.first.get_by_role("button", name="Close", exact=True).or_(
                overlays.first.locator("[data-testid=error-overlay-dismiss]"))
            close.first.click()
            self.settle(0.3)

    def close_dialogs(self) -> None:
        """Close what covers the canvas the way a user does: Escape, else the dialog's
        Close button; 1.48's error overlays by their Close button."""
        self.dismiss_errors()
        for attempt in range(4):
            dialogs = self.page.locator(f"{DIALOG}:visible")
            if not dialogs.count() and not self.page.locator(".p-dialog-mask").count():
                return
            if attempt < 2:
                self.page.keyboard.press("Escape")
            else:  # focus in a dropdown or field can keep Escape from the dialog
                close = dialogs.first.get_by_role("button", name=re.compile(r"^Close( dialog)?$")).or_(
                    dialogs.first.locator(DIALOG_CLOSE_ICON))
                if close.count():
                    close.first.click()
                else:
                    self.page.keyboard.press("Escape")
            self.settle(0.3)

    def canvas_point(self, across: float, down: float) -> tuple[float, float]:
        """A point of the canvas element, as fractions of its width and height."""
        box = self.page.locator("#graph-canvas").bounding_box()
        return box["x"] + box["width"] * across, box["y"] + box["height"] * down

    def search_nodes(self, query: str, at: tuple[float, float] = (0.5, 0.75)) -> list[str]:
        """Double-click the empty canvas, type ``query`` in the node search box
        and return the results' text (display name, category, source), best first.
        The search box stays open (Enter adds the first result, Escape closes it)."""
        x, y = self.canvas_point(*at)
        box = self.page.locator(NODE_SEARCH_BOX).first
        for attempt in range(3):  # a busy page can take a slow double-click for two clicks
            self.page.mouse.dblclick(x, y, delay=20)
            try:
                box.wait_for(timeout=4000)
                break
            except Exception:  # noqa: BLE001
                if attempt == 2:
                    raise
        box.fill(query)
        self.settle(0.8)
        return [" | ".join(parts) for parts in self.js(_SEARCH_RESULTS)]

    def add_node(self, query: str, at: tuple[float, float]) -> list[str]:
        """Add the node search's first result for ``query`` at a canvas point (fractions
        of its width and height): double-click there, type, Enter. 1.48 then lets the new
        node follow the mouse (Comfy.NodeSearchBoxImpl.FollowCursor) until a click drops
        it, so this clicks where the search was opened. Returns the search's results."""
        results = self.search_nodes(query, at=at)
        self.add_first_result(at)
        return results

    def add_first_result(self, at: tuple[float, float]) -> None:
        """In the open node search: Enter adds the first result; where the new node
        follows the mouse (1.48), a click at ``at`` drops it there."""
        self.page.keyboard.press("Enter")
        self.settle(0.5)
        if self.js("() => app.canvas.state?.ghostNodeId != null"):
            self.page.mouse.click(*self.canvas_point(*at))
            self.settle(0.3)

    def widget_point(self, node_id: int, name: str, across: float = 0.5) -> tuple[float, float]:
        return tuple(self.js(_WIDGET_POINT, [node_id, name, across]))

    def reach_widget(self, node_id: int, name: str, across: float = 0.5) -> tuple[float, float]:
        """Where to click a widget, first zooming to the node at 100 % when the
        widget is not drawn for clicks (far-out zoom) or lies off screen or under
        a panel, as a user zooms in before using a widget."""
        point, inside = self.widget_point(node_id, name, across), self.widget_point(node_id, name, 0.5)
        if not self.js(_WIDGET_REACHABLE, [point, inside]):
            self.show_node(node_id, 1.0)
            point = self.widget_point(node_id, name, across)
        return point

    def choose(self, node_id: int, widget: str, value: str) -> None:
        """Open a combo widget's menu on the canvas and click ``value``."""
        self.page.mouse.click(*self.reach_widget(node_id, widget))
        entry = self.page.locator(".litemenu-entry", has_text=value)
        entry.first.wait_for(timeout=10000)
        exact = [i for i in range(entry.count()) if entry.nth(i).inner_text().strip() == value]
        entry.nth(exact[0] if exact else 0).click()
        self.settle(0.3)

    def type_number(self, node_id: int, widget: str, value: str) -> None:
        """Click a number widget's middle (the page asks for a value) and type ``value``."""
        self.page.mouse.click(*self.reach_widget(node_id, widget))
        prompt = self.page.locator(".graphdialog input").first
        prompt.wait_for(timeout=10000)
        prompt.fill(value)
        prompt.press("Enter")
        self.settle(0.3)

    def hover_tooltip(self, node_id: int, widget: str, keep: bool = False) -> str:
        """Rest the mouse on a widget's label; the page's tooltip text ('' when none shows).
        The mouse moves away again unless ``keep`` (to photograph the tooltip)."""
        x, y = self.reach_widget(node_id, widget, across=0.25)
        self.page.mouse.move(x - 4, y)
        self.page.mouse.move(x, y)
        try:
            self.page.locator(".node-tooltip").first.wait_for(state="visible", timeout=5000)
        except Exception:  # noqa: BLE001 - no tooltip is an answer here
            return ""
        text = self.page.locator(".node-tooltip").first.inner_text()
        if not keep:
            self.page.mouse.move(*self.canvas_point(0.98, 0.5))
        return text

    def templates_dialog(self, module: str = PACK_MODULE):
        """The templates browser: the dialog whose list of extensions has the pack's entry."""
        return self.page.locator(DIALOG).filter(has=self.page.get_by_text(module, exact=True)).first

    def open_templates(self, module: str = PACK_MODULE):
        """Open the templates browser (sidebar Templates) unless it is open, and choose
        the pack's entry; returns the dialog once the pack's cards show."""
        dialog = self.templates_dialog(module)
        if not dialog.is_visible():
            self.sidebar("Templates")
            dialog.wait_for(timeout=15000)
        dialog.get_by_text(module, exact=True).first.click()
        dialog.locator("[data-testid^=template-workflow-]").first.wait_for(timeout=15000)
        return dialog

    def open_template(self, name: str, module: str = PACK_MODULE) -> None:
        """Open a workflow from the templates browser: the pack's entry, then its card."""
        dialog = self.open_templates(module)
        card = dialog.locator(f"[data-testid=template-workflow-{name}]").first
        card.wait_for(timeout=15000)
        card.click()
        # A second copy of an open workflow opens as "<name> (2)".
        self.page.wait_for_function(
            "(name) => { const open = app.extensionManager.workflow.activeWorkflow?.filename ?? '';"
            " return app.graph.nodes.length > 0 && (open === name || open.startsWith(name + ' (')) }",
            arg=name, timeout=30000)
        dialog.wait_for(state="hidden", timeout=15000)
        self.page.locator(".p-dialog-mask").wait_for(state="detached", timeout=15000)
        self.settle(1.0)

    def set_language(self, language: str, locale: str) -> None:
        """Choose the page's language as a user does: Settings (Ctrl+,), search
        "Language", pick ``language`` (e.g. "日本語") in its dropdown; waits until
        the setting Comfy.Locale reads ``locale`` and closes the dialog."""
        self.close_dialogs()
        self.command("Comfy.ShowSettingsDialog")
        dialog = self.page.locator(f"{DIALOG}:visible").first
        dialog.wait_for(timeout=15000)
        dialog.get_by_placeholder("Search Settings").first.fill("Language")
        self.settle(0.8)
        dropdown = dialog.get_by_role("combobox", name="Language").or_(dialog.locator("[id='Comfy.Locale'] [role=combobox]"))
        dropdown.first.click()
        self.page.get_by_role("option", name=language, exact=True).first.click()
        self.page.wait_for_function("(locale) => app.extensionManager.setting.get('Comfy.Locale') === locale",
                                    arg=locale, timeout=15000)
        self.settle(0.5)
        self.close_dialogs()

    def fit_view(self) -> None:
        """Zoom the canvas so the whole graph shows (the '.' shortcut)."""
        self.page.mouse.click(*self.canvas_point(0.5, 0.02))
        self.page.keyboard.press(".")
        self.settle(0.5)

    def show_node(self, node_id: int, scale: float = 1.0) -> None:
        """Centre the canvas on a node at ``scale`` (the page draws a node's
        images only while it is on screen)."""
        self.js("""([id, scale]) => {
            const node = app.graph.getNodeById(id), ds = app.canvas.ds, c = app.canvas.canvas;
            ds.scale = scale;
            const w = c.width / (window.devicePixelRatio || 1), h = c.height / (window.devicePixelRatio || 1);
            ds.offset[0] = w / (2 * scale) - (node.pos[0] + node.size[0] / 2);
            ds.offset[1] = h / (2 * scale) - (node.pos[1] + node.size[1] / 2);
            app.canvas.setDirty(true, true);
        }""", [node_id, scale])
        self.settle(0.5)

    def frame_graph(self, margin: float = 30) -> dict:
        """Zoom so the whole graph fills the canvas, drawn in full detail
        (the page normally drops text below 8 px: small previews would be blank).
        Returns the graph's box on the page."""
        box = self.js("""(margin) => {
            const ds = app.canvas.ds, c = app.canvas.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
            const ns = app.graph.nodes;
            const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
            const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
            const w = c.width / (window.devicePixelRatio || 1), h = c.height / (window.devicePixelRatio || 1);
            const scale = Math.min((w - 2 * margin) / (x1 - x0), (h - 2 * margin) / (y1 - y0));
            ds.scale = scale;
            ds.offset[0] = (w / scale - (x1 - x0)) / 2 - x0;
            ds.offset[1] = (h / scale - (y1 - y0)) / 2 - y0;
            app.canvas.min_font_size_for_lod = 0;
            app.canvas.setDirty(true, true);
            const [left, top] = app.canvasPosToClientPos([x0, y0]), [right, bottom] = app.canvasPosToClientPos([x1, y1]);
            return {x: left - margin / 2, y: top - margin / 2, width: right - left + margin, height: bottom - top + margin};
        }""", margin)
        self.settle(0.8)
        return box


# --- thumbnails for the templates browser ------------------------------------------------------------

THUMBNAIL_WIDTH = 640
THUMBNAIL_VIEWPORT = {"width": 2200, "height": 1300}


def _thumbnail(self) -> bytes:
    """The open workflow, framed whole with no page furniture around it, as a small JPEG."""
    self.dismiss_errors()  # 1.48's "<checkpoint> is missing" overlay would sit over the graph
    self.command("Workspace.ToggleFocusMode")
    self.js("async () => { for (const [key, value] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasInfo', false],"
            " ['Comfy.Graph.CanvasMenu', false]]) await app.extensionManager.setting.set(key, value);"
            " document.querySelectorAll('.p-toast').forEach(e => e.remove()) }")
    box = self.frame_graph()
    png = self.page.screenshot(clip=box)
    self.command("Workspace.ToggleFocusMode")
    return thumbnail_jpeg(png)


ComfyPage.thumbnail = _thumbnail


def thumbnail_jpeg(png: bytes, width: int = THUMBNAIL_WIDTH, quality: int = 85) -> bytes:
    """A screenshot scaled to ``width`` pixels across, as JPEG."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def main() -> None:
    import argparse

    from devkit import host, paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thumbnails", action="store_true", help="rewrite example_workflows/<name>.jpg")
    args = parser.parse_args()
    if not args.thumbnails:
        parser.error("nothing to do: pass --thumbnails")
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    examples = paths.REPO_ROOT / "example_workflows"
    with tempfile.TemporaryDirectory() as workdir, host.server(Path(workdir)) as server, \
            chromium(THUMBNAIL_VIEWPORT) as page:
        comfy = ComfyPage(page, server.base)
        comfy.open()
        comfy.close_dialogs()
        for workflow in sorted(examples.glob("*.json")):
            comfy.open_template(workflow.stem)
            out = workflow.with_suffix(".jpg")
            out.write_bytes(comfy.thumbnail())
            print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")

if __name__ == "__main__":
    main()
