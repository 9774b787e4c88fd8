"""The answer as it is written (issue 16): the job event stream of a real `medpruner serve`, the polled
`answer_so_far`, the Slicer ask path's partial answers, and the CLI's growing answer line on a terminal.

(tests/test_streaming.py covers the engine's `ask(on_text=...)` itself.)
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from medpruner.phantom import make_phantom_ct
from server_helpers import AUTH, TOKEN, start_server, wait_state

STAGES = ("queued", "load", "preprocess", "vision", "prune", "answer", "write")
LONG = {"question": "Describe everything.", "max_new_tokens": 2048}
TIMEOUT = httpx.Timeout(30.0)     # every read: well above the 15 s keep-alive


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vol") / "ct.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(10, 64, 64)), str(path))
    return path


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl, tmp_path_factory):
    server = start_server(tiny_qwen3_vl, tmp_path_factory.mktemp("streaming"))
    yield server
    server.stop()


def submit(server, volume_path: Path, params: dict) -> str:
    response = server.client.post("/v1/jobs", files={"volume": ("v.nrrd", volume_path.read_bytes())},
                                  data={"params": json.dumps(params)}, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


@contextmanager
def event_stream(server, job_id: str, headers: dict = AUTH) -> Iterator[httpx.Response]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            yield response


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict | None]]:
    """(event, data) per Server-Sent Event; ("comment", None) for a comment line such as the keep-alive."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", None
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
        elif line == "" and event is not None:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def joined(events) -> str:
    return "".join(data["delta"] for event, data in events if event == "token")


def result(server, job_id: str) -> dict:
    return server.client.get(f"/v1/jobs/{job_id}/result", headers=AUTH).json()


def test_events_follow_a_job_from_the_queue_to_done(server, volume_path):
    blocker = submit(server, volume_path, LONG)
    wait_state(server.client, blocker, states=("running",))
    job_id = submit(server, volume_path, {"question": "Is there a liver lesion?", "max_new_tokens": 48})
    with event_stream(server, job_id) as response:
        stream = read_events(response)
        first = next(stream)
        assert first == ("progress", {"stage": "queued", "progress": 0.0})
        server.client.delete(f"/v1/jobs/{blocker}", headers=AUTH)   # let it run
        events = [first, *stream]                                   # to the end of the stream
    report = result(server, job_id)
    progress = [data for event, data in events if event == "progress"]
    order = [STAGES.index(p["stage"]) for p in progress]
    assert order == sorted(order) and "answer" in [p["stage"] for p in progress]
    values = [p["progress"] for p in progress]
    assert values == sorted(values)
    tokens = [data for event, data in events if event == "token"]
    assert report["answer"] and len(tokens) > 1
    assert joined(events) == report["answer"]
    so_far = ""
    for token in tokens:
        so_far += token["delta"]
        assert token["text"] == so_far and token["delta"]
    final, status = events[-1]
    assert final == "done" and [e for e, _ in events].count("done") == 1
    assert status == server.client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert status["state"] == "done" and status["answer_so_far"] == report["answer"]


def test_closing_the_stream_leaves_the_job_running_and_late_streams_catch_up(server, volume_path):
    job_id = submit(server, volume_path, {"question": "Describe everything.", "max_new_tokens": 600})
    with event_stream(server, job_id) as response:
        for event, _ in read_events(response):
            if event == "token":
                break                      # the client goes away mid-answer
    running, late = [], None
    deadline = time.monotonic() + 180
    while True:
        status = server.client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] != "running" or time.monotonic() > deadline:
            break
        running.append(status["answer_so_far"])
        if late is None and status["answer_so_far"]:
            with event_stream(server, job_id) as response:   # a client that connects mid-answer
                late = next((e, d) for e, d in read_events(response) if e != "progress")
        time.sleep(0.02)
    assert status["state"] == "done", status        # closing its stream did not cancel the job
    answer = result(server, job_id)["answer"]
    seen = [text for text in running if text]
    assert seen and all(answer.startswith(text) for text in seen) and seen != [answer] * len(seen)
    event, data = late
    assert event == "token" and data["delta"] == data["text"] and answer.startswith(data["text"])


def test_a_cancelled_job_ends_its_stream_with_cancelled(server, volume_path):
    job_id = submit(server, volume_path, LONG)
    events = []
    with event_stream(server, job_id) as response:
        for event, data in read_events(response):
            if event == "token" and not any(e == "token" for e, _ in events):
                assert server.client.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200
            events.append((event, data))
    final, status = events[-1]
    assert final == "cancelled" and status["state"] == "cancelled"
    assert status == server.client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert joined(events) == status["answer_so_far"] != ""


def test_a_finished_job_answers_its_final_event_at_once(server, volume_path):
    job_id = submit(server, volume_path, {"question": "Q?", "max_new_tokens": 12})
    wait_state(server.client, job_id)
    started = time.monotonic()
    with event_stream(server, job_id) as response:
        events = list(read_events(response))
    assert time.monotonic() - started < 10, "waited for the keep-alive instead of answering"
    answer = result(server, job_id)["answer"]
    assert [event for event, _ in events] == ["token", "done"]
    assert events[0][1] == {"delta": answer, "text": answer}


def test_the_stream_needs_the_token_and_unknown_jobs_are_404(server, volume_path):
    job_id = submit(server, volume_path, {"question": "Q?", "max_new_tokens": 2})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = server.client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    response = server.client.get("/v1/jobs/nope/events", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_job"
    wait_state(server.client, job_id)


def test_the_stream_sleeps_until_the_worker_changes_the_job():
    """In process, with a real Job: the worker thread's change wakes the stream at once (no polling), an
    idle stream sends keep-alives, a closed stream leaves no waiter behind, and `close` ends streams."""
    from medpruner.pipeline import AskRequest
    from medpruner.server.events import job_events
    from medpruner.server.jobs import Job

    def make_job() -> Job:
        return Job(id="j", request=AskRequest(question="Q?"), upload=None, volume_id=None, out_dir=Path("/none"))

    def later(change) -> None:
        threading.Timer(0.1, change).start()

    async def scenario() -> None:
        job = make_job()
        idle = job_events(job, lambda: job.status(None), keepalive_s=0.2)
        assert await idle.__anext__() == b'event: progress\ndata: {"stage":"queued","progress":0.0}\n\n'
        assert await asyncio.wait_for(idle.__anext__(), 5) == b": keep-alive\n\n"
        await idle.aclose()
        assert job.feed.waiting == 0

        stream = job_events(job, lambda: job.status(None), keepalive_s=60)
        await stream.__anext__()

        def write() -> None:
            job.answer = "Hello"
            job.feed.changed()
        later(write)
        token = await asyncio.wait_for(stream.__anext__(), 5)   # far sooner than the 60 s keep-alive
        assert token == b'event: token\ndata: {"delta":"Hello","text":"Hello"}\n\n'
        later(job.feed.close)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 5)
        assert job.feed.waiting == 0

    asyncio.run(scenario())


def test_sigterm_ends_open_streams_without_holding_the_stop(tiny_qwen3_vl, tmp_path, volume_path):
    server = start_server(tiny_qwen3_vl, tmp_path)
    job_id = submit(server, volume_path, LONG)
    events: list[tuple[str, dict | None]] = []
    first_token = threading.Event()
    ended = threading.Event()

    def listen() -> None:
        with event_stream(server, job_id) as response:
            for item in read_events(response):
                events.append(item)
                if item[0] == "token":
                    first_token.set()
        ended.set()

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    assert first_token.wait(120), server.log.read_text()
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 5, "the Slicer module kills a server that takes more than 5 s"
    reader.join(10)
    assert ended.is_set(), "the stream did not end with the server"
    log = server.log.read_text()
    assert "timeout graceful shutdown exceeded" not in log, log
    assert f"job {job_id} cancelled" in log
    assert events[-1][0] not in ("done", "failed", "cancelled")   # ended by the stop, not by the job


def test_slicer_ask_emits_partial_answers_that_grow_to_the_answer(server):
    pytest.importorskip("slicer", reason="slicer-core runs the Slicer scene tests")
    from medpruner.phantom import phantom_ct_array
    from slicer_helpers import add_volume, make_scene
    from MedPrunerSlicerLib.ask import AskSession
    from MedPrunerSlicerLib.client import MedPrunerClient, build_params

    scene = make_scene()
    volume = add_volume(scene, phantom_ct_array((10, 64, 64)), np.eye(4), "phantom")
    calls: list[tuple[str, object]] = []
    session = AskSession(scene, lambda: MedPrunerClient(server.url, TOKEN), poll_interval=0.02,
                         on_done=lambda result: calls.append(("done", result)),
                         on_error=lambda exc: calls.append(("error", exc)),
                         on_partial_answer=lambda text: calls.append(("partial", text)))
    session.start(volume, build_params("Describe everything.", max_new_tokens=400))
    session.wait(180)
    kind, outcome = calls[-1]
    assert kind == "done", outcome
    partials = [text for kind, text in calls if kind == "partial"]
    assert len(partials) >= 2 and partials[-1] == outcome.report["answer"]
    assert all(len(b) > len(a) and b.startswith(a) for a, b in zip(partials, partials[1:]))


def _read_terminal(master: int, proc: subprocess.Popen, timeout: float) -> bytes:
    """Everything the process writes to the terminal, until it closes it."""
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:     # EIO: the last writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
        raise AssertionError("the CLI did not finish")
    return b"".join(chunks)


def test_cli_prints_the_answer_as_it_comes_on_a_terminal_only(tiny_qwen3_vl, tmp_path, volume_path):
    command = [sys.executable, "-m", "medpruner", "ask", str(volume_path), "Is there a liver lesion?",
               "--model", str(tiny_qwen3_vl), "--max-new-tokens", "40", "--dtype", "float32"]
    master, slave = os.openpty()
    attributes = termios.tcgetattr(slave)
    attributes[1] &= ~termios.OPOST                   # the bytes as written: no \n -> \r\n
    termios.tcsetattr(slave, termios.TCSANOW, attributes)
    try:
        proc = subprocess.Popen([*command, "--out", str(tmp_path / "tty")], stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=slave)
        os.close(slave)
        shown = _read_terminal(master, proc, 300).decode("utf-8", "replace")
        assert proc.wait(60) == 0, shown
    finally:
        os.close(master)
    answer = json.loads((tmp_path / "tty" / "report.json").read_text())["answer"]
    assert answer
    line = f"\nAnswer: {answer}\nmedpruner: [write]"      # the growing line, ended before the next stage
    assert line in shown, shown
    assert shown.index(line) < shown.index("\nQuestion "), "the summary follows the streamed answer"
    assert f"\nAnswer      {answer}\n" in shown                 # and the summary is the usual one
    piped = subprocess.run([*command, "--out", str(tmp_path / "piped")], capture_output=True, text=True,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("Question ") and "Answer: " not in piped.stdout
