"""`medpruner serve` against an attacker on 127.0.0.1: hostile files, hostile HTTP, and what is left behind.

One real server process (tiny model, CPU, small limits, its own TMPDIR). Every hostile file is written
by the test; a secret file and a FIFO sit outside the server's folders, and the headers name them.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from hostile_files import hostile_cases
from medpruner.phantom import make_phantom_ct
from server_helpers import AUTH, TOKEN, rss_bytes, running, wait_state

UPLOAD_MB = 2
SECRET = os.urandom(256)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A secret file and a FIFO outside every server folder, with the secret's atime set in the past."""
    folder = tmp_path_factory.mktemp("outside")
    secret = folder / "secret.raw"
    secret.write_bytes(SECRET)
    fifo = folder / "pipe"
    os.mkfifo(fifo)
    probe = folder / "probe"
    probe.write_bytes(b"x")
    os.utime(probe, (1_000_000, time.time()))
    probe.read_bytes()
    atime_works = os.stat(probe).st_atime != 1_000_000   # relatime/strictatime: a read shows in the atime
    os.utime(secret, (1_000_000, time.time()))
    return secret, fifo, atime_works


@pytest.fixture(scope="module")
def hostile_server(tiny_qwen3_vl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    with running(tiny_qwen3_vl, folder, "--max-upload-mb", str(UPLOAD_MB), "--max-volume-mb", "8",
                 "--max-queue", "2", "--read-timeout", "30") as server:
        server.client.get("/v1/health")
        server.baseline_rss = rss_bytes(server.proc.pid)
        yield server


@pytest.fixture(scope="module")
def phantom_nrrd(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ok") / "ct.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(8, 48, 48)), str(path), True)
    return path.read_bytes()


def _post(client, content: bytes | None, params: dict | None = None, headers=AUTH, name="volume.nrrd"):
    files = {"volume": (name, content)} if content is not None else None
    data = {"params": json.dumps(params or {"question": "Q?", "max_new_tokens": 2})}
    return client.post("/v1/jobs", files=files, data=data, headers=headers)


def _assert_error(response, status: int, code: str, words: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "hint"}
    assert error["code"] == code and words in error["message"], error
    assert all(isinstance(v, str) and v for v in error.values())
    return error


CASES = hostile_cases(Path("/SECRET"), Path("/FIFO"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_hostile_file_is_refused_with_nothing_read(hostile_server, outside, index):
    secret, fifo, atime_works = outside
    name, data, status, code, words = hostile_cases(secret, fifo)[index]
    started = time.monotonic()
    response = _post(hostile_server.client, data)
    error = _assert_error(response, status, code, words)
    assert time.monotonic() - started < 20, "a hostile file must be judged from its header, fast"
    # The error names no server path and echoes nothing long.
    assert str(hostile_server.tmpdir) not in json.dumps(error) and "medpruner-serve-" not in json.dumps(error)
    assert len(error["message"]) < 300 and "X" * 65 not in error["message"]
    # Nothing outside the upload folder was opened; the upload itself is gone.
    if atime_works:
        assert os.stat(secret).st_atime == 1_000_000, "the server read the secret file"
    assert all(not any((ws / "uploads").iterdir()) for ws in hostile_server.workspaces())
    assert hostile_server.client.get("/v1/health").json()["status"] == "ok"


def test_hostile_suite_left_memory_and_folders_as_they_were(hostile_server):
    grown = rss_bytes(hostile_server.proc.pid) - hostile_server.baseline_rss
    assert grown < 150 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MB over the hostile files"
    (workspace,) = hostile_server.workspaces()
    assert not any((workspace / "uploads").iterdir()) and not any((workspace / "jobs").iterdir())


def test_a_good_volume_still_answers_and_the_job_reads_it_in_a_child(hostile_server, phantom_nrrd):
    response = _post(hostile_server.client, phantom_nrrd)
    assert response.status_code == 202, response.text
    status = wait_state(hostile_server.client, response.json()["job_id"])
    assert status["state"] == "done", status


def test_damage_only_the_reader_sees_fails_the_job_with_a_clear_error(hostile_server, phantom_nrrd, tmp_path):
    """A gzip stream whose trailer is right but whose data is corrupt passes every header check: the job fails
    with bad_volume, no file is left, and the server keeps serving."""
    sitk.WriteImage(make_phantom_ct(shape=(8, 48, 48)), str(tmp_path / "ct.nrrd"), True)
    data = bytearray((tmp_path / "ct.nrrd").read_bytes())
    start = data.find(b"\n\n") + 2
    middle = start + (len(data) - start) // 2
    data[middle:middle + 64] = os.urandom(64)
    response = _post(hostile_server.client, bytes(data))
    assert response.status_code == 202, response.text
    status = wait_state(hostile_server.client, response.json()["job_id"])
    assert status["state"] == "failed" and status["error"]["code"] == "bad_volume", status
    assert "medpruner-serve-" not in json.dumps(status["error"])
    (workspace,) = hostile_server.workspaces()
    assert not any((workspace / "uploads").iterdir())
    assert hostile_server.client.get("/v1/health").json()["status"] == "ok"


# -- HTTP: auth, limits and the body ---------------------------------------------------------------
ROUTES = [("GET", "/v1/jobs/0123"), ("GET", "/v1/jobs/0123/result"), ("GET", "/v1/jobs/0123/heatmaps/kept"),
          ("GET", "/v1/jobs/0123/heatmaps/attention"), ("DELETE", "/v1/jobs/0123"), ("POST", "/v1/jobs"),
          ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/nowhere")]


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_but_health_needs_the_token_before_anything_else(hostile_server, method, path):
    client = hostile_server.client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.request(method, path, headers=headers)
        _assert_error(response, 401, "unauthorized", "token")
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/health").status_code == 200


def test_job_routes_with_the_token_and_a_real_job(hostile_server, phantom_nrrd):
    """The token opens every route; without it, a real job's result and heatmaps are refused (not only unknown ids)."""
    client = hostile_server.client
    job_id = _post(client, phantom_nrrd).json()["job_id"]
    assert wait_state(client, job_id)["state"] == "done"
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/v1/jobs/{job_id}/heatmaps/kept",
                 f"/v1/jobs/{job_id}/heatmaps/attention"):
        assert client.get(path, headers=AUTH).status_code == 200
        _assert_error(client.get(path), 401, "unauthorized")
    _assert_error(client.delete(f"/v1/jobs/{job_id}"), 401, "unauthorized")
    assert client.get("/openapi.json", headers=AUTH).status_code == 200


def test_long_ids_are_not_echoed(hostile_server):
    long_id = "x" * 20000
    error = _assert_error(hostile_server.client.get(f"/v1/jobs/{long_id}", headers=AUTH), 404, "unknown_job")
    assert len(error["message"]) < 120 and "xxxx" in error["message"]
    error = _assert_error(hostile_server.client.get("/v1/jobs/abc/heatmaps/" + "k" * 5000, headers=AUTH), 404,
                          "not_found")
    assert len(error["message"]) < 120


def _raw_request(port: int, head: str, body_chunks, chunk_pause: float = 0.0, read_timeout: float = 20.0):
    """Send a request over a plain socket, chunk by chunk, watching for an early response after every chunk.
    Returns (status, bytes of body sent before the response arrived, whole response text)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    sock.sendall(head.encode())
    sent = 0
    response = b""
    try:
        for chunk in body_chunks:
            sock.setblocking(False)
            try:
                response += sock.recv(65536)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if response:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if chunk_pause:
                time.sleep(chunk_pause)
        sock.settimeout(read_timeout)
        while True:   # the server closes the connection after a refusal
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None
    return status, sent, response.decode("latin-1")


def _chunked(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        piece = os.urandom(min(size, total - sent))
        sent += len(piece)
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _multipart_head(port: int, token: str | None, chunked: bool = True, length: int | None = None) -> str:
    lines = ["POST /v1/jobs HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: multipart/form-data; boundary=XyZ"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return "\r\n".join(lines) + "\r\n\r\n"


def _multipart_chunks(total: int):
    """A chunked multipart body whose volume part is `total` bytes of noise (the first chunk carries the headers)."""
    opening = (b'--XyZ\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"question": "Q?"}\r\n'
               b'--XyZ\r\nContent-Disposition: form-data; name="volume"; filename="v.nrrd"\r\n\r\n')
    yield f"{len(opening):x}\r\n".encode() + opening + b"\r\n"
    yield from _chunked(total)


def test_chunked_upload_over_the_limit_is_refused_as_it_streams(hostile_server):
    """No Content-Length: the streaming check alone refuses it, long before the 64 MB are sent."""
    limit = UPLOAD_MB * 2**20
    status, sent, text = _raw_request(hostile_server.port, _multipart_head(hostile_server.port, TOKEN),
                                      _multipart_chunks(64 * 2**20))
    assert status == 413, text
    assert '"upload_too_large"' in text and "connection: close" in text.lower()
    # what the server accepted is bounded by the limit plus one chunk; the rest is socket buffering
    assert sent < limit + 16 * 2**20, f"{sent / 2**20:.0f} MB sent before the refusal"
    (workspace,) = hostile_server.workspaces()
    assert not any((workspace / "uploads").iterdir())
    assert hostile_server.client.get("/v1/health").status_code == 200


def test_volume_part_just_over_the_limit_is_refused(hostile_server):
    """The body stays within the body limit (volume limit + 1 MB of form overhead), the volume part does not."""
    status, _, text = _raw_request(hostile_server.port, _multipart_head(hostile_server.port, TOKEN),
                                   _multipart_chunks(UPLOAD_MB * 2**20 + 512 * 1024))
    assert status == 413 and "upload_too_large" in text, text


def test_bytes_outside_the_form_parts_count_against_the_body_limit(hostile_server):
    """An epilogue after the closing boundary is ignored by the multipart parser, so only the body's own byte
    count can stop it."""
    def body():
        form = b'--XyZ\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"question": "Q?"}\r\n--XyZ--\r\n'
        yield f"{len(form):x}\r\n".encode() + form + b"\r\n"
        yield from _chunked(64 * 2**20)

    status, sent, text = _raw_request(hostile_server.port, _multipart_head(hostile_server.port, TOKEN), body())
    assert status == 413 and "upload_too_large" in text, text
    assert sent < UPLOAD_MB * 2**20 + 16 * 2**20


def test_chunked_upload_with_a_wrong_or_no_token_is_refused_before_the_body(hostile_server):
    for token in (None, "wrong"):
        status, sent, text = _raw_request(hostile_server.port, _multipart_head(hostile_server.port, token),
                                          _multipart_chunks(64 * 2**20), chunk_pause=0.001)
        assert status == 401, text
        assert sent < 16 * 2**20, f"{sent / 2**20:.0f} MB sent before the 401"


def test_declared_length_over_the_limit_is_refused_without_reading(hostile_server):
    head = _multipart_head(hostile_server.port, TOKEN, chunked=False, length=50 * 2**30)
    status, sent, text = _raw_request(hostile_server.port, head, [b"x" * 1024] * 4)
    assert status == 413 and sent <= 4096, text


def test_multipart_tricks(hostile_server, phantom_nrrd):
    client = hostile_server.client
    error = _assert_error(client.post("/v1/jobs", content=b"garbage", headers={**AUTH, "Content-Type": "text/plain"}),
                          415, "unsupported_media_type")
    assert error["hint"]
    body = (b'--B\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"question": "Q?"}\r\n'
            b'--B\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"question": "R?"}\r\n--B--\r\n')
    _assert_error(client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "multipart/form-data; "
                                                                  "boundary=B"}), 422, "invalid_request", "twice")
    body = b'--B\r\nContent-Disposition: form-data; name="evil"\r\n\r\nx\r\n--B--\r\n'
    _assert_error(client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "multipart/form-data; "
                                                                  "boundary=B"}), 422, "invalid_request", "Unknown")
    body = b'--B\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"question": "Q?"}'   # cut short
    _assert_error(client.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "multipart/form-data; "
                                                                  "boundary=B"}), 422, "invalid_request", "incomplete")
    huge = {"question": "Q?", "window": "a" * (100 * 1024)}
    _assert_error(_post(client, phantom_nrrd, huge), 422, "invalid_params", "KB")


# -- Host and Origin -------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8765", "127.0.0.1.evil.example",
                                  "localhost.evil.example", ""])
def test_foreign_host_is_refused(hostile_server, host):
    response = hostile_server.client.get("/v1/health", headers={"Host": host})
    _assert_error(response, 403, "forbidden_host", "host name")
    response = _post(hostile_server.client, b"NRRD0004\n", headers={**AUTH, "Host": host})
    assert response.status_code == 403


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1", "[::1]:8765"])
def test_own_host_names_are_accepted(hostile_server, host):
    assert hostile_server.client.get("/v1/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("origin", ["https://attacker.example", "null", "http://127.0.0.1:1",
                                    "http://localhost", "file://"])
def test_foreign_origin_is_refused(hostile_server, phantom_nrrd, origin):
    response = _post(hostile_server.client, phantom_nrrd, headers={**AUTH, "Origin": origin})
    _assert_error(response, 403, "forbidden_origin", "other web sites")
    assert "access-control-allow-origin" not in response.headers
    _assert_error(hostile_server.client.get("/v1/health", headers={"Origin": origin}), 403, "forbidden_origin")


def test_own_origin_is_accepted(hostile_server):
    origin = f"http://127.0.0.1:{hostile_server.port}"
    assert hostile_server.client.get("/v1/health", headers={"Origin": origin}).status_code == 200


def test_token_less_loopback_server_still_refuses_foreign_pages(tiny_qwen3_vl, tmp_path, phantom_nrrd):
    """Without a token, Host and Origin are all that stands between a web page and the model."""
    with running(tiny_qwen3_vl, tmp_path, token=None) as server:
        response = _post(server.client, phantom_nrrd, headers={"Origin": "https://attacker.example"})
        _assert_error(response, 403, "forbidden_origin")
        response = _post(server.client, phantom_nrrd, headers={"Host": "rebound.attacker.example"})
        _assert_error(response, 403, "forbidden_host")
        assert _post(server.client, phantom_nrrd, headers={}).status_code == 202


def test_allow_origin_and_allowed_host_open_exactly_what_they_name(tiny_qwen3_vl, tmp_path):
    with running(tiny_qwen3_vl, tmp_path, "--allowed-host", "gpu-box.lan", "--allow-origin",
                 "https://viewer.example.org") as server:
        client = server.client
        assert client.get("/v1/health", headers={"Host": "gpu-box.lan:1234"}).status_code == 200
        assert client.get("/v1/health", headers={"Host": "other.lan"}).status_code == 403
        ok = client.get("/v1/health", headers={"Origin": "https://viewer.example.org"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://viewer.example.org"
        preflight = client.options("/v1/jobs", headers={"Origin": "https://viewer.example.org",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert client.get("/v1/health", headers={"Origin": "https://viewer.example.org.evil"}).status_code == 403


# -- queue before body -----------------------------------------------------------------------------
def test_full_queue_is_a_429_before_the_body_is_read(hostile_server, phantom_nrrd):
    client = hostile_server.client
    long = {"question": "Describe everything.", "max_new_tokens": 2048, "compare": True}
    running_job = _post(client, phantom_nrrd, long).json()["job_id"]
    wait_state(client, running_job, states=("running",))
    queued = [_post(client, phantom_nrrd, long) for _ in range(2)]
    assert all(r.status_code == 202 for r in queued), [r.text for r in queued]
    status, sent, text = _raw_request(hostile_server.port, _multipart_head(hostile_server.port, TOKEN),
                                      _multipart_chunks(32 * 2**20), chunk_pause=0.001)
    assert status == 429 and "retry-after" in text.lower(), text
    assert sent < 16 * 2**20
    for job_id in [running_job] + [r.json()["job_id"] for r in queued]:
        client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
    for job_id in [running_job] + [r.json()["job_id"] for r in queued]:
        assert wait_state(client, job_id)["state"] == "cancelled"
    (workspace,) = hostile_server.workspaces()
    assert not any((workspace / "uploads").iterdir()), "cancelled queued jobs must delete their uploads"


def test_a_client_that_sends_its_whole_body_first_still_reads_the_refusal(tiny_qwen3_vl, tmp_path):
    """The Slicer module's client (urllib) writes the whole body before it reads: a 401 or 429 answered before
    the body must still reach it as that error, not as a reset connection ("server not running")."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedPrunerSlicer"))
    from MedPrunerSlicerLib.client import MedPrunerClient, build_params
    from MedPrunerSlicerLib.errors import AuthenticationError, ServerBusy

    volume = os.urandom(24 * 2**20)   # larger than the socket buffers: the server must read it to let it through
    with running(tiny_qwen3_vl, tmp_path, "--max-upload-mb", "64", "--max-queue", "1") as server:
        wrong = MedPrunerClient(server.url, token="wrong", timeout=30)
        with pytest.raises(AuthenticationError):
            wrong.submit(volume, build_params("Q?"))
        client = MedPrunerClient(server.url, token=TOKEN, timeout=30)
        phantom = tmp_path / "ct.nrrd"
        sitk.WriteImage(make_phantom_ct(shape=(8, 48, 48)), str(phantom), True)
        long = build_params("Describe everything.", max_new_tokens=2048, compare=True)
        first = client.submit(phantom.read_bytes(), long)["job_id"]
        wait_state(server.client, first, states=("running",))
        second = client.submit(phantom.read_bytes(), long)["job_id"]
        with pytest.raises(ServerBusy):
            client.submit(volume, build_params("Q?"))
        for job_id in (first, second):
            client.cancel(job_id)
        (workspace,) = server.workspaces()
        assert server.client.get("/v1/health").status_code == 200


def test_length_and_chunked_together_are_refused(hostile_server):
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{hostile_server.port}\r\nContent-Length: 10\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n\r\n")
    started = time.monotonic()
    status, sent, text = _raw_request(hostile_server.port, head, _chunked(64 * 2**20))
    assert status == 400 and "Transfer-Encoding" in text, text
    assert sent < 16 * 2**20 and time.monotonic() - started < 15


def test_a_refused_body_trickled_slowly_is_not_waited_for_forever(hostile_server, monkeypatch):
    """A declared 1 MB sent a byte at a time after a 401: the server stops draining after its deadline
    (30 s + 1 s per MB) and closes, instead of holding the connection for days."""
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{hostile_server.port}\r\nContent-Length: {2**20}\r\n"
            "Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", hostile_server.port), timeout=5)
    sock.sendall(head.encode())
    started = time.monotonic()
    response = b""
    closed = False
    while time.monotonic() - started < 60:
        try:
            sock.sendall(b"x")
        except OSError:
            closed = True
            break
        try:
            sock.settimeout(1.0)
            data = sock.recv(65536)
            if not data:
                closed = True
                break
            response += data
        except socket.timeout:
            pass
    sock.close()
    assert response.startswith(b"HTTP/1.1 401"), response
    assert closed, "the connection must be closed once the drain deadline has passed"
    assert time.monotonic() - started < 45
