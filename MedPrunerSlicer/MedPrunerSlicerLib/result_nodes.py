"""A server result (report.json + two heatmaps) -> MRML nodes, and back from the scene.

One answered question becomes, in a subject-hierarchy folder named after the question:

* ``<q> attention``   scalar volume: the nucleus probability of the token covering each voxel
                      (0 elsewhere), perceptual colour table, zeros transparent (table + threshold);
* ``<q> decisions``   labelmap: 0 not sent, 1 slice dropped, 2 token pruned, 3 contextual, 4 kept,
                      with a colour table built from ``report["labels"]``;
* ``<q> per slice``   table: model slice, voxel slice, kept, L1 to anchor, tokens kept/total,
                      retention, gamma (from ``report["slices"]["per_slice"]``);
* ``<q> tokens kept`` plot chart: tokens kept per slice (bars);
* ``<q> slice filter`` plot chart: L1 distance to the anchor per slice, and gamma as a line;
* ``<q> answer``      text node: question, answer, model, settings, counts, timings (and the
                      unpruned answer when compared). It is the result's handle: its attributes
                      (``MedPruner.*``) and node references point at every other node and at the input;
* ``<q> report.json`` text node: the server's full report, for audit.

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

__all__ = ["ROLES", "ResultNodes", "create_result_nodes", "find_results", "folder_name", "kept_slice_centres_ras",
           "result_from_answer_node", "summary_text"]

ROLE = "MedPruner.Role"
REF_PREFIX = "MedPruner."
ROLES = ("attention", "decisions", "table", "tokens_chart", "filter_chart", "report")
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
        return [self.answer, self.attention, self.decisions, self.table, self.tokens_chart, self.filter_chart,
                self.report_node]


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


def create_result_nodes(scene, input_volume, report: dict, kept: tuple[np.ndarray, np.ndarray],
                        attention: tuple[np.ndarray, np.ndarray], job_id: str = "", server_url: str = "",
                        attributes: dict[str, str] | None = None) -> ResultNodes:
    """Make every node of one result (see module docstring); all or nothing. Main thread only.

    `attributes` are added to the answer node (how the answer was obtained: see `conversation`)."""
    if input_volume is None or input_volume.GetScene() is not scene or input_volume.GetImageData() is None:
        raise ResultError("The input volume was removed from the scene while the question was being answered.",
                          "Load the volume again and ask again.")
    input_matrix = ijk_to_ras_array(input_volume)
    input_shape = input_volume.GetImageData().GetDimensions()[::-1]
    kept_array, kept_matrix = kept
    attention_array, attention_matrix = attention
    _check_geometry("decision", kept_array, kept_matrix, input_shape, input_matrix)
    _check_geometry("attention", attention_array, attention_matrix, input_shape, input_matrix)
    for key in ("question", "answer", "slices", "tokens", "labels"):
        if key not in report:
            raise ResultError(f"The server's report has no '{key}'.", "Update the MedPruner server.")

    created: list = []
    sh = subject_hierarchy(scene)
    folder = 0
    try:
        short = folder_name(report["question"])
        input_item = sh.GetItemByDataNode(input_volume)
        parent = sh.GetItemParent(input_item) if input_item else sh.GetSceneItemID()
        folder = sh.CreateFolderItem(parent or sh.GetSceneItemID(), short)
        sh.SetItemAttribute(folder, "MedPruner.Result", "1")

        decision_colors = decision_color_node(scene, report["labels"])   # checks the labels first
        decisions = _new_volume(scene, "vtkMRMLLabelMapVolumeNode", f"{short} decisions",
                                kept_array.astype(np.uint8, copy=False), input_matrix)
        created.append(decisions)
        _style_decisions(decisions, decision_colors)
        attention_node = _new_volume(scene, "vtkMRMLScalarVolumeNode", f"{short} attention",
                                     attention_array.astype(np.float32, copy=False), input_matrix)
        created.append(attention_node)
        _style_attention(attention_node, attention_color_node(scene), attention_array)
        table = _per_slice_table(scene, f"{short} per slice", report)
        created.append(table)
        tokens_chart, filter_chart, series = _charts(scene, short, table)
        created += [tokens_chart, filter_chart, *series]

        report_node = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{short} report.json")
        report_node.SetText(json.dumps(report, indent=1, allow_nan=False))
        report_node.SetAttribute(ROLE, "report")
        created.append(report_node)
        answer = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{short} answer")
        answer.SetText(summary_text(report))
        created.append(answer)

        decisions.SetAttribute(ROLE, "decisions")
        attention_node.SetAttribute(ROLE, "attention")
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
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

        transform_id = input_volume.GetTransformNodeID()
        for node in (attention_node, decisions):
            node.SetAndObserveTransformNodeID(transform_id)
            node.SetNodeReferenceID(REF_PREFIX + "input", input_volume.GetID())
        for node in created:
            place_in_folder(scene, node, folder)
        return ResultNodes(answer=answer, attention=attention_node, decisions=decisions, table=table,
                           tokens_chart=tokens_chart, filter_chart=filter_chart, report_node=report_node,
                           input_volume=input_volume, folder_item=folder)
    except Exception:
        for node in reversed(created):
            _remove_with_helpers(scene, node)
        if folder:
            sh.RemoveItem(folder, False, False)
        raise


def _remove_with_helpers(scene, node) -> None:
    """Remove `node` and the display and storage nodes made for it."""
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    for helper in [node, *helpers]:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


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
