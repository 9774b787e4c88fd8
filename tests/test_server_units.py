"""Small server pieces on their own: host parsing and policy, message scrubbing, the queue's reservations,
and the sweep of dead servers' folders."""
from __future__ import annotations

import json
import os
import time

import pytest

from medpruner.server.errors import echo, register_private_path, scrub
from medpruner.server.guard import HostPolicy, split_host
from medpruner.server.workspace import MARKER, create_workspace, sweep_dead_workspaces


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1", ("127.0.0.1", None)), ("127.0.0.1:8765", ("127.0.0.1", 8765)), ("LocalHost", ("localhost", None)),
    ("[::1]:8765", ("::1", 8765)), ("[::1]", ("::1", None)), ("::1", ("::1", None)), ("example.org.", ("example.org", None)),
    ("host:99999", ("", None)), ("host:x", ("", None)), ("", ("", None)),
])
def test_split_host(value, expected):
    assert split_host(value) == expected


def test_host_policy_loopback_and_wildcard():
    loopback = HostPolicy("127.0.0.1", 8765)
    assert all(loopback.host_ok(h) for h in ("127.0.0.1:8765", "localhost", "[::1]:1"))
    assert not any(loopback.host_ok(h) for h in ("10.0.0.5", "evil.example", "127.0.0.1.evil.example", None, ""))
    assert loopback.origin_ok("http://127.0.0.1:8765") and loopback.origin_ok("http://localhost:8765/")
    assert not any(loopback.origin_ok(o) for o in ("http://127.0.0.1", "https://127.0.0.1:8766", "null",
                                                  "http://evil.example:8765", "http://127.0.0.1:8765/path"))
    anywhere = HostPolicy("0.0.0.0", 8765, allowed_hosts=["gpu.lan"])
    assert anywhere.host_ok("10.0.0.5:8765") and anywhere.host_ok("gpu.lan") and not anywhere.host_ok("evil.lan")
    named = HostPolicy("gpu.lan", 1, allow_origins=["https://viewer.example/"])
    assert named.host_ok("GPU.LAN:1") and named.origin_ok("https://viewer.example")
    assert not named.origin_ok("https://viewer.example.evil")


def test_scrub_removes_server_paths_and_uids():
    register_private_path("/tmp/medpruner-serve-abc123")
    text = scrub("Cannot read /tmp/medpruner-serve-abc123/uploads/x.nrrd of series 1.2.840.113619.2.55.3.1234 "
                 "(itk 5.4.0, ip 10.0.0.1).")
    assert "medpruner-serve" not in text and "1.2.840" not in text
    assert "<server folder>" in text and "<uid>" in text and "5.4.0" in text and "10.0.0.1" in text
    assert echo("x" * 20000).startswith("'" + "x" * 64 + "'") and len(echo("x" * 20000)) < 80
    assert echo("job") == "'job'"


def test_sweep_keeps_live_and_fresh_folders(tmp_path):
    mine = create_workspace(tmp_path)
    assert json.loads((mine / MARKER).read_text())["pid"] == os.getpid()
    dead = create_workspace(tmp_path)
    (dead / MARKER).write_text(json.dumps({"pid": 2**22 + 17, "start_time": "1"}))
    recycled = create_workspace(tmp_path)   # our pid, but another start time: a recycled pid, the owner is dead
    (recycled / MARKER).write_text(json.dumps({"pid": os.getpid(), "start_time": "0"}))
    unmarked_old = tmp_path / "medpruner-serve-old"
    unmarked_old.mkdir()
    os.utime(unmarked_old, (time.time() - 3600,) * 2)
    unmarked_new = tmp_path / "medpruner-serve-new"
    unmarked_new.mkdir()
    other = tmp_path / "somebody-else"
    other.mkdir()
    swept = sweep_dead_workspaces(tmp_path)
    assert sorted(swept) == sorted([dead, recycled, unmarked_old])
    assert mine.exists() and unmarked_new.exists() and other.exists()
    assert oct(mine.stat().st_mode & 0o777) == "0o700"
