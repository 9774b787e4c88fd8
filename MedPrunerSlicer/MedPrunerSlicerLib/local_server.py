"""The "Start local server" path: what it needs, how it is started, how it is stopped.

Packaging choice: the engine package `medpruner/` ships inside the extension, next to this
module (listed file by file in the module's CMakeLists), and the server runs from that bundled
source: ``PythonSlicer -m medpruner serve ...`` with the module directory first on PYTHONPATH.
So the engine that answers is always the version that came with the panel, nothing of ours is
pip-installed, and uninstalling the extension removes it. Only third-party packages are installed
(`installer.py`: torch through light-the-torch, which picks the CUDA build for the machine, the
rest with pip, `ENGINE_REQUIREMENTS`), in child processes. Packages Slicer bundles
(`SLICER_BUNDLED`) are never installed or upgraded; if one is too old the user is told instead.

Environment: the child gets the environment Slicer was STARTED with
(``slicer.util.startupEnvironment()``, a dict without the launcher's values), not the GUI
process's ``os.environ``: PythonSlicer is itself a launcher and adds Slicer's own settings again,
so passing them twice (or stale ones) only risks mixing two Slicer installs. `server_environment`
also drops the launcher's variables and Slicer's own path entries if the caller passed
``os.environ`` anyway.

The server is a child process in its own process group/session, so Stop (or quitting Slicer)
ends it together with any worker processes it started. Its output goes to a log file the user
can open. A small state file next to the logs records the running server (pid, port, start
time, command): after a crash of Slicer the server may live on and hold the port, and the next
`prepare_port` finds it there, checks it is really our server, and ends it. Qt-free: uses
subprocess; the widget polls `is_running()` and the server's health.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["bundled_constraints", "ENGINE_REQUIREMENTS", "SLICER_BUNDLED", "SLICER_LAUNCHER_VARIABLES", "STATE_FILE", "TINY_MODEL",
           "TORCH_REQUIREMENT", "LocalServer", "end_process_tree", "engine_dir", "missing_requirements",
           "port_is_free", "server_command", "server_environment"]

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
#: through light-the-torch (installer.py), which chooses the CUDA/CPU build.
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


def bundled_constraints(requirements=SLICER_BUNDLED, version_of=None) -> list[str]:
    """``name==installed`` for each package Slicer ships that is installed: given to pip as a constraints
    file, so installing the server's packages can never upgrade or downgrade Slicer's own numpy/SimpleITK."""
    from importlib import metadata

    version_of = version_of or metadata.version
    pins = []
    for requirement in requirements:
        name, _spec = _split(requirement)
        try:
            pins.append(f"{name}=={version_of(name)}")
        except Exception:  # noqa: BLE001 - not installed: nothing to protect
            continue
    return pins


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


#: Variables only the Slicer launcher sets (SlicerBlockCTKAppLauncherSettings.cmake, External_python*.cmake).
#: PythonSlicer sets them again for the server, so a copy from the GUI process is never passed on.
SLICER_LAUNCHER_VARIABLES = ("SLICER_HOME", "PYTHONHOME", "PYTHONNOUSERSITE", "ITK_AUTOLOAD_PATH", "LibraryPaths",
                             "QTWEBENGINE_DISABLE_SANDBOX", "PIP_REQUIRE_VIRTUALENV", "PIP_DISABLE_PIP_VERSION_CHECK")
_LAUNCHER_PREFIXES = ("APPLAUNCHER_",)


def _inside(path: str, folder: str) -> bool:
    """True when `path` is `folder` or below it (case-insensitive where the OS is). Only absolute paths count:
    a value such as "1" or "http" must not be read relative to the current folder."""
    if not folder or not os.path.isabs(path):
        return False
    path = os.path.normcase(os.path.abspath(path))
    folder = os.path.normcase(os.path.abspath(folder))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def server_environment(base: Mapping[str, str] | None = None, slicer_home: str | None = None) -> dict[str, str]:
    """The child's environment, built from `base`: inside Slicer pass ``slicer.util.startupEnvironment()``
    (the environment Slicer was started with); None means this process's ``os.environ`` (tests, scripts).

    The launcher's own variables are dropped, and so is every value or path entry inside `slicer_home`
    (default: the base's SLICER_HOME), so nothing of the GUI process's Slicer setup leaks into the child.
    The bundled engine goes first on PYTHONPATH; output is unbuffered so the log is live. `base` is not changed.
    """
    source = dict(os.environ if base is None else base)
    home = slicer_home or source.get("SLICER_HOME", "")
    fold = str.upper if os.name == "nt" else str   # Windows variable names ignore case
    dropped = {fold(name) for name in SLICER_LAUNCHER_VARIABLES}
    env: dict[str, str] = {}
    for name, value in source.items():
        if not name or fold(name) in dropped or name.upper().startswith(_LAUNCHER_PREFIXES):
            continue
        entries = value.split(os.pathsep)
        kept = [entry for entry in entries if not _inside(entry, home)]
        if len(kept) == len(entries):
            env[name] = value          # untouched, byte for byte (URLs with ':' included)
        elif any(kept):
            env[name] = os.pathsep.join(kept)
    engine = str(engine_dir())
    path_key = next((k for k in env if fold(k) == fold("PYTHONPATH")), "PYTHONPATH")
    others = [entry for entry in env.pop(path_key, "").split(os.pathsep) if entry and not _same_path(entry, engine)]
    env[path_key] = os.pathsep.join([engine, *others])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _same_path(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


# -- processes --------------------------------------------------------------------------------------
def new_process_group_options() -> dict:
    """Popen options that put the child in its own process group, so its whole tree can be ended."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {"start_new_session": True}


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (Linux), None elsewhere or when gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), to tell a process from a later one with its pid."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    """True while `pid` is a running process (a zombie counts as ended)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":   # os.kill(pid, 0) would TERMINATE the process on Windows
        found = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/FO", "CSV", "/NH"], capture_output=True,
                               text=True, check=False).stdout
        return f'"{pid}"' in found
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[0] == "Z")


def end_process_tree(pid: int, timeout: float = 5.0, process: subprocess.Popen | None = None) -> None:
    """End `pid` and every process of its group: SIGTERM (time to clean up), SIGKILL after `timeout` seconds.
    `process`: the Popen object when `pid` is our child (it is then reaped too). Windows: taskkill /T /F."""
    def gone(seconds: float) -> bool:
        if process is not None:
            try:
                process.wait(seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + seconds
        while _alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    if sys.platform == "win32":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        gone(timeout)
        return
    try:
        group = pid if os.getpgid(pid) == pid else None   # ours are session leaders: group id == pid
    except ProcessLookupError:
        gone(0)
        return

    def send(sig: int) -> None:
        try:
            if group is not None:
                os.killpg(group, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    if not gone(timeout):
        send(signal.SIGKILL)
        gone(timeout)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on host:port now (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if os.name != "nt":   # a port whose last connections are in TIME_WAIT is free for uvicorn too
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    # Windows lets a specific address be bound while another program listens on 0.0.0.0: ask the port too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, int(port))) != 0


def _free_port_near(preferred: int, host: str = "127.0.0.1") -> int:
    """The first free port after `preferred` (easy to read and type), else one the OS picks."""
    for port in range(preferred + 1, min(preferred + 50, 65536)):
        if port_is_free(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _wait_port_free(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _health_is_medpruner(port: int, timeout: float = 1.0) -> bool:
    """True when a MedPruner server answers GET /v1/health on 127.0.0.1:port (no proxy, short timeout)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via HTTP(S)_PROXY
    try:
        with opener.open(f"http://127.0.0.1:{int(port)}/v1/health", timeout=timeout) as reply:
            info = json.loads(reply.read(65536).decode("utf-8"))
    except Exception:  # noqa: BLE001 - refused, timeout, not HTTP, not JSON: not ours
        return False
    return isinstance(info, dict) and info.get("status") == "ok" and "model_family" in info and "version" in info


def _is_medpruner_server(pid: int, port: int | None, started: str | None = None) -> bool:
    """Is the live process `pid` a `medpruner serve` (its command line on Linux, its /v1/health elsewhere)?"""
    cmdline = _PROC / str(pid) / "cmdline"
    if _PROC.is_dir():
        try:
            argv = [a.decode("utf-8", "replace") for a in cmdline.read_bytes().split(b"\0") if a]
        except OSError:
            return False
        if started is not None and _process_start(pid) != started:
            return False   # the pid now belongs to a later process
        return "serve" in argv and any("medpruner" in arg for arg in argv)
    return port is not None and _health_is_medpruner(port)


_PROC = Path("/proc")
#: state files of running servers, one per port, in the log folder (glob: STATE_FILE.format(port="*")).
STATE_FILE = "medpruner-server-port{port}.json"


def _port_of(command: Sequence[str]) -> int | None:
    try:
        return int(command[list(command).index("--port") + 1])
    except (ValueError, IndexError):
        return None


class LocalServer:
    """One server child process, its log file and its state file."""

    # every LocalServer of this process: a server one of them runs is never a leftover (e.g. the self-test's)
    _instances: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.port: int | None = None
        LocalServer._instances.add(self)

    # -- start / stop ------------------------------------------------------------------------------
    def start(self, command: list[str], env: Mapping[str, str] | None = None, port: int | None = None) -> None:
        """Start the server (returns at once). `port` defaults to the command's --port; it names the state file."""
        if self.is_running():
            raise RuntimeError("The local server is already running.")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"medpruner-server-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes to it after we return
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=None if env is None else dict(env), cwd=str(self.log_dir),
                                            **new_process_group_options())
        finally:
            log.close()   # the child holds its own handle
        self.command = list(command)
        self.port = int(port) if port is not None else _port_of(command)
        self._write_state()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """End the server and every process it started (terminate, then kill after `timeout`)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            end_process_tree(process.pid, timeout, process)
        state = self._read_state(self._state_path(self.port))
        if state is not None and state.get("pid") == process.pid:
            self._state_path(self.port).unlink(missing_ok=True)

    def log_tail(self, max_chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-max_chars:]
        return data.decode("utf-8", "replace")

    # -- the state file and what a crash left behind -----------------------------------------------
    def _state_path(self, port: int | None) -> Path:
        return self.log_dir / STATE_FILE.format(port="unknown" if port is None else int(port))

    def _write_state(self) -> None:
        """Record the running server, so a later session can find it if Slicer dies without stopping it."""
        assert self.process is not None
        state = {"pid": self.process.pid, "pid_start": _process_start(self.process.pid), "port": self.port,
                 "started": time.time(), "command": self.command, "log": str(self.log_path),
                 "owner": os.getpid(), "owner_start": _process_start(os.getpid())}
        path = self._state_path(self.port)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(state, indent=1))
        os.replace(partial, path)   # never a half-written file

    @staticmethod
    def _read_state(path: Path) -> dict | None:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("pid"), int) else None

    @staticmethod
    def _owner_alive(state: dict) -> bool:
        """True when whoever started the server still has it: another running Slicer, or a LocalServer object of
        this process. A server of this process that no LocalServer holds any more (the module was reloaded
        without stopping it) is a leftover, like one whose Slicer died."""
        owner = state.get("owner")
        if owner == os.getpid():
            return any(server.process is not None and server.process.pid == state["pid"] and server.is_running()
                       for server in list(LocalServer._instances))
        if not isinstance(owner, int):
            return False
        if not _alive(owner):
            return False
        recorded = state.get("owner_start")
        return recorded is None or _process_start(owner) in (None, recorded)

    def stop_leftovers(self, timeout: float = 5.0) -> list[str]:
        """End every server of this log folder whose Slicer is gone (a crash, a kill, a module reload).

        A server is ended only when its pid is alive AND is really a `medpruner serve` (command line on Linux,
        /v1/health elsewhere); a server whose Slicer still runs (another Slicer window) is left alone. Stale
        state files are removed. Returns one sentence per server ended (or that could not be). Blocks up to about
        `timeout` seconds per leftover (usually well under a second)."""
        notes: list[str] = []
        for path in sorted(self.log_dir.glob(STATE_FILE.format(port="*"))):
            state = self._read_state(path)
            if state is None:
                path.unlink(missing_ok=True)
                continue
            pid, port = state["pid"], state.get("port")
            if not _alive(pid) or not _is_medpruner_server(pid, port, state.get("pid_start")):
                path.unlink(missing_ok=True)   # gone, or the pid now belongs to another program
                continue
            if self._owner_alive(state):
                continue   # another Slicer's, or another LocalServer's of this Slicer: not ours to stop
            try:
                end_process_tree(pid, timeout)
            except OSError as exc:   # e.g. another user's process
                notes.append(f"A MedPruner server left over from an earlier session (process {pid}, port {port}) "
                             f"could not be stopped: {exc}.")
                continue
            path.unlink(missing_ok=True)
            notes.append(f"A MedPruner server left over from an earlier session (process {pid}, port {port}) "
                         f"was stopped.")
        return notes

    def prepare_port(self, preferred: int, timeout: float = 5.0) -> tuple[int, str]:
        """The port to start the server on, and a sentence for the user ('' when nothing happened).

        Ends leftover servers first (`stop_leftovers`); then, if `preferred` is still taken by another
        program (or another Slicer's server), picks the next free port and says so. Call it right before
        `start`; it returns at once in the usual case and blocks for at most a few seconds when a leftover
        must be ended."""
        if self.is_running():
            raise RuntimeError("The local server is already running.")
        preferred = int(preferred)
        notes = self.stop_leftovers(timeout)
        if notes and not port_is_free(preferred):
            _wait_port_free(preferred, 3.0)   # the kernel releases the ended server's socket
        if port_is_free(preferred):
            return preferred, " ".join(notes)
        port = _free_port_near(preferred)
        holder = "another MedPruner server (not started here)" if _health_is_medpruner(preferred) else \
            "another program"
        notes.append(f"Port {preferred} is used by {holder}; the local server uses port {port} instead.")
        return port, " ".join(notes)
