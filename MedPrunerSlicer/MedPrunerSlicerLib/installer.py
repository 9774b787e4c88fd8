"""Install the local server's Python packages without ever freezing Slicer.

Before Slicer 5.12 (no `slicer.packaging`), `slicer.util.pip_install` and the PyTorch extension's
`PyTorchUtilsLogic.installTorch` run pip on the main thread and only pump events between output
lines: Slicer looks hung for the minutes PyTorch takes. Here every step is a child process
(``python -m pip install ...``, `python` being PythonSlicer) started from a worker thread
(`job_runner.JobRunner`); pip's output lines and the current step are queued as events that the
main thread drains from its timer. Cancel ends the step's whole process tree. A failed step
raises `SettingsError` with the tail of pip's output as details and a hint chosen from it
(network/proxy, disk space, no version for this Python).

PyTorch: the wheel must match the machine (a CUDA build for the NVIDIA driver, else the CPU
build), which plain pip cannot choose. The PyTorch extension (SlicerPyTorch, PyTorchUtils.py)
solves it with light-the-torch: it pip-installs ``light-the-torch>=0.5``, then runs
``python -m light_the_torch install torch... torchvision...``, both on the main thread;
light-the-torch reads the driver version (nvidia-smi) and installs from the matching
download.pytorch.org index (CPU build without an NVIDIA driver). We run the same tool,
in child processes, with one change: light-the-torch patches pip's internals and therefore pins
pip (0.8.1 declares ``pip >=22.3,<26.1``), while Slicer 5.12 ships pip 26.1.1
(SuperBuild/External_python-pip.cmake), so installing it into Slicer's Python would downgrade
Slicer's pip. So light-the-torch and the pip it wants go into a private scratch folder
(``pip install --target``), and the torch step runs with that folder first on PYTHONPATH: it uses
its own pip, torch lands in Slicer's site-packages, Slicer's pip is untouched, and the folder is
deleted afterwards (checked with light-the-torch 0.8.1 in a scratch venv: a package installed
through it landed in the venv's site-packages, the venv's pip kept its version). The step calls
light-the-torch's console entry point and exits with its status: ``python -m light_the_torch``
drops pip's status (its __main__ calls main() without sys.exit) and exits 0 even when pip failed.
torchvision is not installed: the engine does not need it.

Qt-free, Python 3.9 syntax. Main thread: `install_plan`, `Installer.start/drain/cancel/status_text`;
the worker thread only runs `run_plan`.
"""
from __future__ import annotations

import collections
import importlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import JobCancelled, SettingsError
from .job_runner import JobContext, JobRunner
from .local_server import TORCH_REQUIREMENT, end_process_tree, new_process_group_options

__all__ = ["LTT_REQUIREMENT", "PIP_OPTIONS", "InstallStep", "Installer", "install_plan", "run_plan"]

#: the first light-the-torch that knows CUDA 13 drivers and pip 25-26.0 (0.8.0 stopped at pip 24.3).
LTT_REQUIREMENT = "light-the-torch>=0.8.1"
#: on every pip call: no prompt can block a child nobody sees, and the log has lines, not progress bars.
PIP_OPTIONS = ("--disable-pip-version-check", "--no-input", "--progress-bar", "off")
#: lines of pip's output kept for the error's details.
TAIL_LINES = 60
#: seconds a cancelled step gets to end before it is killed.
CANCEL_GRACE = 1.5
# light-the-torch's `ltt` entry point, run so that pip's exit status becomes the process's.
_LTT_MAIN = "import sys; from light_the_torch._cli import main; sys.exit(main())"


@dataclass(frozen=True)
class InstallStep:
    """One child process: `label` for the user, the `command`, folders put first on PYTHONPATH for this
    step only, and a `scratch` folder deleted once the whole plan has ended ('' = none)."""

    label: str
    command: tuple[str, ...]
    python_path: tuple[str, ...] = ()
    scratch: str = ""


def _name(requirement: str) -> str:
    for i, ch in enumerate(requirement):
        if ch in "<>=!~ ;[":
            return requirement[:i].strip()
    return requirement.strip()


def install_plan(python: str, missing_requirements: Sequence[str], torch_needed: bool,
                 tools_dir: str | None = None, pip_args: Sequence[str] = ()) -> list[InstallStep]:
    """The steps that install what is missing (empty list: nothing to do). Creates nothing but, when torch
    is needed and no `tools_dir` is given, a private temporary folder for light-the-torch.

    `python`: PythonSlicer; `missing_requirements`: requirement strings (``missing_requirements()``'s first
    items); `pip_args`: added to every pip call (e.g. ``["--proxy", "http://proxy:3128"]``, an index URL).
    """
    pip = (str(python), "-m", "pip", "install", *PIP_OPTIONS, *pip_args)
    steps: list[InstallStep] = []
    if torch_needed:
        scratch = "" if tools_dir else tempfile.mkdtemp(prefix="medpruner-ltt-")   # 0700: nothing can be planted
        tools = str(tools_dir or scratch)
        steps.append(InstallStep("Installing light-the-torch (it picks the PyTorch build for this computer)",
                                 (*pip, "--upgrade", "--target", tools, LTT_REQUIREMENT), scratch=scratch))
        steps.append(InstallStep("Installing PyTorch",
                                 (str(python), "-c", _LTT_MAIN, "install", *PIP_OPTIONS, *pip_args,
                                  TORCH_REQUIREMENT), python_path=(tools,), scratch=scratch))
    requirements = [str(r) for r in missing_requirements]
    if requirements:
        names = ", ".join(_name(r) for r in requirements)
        steps.append(InstallStep(f"Installing {names}", (*pip, *requirements)))
    return steps


# -- running the plan (worker thread) ----------------------------------------------------------------
_DISK = ("no space left on device", "errno 28", "not enough space on the disk", "disk quota exceeded")
_NETWORK = ("connectionerror", "connection refused", "failed to establish a new connection", "name resolution",
            "name or service not known", "getaddrinfo failed", "proxyerror", "tunnel connection failed",
            "read timed out", "connecttimeout", "sslerror", "certificate verify failed", "network is unreachable",
            "max retries exceeded", "could not fetch url")
_NO_VERSION = ("no matching distribution", "could not find a version")


def _failure_hint(output: str) -> str:
    """What the user should check, read from pip's own words."""
    text = output.lower()
    if any(marker in text for marker in _DISK):
        return ("The disk is full: free some space (PyTorch with CUDA takes several GB, and pip's download "
                "cache as much again) and try again.")
    if any(marker in text for marker in _NETWORK):
        return ("pip could not reach the package index: check the network connection and the proxy settings "
                "(pip reads HTTPS_PROXY and HTTP_PROXY, or pip.conf), then try again.")
    if any(marker in text for marker in _NO_VERSION):
        return ("pip found no version of a package for this Python and computer. Usually the package index "
                "could not be reached (check the network connection and proxy settings); otherwise this "
                "Slicer's Python is not supported by that package. The pip output names the package.")
    return ("Check the network connection (and proxy settings) and the free disk space, then try again; "
            "the pip output says which package failed.")


def _step_environment(env: Mapping[str, str] | None, step: InstallStep) -> dict[str, str]:
    result = dict(os.environ if env is None else env)
    result["PYTHONUNBUFFERED"] = "1"     # lines arrive while pip works, not when it ends
    result["PYTHONIOENCODING"] = "utf-8"
    if step.python_path:
        result["PYTHONPATH"] = os.pathsep.join([*step.python_path, *filter(None, [result.get("PYTHONPATH")])])
    return result


def _run_step(ctx: JobContext, step: InstallStep, env: Mapping[str, str] | None) -> None:
    """Run one step's child process to its end, streaming its lines; cancel ends its process tree."""
    ctx.emit("output", "> " + subprocess.list2cmdline(list(step.command)))
    try:
        process = subprocess.Popen(list(step.command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=_step_environment(env, step),
                                   **new_process_group_options())
    except OSError as exc:
        raise SettingsError(f"{step.label} could not start: {exc}.",
                            "Check that Slicer's Python (PythonSlicer) exists and runs; reinstalling Slicer repairs "
                            "it.", details=subprocess.list2cmdline(list(step.command))) from exc
    ctx.emit("process", process.pid)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)

    def read() -> None:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            tail.append(line)
            ctx.emit("output", line)

    reader = threading.Thread(target=read, name="MedPrunerSlicer pip output", daemon=True)
    reader.start()
    try:
        while process.poll() is None:
            if ctx.wait(0.1):
                end_process_tree(process.pid, CANCEL_GRACE, process)
                raise JobCancelled("The installation was cancelled.",
                                   "What was installed before stays installed; press Start local server again to "
                                   "install the rest.")
    finally:
        if process.poll() is None:   # an unexpected error in this loop: never leave pip behind
            end_process_tree(process.pid, CANCEL_GRACE, process)
        reader.join(5.0)   # the rest of the output; a grandchild holding the pipe open must not hang us
        if not reader.is_alive():
            process.stdout.close()
    if process.returncode != 0:
        output = "\n".join(tail)
        how = f"exit status {process.returncode}" if process.returncode > 0 else \
            f"ended by signal {-process.returncode}"
        raise SettingsError(f"{step.label} failed ({how}).", _failure_hint(output), details=output)


def run_plan(ctx: JobContext, plan: Sequence[InstallStep], env: Mapping[str, str] | None = None) -> int:
    """The job body: run the steps in order (worker thread). Events: ("step", (index, count, label)),
    ("output", line), ("process", pid). Returns the number of steps run; raises SettingsError or
    JobCancelled. Scratch folders are deleted at the end, whatever happened."""
    try:
        for index, step in enumerate(plan, 1):
            if ctx.cancelled:
                raise JobCancelled("The installation was cancelled.",
                                   "Press Start local server again to install what is missing.")
            ctx.emit("step", (index, len(plan), step.label))
            _run_step(ctx, step, env)
    finally:
        for folder in {step.scratch for step in plan if step.scratch}:
            shutil.rmtree(folder, ignore_errors=True)
    importlib.invalidate_caches()   # the new packages are found by the next requirements check
    return len(plan)


class Installer:
    """Runs one plan at a time on a worker thread; the main thread drains its events from a timer.

    ``start(plan, env, on_done=..., on_error=...)``, then call ``drain()`` every ~100 ms until it returns
    False; ``status_text()`` says what runs now and pip's last line; ``cancel()`` ends the running step.
    Callbacks run inside ``drain()``, on the caller's thread."""

    def __init__(self) -> None:
        self.runner = JobRunner()
        self.output: collections.deque = collections.deque(maxlen=5000)   # every line, for a log view
        self.step: tuple[int, int, str] | None = None

    @property
    def running(self) -> bool:
        return self.runner.running

    def start(self, plan: Sequence[InstallStep], env: Mapping[str, str] | None = None,
              on_done: Callable[[int], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None,
              on_step: Callable[[int, int, str], None] | None = None,
              on_output: Callable[[str], None] | None = None) -> None:
        """Start the plan in the background; `env` is the children's environment (None: this process's)."""
        steps = list(plan)
        base = None if env is None else dict(env)
        self.output.clear()
        self.step = None

        def on_event(kind: str, payload: Any) -> None:
            if kind == "step":
                self.step = payload
                if on_step is not None:
                    on_step(*payload)
            elif kind == "output":
                self.output.append(payload)
                if on_output is not None:
                    on_output(payload)

        self.runner.start(lambda ctx: run_plan(ctx, steps, base), on_event=on_event, on_done=on_done,
                          on_error=on_error)

    def drain(self) -> bool:
        """Deliver queued events to the callbacks (main thread). True while the plan runs."""
        return self.runner.drain()

    def cancel(self) -> None:
        """End the running step's process tree; the plan then ends with JobCancelled (through on_error)."""
        self.runner.cancel()

    def join(self, timeout: float | None = None) -> None:
        self.runner.join(timeout)

    def status_text(self) -> str:
        """e.g. "Installing PyTorch (2/3)" and pip's last line below it; '' before the first step."""
        if self.step is None:
            return ""
        index, count, label = self.step
        last = next((line for line in reversed(self.output) if line.strip()), "")
        return f"{label} ({index}/{count})" + (f"\n{last[:200]}" if last else "")
