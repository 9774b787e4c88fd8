"""A server result (report.json + two heatmaps) -> MRML nodes, and back from the scene.

One answered question becomes, in a subject-hierarchy folder named after the question:

* ``<q> per slice``   table: model slice, voxel slice, kept, L1 to anchor, tokens kept/total,
                      retention, gamma (from ``report["slices"]["per_slice"]``);
* ``<q> tokens kept`` plot chart: tokens kept per slice (bars);
* ``<q> slice filter`` plot chart: L1 distance to the anchor per slice, and gamma as a line;
* ``<q> answer``      text node: question, answer, model, settings, counts, timings (and the
                      unpruned answer when compared). It is the result's handle: its attributes
                      (``MedPruner.*``) and node references point at every other node and at the input;
* ``<q> report.json`` text node: the server's full report, for audit.

and it points (node references) at a pair of heatmaps of the prepared volume, in a
``MedPruner heatmaps`` folder beside the input:

* ``<input> attention``  scalar volume: the nucleus probability of the token covering each voxel
                         (0 elsewhere), perceptual colour table, zeros transparent (table + threshold);
* ``<input> decisions``  labelmap: 0 not sent, 1 slice dropped, 2 token pruned, 3 contextual, 4 kept,
                         with a colour table built from ``report["labels"]``.

The heatmaps depend only on the prepared volume (voxels, geometry, pruning and slicing settings),
never on the question, so there is one pair per prepared volume and input node: a follow-up the
server answered from the same prepared volume (report ``prefix_reused``, same ``volume_id``) shares
the pair instead of storing another copy (hundreds of MB for a CT). The pair records its
``MedPruner.VolumeId`` and input, so it is found again after a .mrb reload; it is kept out of the
answers' folders so that deleting one answer's folder does not take it from the others, and
`remove_result` removes it with the last answer that uses it.

Both heatmaps get exactly the input's IJK-to-RAS matrix (after checking that the server's NRRD
geometry matches it) and the input's parent transform. The input node is only read.
Everything is created or nothing: on any error the nodes made so far are removed.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

import numpy as np

from .colors import attention_color_node, decision_color_node
from .errors import ResultError
from .scene_utils import nodes_by_class, place_in_folder, subject_hierarchy
from .volume_export import ijk_to_ras_array

__all__ = ["HEATMAPS_FOLDER", "ROLES", "ResultNodes", "create_result_nodes", "find_heatmaps", "find_results",
           "folder_name", "heatmap_volume_ids", "kept_slice_centres_ras", "remove_result", "result_from_answer_node",
           "summary_text"]

ROLE = "MedPruner.Role"
REF_PREFIX = "MedPruner."
ROLES = ("attention", "decisions", "table", "tokens_chart", "filter_chart", "report")
HEATMAP_ROLES = ("attention", "decisions")
VOLUME_ID = "MedPruner.VolumeId"            # on heatmap nodes: the prepared volume they show
HEATMAPS_FOLDER = "MedPruner heatmaps"
HEATMAPS_FOLDER_ATTRIBUTE = "MedPruner.Heatmaps"
GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass
class ResultNodes:
    """The nodes of one result; `answer` is the handle (see module docstring)."""

    answer: object
    attention: object
    decisions: object
    table: object
    tokens_chart: object
    filter_chart: object
    report_node: object
    input_volume: object | None
    folder_item: int

    @property
    def report(self) -> dict:
        return json.loads(self.report_node.GetText())

    @property
    def question(self) -> str:
        return self.answer.GetAttribute("MedPruner.Question") or ""

    def nodes(self) -> list:
        """Every node the result shows, the heatmaps it may share with other answers included."""
        return [self.answer, self.attention, self.decisions, self.table, self.tokens_chart, self.filter_chart,
                self.report_node]

    def own_nodes(self) -> list:
        """The nodes only this answer uses (in its folder); the plot series hang off the charts."""
        return [self.answer, self.table, self.tokens_chart, self.filter_chart, self.report_node]


def folder_name(question: str, limit: int = 60) -> str:
    text = " ".join(question.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def _check_geometry(name: str, array: np.ndarray, matrix: np.ndarray, input_shape, input_matrix) -> None:
    if tuple(array.shape) != tuple(input_shape):
        raise ResultError(
            f"The server's {name} heatmap has {array.shape[::-1]} voxels but the input has {tuple(input_shape)[::-1]}.",
            "The input volume may have changed since it was sent: ask again.",
        )
    if not np.allclose(matrix, input_matrix, rtol=0.0, atol=GEOMETRY_TOLERANCE_MM):
        raise ResultError(f"The server's {name} heatmap is not in the input volume's geometry.",
                          "Update the MedPruner server; then ask again.",
                          details=f"heatmap IJK-to-RAS:\n{matrix}\ninput IJK-to-RAS:\n{input_matrix}")


def _new_volume(scene, class_name: str, name: str, array: np.ndarray, matrix: np.ndarray):
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    flat = np.ascontiguousarray(array).reshape(-1)
    vtk_array = numpy_support.numpy_to_vtk(flat, deep=True)
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    node.SetIJKToRASMatrix(m)
    node.CreateDefaultDisplayNodes()
    return node


def _add_column(table, name: str, values, kind: str):
    import vtk

    array = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray}[kind]()
    array.SetName(name)
    for v in values:
        array.InsertNextValue(v)
    table.GetTable().AddColumn(array)


def _per_slice_table(scene, name: str, report: dict):
    rows = report["slices"]["per_slice"]
    gamma = float(report.get("config", {}).get("gamma", float("nan")))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    _add_column(table, "model slice", [int(r["model_index"]) for r in rows], "int")
    _add_column(table, "voxel slice", [int(r["voxel_index"]) for r in rows], "int")
    _add_column(table, "kept", [1 if r["kept"] else 0 for r in rows], "int")
    _add_column(table, "L1 to anchor",
                [float("nan") if r["l1_to_anchor"] is None else float(r["l1_to_anchor"]) for r in rows], "double")
    _add_column(table, "tokens kept", [int(r["tokens_kept"]) for r in rows], "int")
    _add_column(table, "tokens total", [int(r["tokens_total"]) for r in rows], "int")
    _add_column(table, "retention", [float(r["retention"]) for r in rows], "double")
    _add_column(table, "gamma", [gamma] * len(rows), "double")
    descriptions = {
        "model slice": "index of the slice in the model's input (inferior to superior for axial)",
        "voxel slice": "index of the input volume slice it was taken from",
        "kept": "1 when the slice filter kept the slice, 0 when it dropped it as redundant",
        "L1 to anchor": "mean absolute difference to the last kept slice (empty for the first slice)",
        "tokens kept": "visual tokens of the slice the language model saw (nucleus + contextual)",
        "tokens total": "visual tokens of the slice before pruning",
        "retention": "tokens kept / tokens total",
        "gamma": "slice filter threshold: a slice is kept when its L1 to anchor exceeds gamma",
    }
    for column, text in descriptions.items():
        table.SetColumnDescription(column, text)
    table.SetAttribute(ROLE, "table")
    return table


def _series(scene, name: str, table, x: str, y: str, plot_type: str, color, line_style=None):
    import slicer

    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName(x)
    series.SetYColumnName(y)
    series.SetPlotType({"bar": slicer.vtkMRMLPlotSeriesNode.PlotTypeBar,
                        "scatter": slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter}[plot_type])
    series.SetColor(*color)
    if plot_type == "scatter":
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if line_style is None
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        if line_style == "dash":
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
    series.SetAttribute(ROLE, "series")
    return series


def _charts(scene, short: str, table):
    tokens_chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{short} tokens kept")
    tokens_chart.SetTitle("Visual tokens kept per slice")
    tokens_chart.SetXAxisTitle("voxel slice")
    tokens_chart.SetYAxisTitle("tokens kept")
    bars = _series(scene, f"{short} tokens kept per slice", table, "voxel slice", "tokens kept", "bar",
                   (0.90, 0.15, 0.10))
    tokens_chart.AddAndObservePlotSeriesNodeID(bars.GetID())
    tokens_chart.SetAttribute(ROLE, "tokens_chart")

    filter_chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{short} slice filter")
    filter_chart.SetTitle("Slice filter: L1 distance to the anchor and gamma")
    filter_chart.SetXAxisTitle("voxel slice")
    filter_chart.SetYAxisTitle("mean |difference| to anchor")
    l1 = _series(scene, f"{short} L1 to anchor", table, "voxel slice", "L1 to anchor", "scatter", (0.15, 0.30, 0.80))
    gamma = _series(scene, f"{short} gamma", table, "voxel slice", "gamma", "scatter", (0.3, 0.3, 0.3), "dash")
    filter_chart.AddAndObservePlotSeriesNodeID(l1.GetID())
    filter_chart.AddAndObservePlotSeriesNodeID(gamma.GetID())
    filter_chart.SetAttribute(ROLE, "filter_chart")
    return tokens_chart, filter_chart, [bars, l1, gamma]


def _fmt_seconds(value) -> str:
    return "-" if value is None else f"{float(value):.2f} s"


def summary_text(report: dict) -> str:
    """The answer panel's text: question, answer, counts, timings, model, settings (and unpruned)."""
    slices, tokens = report["slices"], report["tokens"]
    timings = report.get("timings_s", {})
    cfg = report.get("config", {})
    lines = [
        f"Question: {report['question']}",
        f"Answer: {report['answer']}",
        "",
        f"Slices kept: {slices['kept']} / {slices['sent']} sent ({slices['total']} in the volume)",
        (f"Visual tokens kept: {tokens['kept_visual']} / {tokens['total_visual']} "
         f"({100.0 * float(tokens['retention']):.1f} %)"),
        "Time: " + ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in timings.items()),
        f"Model: {report.get('model_id', '?')} ({report.get('model_family', '?')})",
        "Pruning: " + ("off" if not cfg.get("enabled", True) else
                       f"gamma {cfg.get('gamma')}, tau {cfg.get('tau')}, temperature {cfg.get('temperature')}, "
                       f"contextual {cfg.get('contextual_ratio')}, merge {cfg.get('merge')}"),
    ]
    for note in report.get("input", {}).get("notes", []):
        lines.append(("WARNING: " if note.startswith("GEOMETRY ASSUMED") else "Note: ") + note)
    if report.get("prepare_s") is not None:
        lines.append("Prepared volume: " + (
            f"reused from an earlier question (preparing it took {_fmt_seconds(report['prepare_s'])})"
            if report.get("prefix_reused") else f"prepared for this question in {_fmt_seconds(report['prepare_s'])}"))
    request = report.get("request", {})
    if request:
        lines.append("Request: " + ", ".join(f"{k} {v}" for k, v in request.items()))
    unpruned = report.get("unpruned")
    if unpruned:
        counts = unpruned.get("counts", {})
        lines += [
            "",
            f"Unpruned answer: {unpruned.get('answer', '')}",
            f"Unpruned visual tokens: {counts.get('visual_tokens_kept', '?')} / {counts.get('visual_tokens_total', '?')}",
            "Unpruned time: " + ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in unpruned.get("timings_s", {}).items()),
        ]
    software = report.get("software")
    if software:
        lines += ["", "Software: " + ", ".join(f"{k} {v}" for k, v in software.items())]
    return "\n".join(lines)


def _style_attention(node, color_node, array: np.ndarray) -> None:
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_node.GetID())
    display.AutoWindowLevelOff()
    display.AutoThresholdOff()
    display.SetInterpolate(False)      # one token = one block of voxels: show it as is
    positive = array[array > 0]
    hi = float(positive.max()) if positive.size else 1.0
    lo = float(positive.min()) if positive.size else 0.0
    # Every positive value maps to a colour entry >= 1 (entry 0 is the transparent one).
    lower = lo - max(hi - lo, hi) / 254.0
    display.SetWindowLevelMinMax(lower, hi)
    display.SetThreshold(lo * 0.5 if lo > 0 else 1e-12, max(hi, 1e-12) * 2.0)
    display.ApplyThresholdOn()


def _style_decisions(node, color_node) -> None:
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_node.GetID())


def _age(node) -> tuple[str, int]:
    """Creation order of our nodes: the creation stamp, then the node ID's serial."""
    return node.GetAttribute("MedPruner.Created") or "", _id_number(node)


def _matches_input(node, input_shape, input_matrix) -> bool:
    """True while a heatmap node still has the input's voxel grid (dimensions and IJK-to-RAS)."""
    image = node.GetImageData()
    if image is None or tuple(image.GetDimensions()[::-1]) != tuple(input_shape):
        return False
    return bool(np.allclose(ijk_to_ras_array(node), input_matrix, rtol=0.0, atol=GEOMETRY_TOLERANCE_MM))


def _heatmap_pairs(scene, input_volume, server_url: str) -> dict[str, tuple]:
    """volume_id -> (attention, decisions): the complete pairs made for `input_volume` by `server_url`.

    With several pairs of one volume_id (the server forgot the volume and prepared it again), the
    newest wins: it is the one the server's cache now holds."""
    if input_volume is None or input_volume.GetScene() is not scene or input_volume.GetImageData() is None:
        return {}
    input_shape = input_volume.GetImageData().GetDimensions()[::-1]
    input_matrix = ijk_to_ras_array(input_volume)
    attentions = [n for n in nodes_by_class(scene, "vtkMRMLScalarVolumeNode")
                  if n.GetAttribute(ROLE) == "attention" and n.GetAttribute(VOLUME_ID)]
    pairs: dict[str, tuple] = {}
    for attention in sorted(attentions, key=_age):
        volume_id = attention.GetAttribute(VOLUME_ID)
        decisions = attention.GetNodeReference(REF_PREFIX + "decisions")
        if (attention.GetNodeReference(REF_PREFIX + "input") is not input_volume
                or (attention.GetAttribute("MedPruner.Server") or "") != server_url
                or decisions is None or decisions.GetAttribute(ROLE) != "decisions"
                or decisions.GetAttribute(VOLUME_ID) != volume_id
                or decisions.GetNodeReference(REF_PREFIX + "attention") is not attention
                or not _matches_input(attention, input_shape, input_matrix)
                or not _matches_input(decisions, input_shape, input_matrix)):
            continue
        pairs[volume_id] = (attention, decisions)
    return pairs


def find_heatmaps(scene, input_volume, volume_id: str, server_url: str) -> tuple | None:
    """(attention, decisions) of prepared volume `volume_id` made for `input_volume` by `server_url`, or None."""
    return _heatmap_pairs(scene, input_volume, server_url).get(volume_id) if volume_id else None


def heatmap_volume_ids(scene, input_volume, server_url: str) -> frozenset[str]:
    """The volume_ids whose heatmaps `input_volume` already has: a follow-up about one of them need not
    download its heatmaps (plain strings, so a worker thread may read them)."""
    return frozenset(_heatmap_pairs(scene, input_volume, server_url))


def _heatmaps_folder(sh, parent: int) -> tuple[int, bool]:
    """The ``MedPruner heatmaps`` folder under `parent` (created when missing); (item, created?)."""
    import vtk

    children = vtk.vtkIdList()
    sh.GetItemChildren(parent, children)
    for i in range(children.GetNumberOfIds()):
        if sh.GetItemAttribute(children.GetId(i), HEATMAPS_FOLDER_ATTRIBUTE) == "1":
            return children.GetId(i), False
    item = sh.CreateFolderItem(parent, HEATMAPS_FOLDER)
    sh.SetItemAttribute(item, HEATMAPS_FOLDER_ATTRIBUTE, "1")
    return item, True


def _pair_names(scene, base: str) -> tuple[str, str]:
    """("<base> attention", "<base> decisions"), with the same number appended when either name is taken."""
    n = 1
    while True:
        suffix = "" if n == 1 else f" {n}"
        names = (f"{base} attention{suffix}", f"{base} decisions{suffix}")
        if all(scene.GetFirstNodeByName(name) is None for name in names):
            return names
        n += 1


def _new_heatmaps(scene, input_volume, report: dict, kept: tuple, attention: tuple, input_matrix: np.ndarray,
                  server_url: str, stamp: str) -> tuple:
    """A new pair of heatmap nodes, named after the input, with what finds them again (see module docstring)."""
    decision_colors = decision_color_node(scene, report["labels"])   # checks the labels first
    attention_name, decisions_name = _pair_names(scene, input_volume.GetName() or "volume")
    decisions = _new_volume(scene, "vtkMRMLLabelMapVolumeNode", decisions_name,
                            kept[0].astype(np.uint8, copy=False), input_matrix)
    _style_decisions(decisions, decision_colors)
    attention_node = _new_volume(scene, "vtkMRMLScalarVolumeNode", attention_name,
                                 attention[0].astype(np.float32, copy=False), input_matrix)
    _style_attention(attention_node, attention_color_node(scene), attention[0])
    volume_id = str(report.get("volume_id") or "")
    for role, node, partner in (("attention", attention_node, decisions), ("decisions", decisions, attention_node)):
        node.SetAttribute(ROLE, role)
        node.SetAttribute("MedPruner.Created", stamp)
        node.SetAttribute("MedPruner.Server", server_url or "")
        if volume_id:   # without one (a server with no cache) the pair is never shared
            node.SetAttribute(VOLUME_ID, volume_id)
        node.SetNodeReferenceID(REF_PREFIX + ("decisions" if role == "attention" else "attention"), partner.GetID())
        node.SetNodeReferenceID(REF_PREFIX + "input", input_volume.GetID())
    return attention_node, decisions


def create_result_nodes(scene, input_volume, report: dict, kept: tuple[np.ndarray, np.ndarray] | None,
                        attention: tuple[np.ndarray, np.ndarray] | None, job_id: str = "", server_url: str = "",
                        attributes: dict[str, str] | None = None) -> ResultNodes:
    """Make every node of one result (see module docstring); all or nothing. Main thread only.

    A follow-up the server answered from a prepared volume whose heatmaps this input already has
    (report `prefix_reused`, same `volume_id`, same server) shares them; then `kept` and `attention`
    (arrays, IJK-to-RAS) may be None: they were not downloaded. `attributes` are added to the answer
    node (how the answer was obtained: see `conversation`)."""
    if input_volume is None or input_volume.GetScene() is not scene or input_volume.GetImageData() is None:
        raise ResultError("The input volume was removed from the scene while the question was being answered.",
                          "Load the volume again and ask again.")
    input_matrix = ijk_to_ras_array(input_volume)
    input_shape = input_volume.GetImageData().GetDimensions()[::-1]
    for name, given in (("decision", kept), ("attention", attention)):
        if given is not None:
            _check_geometry(name, given[0], given[1], input_shape, input_matrix)
    for key in ("question", "answer", "slices", "tokens", "labels"):
        if key not in report:
            raise ResultError(f"The server's report has no '{key}'.", "Update the MedPruner server.")
    shared = (find_heatmaps(scene, input_volume, str(report.get("volume_id") or ""), server_url or "")
              if report.get("prefix_reused") else None)
    if shared is None and (kept is None or attention is None):
        raise ResultError("The heatmaps this answer shares with the earlier answers about the volume were removed "
                          "or changed while the question was being answered.",
                          "Ask again: the next question downloads them.")

    before = set(_node_ids(scene))   # on error, every node added since goes (helpers and half-made ones too)
    new_folders: list[int] = []
    sh = subject_hierarchy(scene)
    try:
        short = folder_name(report["question"])
        input_item = sh.GetItemByDataNode(input_volume)
        parent = (sh.GetItemParent(input_item) if input_item else 0) or sh.GetSceneItemID()
        folder = sh.CreateFolderItem(parent, short)
        new_folders.append(folder)
        sh.SetItemAttribute(folder, "MedPruner.Result", "1")
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")

        if shared is not None:
            attention_node, decisions = shared
        else:
            attention_node, decisions = _new_heatmaps(scene, input_volume, report, kept, attention, input_matrix,
                                                      server_url, stamp)
            heatmaps_folder, made = _heatmaps_folder(sh, parent)
            if made:
                new_folders.append(heatmaps_folder)
            for node in (attention_node, decisions):
                place_in_folder(scene, node, heatmaps_folder)
        own: list = []
        table = _per_slice_table(scene, f"{short} per slice", report)
        own.append(table)
        tokens_chart, filter_chart, series = _charts(scene, short, table)
        own += [tokens_chart, filter_chart, *series]
        report_node = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{short} report.json")
        own.append(report_node)
        report_node.SetText(json.dumps(report, indent=1, allow_nan=False))
        report_node.SetAttribute(ROLE, "report")
        answer = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{short} answer")
        own.append(answer)
        answer.SetText(summary_text(report))

        for key, value in {"Role": "answer", "Question": report["question"], "JobId": job_id or "",
                           "Server": server_url or "", "Created": stamp,
                           "ModelId": str(report.get("model_id", ""))}.items():
            answer.SetAttribute(f"MedPruner.{key}", value)
        for key, value in (attributes or {}).items():
            answer.SetAttribute(key, value)
        for role, node in (("attention", attention_node), ("decisions", decisions), ("table", table),
                           ("tokens_chart", tokens_chart), ("filter_chart", filter_chart),
                           ("report", report_node), ("input", input_volume)):
            answer.SetNodeReferenceID(REF_PREFIX + role, node.GetID())
        for node in own:
            place_in_folder(scene, node, folder)
        # shared heatmaps too: they follow the input wherever it is now
        transform_id = input_volume.GetTransformNodeID()
        for node in (attention_node, decisions):
            node.SetAndObserveTransformNodeID(transform_id)
        return ResultNodes(answer=answer, attention=attention_node, decisions=decisions, table=table,
                           tokens_chart=tokens_chart, filter_chart=filter_chart, report_node=report_node,
                           input_volume=input_volume, folder_item=folder)
    except Exception:
        for node_id in reversed([i for i in _node_ids(scene) if i not in before]):
            _remove_node(scene, scene.GetNodeByID(node_id))
        for item in reversed(new_folders):
            sh.RemoveItem(item, False, False)
        raise


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _remove_node(scene, node) -> None:
    """Remove `node`, its subject-hierarchy item and the display and storage nodes made for it.

    The item goes first: on bare MRML (slicer-core) removing the node leaves its item behind."""
    if node is None or node.GetScene() is not scene:
        return
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.RemoveItem(item, False, False)
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    for helper in [node, *helpers]:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


def _children(sh, item: int) -> list[int]:
    import vtk

    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _used_elsewhere(scene, heatmap, answer) -> bool:
    """True when an answer other than `answer` points at `heatmap`."""
    for other in nodes_by_class(scene, "vtkMRMLTextNode"):
        if other is answer or other.GetAttribute(ROLE) != "answer":
            continue
        if any(other.GetNodeReference(REF_PREFIX + role) is heatmap for role in HEATMAP_ROLES):
            return True
    return False


def remove_result(scene, answer) -> None:
    """Remove one answer: its own nodes and folder, and its heatmaps unless another answer still uses them.

    Works on incomplete results too (nodes deleted by hand). Anything else the user put in the answer's
    folder is moved up to the folder's parent, not deleted; an emptied heatmaps folder goes too."""
    if answer is None or answer.GetScene() is not scene or answer.GetAttribute(ROLE) != "answer":
        raise ValueError("remove_result needs the answer node of a MedPruner result in this scene.")
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(answer)
    folder = sh.GetItemParent(item) if item else 0
    if folder and sh.GetItemAttribute(folder, "MedPruner.Result") != "1":
        folder = 0
    own = [answer.GetNodeReference(REF_PREFIX + role) for role in ROLES if role not in HEATMAP_ROLES]
    for chart in (answer.GetNodeReference(REF_PREFIX + role) for role in ("tokens_chart", "filter_chart")):
        series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())] if chart else []
        own += [s for s in series if s is not None and s.GetAttribute(ROLE) == "series"]
    heatmaps = [answer.GetNodeReference(REF_PREFIX + role) for role in HEATMAP_ROLES]
    heatmaps = [n for n in heatmaps if n is not None and not _used_elsewhere(scene, n, answer)]
    heatmap_folders = {sh.GetItemParent(sh.GetItemByDataNode(n)) for n in heatmaps if sh.GetItemByDataNode(n)}
    for node in [answer, *own, *heatmaps]:
        _remove_node(scene, node)
    if folder:
        parent = sh.GetItemParent(folder)
        for child in _children(sh, folder):
            sh.SetItemParent(child, parent)
        sh.RemoveItem(folder, False, False)
    for heatmaps_folder in heatmap_folders:
        if (heatmaps_folder and sh.GetItemAttribute(heatmaps_folder, HEATMAPS_FOLDER_ATTRIBUTE) == "1"
                and not _children(sh, heatmaps_folder)):
            sh.RemoveItem(heatmaps_folder, False, False)


def result_from_answer_node(answer) -> ResultNodes | None:
    """The result whose handle is `answer` (a text node with MedPruner.Role = answer), or None if incomplete."""
    if answer is None or answer.GetAttribute(ROLE) != "answer":
        return None
    refs = {role: answer.GetNodeReference(REF_PREFIX + role) for role in (*ROLES, "input")}
    if any(refs[role] is None for role in ROLES):
        return None
    scene = answer.GetScene()
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(answer)
    return ResultNodes(answer=answer, attention=refs["attention"], decisions=refs["decisions"], table=refs["table"],
                       tokens_chart=refs["tokens_chart"], filter_chart=refs["filter_chart"],
                       report_node=refs["report"], input_volume=refs["input"],
                       folder_item=sh.GetItemParent(item) if item else 0)


def find_results(scene) -> list[ResultNodes]:
    """Every complete result in the scene, oldest first (by creation time, then node ID)."""
    results = [result_from_answer_node(n) for n in nodes_by_class(scene, "vtkMRMLTextNode")
               if n.GetAttribute(ROLE) == "answer"]
    results = [r for r in results if r is not None]
    return sorted(results, key=lambda r: (r.answer.GetAttribute("MedPruner.Created") or "", _id_number(r.answer)))


def _id_number(node) -> int:
    """The node ID's serial (vtkMRMLTextNode12 -> 12): creation order within one timestamp."""
    digits = "".join(ch for ch in node.GetID() if ch.isdigit())
    return int(digits) if digits else 0


def kept_slice_centres_ras(result: ResultNodes) -> np.ndarray:
    """(n, 3) RAS centres of the voxel slices the slice filter kept, in slice order (for next/previous)."""
    report = result.report
    axis = "IJK".index(report["input"]["slice_axis_ijk"])
    matrix = ijk_to_ras_array(result.attention)
    dims = result.attention.GetImageData().GetDimensions()
    centre = np.array([(d - 1) / 2.0 for d in dims] + [1.0])
    points = []
    for k in report["slices"]["kept_voxel_indices"]:
        ijk = centre.copy()
        ijk[axis] = float(k)
        points.append((matrix @ ijk)[:3])
    return np.array(points).reshape(-1, 3)
