"""The "Start local server" path: what it needs, how it is started, how it is stopped.

Packaging choice: the engine package `medpruner/` ships inside the extension, next to this
module (listed file by file in the module's CMakeLists), and the server runs from that bundled
source: ``PythonSlicer -m medpruner serve ...`` with the module directory first on PYTHONPATH.
So the engine that answers is always the version that came with the panel, nothing of ours is
pip-installed, and uninstalling the extension removes it. Only third-party packages are installed:
torch through the PyTorch extension's installer (it picks the CUDA build for the machine), the
rest with pip (`ENGINE_REQUIREMENTS`). Packages Slicer bundles (`SLICER_BUNDLED`) are never
installed or upgraded; if one is too old the user is told instead.

The server is a child process in its own process group/session, so Stop (or quitting Slicer)
ends it together with any worker processes it started. Its output goes to a log file the user
can open. Qt-free: uses subprocess; the widget polls `is_running()` and the server's health.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ENGINE_REQUIREMENTS", "SLICER_BUNDLED", "TINY_MODEL", "TORCH_REQUIREMENT", "LocalServer", "engine_dir",
           "missing_requirements", "server_command", "server_environment"]

#: installed with pip when missing (the engine's and its server's dependencies, torch apart).
ENGINE_REQUIREMENTS = (
    "transformers>=5.5,<6",
    "tokenizers>=0.21",
    "pillow>=10",
    "matplotlib>=3.8",
    "jinja2>=3.1",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "python-multipart>=0.0.18",
)
#: shipped with Slicer: checked, never installed or upgraded.
SLICER_BUNDLED = ("numpy>=1.26", "SimpleITK>=2.3", "pydicom>=2.4")
#: through the PyTorch extension (PyTorchUtils), which chooses the CUDA/CPU build.
TORCH_REQUIREMENT = "torch>=2.4,<3"


#: model "name" meaning the tiny demo checkpoint (random weights), built in the server process on first use.
TINY_MODEL = "tiny"

# Runs `medpruner serve` after building the tiny checkpoint, so the GUI never waits for the build.
_TINY_LAUNCHER = (
    "import sys\n"
    "from medpruner.tiny import ensure_tiny_checkpoint\n"
    "from medpruner.cli import main\n"
    "args = sys.argv[1:]\n"
    "args[args.index('--model') + 1] = str(ensure_tiny_checkpoint())\n"
    "sys.exit(main(args))\n"
)


def engine_dir() -> Path:
    """The directory that contains the bundled `medpruner` package (the module's directory)."""
    return Path(__file__).resolve().parent.parent


def _split(requirement: str) -> tuple[str, str]:
    for i, ch in enumerate(requirement):
        if ch in "<>=!~ ;[":
            return requirement[:i].strip(), requirement[i:].strip()
    return requirement.strip(), ""


def missing_requirements(requirements, version_of=None) -> list[tuple[str, str | None]]:
    """(requirement, installed version or None) for each requirement that is not satisfied."""
    from importlib import metadata

    version_of = version_of or metadata.version
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging ships with pip/Slicer
        SpecifierSet = None
    missing = []
    for requirement in requirements:
        name, spec = _split(requirement)
        try:
            installed = version_of(name)
        except Exception:  # noqa: BLE001 - PackageNotFoundError and friends
            missing.append((requirement, None))
            continue
        if spec and SpecifierSet is not None and not SpecifierSet(spec).contains(installed, prereleases=True):
            missing.append((requirement, installed))
    return missing


def server_command(python: str, model: str, port: int, host: str = "127.0.0.1", token_file: str | None = None,
                   device: str = "auto") -> list[str]:
    """The command line of the local server (loopback only unless told otherwise)."""
    launcher = ["-c", _TINY_LAUNCHER] if model == TINY_MODEL else ["-m", "medpruner"]
    command = [python, *launcher, "serve", "--model", model, "--host", host, "--port", str(int(port))]
    if device and device != "auto":
        command += ["--device", device]
    if token_file:
        command += ["--token-file", token_file]
    return command


def server_environment(base: dict | None = None) -> dict[str, str]:
    """The child's environment: the bundled engine first on PYTHONPATH, unbuffered output for the log."""
    env = dict(os.environ if base is None else base)
    path = str(engine_dir())
    env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalServer:
    """One server child process and its log file."""

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []

    def start(self, command: list[str], env: dict[str, str] | None = None) -> None:
        if self.is_running():
            raise RuntimeError("The local server is already running.")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"medpruner-server-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes to it after we return
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True   # its own process group: stop() ends the whole tree
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=str(self.log_dir), **kwargs)
        finally:
            log.close()   # the child holds its own handle
        self.command = list(command)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """End the server and every process it started (terminate, then kill after `timeout`)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
        else:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            if sys.platform != "win32":
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(timeout)

    def log_tail(self, max_chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-max_chars:]
        return data.decode("utf-8", "replace")
