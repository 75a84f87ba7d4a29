"""UI-format ComfyUI workflows: load, check against /object_info, convert to API format.

A UI-format workflow is what ComfyUI's web page saves (``version`` 0.4):
``nodes`` (each with ``id``, ``type``, ``inputs`` naming their link ids,
``outputs``, ``widgets_values``, ``pos``, ``size`` ...) and ``links`` as
``[id, from_node, from_slot, to_node, to_slot, type]``. The API format is what
``POST /prompt`` runs: ``{node_id: {"class_type", "inputs", "_meta"}}`` with
links as ``[source_id, output_index]``.

``object_info`` everywhere is the dict that ComfyUI's ``GET /object_info``
returns. Pure Python: nothing here imports ComfyUI.
"""
from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

# Node types that exist only in the web page: never sent to the server.
FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
# Types the web page shows as widgets (everything else is a socket).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Values of the extra "control after generate" widget the page adds after a seed.
SEED_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
SEED_INPUT_NAMES = frozenset({"seed", "noise_seed"})
# Upload combos (LoadImage ...) are followed by the upload button's stored value.
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload")
UPLOAD_VALUES = frozenset({"image", "video", "audio", "file"})
# Node modes: 0 always, 2 never (muted), 4 bypassed.
MODE_MUTED = 2
MODE_BYPASSED = 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted or checked, with the reason."""


def load_workflow(path: str | Path) -> dict:
    """Read a UI-format workflow JSON file (the web page's "Save" format)."""
    with open(path, encoding="utf-8") as handle:
        workflow = json.load(handle)
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowError(f"{path} is not a UI-format workflow (no 'nodes' list)")
    return workflow


def node_types(workflow: Mapping) -> set[str]:
    """Every node ``type`` used in the workflow (notes included)."""
    return {node["type"] for node in workflow["nodes"]}


def nodes_by_id(workflow: Mapping) -> dict[int | str, dict]:
    return {node["id"]: node for node in workflow["nodes"]}


def links_by_id(workflow: Mapping) -> dict[int, list]:
    """``{link_id: [id, from_node, from_slot, to_node, to_slot, type]}`` (object links accepted too)."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]]
        out[link[0]] = list(link)
    return out


def _subgraph_types(workflow: Mapping) -> set[str]:
    return {sub.get("id") for sub in (workflow.get("definitions") or {}).get("subgraphs", [])}


def missing_node_types(workflow: Mapping, object_info: Mapping) -> list[str]:
    """Node types the workflow uses that the server does not have (sorted).

    Web-page-only types (notes, reroutes, primitives) and the workflow's own
    subgraphs are never missing.
    """
    known = set(object_info) | FRONTEND_ONLY_TYPES | _subgraph_types(workflow)
    return sorted(node_types(workflow) - known)


def _input_specs(info: Mapping) -> dict[str, tuple[list | str, dict, bool]]:
    """``{name: (type, options, required)}`` in the node's input order (hidden inputs left out)."""
    specs: dict[str, tuple[Any, dict, bool]] = {}
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        declared = info.get("input", {}).get(section) or {}
        for name in order.get(section) or list(declared):
            spec = declared[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs[name] = (spec[0], options, section == "required")
    return specs


def _is_widget(kind: Any, options: Mapping) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def type_name(kind: Any) -> str:
    """The type a socket carries: a combo's list of choices is ``COMBO``."""
    return "COMBO" if isinstance(kind, list) else str(kind)


def widget_names(info: Mapping) -> list[str]:
    """The node's widget inputs in the order the web page lays out ``widgets_values``."""
    return [name for name, (kind, options, _) in _input_specs(info).items() if _is_widget(kind, options)]


def _has_seed_control(name: str, kind: Any, options: Mapping) -> bool:
    """Whether the page adds a "control after generate" widget after this input."""
    if kind != "INT":
        return False
    return bool(options.get("control_after_generate")) or name in SEED_INPUT_NAMES


def _read_widgets(node: Mapping, info: Mapping) -> tuple[dict[str, Any], int]:
    """``({input name: value}, number of widgets_values consumed)``; see ``widget_values``."""
    values = node.get("widgets_values")
    if values is None:
        return {}, 0
    specs = _input_specs(info)
    if isinstance(values, dict):
        out = {name: values[name] for name in specs if name in values}
        return out, len(out)
    out: dict[str, Any] = {}
    position = 0
    for name, (kind, options, _) in specs.items():
        if not _is_widget(kind, options):
            continue
        if position >= len(values):
            break
        out[name] = values[position]
        position += 1
        if position >= len(values):
            break
        following = values[position]
        if _has_seed_control(name, kind, options):
            # Always stored with control_after_generate; for other seed inputs only when present.
            if options.get("control_after_generate") or following in SEED_CONTROL_VALUES:
                position += 1
        elif any(options.get(flag) for flag in UPLOAD_FLAGS) and following in UPLOAD_VALUES:
            position += 1
    return out, position


def _fits(kind: Any, value: Any) -> bool:
    """Whether a saved value can belong to a widget of this kind."""
    if isinstance(kind, list) or kind in ("STRING", "COMBO"):
        return isinstance(value, str)  # a combo's file names differ between machines
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _newer_widgets(info: Mapping, read: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: default}`` of the widgets after the last saved value, when each
    has a default: widgets this host added since the file was saved (0.33's
    ``bypass`` on LoraModelLoader). Both web pages (frontends 1.32 and 1.48)
    open such a file with those widgets at their defaults. Only where every
    saved value fits its widget: values shifted by a lost one are no older file."""
    names = widget_names(info)
    specs = _input_specs(info)
    if list(read) != names[:len(read)] or not all(_fits(specs[n][0], v) for n, v in read.items()):
        return {}
    later = names[len(read):]
    if not all("default" in specs[name][1] for name in later):
        return {}
    return {name: specs[name][1]["default"] for name in later}


def _read_widgets_with_defaults(node: Mapping, info: Mapping) -> tuple[dict[str, Any], int]:
    """``_read_widgets`` plus the defaults of widgets the host added after the file was saved."""
    read, consumed = _read_widgets(node, info)
    return {**read, **_newer_widgets(info, read)}, consumed


def widget_values(node: Mapping, info: Mapping) -> dict[str, Any]:
    """``{input name: value}`` of a UI node's widgets, read by the server's input order.

    Handles the extra "control after generate" value the page stores after a
    seed (``[seed, "fixed", steps, ...]``), the upload button's value after an
    upload combo (``["photo.png", "image"]``), and dict-shaped ``widgets_values``.
    Widgets after the last saved value take their defaults, as the page does
    when it opens a file saved before this host added them.
    """
    return _read_widgets_with_defaults(node, info)[0]


def _source_of(workflow_nodes: Mapping, links: Mapping, link_id: int | None, seen: frozenset = frozenset()):
    """Follow a link back through reroutes and bypassed nodes.

    Returns ``(node, slot)`` of the real source, ``("primitive", None)`` for a
    PrimitiveNode (whose value the target's own widget already holds), or
    ``None`` when nothing real feeds it (unconnected reroute, muted source).
    """
    if link_id is None or link_id not in links:
        return None
    if link_id in seen:
        raise WorkflowError(f"link {link_id} is part of a cycle through reroutes/bypassed nodes")
    _, from_id, from_slot, _, _, link_type = links[link_id]
    source = workflow_nodes.get(from_id)
    if source is None:
        raise WorkflowError(f"link {link_id} starts at node {from_id}, which is not in the workflow")
    if source["type"] == "PrimitiveNode":
        return ("primitive", None)
    if source["type"] == "Reroute":
        inputs = source.get("inputs") or []
        return _source_of(workflow_nodes, links, inputs[0].get("link") if inputs else None, seen | {link_id})
    mode = source.get("mode", 0)
    if mode == MODE_MUTED:
        return None
    if mode == MODE_BYPASSED:
        # The page passes the first input of the same type straight through.
        for socket in source.get("inputs") or []:
            if socket.get("link") is not None and socket.get("type") == link_type:
                return _source_of(workflow_nodes, links, socket["link"], seen | {link_id})
        return None
    return (source, int(from_slot))


def to_api(workflow: Mapping, object_info: Mapping) -> dict[str, dict]:
    """Convert a UI-format workflow to the API format ``POST /prompt`` runs.

    Widget values are mapped by the server's input order (``object_info``);
    links become ``[source_id, slot]``. Notes, reroutes and primitive nodes
    are dropped (a primitive's value is already in its target's widget),
    muted nodes are left out and bypassed nodes passed through, as the web
    page does. Each node keeps its title in ``_meta.title``.
    """
    if _subgraph_types(workflow):
        raise WorkflowError("workflows with subgraphs are not supported: unpack the subgraphs first")
    missing = missing_node_types(workflow, object_info)
    if missing:
        raise WorkflowError(f"node types missing from this ComfyUI: {', '.join(missing)}")
    all_nodes = nodes_by_id(workflow)
    links = links_by_id(workflow)
    api: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info[kind]
        specs = _input_specs(info)
        inputs: dict[str, Any] = dict(widget_values(node, info))
        for socket in node.get("inputs") or []:
            name = socket.get("name")
            if name not in specs or socket.get("link") is None:
                continue
            source = _source_of(all_nodes, links, socket["link"])
            if source is None:
                continue  # fed by nothing real: a widget keeps its own value, a socket stays unset
            if source[0] == "primitive":
                continue  # the widget value read above is the primitive's value
            source_node, slot = source
            inputs[name] = [str(source_node["id"]), slot]
        api[str(node["id"])] = {
            "class_type": kind,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or kind},
        }
    return api


def _types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's rule: ``*`` matches anything; comma-separated types match if they share one."""
    if output_type == "*" or input_type == "*":
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def link_type_errors(workflow: Mapping, object_info: Mapping) -> list[str]:
    """One message per link whose types do not fit, per the server's ``object_info``.

    Checks that the source output's type matches the target input's type
    (``*`` matches anything), that the link's stored type is the source
    output's type, that both ends exist, and that the nodes' own socket lists
    name the link. Links to or from web-page-only nodes are skipped.
    """
    errors: list[str] = []
    all_nodes = nodes_by_id(workflow)
    for link_id, (_, from_id, from_slot, to_id, to_slot, stored) in links_by_id(workflow).items():
        source, target = all_nodes.get(from_id), all_nodes.get(to_id)
        if source is None or target is None:
            errors.append(f"link {link_id}: node {from_id if source is None else to_id} does not exist")
            continue
        where = f"link {link_id} ({source['type']} #{from_id} slot {from_slot} -> {target['type']} #{to_id} slot {to_slot})"
        target_sockets = target.get("inputs") or []
        if not 0 <= int(to_slot) < len(target_sockets):
            errors.append(f"{where}: target has no input slot {to_slot}")
            continue
        socket = target_sockets[int(to_slot)]
        if socket.get("link") != link_id:
            errors.append(f"{where}: the target input {socket.get('name')!r} names link {socket.get('link')}, not {link_id}")
        source_sockets = source.get("outputs") or []
        if 0 <= int(from_slot) < len(source_sockets) and link_id not in (source_sockets[int(from_slot)].get("links") or []):
            errors.append(f"{where}: the source output does not list link {link_id}")
        if source["type"] in FRONTEND_ONLY_TYPES or target["type"] in FRONTEND_ONLY_TYPES:
            continue
        if source["type"] not in object_info or target["type"] not in object_info:
            continue  # reported by missing_node_types
        outputs = object_info[source["type"]].get("output") or []
        if not 0 <= int(from_slot) < len(outputs):
            errors.append(f"{where}: {source['type']} has no output slot {from_slot}")
            continue
        output_type = type_name(outputs[int(from_slot)])
        specs = _input_specs(object_info[target["type"]])
        name = socket.get("name")
        if name not in specs:
            errors.append(f"{where}: {target['type']} has no input named {name!r}")
            continue
        input_type = type_name(specs[name][0])
        if not _types_match(output_type, input_type):
            errors.append(f"{where}: output type {output_type} does not fit input {name!r} of type {input_type}")
        if not _types_match(output_type, type_name(stored)):
            errors.append(f"{where}: link stored as type {stored!r}, but the output's type is {output_type}")
    return errors


def structure_errors(workflow: Mapping) -> list[str]:
    """What the web page's workflow schema (zod, frontend 1.32) would reject, plus id bookkeeping.

    Not a full schema check: the fields a saved 0.4 workflow must have, node
    fields, link tuples, unique ids and ``last_node_id``/``last_link_id``.
    """
    errors: list[str] = []
    for key, kind in (("last_node_id", (int, str)), ("last_link_id", int), ("nodes", list), ("links", list),
                      ("version", (int, float))):
        if not isinstance(workflow.get(key), kind):
            errors.append(f"workflow field {key!r} missing or of the wrong type")
    if errors:
        return errors
    ids = [node.get("id") for node in workflow["nodes"]]
    if len(set(ids)) != len(ids):
        errors.append("node ids are not unique")
    numeric_ids = [i for i in ids if isinstance(i, int)]
    if numeric_ids and max(numeric_ids) > workflow["last_node_id"]:
        errors.append(f"last_node_id {workflow['last_node_id']} is below the largest node id {max(numeric_ids)}")
    for node in workflow["nodes"]:
        label = f"node {node.get('id')} ({node.get('type')})"
        for field, check in (("id", lambda v: isinstance(v, (int, str))), ("type", lambda v: isinstance(v, str)),
                             ("pos", _is_vector2), ("size", _is_vector2), ("flags", lambda v: isinstance(v, dict)),
                             ("order", _is_number), ("mode", _is_number), ("properties", lambda v: isinstance(v, dict))):
            if field not in node or not check(node[field]):
                errors.append(f"{label}: field {field!r} missing or of the wrong type")
        for socket in node.get("inputs") or []:
            if not isinstance(socket.get("name"), str) or "type" not in socket:
                errors.append(f"{label}: an input lacks 'name' or 'type'")
        for socket in node.get("outputs") or []:
            if not isinstance(socket.get("name"), str) or "type" not in socket:
                errors.append(f"{label}: an output lacks 'name' or 'type'")
        if "widgets_values" in node and not isinstance(node["widgets_values"], (list, dict)):
            errors.append(f"{label}: widgets_values is neither a list nor a dict")
    link_ids = []
    for link in workflow["links"]:
        if not (isinstance(link, list) and len(link) == 6 and all(_is_number(link[i]) for i in (0, 2, 4))):
            errors.append(f"link {link!r} is not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        link_ids.append(link[0])
    if len(set(link_ids)) != len(link_ids):
        errors.append("link ids are not unique")
    if link_ids and max(link_ids) > workflow["last_link_id"]:
        errors.append(f"last_link_id {workflow['last_link_id']} is below the largest link id {max(link_ids)}")
    return errors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_vector2(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)


def widget_count_errors(workflow: Mapping, object_info: Mapping) -> list[str]:
    """Nodes whose ``widgets_values`` do not line up with their widgets.

    Too few or too many values mean they would be read into the wrong inputs
    (e.g. a seed stored without its "control after generate" value). Fewer
    values are fine only where every missing widget comes last and has a
    default: a file saved before the host added them, which the page opens
    with those defaults (see ``widget_values``).
    """
    errors = []
    for node in workflow["nodes"]:
        values = node.get("widgets_values")
        if node["type"] not in object_info or not isinstance(values, list):
            continue
        names = widget_names(object_info[node["type"]])
        read, consumed = _read_widgets_with_defaults(node, object_info[node["type"]])
        if consumed != len(values) or len(read) != len(names):
            errors.append(f"node {node['id']} ({node['type']}): {len(values)} widget values {values!r} "
                          f"do not line up with its widgets {names}")
    return errors


def api_nodes(api_graph: Mapping[str, dict], class_type: str | None = None, title: str | None = None) -> list[str]:
    """Ids of the API-graph nodes with this class type and/or title (``_meta.title``)."""
    return [node_id for node_id, node in api_graph.items()
            if (class_type is None or node["class_type"] == class_type)
            and (title is None or node.get("_meta", {}).get("title") == title)]


def with_checkpoint(api_graph: Mapping[str, dict], name: str) -> dict[str, dict]:
    """A copy of the API graph whose checkpoint loaders all load ``name``."""
    graph = copy.deepcopy(dict(api_graph))
    changed = 0
    for node in graph.values():
        if "ckpt_name" in node["inputs"] and not isinstance(node["inputs"]["ckpt_name"], list):
            node["inputs"]["ckpt_name"] = name
            changed += 1
    if not changed:
        raise WorkflowError("the graph has no checkpoint loader (no 'ckpt_name' input)")
    return graph


def with_inputs(api_graph: Mapping[str, dict], *, title: str | None = None, class_type: str | None = None,
                **values: Any) -> dict[str, dict]:
    """A copy of the API graph with ``values`` set on every node matching ``title``/``class_type``.

    Raises if no node matches, or a matching node has no such input (a typo
    would otherwise be silently ignored by the server).
    """
    if title is None and class_type is None:
        raise ValueError("give a title or a class_type")
    graph = copy.deepcopy(dict(api_graph))
    targets = api_nodes(graph, class_type, title)
    if not targets:
        raise WorkflowError(f"no node with title {title!r} / class {class_type!r}")
    for node_id in targets:
        inputs = graph[node_id]["inputs"]
        unknown = set(values) - set(inputs)
        if unknown:
            raise WorkflowError(f"node {node_id} ({graph[node_id]['class_type']}) has no input {sorted(unknown)}")
        inputs.update(values)
    return graph


def output_ids(api_graph: Mapping[str, dict], object_info: Mapping) -> list[str]:
    """Ids of the API graph's output nodes (those the server runs a prompt for)."""
    return [node_id for node_id, node in api_graph.items() if object_info[node["class_type"]].get("output_node")]


def iter_links(api_graph: Mapping[str, dict]) -> Iterable[tuple[str, str, str, int]]:
    """``(target_id, input_name, source_id, slot)`` for every link of an API graph."""
    for node_id, node in api_graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                yield node_id, name, value[0], value[1]


def overlapping_nodes(workflow: Mapping, title_height: float = 30) -> list[str]:
    """Pairs of nodes whose boxes (title bar included) overlap on the canvas."""
    boxes = []
    for node in workflow["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        boxes.append((node, (x, y - title_height, x + w, y + h)))
    found = []
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                found.append(f"node {a['id']} ({a.get('title', a['type'])}) overlaps node {b['id']} ({b.get('title', b['type'])})")
    return found


class WorkflowBuilder:
    """Write UI-format workflows from code, with sockets named and typed as ``object_info`` says.

    >>> b = WorkflowBuilder(object_info)
    >>> ckpt = b.add("CheckpointLoaderSimple", (0, 0), ["model.safetensors"])
    >>> enc = b.add("CLIPTextEncode", (400, 0), ["a cat"], title="Prompt")
    >>> b.link(ckpt, 1, enc, "clip")
    >>> workflow = b.build()

    Only the sockets (non-widget inputs) are listed in a node's ``inputs``,
    as in ComfyUI's shipped templates; widget values go in ``widgets_values``
    in the server's input order (a seed takes its "control after generate"
    value after it: ``[seed, "fixed", steps, ...]``).
    """

    def __init__(self, object_info: Mapping):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, kind: str, pos: tuple[float, float], widgets: list | None = None, *, title: str | None = None,
            size: tuple[float, float] | None = None, color: str | None = None, bgcolor: str | None = None) -> int:
        """Add a node; returns its id."""
        node_id = len(self.nodes) + 1
        node: dict[str, Any] = {"id": node_id, "type": kind, "pos": [pos[0], pos[1]], "size": None, "flags": {},
                                "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {}}
        if kind in NOTE_TYPES:
            node["properties"] = {}
        else:
            info = self.object_info[kind]
            node["properties"] = {"Node name for S&R": kind}
            for name, (input_kind, options, required) in _input_specs(info).items():
                if not _is_widget(input_kind, options):
                    socket = {"name": name, "type": type_name(input_kind), "link": None}
                    if not required:
                        socket["shape"] = 7  # how the page draws an optional input
                    node["inputs"].append(socket)
            names = info.get("output_name") or info.get("output") or []
            for slot, (output_kind, name) in enumerate(zip(info.get("output") or [], names)):
                node["outputs"].append({"name": name, "type": type_name(output_kind), "slot_index": slot, "links": []})
        if title:
            node["title"] = title
        node["widgets_values"] = list(widgets or [])
        node["size"] = list(size) if size else self._default_size(node)
        if color:
            node["color"] = color
        if bgcolor:
            node["bgcolor"] = bgcolor
        self.nodes.append(node)
        return node_id

    def _default_size(self, node: Mapping) -> list[float]:
        if node["type"] in NOTE_TYPES:
            return [400, 160]
        info = self.object_info[node["type"]]
        rows = max(len(node["inputs"]), len(node["outputs"]))
        height = 30 + 22 * rows
        for name in widget_names(info):
            kind, options, _ = _input_specs(info)[name]
            height += 90 if kind == "STRING" and options.get("multiline") else 26
            if _has_seed_control(name, kind, options):
                height += 26
        return [340, height]

    def link(self, source: int, slot: int, target: int, input_name: str) -> int:
        """Connect output ``slot`` of ``source`` to the socket ``input_name`` of ``target``."""
        src, dst = self.nodes[source - 1], self.nodes[target - 1]
        sockets = [s["name"] for s in dst["inputs"]]
        if input_name not in sockets:
            raise WorkflowError(f"{dst['type']} has no socket {input_name!r} (sockets: {sockets})")
        to_slot = sockets.index(input_name)
        if dst["inputs"][to_slot]["link"] is not None:
            raise WorkflowError(f"{dst['type']} #{target} input {input_name!r} is already connected")
        link_id = len(self.links) + 1
        link_type = src["outputs"][slot]["type"]
        self.links.append([link_id, source, slot, target, to_slot, link_type])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][to_slot]["link"] = link_id
        return link_id

    def build(self, name: str, extra: Mapping | None = None) -> dict:
        """The workflow, with an id derived from ``name`` and each node's ``order``
        a topological order (as the page stores it)."""
        incoming = {node["id"]: {link[1] for link in self.links if link[3] == node["id"]} for node in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [n["id"] for n in self.nodes if n["id"] not in done and incoming[n["id"]] <= set(done)]
            if not ready:
                raise WorkflowError("the workflow has a cycle")
            done.extend(ready)
        nodes = copy.deepcopy(self.nodes)
        for node in nodes:
            node["order"] = done.index(node["id"])
            for output in node["outputs"]:
                if not output["links"]:
                    output["links"] = None  # the page's way to say "unconnected"
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-rece/" + name)),
            "revision": 0,
            "last_node_id": len(nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": copy.deepcopy(self.links),
            "groups": [],
            "config": {},
            "extra": dict(extra or {"ds": {"scale": 0.75, "offset": [80, 320]}}),
            "version": 0.4,
        }
