"""The HTTP client on a slow link (issue 15): chunked uploads and downloads with progress and Cancel,
timeouts per socket operation (never per body), Python 3.9's socket.timeout, early refusals.

The "link" is a loopback server on raw sockets that reads request bodies and writes replies at a set
rate (~3 MB/s) and answers like the MedPruner API; the early-refusal tests run the real `medpruner serve`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import textwrap
import threading
import time

import pytest
from MedPrunerSlicerLib.client import MedPrunerClient, build_params
from MedPrunerSlicerLib.errors import AuthenticationError, JobCancelled, RequestTooLarge, ServerError, ServerUnreachable
from slicer_helpers import MODULE_DIR, SERVER_TOKEN

RATE = 3_000_000          # bytes per second of the slow link
MB = 1_000_000


class LinkServer:
    """HTTP/1.1 on 127.0.0.1 through a slow link: request bodies are read and replies written at `rate`
    bytes/s. POST /v1/jobs answers 202 with a job id, GET .../heatmaps/* sends `download` (declaring
    `declared` bytes, default its length). `stall_after` bytes into a body, reading stops for `stall_s`."""

    def __init__(self, rate: float = RATE, download: bytes = b"", declared: int | None = None,
                 stall_after: int | None = None, stall_s: float = 0.0, tls: ssl.SSLContext | None = None,
                 reply_delay_s: float = 0.0) -> None:
        self.rate, self.download, self.declared, self.tls = rate, download, declared, tls
        self.reply_delay_s = reply_delay_s
        self.stall_after, self.stall_s = stall_after, stall_s
        self.requests: list[dict] = []
        self.finished = threading.Event()   # set when a connection's handling ended
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)   # a link, not a 6 MB buffer
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _pace(self, started: float, count: int) -> None:
        pause = started + count / self.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)

    def _serve(self, conn: socket.socket) -> None:
        record: dict = {"received": 0, "complete": False}
        self.requests.append(record)
        try:
            conn.settimeout(30)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, body = head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            record["method"], record["path"], _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            record["headers"] = headers
            length = int(headers.get("content-length", "0"))
            record["declared"] = length
            data = bytearray(body)
            started = time.monotonic()
            while len(data) < length:
                if self.stall_after is not None and len(data) >= self.stall_after:
                    time.sleep(self.stall_s)
                    self.stall_after = None
                try:
                    chunk = conn.recv(min(16384, length - len(data)))
                except (ConnectionError, socket.timeout):
                    break
                if not chunk:
                    break
                data += chunk
                record["received"] = len(data)
                self._pace(started, len(data))
            record["received"] = len(data)
            if len(data) < length:
                return
            record["complete"] = True
            record["volume_sha256"] = _volume_sha256(headers.get("content-type", ""), bytes(data))
            time.sleep(self.reply_delay_s)
            if record["method"] == "POST":
                reply = json.dumps({"job_id": "slowjob", "state": "queued", "position": 0}).encode()
                conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(reply)).encode() + b"\r\nConnection: close\r\n\r\n" + reply)
                return
            declared = len(self.download) if self.declared is None else self.declared
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
                         + str(declared).encode() + b"\r\nConnection: close\r\n\r\n")
            started = time.monotonic()
            view = memoryview(self.download)
            for start in range(0, len(view), 16384):
                conn.sendall(view[start:start + 16384])
                self._pace(started, start + 16384)
        except OSError:
            pass
        finally:
            conn.close()
            self.finished.set()


def _volume_sha256(content_type: str, body: bytes) -> str | None:
    """sha256 of the multipart part named "volume" (None when there is none)."""
    match = re.search(r"boundary=([^;]+)", content_type)
    if not match:
        return None
    for part in body.split(b"--" + match.group(1).encode()):
        head, _, data = part.partition(b"\r\n\r\n")
        if b'name="volume"' in head:
            return hashlib.sha256(data[:-2]).hexdigest()   # the part ends with CRLF before the next boundary
    return None


@pytest.fixture
def link():
    servers = []

    def start(**kwargs) -> LinkServer:
        servers.append(LinkServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _check_progress(calls: list[tuple[int, int, float]], total: int, elapsed: float) -> None:
    """Monotonic, ending at the total, and steady: no second-long silence while bytes move (the total is
    reached when the peer has the bytes, not when our kernel took them)."""
    done = [c[0] for c in calls]
    assert len(calls) > 5, calls
    assert all(b > a for a, b in zip(done, done[1:])), "progress went back or repeated"
    assert {c[1] for c in calls} == {total} and done[-1] == total
    seconds = [0.0] + [c[2] for c in calls] + [elapsed]
    gaps = [b - a for a, b in zip(seconds, seconds[1:])]
    assert min(gaps) >= 0 and max(gaps) < 1.0, f"progress silent for {max(gaps):.1f} s"


# -- uploads --------------------------------------------------------------------------------------
def test_a_45_mb_volume_goes_through_a_3_mb_s_link_with_the_default_timeout(link):
    server = link()
    volume = os.urandom(45 * MB)
    client = MedPrunerClient(server.url)
    assert client.timeout == 10.0
    calls = []
    started = time.monotonic()
    reply = client.submit(volume, build_params("Any lesion?"), progress=lambda *a: calls.append(a))
    elapsed = time.monotonic() - started
    assert reply["job_id"] == "slowjob"
    assert elapsed > client.timeout, "the link must be slower than one timeout for this test to mean anything"
    record = server.requests[-1]
    assert record["complete"] and record["volume_sha256"] == hashlib.sha256(volume).hexdigest()
    _check_progress(calls, record["declared"], elapsed)


@pytest.mark.parametrize("rate", [RATE, 1e12], ids=["slow link", "fast link"])
def test_cancel_stops_an_upload_mid_body(link, rate):
    server = link(rate=rate)
    volume = os.urandom(30 * MB)
    pressed: list[float] = []

    def progress(sent: int, total: int, seconds: float) -> None:
        if sent >= 5 * MB and not pressed:
            pressed.append(time.monotonic())

    with pytest.raises(JobCancelled):
        MedPrunerClient(server.url).submit(volume, build_params("q?"), progress=progress,
                                           cancelled=lambda: bool(pressed))
    assert time.monotonic() - pressed[0] < 1.0
    assert server.finished.wait(5)
    record = server.requests[-1]
    assert not record["complete"] and 5 * MB <= record["received"] < 15 * MB, record["received"]


def test_cancel_once_the_whole_body_is_out_still_returns_the_job_so_it_can_be_cancelled(link):
    """The server creates the job from a complete body: without its id the job would run on, orphaned."""
    server = link(rate=1e12, reply_delay_s=0.5)
    sent = []
    reply = MedPrunerClient(server.url).submit(os.urandom(MB), build_params("q?"), progress=lambda *a: sent.append(a),
                                               cancelled=lambda: bool(sent) and sent[-1][0] == sent[-1][1])
    assert reply["job_id"] == "slowjob" and server.requests[-1]["complete"]


def test_a_server_that_stops_reading_is_a_timeout_not_an_unexpected_error(link):
    server = link(stall_after=1 * MB, stall_s=6.0)
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as info:
        MedPrunerClient(server.url, timeout=1.0).submit(os.urandom(20 * MB), build_params("q?"))
    assert info.value.message == f"The server at {server.url} did not answer within 1 s."
    assert "while sending the request body" in info.value.details and info.value.hint
    assert 1.0 <= time.monotonic() - started < 4.0


def test_a_server_that_hangs_up_mid_body_without_a_reply_is_said_so():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        received = 0
        while received < MB:
            received += len(conn.recv(65536))
        conn.close()   # unread data: the kernel answers the rest with a reset

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(ServerUnreachable) as info:
            MedPrunerClient(f"http://127.0.0.1:{listener.getsockname()[1]}").submit(os.urandom(20 * MB),
                                                                                  build_params("q?"))
    finally:
        listener.close()
    assert "closed the connection while the request was being sent" in info.value.message
    assert "while sending the request body" in info.value.details and info.value.hint


def test_the_reply_wait_lasts_while_the_kernel_still_sends_the_body(link):
    """All sends return while MBs still sit in the kernel's buffer: slower to drain than one timeout."""
    server = link(rate=2 * MB)
    volume = os.urandom(4 * MB)
    calls = []
    started = time.monotonic()
    reply = MedPrunerClient(server.url, timeout=1.0).submit(volume, build_params("q?"),
                                                             progress=lambda *a: calls.append(a))
    assert reply["job_id"] == "slowjob" and server.requests[-1]["complete"]
    _check_progress(calls, server.requests[-1]["declared"], time.monotonic() - started)


def test_https_uploads_go_in_pieces_under_the_timeout_too(link, tmp_path, monkeypatch):
    """Through TLS (a reverse proxy, a remote GPU box): same pieces, same per-operation timeout."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))   # the client trusts it like a system CA
    server = link(tls=context)
    volume = os.urandom(8 * MB)
    calls = []
    started = time.monotonic()
    reply = MedPrunerClient(server.url, timeout=1.0).submit(volume, build_params("q?"),
                                                             progress=lambda *a: calls.append(a))
    assert server.url.startswith("https://") and reply["job_id"] == "slowjob"
    record = server.requests[-1]
    assert record["complete"] and record["volume_sha256"] == hashlib.sha256(volume).hexdigest()
    _check_progress(calls, record["declared"], time.monotonic() - started)


# -- downloads ------------------------------------------------------------------------------------
def test_a_20_mb_heatmap_comes_through_a_slow_link_with_progress(link):
    payload = os.urandom(20 * MB)
    server = link(download=payload)
    calls = []
    client = MedPrunerClient(server.url, timeout=2.0)   # the download lasts ~7 s: each read has its own timeout
    started = time.monotonic()
    assert client.heatmap("slowjob", "kept", progress=lambda *a: calls.append(a)) == payload
    _check_progress(calls, len(payload), time.monotonic() - started)
    assert calls[-1][2] > 3 * client.timeout


def test_cancel_stops_a_download(link):
    server = link(download=os.urandom(20 * MB))
    pressed: list[float] = []

    def progress(received: int, total: int, seconds: float) -> None:
        if received >= 2 * MB and not pressed:
            pressed.append(time.monotonic())

    with pytest.raises(JobCancelled):
        MedPrunerClient(server.url).heatmap("slowjob", "kept", progress=progress, cancelled=lambda: bool(pressed))
    assert time.monotonic() - pressed[0] < 1.0


def test_a_reply_shorter_than_its_content_length_says_so(link):
    server = link(download=os.urandom(300_000), declared=1_000_000)
    with pytest.raises(ServerError, match="cut short: 300000 of 1000000 bytes") as info:
        MedPrunerClient(server.url).heatmap("slowjob", "attention")
    assert info.value.hint


def test_a_server_that_stops_sending_is_a_timeout():
    url = _stalling_reply_server()
    started = time.monotonic()
    with pytest.raises(ServerUnreachable, match="did not answer within 0.5 s"):
        MedPrunerClient(url, timeout=0.5).heatmap("j", "kept")
    assert time.monotonic() - started < 3.0


def _stalling_reply_server() -> str:
    """A server that sends the head and 100 kB of a 1 MB reply, then nothing (until the client leaves)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n" + b"x" * 100_000)
            conn.settimeout(10)
            try:
                conn.recv(1)   # until the client gives up
            except OSError:
                pass
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


# -- Python 3.9: socket.timeout is not TimeoutError -----------------------------------------------
def _python39() -> str | None:
    for candidate in (shutil.which("python3.9"), os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3.9")):
        if candidate and os.path.exists(candidate):
            try:
                version = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                         capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                continue
            if version == "(3, 9)":
                return candidate
    return None


PY39_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    sys.path.insert(0, sys.argv[1])
    from MedPrunerSlicerLib.client import MedPrunerClient, build_params
    urls = json.loads(sys.argv[2])
    out = {"timeout_is_TimeoutError": socket.timeout is TimeoutError}
    calls = {
        "no_reply": lambda: MedPrunerClient(urls["silent"], timeout=0.5).health(),
        "mid_body": lambda: MedPrunerClient(urls["stalled_download"], timeout=0.5).heatmap("j", "kept"),
        "upload": lambda: MedPrunerClient(urls["stalled_upload"], timeout=0.5).submit(b"v" * 8000000,
                                                                                      build_params("q?")),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = ["no error", ""]
        except Exception as exc:
            out[name] = [type(exc).__name__, getattr(exc, "message", repr(exc))]
    print(json.dumps(out))
""")


def test_timeouts_on_python_39_are_said_as_timeouts(link):
    """Slicer 5.8 runs Python 3.9, where socket.timeout is its own class, raised raw by reads."""
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 on this machine")
    compiled = subprocess.run([python, "-m", "compileall", "-q", str(MODULE_DIR / "MedPrunerSlicerLib")],
                              capture_output=True, text=True, timeout=60)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)   # accepts, never answers
    stalled_upload = link(stall_after=1 * MB, stall_s=4.0)
    urls = {"silent": f"http://127.0.0.1:{silent.getsockname()[1]}", "stalled_upload": stalled_upload.url,
            "stalled_download": _stalling_reply_server()}
    try:
        run = subprocess.run([python, "-c", PY39_SCRIPT, str(MODULE_DIR), json.dumps(urls)], capture_output=True,
                             text=True, timeout=60)
    finally:
        silent.close()
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out.pop("timeout_is_TimeoutError") is False, "this is not the 3.9 behaviour the test is for"
    for name, (kind, message) in out.items():
        assert kind == "ServerUnreachable" and "did not answer within 0.5 s" in message, (name, kind, message)


def test_every_timeout_the_client_catches_names_socket_timeout():
    """On 3.11 socket.timeout IS TimeoutError, so only the source can show the 3.9 class is caught."""
    source = (MODULE_DIR / "MedPrunerSlicerLib" / "client.py").read_text()
    assert re.search(r"_TIMEOUTS = \(socket\.timeout, TimeoutError\)", source)
    assert "except _TIMEOUTS" in source and "isinstance(reason, _TIMEOUTS)" in source
    assert not re.search(r"except \(?TimeoutError", source), "a bare TimeoutError misses 3.9's socket.timeout"


# -- early refusals from the real server ------------------------------------------------------------
@pytest.fixture(scope="module")
def small_limit_server(tiny_qwen3_vl, tmp_path_factory):
    """A real `medpruner serve` (token SERVER_TOKEN) that accepts uploads up to 8 MB."""
    pytest.importorskip("fastapi")
    from MedPrunerSlicerLib import local_server
    from slicer_helpers import running_server

    command = local_server.server_command
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_server, "server_command", lambda *a, **k: [*command(*a, **k), "--max-upload-mb", "8"])
        with running_server(tiny_qwen3_vl, tmp_path_factory.mktemp("small-limit")) as url:
            patch.undo()
            yield url


@pytest.mark.parametrize("token, size, error, words", [
    ("wrong", 6 * MB, AuthenticationError, "refused the token"),         # within the limit: drained, then 401
    ("wrong", 60 * MB, AuthenticationError, "refused the token"),        # over it: 401 and the connection closes
    (SERVER_TOKEN, 60 * MB, RequestTooLarge, "larger than the server accepts"),
])
def test_a_refusal_sent_before_the_body_is_read_reaches_the_user(small_limit_server, token, size, error, words):
    calls = []
    with pytest.raises(error) as info:
        MedPrunerClient(small_limit_server, token).submit(os.urandom(size), build_params("q?"),
                                                          progress=lambda *a: calls.append(a))
    assert words in info.value.message and info.value.hint
    assert info.value.status in (401, 413)


def test_the_real_server_takes_a_chunked_upload(small_limit_server):
    """uvicorn and the server's multipart reader get the body in pieces: the job is created from it."""
    import numpy as np
    from medpruner.phantom import phantom_ct_array
    from MedPrunerSlicerLib.volume_export import VolumeSnapshot

    data = VolumeSnapshot(phantom_ct_array((8, 32, 32)), np.diag([-1.0, -1.0, 2.0, 1.0])).to_nrrd()
    client = MedPrunerClient(small_limit_server, SERVER_TOKEN)
    calls = []
    reply = client.submit(data, build_params("q?", max_new_tokens=2), progress=lambda *a: calls.append(a))
    assert reply["job_id"] and calls[-1][0] == calls[-1][1] > len(data)
    client.cancel(reply["job_id"])


# -- the Ask path ---------------------------------------------------------------------------------
def test_ask_shows_bytes_and_rate_while_sending_and_cancel_stops_the_upload(link):
    import numpy as np
    from MedPrunerSlicerLib.ask import run_job
    from MedPrunerSlicerLib.job_runner import JobRunner
    from MedPrunerSlicerLib.volume_export import VolumeSnapshot

    server = link()
    voxels = np.random.default_rng(3).integers(-1000, 1000, size=(24, 512, 512), dtype=np.int16)   # ~12 MB
    snapshot = VolumeSnapshot(voxels, np.diag([-1.0, -1.0, 2.0, 1.0]))
    runner, events, outcome = JobRunner(), [], {}
    runner.start(lambda ctx: run_job(ctx, MedPrunerClient(server.url), snapshot, build_params("q?")),
                 on_event=lambda kind, payload: events.append((time.monotonic(), kind, payload)),
                 on_error=lambda exc: outcome.setdefault("error", exc),
                 on_done=lambda value: outcome.setdefault("done", value))
    pressed = None
    deadline = time.monotonic() + 30
    while runner.drain():
        uploads = [(t, p) for t, k, p in events if k == "progress" and p[0] == "upload" and p[1]]
        if pressed is None and uploads and uploads[-1][1][1] >= 0.3:
            pressed = time.monotonic()
            runner.cancel()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert isinstance(outcome.get("error"), JobCancelled) and time.monotonic() - pressed < 1.0
    texts = [p[2] for t, p in uploads]
    pattern = r"Sending the volume: \d+\.\d / \d+\.\d MB \(\d+\.\d MB/s\)"
    assert all(re.fullmatch(pattern, text) for text in texts), texts
    fractions = [p[1] for t, p in uploads]
    assert fractions == sorted(fractions) and len(fractions) >= 5
    span = uploads[-1][0] - uploads[0][0]
    assert len(uploads) <= 10 * span + 3, (len(uploads), span)
    assert server.finished.wait(5) and not server.requests[-1]["complete"]
