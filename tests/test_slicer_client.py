"""Server address rules, consent, the HTTP client's errors, the worker thread (local server: test_slicer_local_server.py)."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.errors import (
    AuthenticationError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    RequestTooLarge,
    ServerBusy,
    ServerError,
    ServerUnreachable,
    SettingsError,
)
from MedPrunerSlicerLib.job_runner import JobRunner
from MedPrunerSlicerLib.settings import (
    DEFAULT_URL,
    ConsentPolicy,
    DictStore,
    Preferences,
    is_local_url,
    normalize_server_url,
)
from slicer_helpers import StubServer


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed, expected", [
    ("", DEFAULT_URL),
    ("127.0.0.1", "http://127.0.0.1:8765"),
    ("localhost:9000", "http://127.0.0.1:9000"),
    ("http://localhost:8765/", "http://127.0.0.1:8765"),
    ("gpu-box:8765", "http://gpu-box:8765"),
    ("https://gpu.example.org/medpruner/", "https://gpu.example.org/medpruner"),
    ("HTTP://GPU-BOX:80", "http://gpu-box:80"),
    ("[::1]:8765", "http://[::1]:8765"),
])
def test_server_url_normalisation(typed, expected):
    assert normalize_server_url(typed) == expected


@pytest.mark.parametrize("typed, words", [
    ("0.0.0.0:8765", "listens"), ("http://0.0.0.0", "listens"), ("ftp://host", "http"),
    ("http://user:pw@host:1", "password"), ("http://host:1/?a=1", "'?'"), ("http://host:99999", "not valid"),
])
def test_bad_server_urls_are_refused_with_a_remedy(typed, words):
    with pytest.raises(SettingsError) as info:
        normalize_server_url(typed)
    assert words in info.value.message and info.value.hint


def test_consent_is_asked_once_per_remote_server_and_remembered_on_request():
    store = DictStore()
    policy = ConsentPolicy(store)
    assert not policy.needs_consent("http://127.0.0.1:8765") and is_local_url("http://127.0.0.2:1")
    remote = "http://gpu-box:8765"
    assert policy.needs_consent(remote)
    policy.grant(remote)
    assert not policy.needs_consent(remote)
    assert ConsentPolicy(store).needs_consent(remote), "without 'don't ask again' only this session is covered"
    policy.grant("https://other:1/x", remember=True)
    assert not ConsentPolicy(store).needs_consent("https://other:1/y")
    assert ConsentPolicy(store).needs_consent("https://other:2")


def test_preferences_keep_a_history_of_addresses():
    prefs = Preferences(DictStore())
    assert prefs.server_url == DEFAULT_URL
    prefs.server_url = "gpu-box"
    prefs.server_url = "localhost"
    prefs.server_url = "gpu-box"
    assert prefs.url_history == ["http://gpu-box:8765", "http://127.0.0.1:8765"]
    prefs.token = "  secret "
    assert prefs.token == "secret"


# -- client errors --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_not_running_says_so_with_the_address():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ServerUnreachable) as info:
        MedPrunerClient(url, timeout=2).health()
    assert info.value.message == f"The MedPruner server is not running at {url}."
    assert "Start it" in info.value.hint


def test_timeout_is_short_and_reported():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)   # accepts the connection, never answers
    try:
        start = time.monotonic()
        with pytest.raises(ServerUnreachable, match="did not answer within 0.5 s"):
            MedPrunerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5).health()
        assert time.monotonic() - start < 5
    finally:
        listener.close()


@pytest.mark.parametrize("status, body, headers, error, words", [
    (401, {"error": {"code": "unauthorized", "message": "no", "hint": ""}}, {}, AuthenticationError, "token"),
    (413, {"error": {"code": "too_large", "message": "big", "hint": ""}}, {}, RequestTooLarge, "larger"),
    (422, {"error": {"code": "bad_input", "message": "gamma must be >= 0", "hint": "Use 0..1", "field": "pruning.gamma"}},
     {}, InvalidRequest, "pruning.gamma"),
    (422, {"detail": [{"loc": ["body", "params"], "msg": "Field required", "type": "missing"}]}, {}, InvalidRequest,
     "params"),
    (429, {"error": {"code": "busy", "message": "queue full", "hint": ""}}, {"Retry-After": "7"}, ServerBusy, "7 s"),
    (500, b"<html>boom</html>", {}, ServerError, "HTTP 500"),
])
def test_http_errors_become_clear_exceptions(stub, status, body, headers, error, words):
    stub.fail = {"POST /v1/jobs": (status, body, headers)}
    try:
        with pytest.raises(error) as info:
            MedPrunerClient(stub.url).submit(b"NRRD0004\n\n", build_params("q?"))
    finally:
        stub.fail = {}
    exc = info.value
    assert exc.status == status and exc.hint and exc.details
    assert words in exc.message + exc.hint
    if status == 429:
        assert exc.retry_after == 7.0
    if status == 422 and "field" in body.get("error", {}):
        assert exc.field == "pruning.gamma"


def test_token_is_sent_as_bearer_and_a_wrong_one_is_named(engine):
    server = StubServer(engine, token="s3cret")
    try:
        with pytest.raises(AuthenticationError, match="needs a token"):
            MedPrunerClient(server.url).status("x")
        with pytest.raises(AuthenticationError, match="refused the token"):
            MedPrunerClient(server.url, token="wrong").status("x")
        with pytest.raises(ServerError, match="Not found"):
            MedPrunerClient(server.url, token="s3cret").status("x")
        assert server.requests[-1][2]["Authorization"] == "Bearer s3cret"
    finally:
        server.close()


def test_non_json_reply_points_at_the_wrong_service(stub):
    stub.fail = {"GET /v1/health": (200, b"<html>router login</html>", {})}
    try:
        with pytest.raises(ServerError, match="not JSON"):
            MedPrunerClient(stub.url).health()
    finally:
        stub.fail = {}


def test_empty_question_is_refused_before_sending():
    with pytest.raises(InvalidRequest, match="empty"):
        build_params("   ")


# -- the job on a worker thread -----------------------------------------------------------------------
def _snapshot():
    import numpy as np
    from medpruner.phantom import phantom_ct_array
    from MedPrunerSlicerLib.volume_export import VolumeSnapshot

    return VolumeSnapshot(phantom_ct_array((8, 32, 32)), np.diag([-1.0, -1.0, 2.0, 1.0]))


def _run(stub, params, cancel_after=None):
    from MedPrunerSlicerLib.ask import run_job

    runner, events, outcome = JobRunner(), [], {}
    runner.start(lambda ctx: run_job(ctx, MedPrunerClient(stub.url), _snapshot(), params, poll_interval=0.02),
                 on_event=lambda kind, payload: events.append((kind, payload)),
                 on_done=lambda value: outcome.setdefault("done", value),
                 on_error=lambda exc: outcome.setdefault("error", exc))
    deadline = time.monotonic() + 60
    while runner.drain():
        assert threading.current_thread() is threading.main_thread()
        if cancel_after and any(k == "submitted" for k, _ in events) and time.monotonic() > cancel_after:
            runner.cancel()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return events, outcome


def test_job_reports_stages_and_returns_report_and_heatmaps(stub):
    events, outcome = _run(stub, build_params("Is there a lesion?", max_new_tokens=4))
    done = outcome["done"]
    assert done.report["question"] == "Is there a lesion?"
    assert done.kept[0].shape == (8, 32, 32) and done.attention[0].dtype.kind == "f"
    stages = [payload[0] for kind, payload in events if kind == "progress"]
    assert stages[0] == "upload" and stages[-1] == "download"


def test_job_failure_carries_the_servers_message_and_hint(stub):
    events, outcome = _run(stub, build_params("q?", gamma=-1.0))
    exc = outcome["error"]
    assert isinstance(exc, JobFailed)
    assert "gamma" in exc.message and exc.hint and exc.code == "bad_input"


def test_cancel_stops_the_job_on_the_server(stub):
    stub.gate.clear()   # jobs wait, so Cancel arrives while it runs
    try:
        events, outcome = _run(stub, build_params("q?", max_new_tokens=4), cancel_after=time.monotonic() + 0.2)
    finally:
        stub.gate.set()
    assert isinstance(outcome["error"], JobCancelled)
    job_id = next(payload for kind, payload in events if kind == "submitted")
    assert ("DELETE", f"/v1/jobs/{job_id}") in [(m, p) for m, p, _ in stub.requests]
    deadline = time.monotonic() + 10
    while stub.jobs[job_id]["state"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_runner_delivers_events_in_order_and_errors_on_the_draining_thread():
    runner, seen = JobRunner(), []

    def job(ctx):
        for i in range(3):
            ctx.emit("step", i)
        raise ValueError("boom")

    runner.start(job, on_event=lambda k, p: seen.append(p), on_error=lambda e: seen.append(str(e)))
    while runner.drain():
        time.sleep(0.005)
    assert seen == [0, 1, 2, "boom"]
    with pytest.raises(RuntimeError):
        runner.start(job) if runner.running else (_ for _ in ()).throw(RuntimeError("not running"))
