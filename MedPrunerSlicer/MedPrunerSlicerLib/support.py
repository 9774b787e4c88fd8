"""Which Slicer can do what, decided before anything is downloaded or installed.

The panel itself only talks HTTP with the standard library, so it runs in every supported
Slicer. The local server runs the bundled engine in Slicer's own Python, and that needs
Python 3.10 or newer: transformers 5 dropped Python 3.9 (its current releases ask for 3.11+),
and the engine uses 3.10 language and library features (`itertools.pairwise`). Slicer 5.8 ships
Python 3.9.10, Slicer 5.10 and 5.12 ship Python 3.12.10 (Slicer_REQUIRED_PYTHON_VERSION in
Slicer's top-level CMakeLists.txt at tags v5.8.1, v5.10.0, v5.12.0). The Python version is what
decides, so a custom Slicer build with a newer Python also works; the Slicer version only makes
the message clearer. Pure Python, no Qt: this file is loaded by Slicer 5.8 too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIN_PYTHON_LOCAL_SERVER", "MIN_SLICER_LOCAL_SERVER", "MIN_SLICER_PANEL", "SUPPORTED_VERSIONS_TEXT",
           "Support", "local_server_support"]

#: the oldest Slicer the panel is written and tested for (Python 3.9 syntax in the module and its Lib).
MIN_SLICER_PANEL = (5, 8)
#: the oldest Slicer release whose Python can run the local server (5.10 ships Python 3.12).
MIN_SLICER_LOCAL_SERVER = (5, 10)
#: what the engine and its dependencies need (pyproject's requires-python).
MIN_PYTHON_LOCAL_SERVER = (3, 10)

#: one paragraph for the README and the module's help.
SUPPORTED_VERSIONS_TEXT = (
    "MedPruner works in 3D Slicer 5.8 and newer with a MedPruner server that runs elsewhere (another computer, "
    "or one you start yourself), which is all the panel needs. Start local server, which runs the server "
    "inside Slicer's own Python, needs Slicer 5.10 or newer: the server needs Python 3.10 or newer, and "
    "Slicer 5.8 ships Python 3.9 while Slicer 5.10 and 5.12 ship Python 3.12. On Slicer 5.8, run the server "
    "on a GPU computer and enter its address under Server."
)


@dataclass(frozen=True)
class Support:
    """A verdict: `ok`, a `message` saying what this Slicer can do, and a `hint` (what to do instead)."""

    ok: bool
    message: str
    hint: str = ""


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(int(part)) for part in version[:2])


def local_server_support(python_version: Sequence[int],
                         slicer_version: Sequence[int] | None = None) -> Support:
    """Can Start local server work here? `python_version`: e.g. ``sys.version_info[:2]``; `slicer_version`:
    ``(slicer.app.majorVersion, slicer.app.minorVersion)``, or None outside Slicer."""
    python = tuple(int(part) for part in python_version[:2])
    slicer = None if slicer_version is None else tuple(int(part) for part in slicer_version[:2])
    this = f"this Slicer ({_dotted(slicer)})" if slicer is not None else "this Python"
    if slicer is not None and slicer < MIN_SLICER_PANEL:
        return Support(False, f"MedPruner needs 3D Slicer {_dotted(MIN_SLICER_PANEL)} or newer; {this} is older.",
                       f"Install Slicer {_dotted(MIN_SLICER_LOCAL_SERVER)} or newer from download.slicer.org.")
    if python < MIN_PYTHON_LOCAL_SERVER:
        return Support(False,
                       f"Start local server needs Python {_dotted(MIN_PYTHON_LOCAL_SERVER)} or newer; {this} has "
                       f"Python {_dotted(python)}.",
                       f"Run the MedPruner server on another computer and enter its address under Server, or use "
                       f"Slicer {_dotted(MIN_SLICER_LOCAL_SERVER)} or newer to start a local server.")
    where = f"Slicer {_dotted(slicer)}, " if slicer is not None else ""
    return Support(True, f"Start local server can run here ({where}Python {_dotted(python)}).")
