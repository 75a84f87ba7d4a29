"""Drive ComfyUI's web page in headless Chromium, as a user would.

Debian's ``chromium`` (installed by ``scripts/setup.sh``) driven through
Playwright's Python library, never a browser download of Playwright's own.
Each launch gets a fresh profile folder, so every run is a first visit.

    .venv/bin/python -m devkit.browser --thumbnails   # rewrite example_workflows/*.jpg

The helpers find things the way a person does (sidebar buttons, the node
search box, the templates browser, the widgets on the canvas) and read the
page's state through ComfyUI's ``window.app`` only to check what they did.
"""
from __future__ import annotations

import contextlib
import io
import os
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


class ComfyPage:
    """ComfyUI's page at ``base`` in a Playwright ``page``."""

    def __init__(self, page, base: str):
        self.page = page
        self.base = base
        self.errors: list[str] = []  # uncaught exceptions in the page
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    # --- reading the page ------------------------------------------------------------------------

    def js(self, expression: str, arg: object = None) -> object:
        return self.page.evaluate(expression, arg)

    def text(self) -> str:
        return self.page.evaluate("() => document.body.innerText")

    def nodes(self) -> list[dict]:
        """The open graph's nodes: id, type, title, widgets' values, whether the page knows the type."""
        return self.js("""() => app.graph.nodes.map(n => ({
            id: n.id, type: n.type, title: n.title,
            known: !!LiteGraph.registered_node_types[n.type] && !n.has_errors,
            widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])),
        }))""")

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

    def command(self, command_id: str) -> None:
        """Run one of the page's own commands (what a menu entry or a shortcut runs)."""
        self.js("(id) => app.extensionManager.command.execute(id)", command_id)
        self.settle()

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.page.locator(".p-dialog-mask, [role=dialog]").count():
                return
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
        box = self.page.locator(".comfy-vue-node-search-container input, .p-autocomplete-input").first
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
        return [t for t in self.js(
            "() => [...document.querySelectorAll('.p-autocomplete-option, [role=option]')]"
            ".map(e => e.innerText.replace(/\\u00a0/g, ' ').replace(/\\s*\\n\\s*/g, ' | ').trim())") if t]

    def widget_point(self, node_id: int, name: str, across: float = 0.5) -> tuple[float, float]:
        return tuple(self.js(_WIDGET_POINT, [node_id, name, across]))

    def choose(self, node_id: int, widget: str, value: str) -> None:
        """Open a combo widget's menu on the canvas and click ``value``."""
        self.page.mouse.click(*self.widget_point(node_id, widget))
        entry = self.page.locator(".litemenu-entry", has_text=value)
        entry.first.wait_for(timeout=10000)
        exact = [i for i in range(entry.count()) if entry.nth(i).inner_text().strip() == value]
        entry.nth(exact[0] if exact else 0).click()
        self.settle(0.3)

    def type_number(self, node_id: int, widget: str, value: str) -> None:
        """Click a number widget's middle (the page asks for a value) and type ``value``."""
        self.page.mouse.click(*self.widget_point(node_id, widget))
        prompt = self.page.locator(".graphdialog input").first
        prompt.wait_for(timeout=10000)
        prompt.fill(value)
        prompt.press("Enter")
        self.settle(0.3)

    def hover_tooltip(self, node_id: int, widget: str) -> str:
        """Rest the mouse on a widget's label; the page's tooltip text ('' when none shows)."""
        x, y = self.widget_point(node_id, widget, across=0.25)
        self.page.mouse.move(x - 4, y)
        self.page.mouse.move(x, y)
        try:
            self.page.locator(".node-tooltip").first.wait_for(state="visible", timeout=5000)
        except Exception:  # noqa: BLE001 - no tooltip is an answer here
            return ""
        text = self.page.locator(".node-tooltip").first.inner_text()
        self.page.mouse.move(*self.canvas_point(0.98, 0.5))
        return text

    def open_template(self, name: str, module: str = PACK_MODULE) -> None:
        """Open a workflow from the templates browser: the pack's entry, then its card."""
        dialog = self.page.locator("[data-testid=template-workflows-content]")
        if not dialog.count():
            self.sidebar("Templates")
            dialog.first.wait_for(timeout=15000)
        self.page.locator(".p-dialog").get_by_text(module, exact=True).first.click()
        card = self.page.locator(f"[data-testid=template-workflow-{name}]").first
        card.wait_for(timeout=15000)
        card.click()
        # A second copy of an open workflow opens as "<name> (2)".
        self.page.wait_for_function(
            "(name) => { const open = app.extensionManager.workflow.activeWorkflow?.filename ?? '';"
            " return !document.querySelector('.p-dialog-mask') && app.graph.nodes.length > 0"
            " && (open === name || open.startsWith(name + ' (')) }", arg=name, timeout=30000)
        self.settle(1.0)

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
