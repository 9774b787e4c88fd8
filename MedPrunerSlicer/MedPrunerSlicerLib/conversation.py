"""The questions asked about one volume, read back from the scene, and what a follow-up may reuse.

A server keeps the pruned visual prefix of each volume it prepared under a `volume_id` (a hash of
voxels, geometry and settings). Each answer node records what its question was asked about
(attributes below), so the next question about the same volume can name that `volume_id` instead of
sending the voxels again, and the answer panel can show the conversation and the time reuse saved.
Everything lives in the scene's attributes: it survives reloading the module and saving the scene.

A recorded `volume_id` is offered for reuse only for the same volume node, the same voxels and
geometry (fingerprint), the same server address and the same preparation settings; the server
checks again and answers `unknown_volume` / `settings_mismatch` when it cannot reuse, and the ask
path then sends the volume as for a first question.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass

from .result_nodes import ResultNodes, find_results

__all__ = ["ATTRIBUTES", "Provenance", "ReuseCandidate", "Turn", "conversation", "conversation_html",
           "reuse_candidates", "settings_key"]

# Params that change how the volume is prepared (the server's preparation settings, minus the model,
# which the server checks itself). The question, answer length and comparison do not.
PREPARATION_PARAMS = ("pruning", "axis", "window", "max_slices")

ATTRIBUTES = {
    "volume_id": "MedPruner.VolumeId",
    "fingerprint": "MedPruner.VolumeFingerprint",
    "settings_key": "MedPruner.SettingsKey",
    "volume_sent": "MedPruner.VolumeSent",
    "upload_s": "MedPruner.UploadSeconds",
    "wall_s": "MedPruner.WallSeconds",
    "saved_s": "MedPruner.SavedSeconds",
}


def settings_key(params: dict) -> str:
    """Canonical text of the preparation settings in a job's params (equal settings, equal text)."""
    return json.dumps({name: params.get(name) for name in PREPARATION_PARAMS}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ReuseCandidate:
    """A prepared volume a follow-up may name: valid only while the voxels still have `fingerprint`."""

    volume_id: str
    fingerprint: str
    upload_s: float   # what sending it took the question that sent it: saved when it is not sent again


@dataclass(frozen=True)
class Provenance:
    """How one answer was obtained; stored on its answer node."""

    volume_id: str
    fingerprint: str
    settings_key: str
    volume_sent: bool
    upload_s: float
    wall_s: float
    saved_s: float

    def attributes(self) -> dict[str, str]:
        return {
            ATTRIBUTES["volume_id"]: self.volume_id,
            ATTRIBUTES["fingerprint"]: self.fingerprint,
            ATTRIBUTES["settings_key"]: self.settings_key,
            ATTRIBUTES["volume_sent"]: "1" if self.volume_sent else "0",
            ATTRIBUTES["upload_s"]: f"{self.upload_s:.4f}",
            ATTRIBUTES["wall_s"]: f"{self.wall_s:.4f}",
            ATTRIBUTES["saved_s"]: f"{self.saved_s:.4f}",
        }

    @staticmethod
    def saved_seconds(report: dict, volume_sent: bool, candidate: ReuseCandidate | None) -> float:
        """Preparation the server skipped (its own measurement) plus the upload this client skipped."""
        saved = float(report.get("prepare_s") or 0.0) if report.get("prefix_reused") else 0.0
        if not volume_sent and candidate is not None:
            saved += candidate.upload_s
        return saved


@dataclass(frozen=True)
class Turn:
    """One answered question of a conversation."""

    result: ResultNodes
    question: str
    answer: str
    prefix_reused: bool
    volume_sent: bool
    upload_s: float
    wall_s: float | None
    saved_s: float
    volume_id: str
    fingerprint: str
    settings_key: str
    server: str


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _turn(result: ResultNodes) -> Turn:
    node = result.answer
    report = result.report

    def attribute(name: str) -> str:
        return node.GetAttribute(ATTRIBUTES[name]) or ""

    return Turn(
        result=result,
        question=str(report.get("question", "")),
        answer=str(report.get("answer", "")),
        prefix_reused=bool(report.get("prefix_reused")),
        volume_sent=attribute("volume_sent") != "0",
        upload_s=_float(attribute("upload_s")) or 0.0,
        wall_s=_float(attribute("wall_s")),
        saved_s=_float(attribute("saved_s")) or 0.0,
        volume_id=attribute("volume_id") or str(report.get("volume_id") or ""),
        fingerprint=attribute("fingerprint"),
        settings_key=attribute("settings_key"),
        server=node.GetAttribute("MedPruner.Server") or "",
    )


def conversation(scene, volume_node) -> list[Turn]:
    """Every answered question about `volume_node`, oldest first."""
    if volume_node is None:
        return []
    return [_turn(r) for r in find_results(scene) if r.input_volume is volume_node]


def reuse_candidates(scene, volume_node, server_url: str, key: str) -> list[ReuseCandidate]:
    """Prepared volumes of `volume_node` on `server_url` with settings `key`, newest first."""
    turns = conversation(scene, volume_node)
    upload_of = {t.volume_id: t.upload_s for t in turns if t.volume_sent}   # the latest upload of each
    seen: set[tuple[str, str]] = set()
    candidates = []
    for turn in reversed(turns):
        if not turn.volume_id or not turn.fingerprint or turn.server != server_url or turn.settings_key != key:
            continue
        if (turn.volume_id, turn.fingerprint) in seen:
            continue
        seen.add((turn.volume_id, turn.fingerprint))
        candidates.append(ReuseCandidate(turn.volume_id, turn.fingerprint, upload_of.get(turn.volume_id, 0.0)))
    return candidates


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f} s"


def conversation_html(turns: list[Turn], current_answer=None, volume_name: str = "") -> str:
    """The answer panel's conversation: every question and answer, how long it took, what reuse saved.

    Each question links to its result as ``result:<answer node ID>``, for the panel to show it again.
    """
    if not turns:
        return ("<p><i>No question has been asked about this volume yet. Ask one: the next questions about "
                "it reuse its prepared visual tokens and are answered much faster.</i></p>")
    reused = [t for t in turns if t.prefix_reused]
    saved = sum(t.saved_s for t in turns)
    about = f" about <b>{html.escape(volume_name)}</b>" if volume_name else " about this volume"
    head = f"<p>{len(turns)} question{'s' if len(turns) != 1 else ''}{about}"
    if reused:
        head += (f"; {len(reused)} reused the prepared volume, saving <b>{saved:.1f} s</b> in all")
    items = []
    previous = None
    for turn in turns:
        notes = []
        if previous is not None and turn.fingerprint and previous.fingerprint and turn.fingerprint != previous.fingerprint:
            notes.append("the voxels changed since the previous question")
        if previous is not None and turn.settings_key and previous.settings_key and turn.settings_key != previous.settings_key:
            notes.append("new pruning or slicing settings")
        if turn.prefix_reused:
            how = "reused the prepared volume" + ("" if turn.volume_sent else ", volume not sent again")
            how += f", <b>{turn.saved_s:.1f} s saved</b>"
        else:
            how = "volume sent and prepared"
        timing = f"answered in {_seconds(turn.wall_s)}; {how}"
        if notes:
            timing += " (" + "; ".join(notes) + ")"
        question = f'<a href="result:{html.escape(turn.result.answer.GetID())}">{html.escape(turn.question)}</a>'
        if current_answer is not None and turn.result.answer is current_answer:
            question = f"<b>{question}</b>"
        items.append(f"<li>{question}<br>{html.escape(turn.answer)}<br><small>{timing}</small></li>")
        previous = turn
    return head + ".</p><ol>" + "".join(items) + "</ol>"
