"""What a server leaves behind: nothing, on every exit it controls; its dead predecessors' folders, swept.

Real `medpruner serve` processes with their own TMPDIR, stopped the ways the Slicer module and a
user stop them (SIGTERM, SIGINT) and the way a crash does (SIGKILL).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from medpruner.phantom import make_phantom_ct
from server_helpers import AUTH, reader_processes, running, start_server, wait_state

LONG = {"question": "Describe everything.", "max_new_tokens": 2048, "compare": True}


@pytest.fixture(scope="module")
def volume_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("vol") / "ct.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(8, 48, 48)), str(path), True)
    return path.read_bytes()


def _submit(client, data: bytes, params: dict):
    return client.post("/v1/jobs", files={"volume": ("v.nrrd", data)}, data={"params": json.dumps(params)},
                       headers=AUTH)


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_job_stops_the_server_and_deletes_every_file(tiny_qwen3_vl, tmp_path, volume_bytes, sig):
    server = start_server(tiny_qwen3_vl, tmp_path, "--max-queue", "4")
    (workspace,) = server.workspaces()
    running_job = _submit(server.client, volume_bytes, LONG).json()["job_id"]
    wait_state(server.client, running_job, states=("running",))
    queued = _submit(server.client, volume_bytes, {"question": "Q?"})
    assert queued.status_code == 202
    assert any((workspace / "uploads").iterdir()), "the queued job holds its upload on disk"
    started = time.monotonic()
    code = server.stop(sig, timeout=30)
    assert code == 0, server.log.read_text()
    assert time.monotonic() - started < 5, "the Slicer module kills a server that takes more than 5 s"
    assert _files_under(server.tmpdir) == [], _files_under(server.tmpdir)
    log = server.log.read_text()
    assert "files are deleted" in log
    assert f"job {running_job} cancelled" in log, "the running job must be stopped, not abandoned"


def test_sigterm_while_the_model_loads_leaves_nothing(tiny_qwen3_vl, tmp_path):
    server = start_server(tiny_qwen3_vl, tmp_path, wait=False)
    deadline = time.time() + 60
    while not server.workspaces() and time.time() < deadline:
        time.sleep(0.01)
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    assert _files_under(server.tmpdir) == []


def test_a_killed_servers_folder_is_swept_by_the_next_server(tiny_qwen3_vl, tmp_path, volume_bytes):
    first = start_server(tiny_qwen3_vl, tmp_path)
    job = _submit(first.client, volume_bytes, LONG).json()["job_id"]
    wait_state(first.client, job, states=("running",))
    first.stop(signal.SIGKILL)
    (left,) = first.workspaces()
    assert (left / "owner.json").exists()
    # Another live process's folder, and one without a marker but fresh, must survive the sweep.
    alive = tmp_path / "tmp" / "medpruner-serve-alive"
    alive.mkdir()
    (alive / "owner.json").write_text(json.dumps({"pid": os.getpid(), "start_time": None}))
    fresh = tmp_path / "tmp" / "medpruner-serve-fresh"
    fresh.mkdir()
    stale = tmp_path / "tmp" / "medpruner-serve-stale"
    stale.mkdir()
    (stale / "patient.dcm").write_bytes(b"PatientName^Canary")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    with running(tiny_qwen3_vl, tmp_path) as second:
        assert not left.exists() and not stale.exists()
        assert alive.exists() and fresh.exists()
        assert len(second.workspaces()) == 3   # its own, alive, fresh
    assert "did not stop cleanly" in second.log.read_text()


def test_a_busy_port_is_refused_before_the_model_loads(tiny_qwen3_vl, tmp_path):
    with running(tiny_qwen3_vl, tmp_path / "a") as first:
        proc = subprocess.run([sys.executable, "-m", "medpruner", "serve", "--model", str(tiny_qwen3_vl),
                               "--port", str(first.port)], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, TMPDIR=str(first.tmpdir)))
        assert proc.returncode == 2, proc.stderr
        assert "already in use" in proc.stderr and "--port" in proc.stderr
        assert "[load]" not in proc.stderr, "the model must not load when the port is taken"
        assert len(first.workspaces()) == 1, "a refused server creates no folder"
        assert first.client.get("/v1/health").status_code == 200


def test_port_zero_picks_a_free_port_and_says_which(tiny_qwen3_vl, tmp_path):
    server = start_server(tiny_qwen3_vl, tmp_path, port=0, wait=False)
    try:
        deadline = time.time() + 120
        while "serving" not in server.log.read_text():
            assert server.proc.poll() is None and time.time() < deadline, server.log.read_text()
            time.sleep(0.2)
        line = next(ln for ln in server.log.read_text().splitlines() if "serving" in ln)
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        import httpx

        assert port > 0 and httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_read_timeout_fails_the_job_and_the_server_stays_healthy(tiny_qwen3_vl, tmp_path, volume_bytes):
    with running(tiny_qwen3_vl, tmp_path, "--read-timeout", "0.001") as server:
        job = _submit(server.client, volume_bytes, {"question": "Q?", "max_new_tokens": 2}).json()["job_id"]
        status = wait_state(server.client, job)
        assert status["state"] == "failed", status
        assert "took longer than" in status["error"]["message"] and status["error"]["hint"]
        (workspace,) = server.workspaces()
        assert not any((workspace / "uploads").iterdir()) and not any((workspace / "jobs").iterdir())
        assert server.client.get("/v1/health").json()["status"] == "ok"
        assert reader_processes() == []


def test_follow_up_ids_differ_between_servers(tiny_qwen3_vl, tmp_path, volume_bytes):
    """volume_id is keyed with a per-server secret: the same voxels give another id on another server."""
    ids = []
    for name in ("one", "two"):
        with running(tiny_qwen3_vl, tmp_path / name) as server:
            job = _submit(server.client, volume_bytes, {"question": "Q?", "max_new_tokens": 2}).json()["job_id"]
            assert wait_state(server.client, job)["state"] == "done"
            ids.append(server.client.get(f"/v1/jobs/{job}/result", headers=AUTH).json()["volume_id"])
    assert ids[0] != ids[1] and all(len(i) == 32 for i in ids)
