"""MedPrunerSlicer: ask a vision-language model about a CT/MR volume; see which slices and tokens it kept.

Module, parameter node, widget, logic and self-test, the Slicer way. The widget only wires widgets
to the scene logic in MedPrunerSlicerLib (Qt-free, tested headless on slicer-core); the logic
reports through callbacks and never touches widgets. The engine (`medpruner`, torch) is never
imported here: it only runs in the local server's own process.

Nothing that can take more than ~100 ms runs on the main thread: HTTP (asking, testing the
connection, waiting for the local server) and installs run on worker threads or child processes,
drained by QTimers.
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
from MedPrunerSlicerLib import display, installer, local_server, support
from MedPrunerSlicerLib.answer_view import (
    RESEARCH_NOTICE,
    answer_html,
    compare_rows,
    details_html,
    partial_answer_html,
)
from MedPrunerSlicerLib.ask import AskSession
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.conversation import conversation, conversation_html
from MedPrunerSlicerLib.errors import JobCancelled, MedPrunerSlicerError, ServerUnreachable, SettingsError
from MedPrunerSlicerLib.job_runner import JobRunner
from MedPrunerSlicerLib.result_nodes import find_results, remove_result, result_from_answer_node
from MedPrunerSlicerLib.settings import (
    DEFAULT_PORT,
    KEYS,
    ConsentPolicy,
    Preferences,
    is_local_url,
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
OVERLAY_STYLES = ("outline", "filled")
DOCUMENTATION_URL = "https://github.com/medpruner/SlicerMedPruner/blob/main/docs/SLICER.md"
#: kept identical to EXTENSION_CONTRIBUTORS in CMakeLists.txt and the .s4ext (a test checks it)
CONTRIBUTORS = ["MedPruner project maintainers (MedPruner project)"]


#
# Module
#
class MedPrunerSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedPruner")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = list(CONTRIBUTORS)
        self.parent.helpText = _(
            "Ask a vision-language model a question about a CT or MR volume. MedPruner drops near-duplicate "
            "slices and unimportant image regions before the language model sees them; the overlay over the "
            "slice views shows what the model looked at and dims what it did not. The model runs in a "
            "MedPruner server: on this computer (Start local server) or on a GPU machine (set its address and token)."
        )
        self.parent.helpText += "<p><b>" + _(RESEARCH_NOTICE) + "</b></p>"
        self.parent.helpText += "<p>" + _(support.SUPPORTED_VERSIONS_TEXT) + "</p>"
        self.parent.helpText += '<p>' + _("Documentation:") + f' <a href="{DOCUMENTATION_URL}">{DOCUMENTATION_URL}</a></p>'
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
    overlayStyle: str = "outline"
    overlayViews: str = "input"       # "input": the views showing the input; "all"; or one view's name
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
        self._shownResult = None
        self._conversationKey = None
        self._askWhenServerReady = False
        self._installDialog = None
        self._askedQuestion = ""
        self._partialAnswer = ""
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._serverTimer = qt.QTimer()
        self._serverTimer.setInterval(1000)
        self._tasksTimer = qt.QTimer()
        self._tasksTimer.setInterval(100)

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
        self.logic.partialAnswerCallback = self.onPartialAnswer

        for mode, text in zip(OVERLAY_MODES, (_("Where it looked and its attention"), _("Attention only"),
                                              _("Where it looked only"), _("Nothing"))):
            self.ui.overlayComboBox.addItem(text, mode)
        for style, text in zip(OVERLAY_STYLES, (_("Outlines, anatomy visible"), _("Filled colours"))):
            self.ui.overlayStyleComboBox.addItem(text, style)
        self._fillViewsComboBox()
        self.ui.compareTable.setColumnCount(2)
        self.ui.compareTable.setHorizontalHeaderLabels([_("Pruned"), _("Unpruned")])
        self.ui.compareTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)

        prefs = self.logic.preferences
        self.ui.serverUrlComboBox.addItems(prefs.url_history or [prefs.server_url])
        self.ui.serverUrlComboBox.setCurrentText(prefs.server_url)
        self.ui.tokenLineEdit.text = prefs.token
        self.ui.localModelLineEdit.text = prefs.local_model
        self._showSupport()

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
        self.ui.overlayStyleComboBox.connect("currentIndexChanged(int)", self.onOverlayStyleChanged)
        self.ui.overlayViewsComboBox.connect("currentIndexChanged(int)", self.onOverlayViewsChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.conversationBrowser.connect("anchorClicked(QUrl)", self.onConversationLink)
        self.ui.previousKeptButton.connect("clicked(bool)", lambda: self.onJumpKept(-1))
        self.ui.nextKeptButton.connect("clicked(bool)", lambda: self.onJumpKept(+1))
        self.ui.showPlotsButton.connect("clicked(bool)", self.onShowPlots)
        self.ui.removeResultButton.connect("clicked(bool)", self.onRemoveResult)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self._serverTimer.connect("timeout()", self.onServerTimer)
        self._tasksTimer.connect("timeout()", self.onTasksTimer)
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

        self.initializeParameterNode()

    def onReload(self) -> None:
        """Developer mode Reload: Slicer reloads only this file, so drop MedPrunerSlicerLib to reload it too."""
        for name in [n for n in sys.modules if n == "MedPrunerSlicerLib" or n.startswith("MedPrunerSlicerLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        for timer in (self._pollTimer, self._serverTimer, self._tasksTimer):
            timer.stop()
        self._closeInstallDialog()
        if self.logic:
            slicer.app.disconnect("aboutToQuit()", self.logic.shutdown)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self._loadServerFields()   # Application Settings may have changed them meanwhile
        self._fillViewsComboBox()  # the layout may have changed
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
        self._showResult(None, display_it=False)   # node IDs restart in the next scene: forget the old ones
        self._conversationKey = None
        self.ui.conversationBrowser.setHtml("")

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = self.logic.defaultInputVolume()
            if volume is not None:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _syncOverlayCombos(self) -> None:
        """Combos follow the parameter node (scene load, undo, scripts); an unknown value becomes the default."""
        node = self._parameterNode
        for combo, field in ((self.ui.overlayComboBox, "overlayMode"), (self.ui.overlayStyleComboBox, "overlayStyle"),
                             (self.ui.overlayViewsComboBox, "overlayViews")):
            value = getattr(node, field)
            index = combo.findData(value)
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(wasBlocked)
            if index < 0:
                setattr(node, field, combo.itemData(0))

    def _hideHeatmapsFromInputSelector(self) -> None:
        """MedPruner's own heatmaps are scalar volumes too: never offer them as a volume to ask about."""
        ids = self.logic.heatmapNodeIds()
        proxy = self.ui.inputSelector.sortFilterProxyModel()
        if list(proxy.hiddenNodeIDs) != ids:
            proxy.hiddenNodeIDs = ids

    def _fillViewsComboBox(self) -> None:
        combo = self.ui.overlayViewsComboBox
        current = combo.currentData if combo.count else (self._parameterNode.overlayViews if self._parameterNode else "input")
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Views showing the input volume"), "input")
        combo.addItem(_("All slice views"), "all")
        layoutManager = slicer.app.layoutManager()
        for name in (layoutManager.sliceViewNames() if layoutManager else []):
            combo.addItem(_("{view} view only").format(view=name), name)
        combo.setCurrentIndex(max(combo.findData(current), 0))
        combo.blockSignals(wasBlocked)

    def _showSupport(self) -> None:
        verdict = self.logic.localServerSupport()
        self.ui.serverSupportLabel.visible = not verdict.ok
        self.ui.serverSupportLabel.text = "" if verdict.ok else verdict.message + " " + verdict.hint
        self.ui.startServerButton.enabled = verdict.ok and not self.logic.localServer.is_running()

    # -- state -> widgets ----------------------------------------------------------------------
    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node:
            self._syncOverlayCombos()
        self._hideHeatmapsFromInputSelector()
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
        shown = self._shownResult
        if (shown.answer if shown else None) is not answer:
            self._showResult(result_from_answer_node(answer))
        conversationKey = (node.inputVolume.GetID() if hasInput else None, answer.GetID() if answer else None)
        if conversationKey != self._conversationKey:
            self._showConversation()
        hasResult = self._shownResult is not None
        for button in (self.ui.previousKeptButton, self.ui.nextKeptButton, self.ui.showPlotsButton,
                       self.ui.removeResultButton):
            button.enabled = hasResult and not (button is self.ui.removeResultButton and running)

    def _showResult(self, result, display_it: bool = True) -> None:
        """Show `result`'s answer, and its overlay in the views; None clears both and restores the views."""
        previous, self._shownResult = self._shownResult, result
        if result is None:
            self.ui.answerBrowser.setHtml("")
            self.ui.answerDetailsLabel.text = ""
            self.ui.compareTable.visible = False
            if display_it and previous is not None:
                display.hide_result(slicer.mrmlScene)
            return
        report = result.report
        self.ui.answerBrowser.setHtml(answer_html(report))
        self.ui.answerDetailsLabel.text = details_html(report)
        self._fillCompareTable(report)
        if display_it:
            self._applyOverlay()

    def _applyOverlay(self) -> None:
        """Show the current result in the chosen views, mode and style; mode "none" restores the views."""
        result, node = self._shownResult, self._parameterNode
        if result is None or node is None:
            return
        if node.overlayMode == "none":
            display.hide_result(slicer.mrmlScene)
            return
        display.hide_result(slicer.mrmlScene)   # other views may have been chosen: restore them first
        display.show_result(slicer.mrmlScene, result, node.overlayMode, node.overlayOpacity, style=node.overlayStyle,
                            composite_nodes=self.logic.compositeNodesFor(node.overlayViews))

    def _showConversation(self) -> None:
        node = self._parameterNode
        volume = node.inputVolume if node else None
        current = node.currentResult if node else None
        self._conversationKey = (volume.GetID() if volume else None, current.GetID() if current else None)
        self.ui.conversationBrowser.setHtml(self.logic.conversationHtml(volume, current))
        count = len(conversation(slicer.mrmlScene, volume)) if volume else 0
        self.ui.conversationCollapsibleButton.text = _("Conversation about this volume ({count})").format(count=count)

    def onConversationLink(self, url) -> None:
        """A question of the conversation was clicked: show its answer and heatmaps."""
        node = slicer.mrmlScene.GetNodeByID(url.toString().partition("result:")[2])
        if self._parameterNode and result_from_answer_node(node) is not None and node.IsA("vtkMRMLTextNode"):
            self._parameterNode.currentResult = node

    def _fillCompareTable(self, report) -> None:
        rows = compare_rows(report)
        table = self.ui.compareTable
        table.visible = bool(rows)
        table.setRowCount(len(rows))
        table.setVerticalHeaderLabels([_(label) for label, _pruned, _unpruned in rows])
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
        self._askWhenServerReady = False
        try:
            self._saveServerFields()
        except SettingsError as exc:
            self._showError(exc)
            return
        url = self.logic.preferences.server_url
        if self.logic.consent.needs_consent(url) and not self._askConsent(url):   # no wait cursor over a question
            return
        with slicer.util.tryWithErrorDisplay(_("Could not ask the question."), waitCursor=True):
            node = self._parameterNode
            params = build_params(node.question, enabled=node.pruningEnabled, gamma=node.gamma, tau=node.tau,
                                  compare=node.compare)
            self.logic.ask(node.inputVolume, params)   # checks and copies the volume; HTTP runs in the worker
            self._askedQuestion, self._partialAnswer = params["question"], ""
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
        accepted = box.exec_() == qt.QMessageBox.Yes
        remember = dontAsk.checked
        box.deleteLater()
        if accepted:
            self.logic.consent.grant(url, remember=remember)
        return accepted

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

    def onPartialAnswer(self, text: str) -> None:
        """The answer growing as the model writes it (the finished one replaces it in onDone)."""
        self._partialAnswer = text
        self.ui.answerCollapsibleButton.collapsed = False
        self.ui.answerBrowser.setHtml(partial_answer_html(self._askedQuestion, text))
        self.ui.answerDetailsLabel.text = ""

    def onDone(self, result) -> None:
        self.ui.statusLabel.text = self.logic.doneMessage(result)
        if self._parameterNode:
            self._parameterNode.currentResult = result.answer   # shows it, and the conversation with it

    def onError(self, exc) -> None:
        self.ui.progressBar.visible = False
        if self._partialAnswer:   # what was written stays readable, marked as incomplete
            state = "cancelled" if isinstance(exc, JobCancelled) else "failed"
            self.ui.answerBrowser.setHtml(partial_answer_html(self._askedQuestion, self._partialAnswer, state))
            self._partialAnswer = ""
        if isinstance(exc, JobCancelled):
            self.ui.statusLabel.text = _("Cancelled.")
            return
        self.ui.statusLabel.text = _("Failed.")
        if isinstance(exc, ServerUnreachable) and self.logic.isFirstRun():
            self._offerServerSetup()
            return
        self._showError(exc)

    def _showError(self, exc) -> None:
        if isinstance(exc, MedPrunerSlicerError):
            text = exc.message + ("\n\n" + exc.hint if exc.hint else "")
            details = {"detailedText": exc.details} if exc.details else {}   # None would show as "None"
            slicer.util.errorDisplay(text, windowTitle=_("MedPruner"), **details)
        else:
            logging.error("MedPrunerSlicer: unexpected error", exc_info=exc)
            slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=exc), windowTitle=_("MedPruner"),
                                     detailedText=repr(exc))

    def _offerServerSetup(self) -> None:
        """First run: no server answers at the local address. Offer to start one, or to enter a remote one."""
        url = self.logic.preferences.server_url
        verdict = self.logic.localServerSupport()
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Question)
        box.setWindowTitle(_("Set up a MedPruner server"))
        box.setText(_("No MedPruner server answers at {url}. The model runs in a server: on this computer, or on a "
                      "GPU machine of your network.").format(url=url))
        model = self.ui.localModelLineEdit.text.strip() or _("the demo model (random weights: meaningless answers)")
        if verdict.ok:
            box.setInformativeText(_("Start a server on this computer with {model}? Your question is asked as soon "
                                     "as it is ready. Or enter the address of a remote server.").format(model=model))
        else:
            box.setInformativeText(verdict.message + " " + verdict.hint)
        startButton = box.addButton(_("Start local server"), qt.QMessageBox.AcceptRole) if verdict.ok else None
        remoteButton = box.addButton(_("Use a remote server..."), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        box.deleteLater()
        if startButton is not None and clicked == startButton:
            self._askWhenServerReady = True
            self.onStartServer()
        elif clicked == remoteButton:
            self.ui.serverCollapsibleButton.collapsed = False
            self.ui.serverUrlComboBox.setFocus()
            self.ui.serverUrlComboBox.lineEdit().selectAll()
            self.ui.statusLabel.text = _("Enter the server's address and token in the Server section, then press Ask.")

    # -- overlay ---------------------------------------------------------------------------------
    def onOverlayModeChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.overlayMode = self.ui.overlayComboBox.itemData(index) or "both"
            self._applyOverlay()

    def onOverlayStyleChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.overlayStyle = self.ui.overlayStyleComboBox.itemData(index) or "outline"
            self._applyOverlay()

    def onOverlayViewsChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.overlayViews = self.ui.overlayViewsComboBox.itemData(index) or "input"
            self._applyOverlay()

    def onOpacityChanged(self, value: float) -> None:
        """Only the slider changes the overlay's opacity (never a keystroke elsewhere in the panel)."""
        if self._shownResult is not None:
            display.set_opacity(slicer.mrmlScene, value)

    def onJumpKept(self, direction: int) -> None:
        result = self._shownResult
        if result is None:
            return
        sliceNode = self.logic.sliceNodeForJump(result)
        if sliceNode is None:
            self.ui.statusLabel.text = _("No slice view shows the input volume.")
        elif display.jump_to_kept_slice(result, sliceNode, direction) is None:
            self.ui.statusLabel.text = _("No kept slice further in that direction.")

    def onShowPlots(self) -> None:
        """The only place the layout changes: the user asked for the plots."""
        if self._shownResult is not None:
            self.logic.showChart(self._shownResult.tokens_chart)

    def onRemoveResult(self) -> None:
        result = self._shownResult
        if result is None or self.logic.running:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Remove the question \"{question}\", its answer and its heatmaps from the scene?").format(
                    question=result.question), windowTitle=_("MedPruner")):
            return
        nextAnswer = self.logic.removeResult(result)
        self._shownResult = None
        if self._parameterNode:
            self._parameterNode.currentResult = nextAnswer
        self._conversationKey = None
        self._onParameterNodeModified()

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
        """Checks the server in the worker; the answer arrives through onTasksTimer."""
        try:
            self._saveServerFields()
        except SettingsError as exc:
            self.ui.serverStatusLabel.text = exc.message + " " + exc.hint
            return
        if not self.logic.startConnectionCheck(self._onConnectionChecked, self._onConnectionFailed):
            return   # a check is already running: its answer is on the way
        self.ui.testConnectionButton.enabled = False
        self.ui.serverStatusLabel.text = _("Testing the connection to {url}...").format(
            url=self.logic.preferences.server_url)
        self._tasksTimer.start()

    def _onConnectionChecked(self, info) -> None:
        self.ui.testConnectionButton.enabled = True
        self.ui.serverStatusLabel.text = _("Connected: {info}").format(info=self.logic.describeHealth(info))

    def _onConnectionFailed(self, exc) -> None:
        self.ui.testConnectionButton.enabled = True
        self.ui.serverStatusLabel.text = _("Not connected.")
        self._showError(exc)

    def onTasksTimer(self) -> None:
        """Deliver what the background checks, probes, installs and server start/stop finished (100 ms)."""
        busy, errors = self.logic.pollTasks()
        for exc in errors:   # a callback that failed: said once, and the other tasks keep being drained
            self._showError(exc)
        if self._installDialog is not None:
            self._installDialog.setLabelText(self.logic.installStatus())
        if not busy:
            self._tasksTimer.stop()

    def onStartServer(self) -> None:
        try:
            self._startServer()
        except Exception as exc:  # noqa: BLE001 - message, hint and details (e.g. pip's output) in one dialog
            self._askWhenServerReady = False
            self.ui.startServerButton.enabled = self.logic.localServerSupport().ok
            self._showError(exc)

    def _startServer(self) -> None:
        if self.logic.serverBusy() or self._serverTimer.isActive():
            self.ui.serverStatusLabel.text = _("The local server is already being set up.")
            return
        self.onLocalModelEdited()
        verdict = self.logic.localServerSupport()   # what this Slicer can do, before anything is installed
        if not verdict.ok:
            raise SettingsError(verdict.message, verdict.hint)
        steps = self.logic.installSteps()
        if not steps:
            self._launchServer()
            return
        listing = "\n".join("  " + step.label for step in steps)
        if not slicer.util.confirmOkCancelDisplay(
                _("The local server needs Python packages that will be downloaded and installed into Slicer's "
                  "Python (several minutes, and a few GB for PyTorch). Slicer stays usable meanwhile.\n{listing}")
                .format(listing=listing), windowTitle=_("Install MedPruner server dependencies")):
            self._askWhenServerReady = False
            return
        self.logic.startInstall(steps, self._onInstalled, self._onInstallFailed)
        dialog = qt.QProgressDialog(_("Installing..."), _("Cancel"), 0, 0, slicer.util.mainWindow())
        dialog.setWindowTitle(_("Installing MedPruner server dependencies"))
        dialog.setMinimumWidth(520)
        dialog.setAutoClose(False)
        dialog.setAutoReset(False)
        dialog.connect("canceled()", self.logic.cancelInstall)
        dialog.show()
        self._installDialog = dialog
        self.ui.startServerButton.enabled = False
        self.ui.serverStatusLabel.text = _("Installing the server's Python packages...")
        self._tasksTimer.start()

    def _closeInstallDialog(self) -> None:
        dialog, self._installDialog = self._installDialog, None
        if dialog is not None:
            dialog.disconnect("canceled()", self.logic.cancelInstall)
            dialog.close()
            dialog.deleteLater()

    def _onInstalled(self, _result) -> None:
        self._closeInstallDialog()
        self._launchServer()

    def _onInstallFailed(self, exc) -> None:
        self._closeInstallDialog()
        self._dropPendingQuestion(_("The server's packages were not installed; the question was not asked."))
        self.ui.startServerButton.enabled = True
        self.ui.serverStatusLabel.text = _("Installing the server's Python packages did not finish.")
        if not isinstance(exc, JobCancelled):
            self._showError(exc)

    def _launchServer(self) -> None:
        """Start the server process in the background (ending a leftover server can take seconds)."""
        self.ui.startServerButton.enabled = False
        self.ui.serverStatusLabel.text = _("Starting the server...")
        self.logic.startLocalServerInBackground(self.ui.localModelLineEdit.text, self._onServerLaunched,
                                                self._onServerLaunchFailed)
        self._tasksTimer.start()

    def _onServerLaunched(self, note: str) -> None:
        self.ui.serverUrlComboBox.setCurrentText(self.logic.preferences.server_url)
        self.ui.serverStatusLabel.text = (note + " " if note else "") + _(
            "Starting the server (loading the model can take minutes)...")
        self.ui.stopServerButton.enabled = True
        self.ui.openLogButton.enabled = True
        if self._askWhenServerReady:
            self.ui.statusLabel.text = _("Waiting for the local server; the question is asked when it is ready.")
        self._serverTimer.start()

    def _onServerLaunchFailed(self, exc) -> None:
        self._dropPendingQuestion(_("The local server did not start; the question was not asked."))
        self.ui.startServerButton.enabled = True
        self.ui.serverStatusLabel.text = _("The local server did not start.")
        self._showError(exc)

    def _dropPendingQuestion(self, text: str) -> None:
        if self._askWhenServerReady:
            self._askWhenServerReady = False
            self.ui.statusLabel.text = text

    def onServerTimer(self) -> None:
        """Once a second while the local server starts: its process (no HTTP here) and a health probe (worker)."""
        state = self.logic.localServerProcessState()
        if state == "running":
            self.logic.startReadinessProbe(self._onServerReady, lambda exc: None)
            self._tasksTimer.start()
            return
        self._serverTimer.stop()
        self._dropPendingQuestion(_("The local server stopped; the question was not asked."))
        self.ui.startServerButton.enabled = True
        self.ui.stopServerButton.enabled = False
        code = self.logic.localServer.exit_code
        self.ui.serverStatusLabel.text = _("The local server exited (code {code}); open its log for details.").format(
            code=code)
        if state == "failed":
            slicer.util.errorDisplay(_("The local server stopped while starting."), windowTitle=_("MedPruner"),
                                     detailedText=self.logic.localServer.log_tail())

    def _onServerReady(self, info) -> None:
        if not self._serverTimer.isActive():
            return
        self._serverTimer.stop()
        self.ui.serverStatusLabel.text = _("Local server ready: {info}").format(info=self.logic.describeHealth(info))
        self.ui.startServerButton.enabled = False
        self.ui.stopServerButton.enabled = True
        if self._askWhenServerReady:
            self._askWhenServerReady = False
            if self.ui.askButton.enabled and not self.logic.running:
                try:
                    self.onAskOrCancel()
                except Exception:  # noqa: BLE001, S110 - tryWithErrorDisplay has shown it already
                    pass
            else:
                self.ui.statusLabel.text = _("The local server is ready: press Ask.")

    def onStopServer(self) -> None:
        """Stop in the background (the server gets a few seconds to end its job and delete its files)."""
        self._serverTimer.stop()
        self._dropPendingQuestion(_("The local server was stopped; the question was not asked."))
        self.ui.stopServerButton.enabled = False
        self.ui.serverStatusLabel.text = _("Stopping the local server...")
        self.logic.stopLocalServerInBackground(self._onServerStopped, self._onServerStopped)
        self._tasksTimer.start()

    def _onServerStopped(self, _result=None) -> None:
        self.ui.serverStatusLabel.text = _("Local server stopped.")
        self.ui.startServerButton.enabled = self.logic.localServerSupport().ok
        self.ui.stopServerButton.enabled = self.logic.localServer.is_running()

    def onOpenLog(self) -> None:
        path = self.logic.localServer.log_path
        if path and path.exists():
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))


#
# Logic
#
class MedPrunerSlicerLogic(ScriptedLoadableModuleLogic):
    """Scene logic for the module (no widgets). Reports through the *Callback attributes.

    Every HTTP call and every install runs in a worker (`session`, `checks`, `probes`, `installs`:
    JobRunners drained by the widget's timers); the main thread only starts them and takes results.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.preferences = Preferences(qt.QSettings())
        self.consent = ConsentPolicy(qt.QSettings())
        self.localServer = local_server.LocalServer(os.path.join(slicer.app.temporaryPath, "MedPruner"))
        self.progressCallback = None
        self.doneCallback = None
        self.errorCallback = None
        self.partialAnswerCallback = None   # (text so far): the answer as the model writes it
        self.session = AskSession(slicer.mrmlScene, self.client,
                                  on_progress=lambda *a: self.progressCallback and self.progressCallback(*a),
                                  on_done=lambda r: self.doneCallback and self.doneCallback(r),
                                  on_error=self._onError,
                                  on_partial_answer=lambda t: self.partialAnswerCallback and self.partialAnswerCallback(t))
        self.checks = JobRunner()      # Test connection
        self.probes = JobRunner()      # is the local server ready yet?
        self.serverOps = JobRunner()   # starting (a leftover server may need ending) and stopping the local server
        self.installs = installer.Installer()
        self._everConnected = False

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
        running = self.session.poll()
        if not running and self.session.job_id:
            self._everConnected = True
        return running

    def cancel(self) -> None:
        self.session.cancel()

    def elapsed(self) -> float:
        return time.monotonic() - (self.session.started_at or time.monotonic())

    def isFirstRun(self) -> bool:
        """No server has answered yet in this session, and the address is this computer's default one."""
        url = self.preferences.server_url
        return (not self._everConnected and is_local_url(url) and not self.localServer.is_running()
                and not self.serverBusy() and not find_results(slicer.mrmlScene))

    # views
    @staticmethod
    def _compositeNodes() -> list:
        return list(slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"))

    def volumeInViews(self):
        """The background volume the user is looking at (Red view first, then any slice view), if any."""
        composites = sorted(self._compositeNodes(), key=lambda c: c.GetLayoutName() != "Red")
        for composite in composites:
            volume = slicer.mrmlScene.GetNodeByID(composite.GetBackgroundVolumeID() or "")
            if volume is not None:
                return volume
        return None

    @staticmethod
    def heatmapNodeIds() -> list:
        """IDs of the heatmap volumes MedPruner made, sorted (its display helpers are hidden from editors)."""
        return sorted(n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                      if n.GetAttribute("MedPruner.Role"))

    def defaultInputVolume(self):
        """A plain scalar volume to ask about: the one in the views, else the scene's first (never a labelmap,
        vector, tensor or MedPruner heatmap: the input selector shows plain scalar volumes only)."""
        def usable(node) -> bool:
            return (node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode"
                    and not node.GetAttribute("MedPruner.Role"))

        inView = self.volumeInViews()
        if usable(inView):
            return inView
        return next((n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if usable(n)), None)

    def compositeNodesFor(self, views: str):
        """Slice composite nodes for the Overlay's "In views" choice (None: the views showing the input)."""
        if views == "input":
            return None
        if views == "all":
            return self._compositeNodes()
        return [c for c in self._compositeNodes() if c.GetLayoutName() == views] or None

    def sliceNodeForJump(self, result):
        """The slice view for next/previous kept slice: among the views showing the input, the one whose
        normal is closest to the result's slice axis (so each step lands on the next kept slice)."""
        sliceNodes = {n.GetLayoutName(): n for n in slicer.util.getNodesByClass("vtkMRMLSliceNode")}
        inputId = result.input_volume.GetID() if result.input_volume is not None else None
        showing = [sliceNodes[c.GetLayoutName()] for c in self._compositeNodes()
                   if c.GetLayoutName() in sliceNodes and inputId and inputId in
                   (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID())]
        return display.best_slice_node(result, showing) if showing else None

    def results(self):
        return find_results(slicer.mrmlScene)

    def removeResult(self, result):
        """Restore the views, remove the result (shared heatmaps only with their last answer); the next answer to show."""
        display.hide_result(slicer.mrmlScene, result)
        volume = result.input_volume
        remove_result(slicer.mrmlScene, result.answer)
        remaining = conversation(slicer.mrmlScene, volume) if volume is not None else []
        return remaining[-1].result.answer if remaining else None

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
        """Switch to a layout with a plot view showing `chartNode` (only when the user asks: Show plots)."""
        if chartNode is not None and hasattr(slicer.modules, "plots"):
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)

    # server: every HTTP call in a worker
    def startConnectionCheck(self, onDone, onError) -> bool:
        """Test connection in the background (health, and the token when the server needs one).
        False when a check is already running."""
        if self.checks.running:
            return False
        client = self.client()

        def done(info):
            self._everConnected = True
            onDone(info)

        self.checks.start(lambda ctx: client.check_token(), on_done=done, on_error=onError)
        return True

    def startReadinessProbe(self, onReady, onNotYet) -> None:
        """Ask the local server's health in the background (skipped while the previous probe runs)."""
        if self.probes.running:
            return
        client = MedPrunerClient(self.preferences.server_url, self.preferences.token, timeout=2.0)

        def ready(info):
            self._everConnected = True
            onReady(info)

        self.probes.start(lambda ctx: client.check_token(), on_done=ready, on_error=onNotYet)

    def pollTasks(self) -> tuple:
        """Deliver what the background tasks finished (main thread): (any still running, errors raised by
        callbacks). Each runner is drained on its own, so one failing callback never strands the others."""
        errors = []
        for runner in (self.checks, self.probes, self.installs, self.serverOps):
            try:
                runner.drain()
            except Exception as exc:  # noqa: BLE001 - reported by the caller; the other runners go on
                errors.append(exc)
        return self.serverBusy() or self.checks.running or self.probes.running, errors

    def serverBusy(self) -> bool:
        """An install, or the start or stop of the local server, is under way."""
        return self.installs.running or self.serverOps.running

    @staticmethod
    def describeHealth(info: dict) -> str:
        parts = [str(info.get(k)) for k in ("model_id", "device", "version") if info.get(k)]
        text = ", ".join(parts) or json.dumps(info)[:200]
        if info.get("demo_model"):
            text += " " + _("(demo model: random weights, meaningless answers)")
        return text

    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer (Slicer's Python launcher with the right environment)."""
        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = os.path.join(slicer.app.slicerHome, "bin", "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        return candidate if os.path.exists(candidate) else sys.executable

    @staticmethod
    def slicerVersion() -> tuple:
        return (int(slicer.app.majorVersion), int(slicer.app.minorVersion))

    def localServerSupport(self):
        """Can this Slicer run the local server (its Python version), said before anything is installed."""
        return support.local_server_support(tuple(sys.version_info[:2]), self.slicerVersion())

    def installSteps(self) -> list:
        """What must be installed for the local server (empty when nothing is missing). Raises SettingsError
        when a package Slicer ships is too old (it is never replaced)."""
        bad_bundled = local_server.missing_requirements(local_server.SLICER_BUNDLED)
        if bad_bundled:
            listing = ", ".join(f"{req} (found {ver or 'none'})" for req, ver in bad_bundled)
            raise SettingsError(_("This Slicer's bundled Python packages are too old for the local server: {listing}.")
                                .format(listing=listing),
                                _("Use a newer Slicer, or run the server on another computer (see the documentation)."))
        missing = [req for req, _ver in local_server.missing_requirements(local_server.ENGINE_REQUIREMENTS)]
        torchMissing = bool(local_server.missing_requirements([local_server.TORCH_REQUIREMENT]))
        if not missing and not torchMissing:
            return []
        # pip may never replace a package Slicer ships: pin the installed versions for every pip call
        constraints = os.path.join(slicer.app.temporaryPath, "MedPruner-constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write("\n".join(local_server.bundled_constraints()) + "\n")
        return installer.install_plan(self.pythonExecutable(), missing, torchMissing,
                                      pip_args=("--constraint", constraints))

    def startInstall(self, steps, onDone, onError) -> None:
        """Run the install steps in child processes (never on the main thread); progress via installStatus()."""
        # Slicer's own pip_install runs PythonSlicer in Slicer's process environment: the same here.
        self.installs.start(steps, None, on_done=onDone, on_error=onError)

    def installStatus(self) -> str:
        return self.installs.status_text()

    def cancelInstall(self) -> None:
        self.installs.cancel()

    @staticmethod
    def startupEnvironment() -> dict:
        """The environment Slicer was started with (not the launcher's), for the child processes."""
        if hasattr(slicer.util, "startupEnvironment"):
            return dict(slicer.util.startupEnvironment())
        return dict(os.environ)

    def _preferredPort(self) -> int:
        url = normalize_server_url(self.preferences.server_url)
        tail = url[len("http://127.0.0.1:"):] if url.startswith("http://127.0.0.1:") else ""
        return int(tail) if tail.isdigit() else DEFAULT_PORT

    def _launch(self, model: str, preferred: int, python: str, env: dict) -> tuple:
        """Free the port (a leftover server of a crashed Slicer is ended) and start the server: (port, note)."""
        port, note = self.localServer.prepare_port(preferred)
        command = local_server.server_command(python, model.strip() or local_server.TINY_MODEL, port)
        self.localServer.start(command, env, port=port)
        return port, note

    def startLocalServer(self, model: str) -> str:
        """Start `medpruner serve` on 127.0.0.1 (the tiny demo model when `model` is empty) and return at once
        the note for the user (empty unless the usual port was taken). Scripts and the self-test; the widget
        uses startLocalServerInBackground, since freeing the port can take seconds."""
        port, note = self._launch(model, self._preferredPort(), self.pythonExecutable(),
                                  local_server.server_environment(self.startupEnvironment()))
        self.preferences.server_url = f"http://127.0.0.1:{port}"
        return note

    def startLocalServerInBackground(self, model: str, onStarted, onError) -> None:
        """startLocalServer in a worker: onStarted(note) once the process runs (the address is saved then)."""
        preferred, python = self._preferredPort(), self.pythonExecutable()
        env = local_server.server_environment(self.startupEnvironment())

        def started(result) -> None:
            port, note = result
            self.preferences.server_url = f"http://127.0.0.1:{port}"   # QSettings: on the main thread
            onStarted(note)

        self.serverOps.start(lambda ctx: self._launch(model, preferred, python, env), on_done=started,
                             on_error=onError)

    def localServerProcessState(self) -> str:
        """"running", "stopped" (exit code 0 or never started) or "failed": the process only, no HTTP."""
        if self.localServer.is_running():
            return "running"
        return "failed" if self.localServer.exit_code not in (None, 0) else "stopped"

    def stopLocalServer(self) -> None:
        """End the server and what it started (waits up to a few seconds: scripts and shutdown)."""
        self.localServer.stop()

    def stopLocalServerInBackground(self, onStopped, onError) -> None:
        """stopLocalServer in a worker (the server may take seconds to cancel its job and delete its files)."""
        self.serverOps.start(lambda ctx: self.localServer.stop(), on_done=onStopped, on_error=onError)

    def shutdown(self) -> None:
        """Cancel the running question and installs, stop the local server (module cleanup, application quit)."""
        self.session.cancel()
        self.cancelInstall()
        self.session.runner.join(2.0)
        self.installs.join(installer.CANCEL_GRACE + 1.0)   # pip's process tree ends before Slicer does
        self.serverOps.join(10.0)
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
            ready = []
            deadline = time.monotonic() + 300
            while not ready and logic.localServerProcessState() == "running" and time.monotonic() < deadline:
                logic.startReadinessProbe(ready.append, lambda exc: None)
                logic.pollTasks()
                slicer.app.processEvents()
                time.sleep(0.5)
            self.assertTrue(ready, logic.localServer.log_tail())
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
            display.show_result(slicer.mrmlScene, result, "both", 0.6, style="outline")
            self.assertEqual(result.attention.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            self.assertTrue(done[1].report["prefix_reused"], "the follow-up did not reuse the prepared volume")
            self.assertIs(done[1].attention, done[0].attention, "the follow-up copied the heatmaps")
            display.hide_result(slicer.mrmlScene)
            self.assertIn("Where is it?", logic.conversationHtml(volume, done[1].answer))
            self.delayDisplay("Tiny model end to end (question and follow-up) passed")
        finally:
            logic.stopLocalServer()
