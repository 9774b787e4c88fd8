"""Start local server, without Slicer: what this Slicer supports, the installs (real pip in child
processes), the server's environment, its process tree, and the server a crash left behind."""
from __future__ import annotations

import gc
import glob
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from MedPrunerSlicerLib import installer, local_server, support
from MedPrunerSlicerLib.errors import JobCancelled, SettingsError
from MedPrunerSlicerLib.installer import InstallStep, Installer, install_plan, run_plan
from MedPrunerSlicerLib.job_runner import JobRunner
from slicer_helpers import MODULE_DIR, REPO

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")


def _gone(pid: int) -> bool:
    """The process has ended (a zombie not yet reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return not status or status.startswith("Z")


def _wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pip_env() -> dict[str, str]:
    """This environment without pip settings, proxies or unbuffered output (the installer must add that)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PIP_") and "proxy" not in k.lower() and k != "PYTHONUNBUFFERED"}


# -- supported versions -----------------------------------------------------------------------------
@pytest.mark.parametrize("python, slicer, ok, words", [
    ((3, 9), (5, 8), False, ["Python 3.10", "Slicer (5.8)", "Python 3.9", "another computer", "Slicer 5.10"]),
    ((3, 9, 10, "final", 0), (5, 8, 1), False, ["Python 3.9"]),
    ((3, 12), (5, 10), True, ["Slicer 5.10", "Python 3.12"]),
    ((3, 12, 10, "final", 0), (5, 12, 3), True, ["Slicer 5.12"]),
    ((3, 12), None, True, ["Python 3.12"]),
    ((3, 9), None, False, ["this Python", "3.9"]),
    ((3, 10), (5, 9), True, ["Python 3.10"]),           # a custom build with a newer Python: Python decides
    ((3, 12), (5, 6), False, ["5.8 or newer"]),          # older than the panel itself
])
def test_local_server_support_rule_table(python, slicer, ok, words):
    verdict = support.local_server_support(python, slicer)
    assert verdict.ok is ok
    for word in words:
        assert word in verdict.message + " " + verdict.hint
    assert bool(verdict.hint) is (not ok)


def test_supported_versions_are_stated_once_and_agree_with_the_project():
    assert support.MIN_SLICER_PANEL == (5, 8)
    assert support.MIN_SLICER_LOCAL_SERVER == (5, 10)
    text = support.SUPPORTED_VERSIONS_TEXT
    for word in ("5.8", "5.10", "Python 3.9", "Python 3.12", "Python 3.10"):
        assert word in text
    pyproject = (REPO / "pyproject.toml").read_text().splitlines()
    major, minor = support.MIN_PYTHON_LOCAL_SERVER
    assert [line for line in pyproject if line.startswith("requires-python")] == [f'requires-python = ">={major}.{minor}"']
    assert support.local_server_support(sys.version_info, None).ok   # the Python running these tests can


def _python39() -> str | None:
    found = shutil.which("python3.9")
    if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
        return found
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    matches = sorted(glob.glob(os.path.join(root, "versions", "3.9*", "bin", "python3.9")))
    return matches[-1] if matches else None


def test_the_new_files_load_and_work_on_slicer_58s_python_39():
    python39 = _python39()
    if python39 is None:
        pytest.skip("no Python 3.9 interpreter here")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        "from MedPrunerSlicerLib import installer, local_server, support\n"
        "verdict = support.local_server_support(sys.version_info, (5, 8))\n"
        "assert not verdict.ok and 'Python 3.9' in verdict.message, verdict\n"
        "plan = installer.install_plan(sys.executable, ['x>=1'], True, tools_dir='/tools')\n"
        "assert len(plan) == 3\n"
        "assert local_server.server_environment({'PYTHONPATH': '/x'})['PYTHONUNBUFFERED'] == '1'\n"
        "print('ok')\n")
    result = subprocess.run([python39, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- the install plan -------------------------------------------------------------------------------
def test_install_plan_torch_through_a_private_light_the_torch_then_pip():
    missing = ["transformers>=5.5,<6", "fastapi>=0.110"]
    plan = install_plan("/slicer/bin/PythonSlicer", missing, True, tools_dir="/tools", pip_args=["--proxy", "p:3128"])
    assert [step.label for step in plan] == [
        "Installing light-the-torch (it picks the PyTorch build for this computer)",
        "Installing PyTorch", "Installing transformers, fastapi"]
    ltt, torch, rest = (step.command for step in plan)
    pip = ("/slicer/bin/PythonSlicer", "-m", "pip", "install", *installer.PIP_OPTIONS, "--proxy", "p:3128")
    assert ltt == (*pip, "--upgrade", "--target", "/tools", installer.LTT_REQUIREMENT)
    assert torch[:2] == ("/slicer/bin/PythonSlicer", "-c") and "sys.exit(main())" in torch[2]
    assert torch[3:] == ("install", *installer.PIP_OPTIONS, "--proxy", "p:3128", local_server.TORCH_REQUIREMENT)
    assert plan[1].python_path == ("/tools",) and plan[0].python_path == plan[2].python_path == ()
    assert rest == (*pip, *missing)
    assert not any(step.scratch for step in plan)          # the caller's folder is never deleted
    assert "--no-input" in installer.PIP_OPTIONS           # a prompt would block a child nobody sees
    assert install_plan("/py", [], False) == []
    assert [s.label for s in install_plan("/py", ["uvicorn>=0.29"], False)] == ["Installing uvicorn"]


@posix_only
def test_install_plan_scratch_folder_is_private_and_removed_after_the_plan(tmp_path):
    plan = install_plan(sys.executable, [], True)
    scratch = plan[0].scratch
    try:
        assert scratch and plan[1].scratch == scratch and plan[1].python_path == (scratch,)
        assert os.stat(scratch).st_mode & 0o077 == 0     # nobody else can plant a pip there
        steps = [InstallStep("uses the scratch folder", (sys.executable, "-c", "pass"), scratch=scratch)]
        runner = JobRunner()
        runner.start(lambda ctx: run_plan(ctx, steps, _pip_env()))
        while runner.drain():
            time.sleep(0.01)
        assert not os.path.exists(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_the_torch_step_exits_with_pips_status(tmp_path):
    """A stand-in light_the_torch whose main() returns 1 (as pip does on failure) must fail the step."""
    fake = tmp_path / "tools" / "light_the_torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "_cli.py").write_text("import sys\n\ndef main():\n    print('ltt', sys.argv[1:])\n    return 1\n")
    step = install_plan(sys.executable, [], True, tools_dir=str(tmp_path / "tools"))[1]
    runner, errors = JobRunner(), []
    runner.start(lambda ctx: run_plan(ctx, [step], _pip_env()), on_error=errors.append)
    while runner.drain():
        time.sleep(0.01)
    assert len(errors) == 1 and isinstance(errors[0], SettingsError), errors
    assert "ltt ['install'" in errors[0].details and "exit status 1" in errors[0].message


# -- running pip for real -----------------------------------------------------------------------------
@pytest.fixture()
def tiny_package(tmp_path):
    pytest.importorskip("setuptools")
    package = tmp_path / "tinypkg"
    package.mkdir()
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "medpruner-tinypkg"\nversion = "0.1"\n\n'
        '[tool.setuptools]\npy-modules = ["medpruner_tinypkg"]\n')
    (package / "medpruner_tinypkg.py").write_text("VALUE = 42\n")
    return package


def _drain(job, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while job.drain():
        assert time.monotonic() < deadline, "the install did not end"
        time.sleep(0.01)


def test_install_streams_pips_lines_while_it_runs_and_succeeds(tmp_path, tiny_package):
    go, target = tmp_path / "go", tmp_path / "site"
    # step 1 prints (no flush) and then waits for the test: its line must arrive while it still runs.
    waiter = InstallStep("Waiting", (sys.executable, "-c",
                                     "import os, sys, time\nprint('waiting for the go')\n"
                                     "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\n", str(go)))
    plan = [waiter, *install_plan(sys.executable, [str(tiny_package)], False,
                                  pip_args=["--no-index", "--no-build-isolation", "--target", str(target)])]
    job, steps, lines, done, errors = Installer(), [], [], [], []
    job.start(plan, _pip_env(), on_done=done.append, on_error=errors.append,
              on_step=lambda *step: steps.append(step), on_output=lines.append)
    _wait_until(lambda: job.drain() and "waiting for the go" in lines, 20, f"no live output: {lines}")
    assert job.running and not go.exists()
    assert job.status_text() == "Waiting (1/2)\nwaiting for the go"
    go.touch()
    _drain(job)
    assert errors == [] and done == [2]
    assert steps == [(1, 2, "Waiting"), (2, 2, f"Installing {tiny_package}")]
    assert any(line.startswith("Successfully installed medpruner-tinypkg-0.1") for line in lines), lines
    assert any(line.startswith("> ") and "--target" in line for line in lines)   # the command, for the log
    assert (target / "medpruner_tinypkg.py").read_text() == "VALUE = 42\n"
    assert job.status_text().startswith("Installing ") and "(2/2)" in job.status_text()
    assert list(job.output) == lines


def test_a_failing_pip_step_gives_pips_words_and_what_to_check(tmp_path):
    plan = install_plan(sys.executable, ["medpruner-no-such-package-xyz>=1"], False,
                        pip_args=["--no-index", "--target", str(tmp_path / "site")])
    plan.append(InstallStep("Never run", (sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')")))
    job, errors, done = Installer(), [], []
    job.start(plan, _pip_env(), on_done=done.append, on_error=errors.append)
    _drain(job)
    assert done == [] and len(errors) == 1
    error = errors[0]
    assert isinstance(error, SettingsError)
    assert error.message == "Installing medpruner-no-such-package-xyz failed (exit status 1)."
    assert "No matching distribution found for medpruner-no-such-package-xyz" in error.details
    assert "network" in error.hint and "proxy" in error.hint
    assert not (tmp_path / "ran").exists()          # the plan stops at the failed step


@pytest.mark.parametrize("output, words", [
    ("OSError: [Errno 28] No space left on device", "disk is full"),
    ("Failed to establish a new connection: [Errno -2] Name or service not known", "proxy settings"),
    ("ERROR: No matching distribution found for torch", "no version of a package"),
    ("something else went wrong", "free disk space"),
])
def test_the_hint_follows_pips_words(output, words):
    assert words in installer._failure_hint(output)


@posix_only
def test_cancel_ends_a_pip_blocked_on_a_silent_index_within_two_seconds(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    silent.settimeout(60)
    port = silent.getsockname()[1]
    plan = install_plan(sys.executable, ["medpruner-tinypkg"], False,
                        pip_args=["--index-url", f"http://127.0.0.1:{port}/simple", "--timeout", "60", "--retries", "0",
                                  "--target", str(tmp_path / "site")])
    runner, pids, errors = JobRunner(), [], []
    env = {**_pip_env(), "NO_PROXY": "127.0.0.1"}
    runner.start(lambda ctx: run_plan(ctx, plan, env), on_error=errors.append,
                 on_event=lambda kind, payload: pids.append(payload) if kind == "process" else None)
    try:
        connection, _address = silent.accept()
        connection.settimeout(30)
        request = b""
        while b"\r\n\r\n" not in request:            # pip asked for its index page and waits for an answer
            request += connection.recv(65536)
        assert request.startswith(b"GET /simple/medpruner-tinypkg/")
        runner.drain()
        assert runner.running and pids
        started = time.monotonic()
        runner.cancel()
        while runner.drain():
            time.sleep(0.01)
        assert time.monotonic() - started < 2.0
        assert len(errors) == 1 and isinstance(errors[0], JobCancelled), errors
        _wait_until(lambda: _gone(pids[0]), 1.0, "pip survived the cancel")
        connection.settimeout(2)
        assert connection.recv(65536) == b""           # its end of the connection closed with it
        connection.close()
    finally:
        silent.close()
        if pids and not _gone(pids[0]):
            os.kill(pids[0], 9)


@posix_only
def test_cancel_ends_the_steps_whole_process_tree(tmp_path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print('child', child.pid)\n"
              "time.sleep(60)\n")
    job, lines, errors = Installer(), [], []
    job.start([InstallStep("Blocking", (sys.executable, "-c", script))], _pip_env(), on_output=lines.append,
              on_error=errors.append)
    _wait_until(lambda: job.drain() and any(line.startswith("child ") for line in lines), 20, "no child")
    child = int(next(line for line in lines if line.startswith("child ")).split()[1])
    try:
        started = time.monotonic()
        job.cancel()
        _drain(job, 10)
        assert time.monotonic() - started < 2.0
        assert isinstance(errors[0], JobCancelled) and "cancelled" in errors[0].message
        _wait_until(lambda: _gone(child), 2.0, "the step's child process survived the cancel")
    finally:
        if not _gone(child):
            os.kill(child, 9)


# -- the server's environment and command --------------------------------------------------------------
def test_server_command_and_environment():
    cmd = local_server.server_command("/py", "/models/qwen", 9000)
    assert cmd == ["/py", "-m", "medpruner", "serve", "--model", "/models/qwen", "--host", "127.0.0.1",
                   "--port", "9000"]
    tiny = local_server.server_command("/py", local_server.TINY_MODEL, 9000, token_file="/t")
    assert tiny[1] == "-c" and tiny[-2:] == ["--token-file", "/t"]
    env = local_server.server_environment({"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(local_server.engine_dir()), "/x"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert (local_server.engine_dir() / "medpruner" / "__init__.py").exists()


@posix_only
def test_server_environment_keeps_the_users_and_drops_slicers_own(tmp_path, monkeypatch):
    """From a launcher-made environment (what os.environ is inside Slicer) only the user's values go on."""
    launcher = {
        "SLICER_HOME": "/opt/Slicer-5.10", "PYTHONHOME": "/opt/Slicer-5.10/lib/Python", "PYTHONNOUSERSITE": "1",
        "PATH": "/opt/Slicer-5.10/bin:/usr/local/bin:/usr/bin",
        "LD_LIBRARY_PATH": "/opt/Slicer-5.10/lib/Slicer-5.10:/usr/local/cuda/lib64",
        "PYTHONPATH": "/opt/Slicer-5.10/lib/Slicer-5.10/qt-scripted-modules:/home/me/lib",
        "QT_PLUGIN_PATH": "/opt/Slicer-5.10/lib/QtPlugins", "SSL_CERT_FILE": "/opt/Slicer-5.10/share/Slicer.crt",
        "ITK_AUTOLOAD_PATH": "/opt/Slicer-5.10/lib/ITKFactories", "LibraryPaths": "/opt/Slicer-5.10/lib",
        "APPLAUNCHER_LEVEL": "1", "PIP_REQUIRE_VIRTUALENV": "0", "QTWEBENGINE_DISABLE_SANDBOX": "1",
        "HOME": "/home/me", "HTTPS_PROXY": "http://proxy:3128", "HF_HOME": "/data/hf",
        "CUDA_VISIBLE_DEVICES": "1", "SLICER_OTHER": "/opt/Slicer-5.10-extensions/x",   # not inside SLICER_HOME
    }
    original = dict(launcher)
    env = local_server.server_environment(launcher)
    assert launcher == original                       # the caller's mapping is not changed
    assert env == {
        "PATH": "/usr/local/bin:/usr/bin", "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
        "PYTHONPATH": os.pathsep.join([str(local_server.engine_dir()), "/home/me/lib"]),
        "HOME": "/home/me", "HTTPS_PROXY": "http://proxy:3128", "HF_HOME": "/data/hf", "CUDA_VISIBLE_DEVICES": "1",
        "SLICER_OTHER": "/opt/Slicer-5.10-extensions/x", "PYTHONUNBUFFERED": "1"}
    # startupEnvironment() has no SLICER_HOME: the module may name it; the engine is never listed twice
    env = local_server.server_environment({"PATH": "/opt/S/bin:/bin", "PYTHONPATH": str(local_server.engine_dir())},
                                          slicer_home="/opt/S")
    assert env["PATH"] == "/bin" and env["PYTHONPATH"] == str(local_server.engine_dir())
    # Slicer's current folder is often inside its home: values that are not absolute paths stay as they are
    monkeypatch.chdir(tmp_path)
    env = local_server.server_environment({"CUDA_VISIBLE_DEVICES": "1", "MODE": "bin", "PATH": f"{tmp_path}/bin:/bin"},
                                          slicer_home=str(tmp_path))
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["MODE"] == "bin" and env["PATH"] == "/bin"


def test_missing_requirements_are_found_without_touching_anything():
    versions = {"transformers": "5.6.0", "tokenizers": "0.20.0"}

    def version_of(name):
        if name not in versions:
            raise LookupError(name)
        return versions[name]

    missing = dict(local_server.missing_requirements(["transformers>=5.5,<6", "tokenizers>=0.21", "uvicorn>=0.29"],
                                                     version_of))
    assert missing == {"tokenizers>=0.21": "0.20.0", "uvicorn>=0.29": None}


# -- the server process, its state file, and what a crash leaves behind -------------------------------
@posix_only
def test_stop_ends_the_whole_process_tree(tmp_path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    server = local_server.LocalServer(tmp_path)
    server.start([sys.executable, "-c", script])
    _wait_until(lambda: server.log_tail().strip(), 10, "the server printed nothing")
    child = int(server.log_tail().split()[0])
    assert server.is_running()
    server.stop(timeout=5)
    assert not server.is_running()
    _wait_until(lambda: _gone(child), 5, "the server's child process survived stop()")
    assert json.dumps(server.command)


# A stand-in for `medpruner serve`: listens on its port, starts a worker, says so, waits to be ended.
_FAKE_SERVER = (
    "import socket, subprocess, sys, time\n"
    "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
    "listener = socket.socket()\n"
    "listener.bind(('127.0.0.1', port))\n"
    "listener.listen(4)\n"
    "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "sys.stdout.write('listening %d\\n' % worker.pid)\n"
    "sys.stdout.flush()\n"
    "time.sleep(60)\n")


def _start_fake(server: local_server.LocalServer, port: int, *marks: str) -> int:
    """Start the stand-in through `server` (so the state file is written); returns its worker's pid."""
    server.start([sys.executable, "-c", _FAKE_SERVER, *marks, "--port", str(port)])
    _wait_until(lambda: server.log_tail().endswith("\n"), 20, f"the stand-in did not start: {server.log_tail()}")
    return int(server.log_tail().split()[1])


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _state(tmp_path: Path, port: int) -> Path:
    return tmp_path / local_server.STATE_FILE.format(port=port)


@posix_only
def test_the_state_file_records_the_running_server_and_stop_removes_it(tmp_path):
    port = _free_port()
    server = local_server.LocalServer(tmp_path)
    try:
        _start_fake(server, port, "medpruner", "serve")
        state = json.loads(_state(tmp_path, port).read_text())
        assert state["pid"] == server.process.pid and state["port"] == port == server.port
        assert state["command"] == server.command and state["owner"] == os.getpid()
        assert state["log"] == str(server.log_path) and abs(state["started"] - time.time()) < 60
        with pytest.raises(RuntimeError):
            server.prepare_port(port)               # ours is running: nothing to prepare
    finally:
        server.stop()
    assert not _state(tmp_path, port).exists()


@posix_only
@pytest.mark.parametrize("owner", ["a Slicer that died", "this Slicer, reloaded"])
def test_a_server_left_over_after_a_crash_is_ended_and_its_port_reused(tmp_path, owner):
    port = _free_port()
    crashed = local_server.LocalServer(tmp_path)
    worker = _start_fake(crashed, port, "medpruner", "serve")
    process = crashed.process
    leftover = process.pid
    if owner == "a Slicer that died":
        path = _state(tmp_path, port)
        path.write_text(json.dumps({**json.loads(path.read_text()), "owner": _dead_pid(), "owner_start": None}))
    del crashed            # the module that started it is gone (reloaded without Stop)
    gc.collect()
    try:
        assert not local_server.port_is_free(port)
        fresh = local_server.LocalServer(tmp_path)          # the next session: knows nothing but the folder
        started = time.monotonic()
        chosen, note = fresh.prepare_port(port)
        assert time.monotonic() - started < 4.0             # SIGTERM is enough: no wait for the kill timeout
        assert chosen == port
        assert f"process {leftover}, port {port}" in note and "was stopped" in note
        assert process.poll() is not None and _gone(worker)          # the whole tree, worker included
        assert local_server.port_is_free(port) and not _state(tmp_path, port).exists()
        assert fresh.prepare_port(port) == (port, "")                 # nothing left to say
    finally:
        local_server.end_process_tree(process.pid, 5, process)
        if not _gone(worker):
            os.kill(worker, 9)


@posix_only
def test_a_server_another_local_server_of_this_slicer_runs_is_left_alone(tmp_path):
    """The module's self-test makes its own logic (and LocalServer) while the user's server runs."""
    port = _free_port()
    users = local_server.LocalServer(tmp_path)
    try:
        _start_fake(users, port, "medpruner", "serve")
        chosen, note = local_server.LocalServer(tmp_path).prepare_port(port)
        assert users.is_running() and _state(tmp_path, port).exists()
        assert chosen != port and note.startswith(f"Port {port} is used by another program")
    finally:
        users.stop()


@posix_only
def test_a_live_process_that_is_not_our_server_is_never_ended(tmp_path):
    """The state file names a live process that holds the port but is not `medpruner serve` (pid reuse)."""
    port = _free_port()
    crashed = local_server.LocalServer(tmp_path)
    worker = _start_fake(crashed, port, "some", "other", "program")
    path = _state(tmp_path, port)
    path.write_text(json.dumps({**json.loads(path.read_text()), "owner": _dead_pid(), "owner_start": None}))
    try:
        chosen, note = local_server.LocalServer(tmp_path).prepare_port(port)
        assert crashed.is_running() and not _gone(worker)
        assert chosen != port and local_server.port_is_free(chosen)
        assert note == f"Port {port} is used by another program; the local server uses port {chosen} instead."
        assert not path.exists()                                     # a stale record is dropped
    finally:
        crashed.stop()


@posix_only
def test_the_server_of_another_running_slicer_is_left_alone(tmp_path):
    port = _free_port()
    other_slicer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    theirs = local_server.LocalServer(tmp_path)
    try:
        _start_fake(theirs, port, "medpruner", "serve")
        path = _state(tmp_path, port)
        path.write_text(json.dumps({**json.loads(path.read_text()), "owner": other_slicer.pid,
                                    "owner_start": local_server._process_start(other_slicer.pid)}))
        chosen, note = local_server.LocalServer(tmp_path).prepare_port(port)
        assert theirs.is_running() and path.exists()
        assert chosen != port and f"Port {port} is used by" in note
    finally:
        theirs.stop()
        other_slicer.kill()
        other_slicer.wait()


def test_a_foreign_listener_gets_another_port_and_a_message(tmp_path):
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(1)
        port = foreign.getsockname()[1]
        chosen, note = local_server.LocalServer(tmp_path).prepare_port(port)
        assert chosen != port and local_server.port_is_free(chosen)
        assert note == f"Port {port} is used by another program; the local server uses port {chosen} instead."
        with socket.create_connection(("127.0.0.1", port), timeout=2):   # the other program is untouched
            pass
    free = _free_port()
    assert local_server.LocalServer(tmp_path).prepare_port(free) == (free, "")


class _Health(http.server.BaseHTTPRequestHandler):
    reply: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = json.dumps(self.reply).encode() if self.path == "/v1/health" else b"{}"
        self.send_response(200 if self.path == "/v1/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("reply, ours", [
    ({"status": "ok", "model_id": "tiny", "model_family": "qwen3_vl", "version": "0.1.0"}, True),
    ({"status": "ok"}, False),                          # some other service's health check
])
def test_without_proc_the_health_reply_tells_our_server(tmp_path, monkeypatch, reply, ours):
    monkeypatch.setattr(local_server, "_PROC", tmp_path / "no-proc")   # as on macOS and Windows
    handler = type("Health", (_Health,), {"reply": reply})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert local_server._is_medpruner_server(os.getpid(), httpd.server_address[1]) is ours
        assert local_server._is_medpruner_server(os.getpid(), None) is False
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_pip_is_held_to_the_packages_slicer_ships(tmp_path, tiny_package):
    """The constraints file pins Slicer's numpy at its installed version, and real pip (a dry run resolving
    against this environment) accepts it for a package that needs numpy and honours it."""
    import numpy

    from MedPrunerSlicerLib.local_server import SLICER_BUNDLED, bundled_constraints

    pins = bundled_constraints()
    assert f"numpy=={numpy.__version__}" in pins and len(pins) == len(SLICER_BUNDLED)
    assert bundled_constraints(["numpy>=1", "no-such-package-xyz>=1"]) == [f"numpy=={numpy.__version__}"]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    needs_numpy = tmp_path / "needs-numpy"
    shutil.copytree(tiny_package, needs_numpy)
    pyproject = needs_numpy / "pyproject.toml"
    major = int(numpy.__version__.split(".")[0])

    def dry_run(requirement: str) -> subprocess.CompletedProcess:
        pyproject.write_text(pyproject.read_text().split("dependencies")[0].replace(
            'version = "0.1"\n', f'version = "0.1"\ndependencies = ["{requirement}"]\n', 1))
        return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                               "--disable-pip-version-check", "--constraint", str(constraints), str(needs_numpy)],
                              capture_output=True, text=True, env=_pip_env(), timeout=120)

    allowed = dry_run(f"numpy>={major}")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "Would install medpruner-tinypkg-0.1" in allowed.stdout and "numpy" not in allowed.stdout.split("Would")[-1]
    constraints.write_text("numpy==0.0.1\n")   # the file is read: a pin the environment cannot meet fails
    assert dry_run(f"numpy>={major}").returncode != 0
