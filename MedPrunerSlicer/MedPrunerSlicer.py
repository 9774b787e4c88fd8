"""MedPrunerSlicer: ask a vision-language model about a CT/MR volume; see which slices and tokens it kept.

Module, parameter node, widget, logic and self-test, the Slicer way. The widget only wires widgets
to the scene logic in MedPrunerSlicerLib (Qt-free, tested headless on slicer-core); the logic
reports through callbacks and never touches widgets. The engine (`medpruner`, torch) is never
imported here: it only runs in the local server's own process.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from MedPrunerSlicerLib import display, local_server
from MedPrunerSlicerLib.ask import AskSession
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.conversation import conversation, conversation_html
from MedPrunerSlicerLib.errors import JobCancelled, MedPrunerSlicerError, SettingsError
from MedPrunerSlicerLib.result_nodes import find_results, result_from_answer_node
from MedPrunerSlicerLib.settings import (
    DEFAULT_PORT,
    KEYS,
    ConsentPolicy,
    Preferences,
    normalize_server_url,
)
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTextNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

OVERLAY_MODES = ("both", "attention", "decisions", "none")


#
# Module
#
class MedPrunerSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedPruner")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedPrunerSlicer authors"]
        self.parent.helpText = _(
            "Ask a vision-language model a question about a CT or MR volume. MedPruner drops redundant "
            "slices and visual tokens before the language model sees them; heatmaps over the slice views "
            "show what the model kept. The model runs in a MedPruner server: on this computer "
            "(Start local server) or on a GPU machine (set its address and token)."
        )
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _(
            "MedPruner: training-free visual token pruning for 3D medical vision-language models "
            "(arXiv 2603.11625, MICCAI 2026)."
        )
        slicer.app.connect("startupCompleted()", registerSettingsPanel)


def registerSettingsPanel():
    """A MedPruner page in Application Settings: server address and token, stored in QSettings."""
    if not hasattr(slicer.app, "settingsDialog"):
        return
    panel = MedPrunerSlicerSettingsPanel()
    slicer.app.settingsDialog().addPanel(_("MedPruner"), panel)


class MedPrunerSlicerSettingsPanel(ctk.ctkSettingsPanel):
    def __init__(self, *args, **kwargs):
        ctk.ctkSettingsPanel.__init__(self, *args, **kwargs)
        layout = qt.QFormLayout(self)
        self.urlLineEdit = qt.QLineEdit()
        self.urlLineEdit.toolTip = _("Address of the MedPruner server; http:// is added when missing.")
        layout.addRow(_("Server address:"), self.urlLineEdit)
        self.tokenLineEdit = qt.QLineEdit()
        self.tokenLineEdit.echoMode = qt.QLineEdit.Password
        layout.addRow(_("Server token:"), self.tokenLineEdit)
        self.registerProperty(KEYS["url"], self.urlLineEdit, "text", qt.SIGNAL("textChanged(QString)"))
        self.registerProperty(KEYS["token"], self.tokenLineEdit, "text", qt.SIGNAL("textChanged(QString)"))


#
# Parameter node
#
@parameterNodeWrapper
class MedPrunerSlicerParameterNode:
    """GUI state, saved with the scene. Server address and token are user preferences (QSettings) instead."""

    inputVolume: vtkMRMLScalarVolumeNode
    question: str = ""
    pruningEnabled: bool = True
    gamma: Annotated[float, WithinRange(0.0, 0.5)] = 0.05
    tau: Annotated[float, WithinRange(0.01, 1.0)] = 0.9
    compare: bool = False
    overlayMode: str = "both"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    currentResult: vtkMRMLTextNode


#
# Widget
#
class MedPrunerSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._serverTimer = qt.QTimer()
        self._serverTimer.setInterval(1000)
        self._serverStartedAt = None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedPrunerSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.resultSelector.addAttribute("vtkMRMLTextNode", "MedPruner.Role", "answer")

        self.logic = MedPrunerSlicerLogic()
        self.logic.progressCallback = self.onProgress
        self.logic.doneCallback = self.onDone
        self.logic.errorCallback = self.onError

        for mode, text in zip(OVERLAY_MODES, (_("Attention and decisions"), _("Attention"),
                                              _("Decisions (kept / contextual / pruned / dropped)"), _("None"))):
            self.ui.overlayComboBox.addItem(text, mode)
        self.ui.compareTable.setColumnCount(2)
        self.ui.compareTable.setHorizontalHeaderLabels([_("Pruned"), _("Unpruned")])
        self.ui.compareTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)

        prefs = self.logic.preferences
        self.ui.serverUrlComboBox.addItems(prefs.url_history or [prefs.server_url])
        self.ui.serverUrlComboBox.setCurrentText(prefs.server_url)
        self.ui.tokenLineEdit.text = prefs.token
        self.ui.localModelLineEdit.text = prefs.local_model

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.askButton.connect("clicked(bool)", self.onAskOrCancel)
        self.ui.questionLineEdit.connect("returnPressed()", self.onQuestionReturn)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.startServerButton.connect("clicked(bool)", self.onStartServer)
        self.ui.stopServerButton.connect("clicked(bool)", self.onStopServer)
        self.ui.openLogButton.connect("clicked(bool)", self.onOpenLog)
        self.ui.serverUrlComboBox.lineEdit().connect("editingFinished()", self.onServerUrlEdited)
        self.ui.serverUrlComboBox.connect("activated(int)", lambda _index: self.onServerUrlEdited())
        self.ui.tokenLineEdit.connect("editingFinished()", self.onTokenEdited)
        self.ui.localModelLineEdit.connect("editingFinished()", self.onLocalModelEdited)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onOverlayModeChanged)
        self.ui.conversationBrowser.connect("anchorClicked(QUrl)", self.onConversationLink)
        self.ui.previousKeptButton.connect("clicked(bool)", lambda: self.onJumpKept(-1))
        self.ui.nextKeptButton.connect("clicked(bool)", lambda: self.onJumpKept(+1))
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self._serverTimer.connect("timeout()", self.onServerTimer)
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._pollTimer.stop()
        self._serverTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self._loadServerFields()   # Application Settings may have changed them meanwhile
        self.initializeParameterNode()

    def _loadServerFields(self) -> None:
        prefs = self.logic.preferences
        self.ui.serverUrlComboBox.setCurrentText(prefs.server_url)
        self.ui.tokenLineEdit.text = prefs.token

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)
        self._showResult(None)                 # node IDs restart in the next scene: forget the old ones
        self._conversationKey = None
        self.ui.conversationBrowser.setHtml("")

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = self.logic.volumeInViews() or slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            index = self.ui.overlayComboBox.findData(self._parameterNode.overlayMode)
            self.ui.overlayComboBox.setCurrentIndex(max(index, 0))
            self._onParameterNodeModified()

    # -- state -> widgets ----------------------------------------------------------------------
    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self.logic.running
        hasInput = bool(node and node.inputVolume)
        hasQuestion = bool(node and node.question.strip())
        self.ui.askButton.text = _("Cancel") if running else _("Ask")
        self.ui.askButton.enabled = running or (hasInput and hasQuestion)
        self.ui.askButton.toolTip = (_("Stop the running question.") if running else
                                     _("Select an input volume.") if not hasInput else
                                     _("Type a question.") if not hasQuestion else
                                     _("Send the volume and the question to the server."))
        self.ui.gammaSlider.enabled = bool(node and node.pruningEnabled)
        self.ui.tauSlider.enabled = bool(node and node.pruningEnabled)
        answer = node.currentResult if node else None
        shown = self._shownResultKey()
        if (shown.answer if shown else None) is not answer:
            self._showResult(result_from_answer_node(answer))
        conversationKey = (node.inputVolume.GetID() if hasInput else None, answer.GetID() if answer else None)
        if conversationKey != getattr(self, "_conversationKey", None):
            self._showConversation()
        self.ui.previousKeptButton.enabled = self._shownResultKey() is not None
        self.ui.nextKeptButton.enabled = self._shownResultKey() is not None
        if node and self._shownResultKey() is not None:
            display.set_opacity(slicer.mrmlScene, node.overlayOpacity)

    def _shownResultKey(self):
        return getattr(self, "_shownResult", None)

    def _showResult(self, result) -> None:
        self._shownResult = result
        if result is None:
            self.ui.answerBrowser.setPlainText("")
            self.ui.compareTable.visible = False
            return
        report = result.report
        self.ui.answerBrowser.setHtml(self.logic.answerHtml(report))
        self._fillCompareTable(report)
        display.show_result(slicer.mrmlScene, result, self._parameterNode.overlayMode, self._parameterNode.overlayOpacity)
        self.logic.showChart(result.tokens_chart)

    def _showConversation(self) -> None:
        node = self._parameterNode
        volume = node.inputVolume if node else None
        current = node.currentResult if node else None
        self._conversationKey = (volume.GetID() if volume else None, current.GetID() if current else None)
        self.ui.conversationBrowser.setHtml(self.logic.conversationHtml(volume, current))

    def onConversationLink(self, url) -> None:
        """A question of the conversation was clicked: show its answer and heatmaps."""
        node = slicer.mrmlScene.GetNodeByID(url.toString().partition("result:")[2])
        if self._parameterNode and result_from_answer_node(node) is not None and node.IsA("vtkMRMLTextNode"):
            self._parameterNode.currentResult = node

    def _fillCompareTable(self, report) -> None:
        rows = self.logic.compareRows(report)
        table = self.ui.compareTable
        table.visible = bool(rows)
        table.setRowCount(len(rows))
        table.setVerticalHeaderLabels([label for label, _pruned, _unpruned in rows])
        for r, (_label, pruned, unpruned) in enumerate(rows):
            table.setItem(r, 0, qt.QTableWidgetItem(pruned))
            table.setItem(r, 1, qt.QTableWidgetItem(unpruned))
        table.resizeRowsToContents()

    # -- asking --------------------------------------------------------------------------------
    def onQuestionReturn(self) -> None:
        """Enter in the question field asks; it never cancels a running question."""
        if not self.logic.running and self.ui.askButton.enabled:
            self.onAskOrCancel()

    def onAskOrCancel(self) -> None:
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Could not ask the question."), waitCursor=True):
            self._saveServerFields()
            url = self.logic.preferences.server_url
            if self.logic.consent.needs_consent(url) and not self._askConsent(url):
                return
            node = self._parameterNode
            params = build_params(node.question, enabled=node.pruningEnabled, gamma=node.gamma, tau=node.tau,
                                  compare=node.compare)
            self.logic.ask(node.inputVolume, params)
            self.ui.progressBar.visible = True
            self.ui.progressBar.setRange(0, 0)
            self.ui.statusLabel.text = _("Sending the volume...")
            self._pollTimer.start()
        self._onParameterNodeModified()

    def _askConsent(self, url: str) -> bool:
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Question)
        box.setWindowTitle(_("Send image data to another computer?"))
        box.setText(_("The voxels and geometry of the selected volume will be sent to the server at {url}, "
                      "which is not on this computer. No names, DICOM tags or IDs are sent.").format(url=url))
        box.setInformativeText(_("Send it only if that server is allowed to receive this image data."))
        box.setStandardButtons(qt.QMessageBox.Yes | qt.QMessageBox.Cancel)
        box.setDefaultButton(qt.QMessageBox.Cancel)
        dontAsk = qt.QCheckBox(_("Don't ask again for this server"))
        box.setCheckBox(dontAsk)
        if box.exec_() != qt.QMessageBox.Yes:
            return False
        self.logic.consent.grant(url, remember=dontAsk.checked)
        return True

    def onPollTimer(self) -> None:
        try:
            running = self.logic.poll()
        except Exception as exc:  # noqa: BLE001 - never let an exception kill the timer silently
            running = False
            self.onError(exc)
        if not running:
            self._pollTimer.stop()
            self.ui.progressBar.visible = False
            self._onParameterNodeModified()

    def onProgress(self, stage: str, fraction, message: str) -> None:
        if fraction is None:
            self.ui.progressBar.setRange(0, 0)
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onDone(self, result) -> None:
        self.ui.statusLabel.text = self.logic.doneMessage(result)
        if self._parameterNode:
            self._parameterNode.currentResult = result.answer   # shows it, and the conversation with it

    def onError(self, exc) -> None:
        self.ui.progressBar.visible = False
        if isinstance(exc, JobCancelled):
            self.ui.statusLabel.text = _("Cancelled.")
            return
        self.ui.statusLabel.text = _("Failed.")
        if isinstance(exc, MedPrunerSlicerError):
            text = exc.message + ("\n\n" + exc.hint if exc.hint else "")
            details = {"detailedText": exc.details} if exc.details else {}   # None would show as "None"
            slicer.util.errorDisplay(text, windowTitle=_("MedPruner"), **details)
        else:
            logging.error("MedPrunerSlicer: unexpected error", exc_info=exc)
            slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=exc), windowTitle=_("MedPruner"),
                                     detailedText=repr(exc))

    # -- overlay ---------------------------------------------------------------------------------
    def onOverlayModeChanged(self, index: int) -> None:
        if not self._parameterNode:
            return
        self._parameterNode.overlayMode = self.ui.overlayComboBox.itemData(index) or "both"
        result = self._shownResultKey()
        if result is not None:
            display.show_result(slicer.mrmlScene, result, self._parameterNode.overlayMode,
                                self._parameterNode.overlayOpacity)

    def onJumpKept(self, direction: int) -> None:
        result = self._shownResultKey()
        if result is None:
            return
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        if display.jump_to_kept_slice(result, sliceNode, direction) is None:
            self.ui.statusLabel.text = _("No kept slice further in that direction.")

    # -- server ----------------------------------------------------------------------------------
    def _saveServerFields(self) -> None:
        prefs = self.logic.preferences
        prefs.server_url = self.ui.serverUrlComboBox.currentText   # raises SettingsError on a bad address
        self.ui.serverUrlComboBox.setCurrentText(prefs.server_url)
        prefs.token = self.ui.tokenLineEdit.text

    def onServerUrlEdited(self) -> None:
        try:
            self._saveServerFields()
            self.ui.serverStatusLabel.text = ""
        except SettingsError as exc:
            self.ui.serverStatusLabel.text = exc.message + " " + exc.hint

    def onTokenEdited(self) -> None:
        self.logic.preferences.token = self.ui.tokenLineEdit.text

    def onLocalModelEdited(self) -> None:
        self.logic.preferences.local_model = self.ui.localModelLineEdit.text

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The server did not answer as expected."), waitCursor=True):
            self._saveServerFields()
            info = self.logic.testConnection()
            self.ui.serverStatusLabel.text = _("Connected: {info}").format(info=self.logic.describeHealth(info))

    def onStartServer(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start the local server."), waitCursor=False):
            try:
                self._startServer()
            except MedPrunerSlicerError as exc:   # message, hint and details (e.g. pip's output) in one dialog
                self.onError(exc)

    def _startServer(self) -> None:
        self.onLocalModelEdited()
        if not self.logic.ensureServerDependencies():
            return
        self.logic.startLocalServer(self.ui.localModelLineEdit.text)
        url = self.logic.preferences.server_url
        self.ui.serverUrlComboBox.setCurrentText(url)
        self.ui.serverStatusLabel.text = _("Starting the server (loading the model can take minutes)...")
        self._serverStartedAt = time.monotonic()
        self.ui.startServerButton.enabled = False
        self.ui.stopServerButton.enabled = True
        self.ui.openLogButton.enabled = True
        self._serverTimer.start()

    def onServerTimer(self) -> None:
        state, text = self.logic.localServerState()
        self.ui.serverStatusLabel.text = text
        if state in ("ready", "stopped", "failed"):
            self._serverTimer.stop()
            self.ui.startServerButton.enabled = state != "ready"
            self.ui.stopServerButton.enabled = state == "ready"
            if state == "failed":
                slicer.util.errorDisplay(_("The local server stopped while starting."), windowTitle=_("MedPruner"),
                                         detailedText=self.logic.localServer.log_tail())

    def onStopServer(self) -> None:
        self.logic.stopLocalServer()
        self._serverTimer.stop()
        self.ui.serverStatusLabel.text = _("Local server stopped.")
        self.ui.startServerButton.enabled = True
        self.ui.stopServerButton.enabled = False

    def onOpenLog(self) -> None:
        path = self.logic.localServer.log_path
        if path and path.exists():
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))


#
# Logic
#
class MedPrunerSlicerLogic(ScriptedLoadableModuleLogic):
    """Scene logic for the module (no widgets). Reports through the *Callback attributes."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.preferences = Preferences(qt.QSettings())
        self.consent = ConsentPolicy(qt.QSettings())
        self.localServer = local_server.LocalServer(os.path.join(slicer.app.temporaryPath, "MedPruner"))
        self.progressCallback = None
        self.doneCallback = None
        self.errorCallback = None
        self.session = AskSession(slicer.mrmlScene, self.client,
                                  on_progress=lambda *a: self.progressCallback and self.progressCallback(*a),
                                  on_done=lambda r: self.doneCallback and self.doneCallback(r),
                                  on_error=self._onError)

    def getParameterNode(self):
        return MedPrunerSlicerParameterNode(super().getParameterNode())

    def _onError(self, exc) -> None:
        if self.errorCallback:
            self.errorCallback(exc)
        else:
            raise exc

    def client(self) -> MedPrunerClient:
        return MedPrunerClient(self.preferences.server_url, self.preferences.token)

    # asking
    @property
    def running(self) -> bool:
        return self.session.running

    def ask(self, volumeNode, params, reuse: bool = True) -> None:
        """Ask in the background; a follow-up about the same voxels and settings reuses the server's prepared volume."""
        self.session.scene = slicer.mrmlScene
        self.session.start(volumeNode, params, reuse=reuse)

    def poll(self) -> bool:
        return self.session.poll()

    def cancel(self) -> None:
        self.session.cancel()

    def elapsed(self) -> float:
        return time.monotonic() - (self.session.started_at or time.monotonic())

    def volumeInViews(self):
        """The background volume of the red slice view (what the user is looking at), if any."""
        composite = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        volumeId = composite.GetBackgroundVolumeID() if composite else None
        return slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None

    def results(self):
        return find_results(slicer.mrmlScene)

    @staticmethod
    def conversationHtml(volumeNode, currentAnswer=None) -> str:
        """The questions asked about `volumeNode`, their answers, times and the time reuse saved."""
        if volumeNode is None:
            return "<p><i>" + _("Select an input volume to see the questions asked about it.") + "</i></p>"
        turns = conversation(slicer.mrmlScene, volumeNode)
        return conversation_html(turns, currentAnswer, volumeNode.GetName())

    def doneMessage(self, result) -> str:
        """The status line after an answer: how long it took and, for a follow-up, what reuse saved."""
        turns = conversation(slicer.mrmlScene, result.input_volume)
        turn = next((t for t in turns if t.result.answer is result.answer), None)
        seconds = self.elapsed() if turn is None or turn.wall_s is None else turn.wall_s
        text = _("Answered in {seconds:.1f} s.").format(seconds=seconds)
        if turn is not None and turn.prefix_reused:
            text += " " + _("Follow-up: the server reused the prepared volume ({saved:.1f} s saved).").format(
                saved=turn.saved_s)
        return text

    def showChart(self, chartNode) -> None:
        if chartNode is not None and hasattr(slicer.modules, "plots"):
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)

    @staticmethod
    def answerHtml(report) -> str:
        import html

        slices, tokens, timings = report["slices"], report["tokens"], report.get("timings_s", {})
        rows = [
            (_("Slices kept"), f"{slices['kept']} / {slices['sent']}"),
            (_("Visual tokens kept"), (f"{tokens['kept_visual']} / {tokens['total_visual']} "
                                       f"({100.0 * float(tokens['retention']):.1f} %)")),
            (_("Time"), ", ".join(f"{k} {float(v):.2f} s" for k, v in timings.items())),
            (_("Model"), str(report.get("model_id", ""))),
        ]
        body = "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return (f"<p><b>{html.escape(report['question'])}</b></p><p>{html.escape(report['answer'])}</p>"
                f"<table>{body}</table>")

    @staticmethod
    def compareRows(report):
        unpruned = report.get("unpruned")
        if not unpruned:
            return []
        counts = unpruned.get("counts", {})
        pruned_t, unpruned_t = report.get("timings_s", {}), unpruned.get("timings_s", {})
        return [
            (_("Answer"), report["answer"], unpruned.get("answer", "")),
            (_("Visual tokens"), f"{report['tokens']['kept_visual']} / {report['tokens']['total_visual']}",
             f"{counts.get('visual_tokens_kept', '?')} / {counts.get('visual_tokens_total', '?')}"),
            (_("Total time"), f"{float(pruned_t.get('total', 0.0)):.2f} s", f"{float(unpruned_t.get('total', 0.0)):.2f} s"),
            (_("Prefill time"), f"{float(pruned_t.get('prefill', 0.0)):.2f} s",
             f"{float(unpruned_t.get('prefill', 0.0)):.2f} s"),
        ]

    # server
    def testConnection(self) -> dict:
        return self.client().check_token()

    @staticmethod
    def describeHealth(info: dict) -> str:
        parts = [str(info.get(k)) for k in ("model_id", "device", "version") if info.get(k)]
        return ", ".join(parts) or json.dumps(info)[:200]

    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer (Slicer's Python launcher with the right environment)."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = os.path.join(slicer.app.slicerHome, "bin", "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        return candidate if os.path.exists(candidate) else sys.executable

    def ensureServerDependencies(self) -> bool:
        """Install what the local server needs after one confirmation. False if the user declined."""
        bad_bundled = local_server.missing_requirements(local_server.SLICER_BUNDLED)
        if bad_bundled:
            listing = ", ".join(f"{req} (found {ver or 'none'})" for req, ver in bad_bundled)
            raise SettingsError(_("This Slicer's bundled Python packages are too old for the local server: {listing}.")
                                .format(listing=listing),
                                _("Use a newer Slicer, or run the server on another computer (see the documentation)."))
        missing = [req for req, _ver in local_server.missing_requirements(local_server.ENGINE_REQUIREMENTS)]
        torchMissing = bool(local_server.missing_requirements([local_server.TORCH_REQUIREMENT]))
        if not missing and not torchMissing:
            return True
        listing = "\n".join(["  " + r for r in ([local_server.TORCH_REQUIREMENT + _(" (PyTorch extension)")] if torchMissing else []) + missing])
        if not slicer.util.confirmOkCancelDisplay(
                _("The local server needs these Python packages, which will be downloaded and installed "
                  "into Slicer's Python (this can take several minutes and a few GB for PyTorch):\n{listing}")
                .format(listing=listing), windowTitle=_("Install MedPruner server dependencies")):
            return False
        if torchMissing:
            self._installTorch()
        if missing:
            self._pipInstall(missing)
        return True

    @staticmethod
    def _installTorch() -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            manager = slicer.app.extensionsManagerModel()
            if hasattr(manager, "downloadAndInstallExtensionByName") and slicer.util.confirmOkCancelDisplay(
                    _("PyTorch is installed through the PyTorch extension, which is not installed. Install it now? "
                      "Slicer must be restarted afterwards; then press Start local server again.")):
                manager.downloadAndInstallExtensionByName("PyTorch", True, True)
                slicer.util.restart() if slicer.util.confirmYesNoDisplay(_("Restart Slicer now?")) else None
            raise SettingsError(_("The PyTorch extension is needed to start a local server."),
                                _("Install 'PyTorch' from the Extensions Manager, restart Slicer, and try again."))
        # Called when torch is missing or too old (torchInstalled() would only say it imports).
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.4,<3")
        if torch is None:
            raise SettingsError(_("PyTorch was not installed."), _("Install it from the PyTorch Utils module."))

    @staticmethod
    def _pipInstall(requirements) -> None:
        import subprocess

        try:
            import slicer.packaging as packaging   # Slicer 5.12+; not imported by `import slicer`
        except ImportError:
            packaging = None
        try:
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                # The user already confirmed the list above: no second dialog.
                packaging.pip_ensure(list(requirements), prompt_install=False, requester="MedPrunerSlicer")
            else:
                slicer.util.pip_install(" ".join(f'"{r}"' for r in requirements))
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            output = "\n".join(str(x) for x in (getattr(exc, "output", None), getattr(exc, "stderr", None)) if x)
            raise SettingsError(_("Installing the server's Python packages failed."),
                                _("Check the network connection (or proxy settings) and try again; the pip output "
                                  "below says which package failed."),
                                details=output or str(exc)) from exc

    def startLocalServer(self, model: str) -> None:
        """Start `medpruner serve` on 127.0.0.1 (the tiny demo model when `model` is empty), in the background."""
        url = normalize_server_url(self.preferences.server_url)
        port = int(url.rsplit(":", 1)[-1]) if url.startswith("http://127.0.0.1:") else DEFAULT_PORT
        self.preferences.server_url = f"http://127.0.0.1:{port}"
        command = local_server.server_command(self.pythonExecutable(), model.strip() or local_server.TINY_MODEL, port)
        self.localServer.start(command, local_server.server_environment())

    def localServerState(self) -> tuple[str, str]:
        if not self.localServer.is_running():
            code = self.localServer.exit_code
            return ("failed" if code not in (None, 0) else "stopped",
                    _("The local server exited (code {code}); open its log for details.").format(code=code))
        try:
            info = self.testConnection()
        except MedPrunerSlicerError:
            return "starting", _("Starting the server (loading the model)...")
        return "ready", _("Local server ready: {info}").format(info=self.describeHealth(info))

    def stopLocalServer(self) -> None:
        self.localServer.stop()

    def shutdown(self) -> None:
        """Cancel the running question and stop the local server (module cleanup, application quit)."""
        self.session.cancel()
        self.session.runner.join(2.0)
        self.localServer.stop()


#
# Test
#
class MedPrunerSlicerTest(ScriptedLoadableModuleTest):
    """Self-test for anyone running Slicer: export round trip, then the tiny model end to end."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_export_roundtrip()
        self.setUp()
        self.test_ask_tiny_model()

    def _sampleVolume(self):
        import numpy as np

        try:
            import SampleData

            return SampleData.downloadSample("CTChest")
        except Exception:  # noqa: BLE001 - offline: a synthetic CT instead
            from medpruner.phantom import phantom_ct_array

            ijkToRas = np.diag([-0.8, -0.8, 2.5, 1.0])
            return slicer.util.addVolumeFromArray(phantom_ct_array((32, 96, 96)), ijkToRas, "phantom")

    def test_export_roundtrip(self):
        import numpy as np
        from MedPrunerSlicerLib.nrrd_io import decode_nrrd
        from MedPrunerSlicerLib.volume_export import ijk_to_ras_array, snapshot_volume

        self.delayDisplay("Export round trip")
        volume = self._sampleVolume()
        snapshot = snapshot_volume(volume)
        array, matrix = decode_nrrd(snapshot.to_nrrd())
        np.testing.assert_array_equal(array, slicer.util.arrayFromVolume(volume))
        np.testing.assert_allclose(matrix, ijk_to_ras_array(volume), atol=1e-9)
        self.delayDisplay("Export round trip passed")

    def test_ask_tiny_model(self):
        from MedPrunerSlicerLib.volume_export import volume_fingerprint

        if local_server.missing_requirements([local_server.TORCH_REQUIREMENT, *local_server.ENGINE_REQUIREMENTS]):
            self.delayDisplay("Server dependencies not installed: tiny-model test skipped")
            return
        self.delayDisplay("Starting a local server with the tiny model")
        from MedPrunerSlicerLib.settings import DictStore

        logic = MedPrunerSlicerLogic()
        logic.preferences = Preferences(DictStore())   # never touch the user's saved server address
        logic.preferences.server_url = "http://127.0.0.1:18765"
        logic.startLocalServer("")
        try:
            deadline = time.monotonic() + 300
            while logic.localServerState()[0] == "starting" and time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.5)
            self.assertEqual(logic.localServerState()[0], "ready", logic.localServer.log_tail())
            volume = self._sampleVolume()
            before = volume_fingerprint(volume)
            done = []
            logic.doneCallback = done.append
            logic.errorCallback = lambda exc: self.fail(str(exc))
            for question in ("Is there a liver lesion?", "Where is it?"):
                logic.ask(volume, build_params(question, max_new_tokens=8))
                deadline = time.monotonic() + 300
                while logic.poll() and time.monotonic() < deadline:
                    slicer.app.processEvents()
                    time.sleep(0.1)
            self.assertEqual(len(done), 2)
            result = done[0]
            self.assertEqual(volume_fingerprint(volume), before)
            display.show_result(slicer.mrmlScene, result, "both", 0.6)
            self.assertEqual(result.attention.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            self.assertTrue(done[1].report["prefix_reused"], "the follow-up did not reuse the prepared volume")
            self.assertIn("Where is it?", logic.conversationHtml(volume, done[1].answer))
            self.delayDisplay("Tiny model end to end (question and follow-up) passed")
        finally:
            logic.stopLocalServer()
