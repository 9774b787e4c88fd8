"""Start and stop real `medpruner serve` processes on 127.0.0.1 for the server tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def reader_processes() -> list[int]:
    """Pids of volume reader processes (medpruner.server.read_child) still alive."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"medpruner.server.read_child" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class RunningServer:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, tmpdir: Path) -> None:
        self.proc, self.port, self.log, self.tmpdir = proc, port, log, tmpdir
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if self.client.get("/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start:\n" + self.log.read_text())
            time.sleep(0.2)

    def workspaces(self) -> list[Path]:
        return sorted(self.tmpdir.glob("medpruner-serve-*"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.client.close()


def start_server(model: Path, folder: Path, *extra: str, token: str | None = TOKEN, port: int | None = None,
                 wait: bool = True) -> RunningServer:
    """A server process whose temp folder (TMPDIR) is `folder`/tmp, logging to `folder`/serve.log."""
    port = port or free_port()
    tmpdir = folder / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    command = [sys.executable, "-m", "medpruner", "serve", "--model", str(model), "--port", str(port),
               "--dtype", "float32", *extra]
    if token:
        command += ["--token", token]
    env = dict(os.environ, TMPDIR=str(tmpdir))
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(proc, port, log, tmpdir)
    if wait:
        server.wait_ready()
    return server


@contextmanager
def running(model: Path, folder: Path, *extra: str, **kwargs):
    server = start_server(model, folder, *extra, **kwargs)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


def wait_state(client: httpx.Client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 120,
               headers=AUTH) -> dict:
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {status}")
