"""Helpers of the Slicer-side tests (tests/test_slicer_*.py): headless scenes on slicer-core,
volume nodes from arrays, an offscreen slice render, and a small stand-in HTTP server.

The stand-in implements the issue-5 API on top of the real `medpruner.pipeline.run_ask` (so its
results are the engine's real outputs), and can be told to answer with any HTTP error: it tests
the client's error handling, and the Ask path while `medpruner.server` is not there. The real
server is tested end to end in test_slicer_e2e.py.
"""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedPrunerSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


SERVER_TOKEN = "e2e-secret-token"


@contextlib.contextmanager
def running_server(checkpoint, workdir: Path, token: str = SERVER_TOKEN, timeout: float = 90.0):
    """A real `python -m medpruner serve` on 127.0.0.1 (CPU, a token), started the way the module starts
    its local server; yields its URL and stops the whole process tree afterwards."""
    from MedPrunerSlicerLib import local_server
    from MedPrunerSlicerLib.client import MedPrunerClient
    from MedPrunerSlicerLib.errors import MedPrunerSlicerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = workdir / "token"
    token_file.write_text(token)
    process = local_server.LocalServer(workdir)
    command = local_server.server_command(sys.executable, str(checkpoint), port, token_file=str(token_file),
                                          device="cpu")
    process.start(command, local_server.server_environment())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                MedPrunerClient(url, token, timeout=2).health()
                break
            except MedPrunerSlicerError:
                if not process.is_running() or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{process.log_tail()}") from None
                time.sleep(0.3)
        yield url
    finally:
        process.stop()


def make_scene():
    """A vtkMRMLScene set up like the app's for what the scene logic uses (colours, IO for .mrb)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="mrml-cache-"))
    scene.SetCacheManager(cache)
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())   # registered by the Sequences module in the app
    scene._keep = (app, colors, cache, io)   # keep the logics alive as long as the scene
    return scene


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "input",
               class_name: str = "vtkMRMLScalarVolumeNode"):
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1][:3])
    flat = np.ascontiguousarray(array).reshape(int(np.prod(array.shape[:3])), -1)
    vtk_array = numpy_support.numpy_to_vtk(flat if flat.shape[1] > 1 else flat[:, 0], deep=True)
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(m)
    node.CreateDefaultDisplayNodes()
    return node


class SliceRenderer:
    """Slicer's own slice pipeline (vtkMRMLSliceLogic: reslice, window/level, colour tables, layer
    blending) on the CPU, without any window or OpenGL. `render()` gives the view's RGB pixels."""

    def __init__(self, scene, name: str = "Red", orientation: str = "Axial", size: int = 400) -> None:
        import slicer

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLScene(scene)
        self.slice_node = self.logic.AddSliceNode(name)
        getattr(self.slice_node, f"SetOrientationTo{orientation}")()
        self.slice_node.SetDimensions(size, size, 1)
        self.composite = self.logic.GetSliceCompositeNode()
        self.size = size

    def fit(self) -> None:
        self.logic.FitSliceToBackground(self.size, self.size)

    def render(self) -> np.ndarray:
        from vtk.util import numpy_support

        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1]  # rows bottom-up
        # the view draws the blended image over its black background: composite by the alpha channel
        rgb = rgba[:, :, :3].astype(np.uint16) * rgba[:, :, 3:4].astype(np.uint16) // 255
        return rgb.astype(np.uint8)

    def xy_of_ras(self, ras) -> tuple[int, int]:
        """(row, col) in render() pixels of a RAS point on the current slice."""
        m = self.slice_node.GetXYToRAS()
        mat = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        x, y, _z, _w = np.linalg.inv(mat) @ np.array([*ras, 1.0])
        return int(round(self.size - 1 - y)), int(round(x))


class StubServer:
    """The issue-5 HTTP API over the real pipeline, in a thread; `fail` injects HTTP errors."""

    def __init__(self, engine, token: str = "") -> None:
        self.engine = engine
        self.token = token
        self.jobs: dict[str, dict] = {}
        self.fail: dict[str, tuple[int, dict, dict]] = {}   # "METHOD /path-prefix" -> (status, body, headers)
        self.requests: list[tuple[str, str, dict]] = []
        self.gate = threading.Event()   # jobs wait for it before running (set = run at once)
        self.gate.set()
        self.workdir = Path(tempfile.mkdtemp(prefix="medpruner-stub-"))
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body, content_type="application/json", headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stub.requests.append((method, self.path, dict(self.headers)))
                for key, (status, payload, headers) in stub.fail.items():
                    m, prefix = key.split(" ", 1)
                    if m == method and self.path.startswith(prefix):
                        return self._send(status, payload, headers=headers)
                if self.path == "/v1/health":
                    return self._send(200, {"status": "ok", "model_id": str(stub.engine.model_id), "device": "cpu"})
                if stub.token and self.headers.get("Authorization") != f"Bearer {stub.token}":
                    return self._send(401, {"error": {"code": "unauthorized", "message": "bad token", "hint": ""}})
                parts = self.path.strip("/").split("/")
                if method == "POST" and self.path == "/v1/jobs":
                    return self._send(202, stub.submit(self.headers.get("Content-Type", ""), body))
                if len(parts) >= 3 and parts[:2] == ["v1", "jobs"] and parts[2] in stub.jobs:
                    job = stub.jobs[parts[2]]
                    if method == "DELETE":
                        job["cancel"].set()
                        return self._send(200, {"job_id": parts[2], "state": "cancelled"})
                    if len(parts) == 3:
                        return self._send(200, {k: job[k] for k in ("job_id", "state", "stage", "progress", "position",
                                                                   "error")})
                    if parts[3:] == ["result"] and job["state"] == "done":
                        return self._send(200, job["report"])
                    if parts[3] == "heatmaps" and job["state"] == "done" and parts[4] in ("kept", "attention"):
                        data = (job["out"] / f"heatmap_{parts[4]}.nrrd").read_bytes()
                        return self._send(200, data, "application/octet-stream")
                return self._send(404, {"error": {"code": "not_found", "message": "no such job", "hint": ""}})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def submit(self, content_type: str, body: bytes) -> dict:
        from email.parser import BytesParser
        from email.policy import HTTP

        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in msg.iter_parts()}
        job_id = uuid.uuid4().hex[:12]
        out = self.workdir / job_id
        out.mkdir()
        (out / "volume.nrrd").write_bytes(fields["volume"])
        params = json.loads(fields["params"])
        job = {"job_id": job_id, "state": "queued", "stage": None, "progress": 0.0, "position": 0, "error": None,
               "cancel": threading.Event(), "out": out, "params": params}
        self.jobs[job_id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return {"job_id": job_id, "state": "queued", "position": 0}

    def _run(self, job: dict) -> None:
        from medpruner.config import PruningConfig
        from medpruner.errors import Cancelled, MedPrunerError
        from medpruner.pipeline import AskRequest, run_ask

        params = dict(job["params"])
        try:
            request = AskRequest(question=params["question"], pruning=PruningConfig(**params.get("pruning", {})),
                                 axis=params.get("axis", "axial"), window=params.get("window", "auto"),
                                 max_slices=params.get("max_slices"), max_new_tokens=params.get("max_new_tokens", 128),
                                 compare=params.get("compare", False))
            job["state"] = "running"
            job["stage"] = "load"
            while not self.gate.wait(0.05):
                if job["cancel"].is_set():
                    raise Cancelled()

            def progress(stage, fraction):
                job["stage"], job["progress"] = stage, fraction

            job["report"] = run_ask(self.engine, job["out"] / "volume.nrrd", request, job["out"], progress=progress,
                                    cancel=job["cancel"].is_set)
            job["state"] = "done"
        except Cancelled:
            job["state"] = "cancelled"
        except MedPrunerError as exc:
            job["state"] = "failed"
            job["error"] = {"code": exc.code, "message": exc.message, "hint": exc.hint}
        except ValueError as exc:   # PruningConfig's own validation
            job["state"] = "failed"
            job["error"] = {"code": "bad_input", "message": str(exc), "hint": "Check the pruning settings."}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ask_once(scene, volume, url: str, question: str = "Is there a liver lesion?", **params):
    """One question through the real Ask path (AskSession over HTTP) to `url`; its ResultNodes."""
    from MedPrunerSlicerLib.ask import AskSession
    from MedPrunerSlicerLib.client import MedPrunerClient, build_params

    done, errors = [], []
    session = AskSession(scene, lambda: MedPrunerClient(url), on_done=done.append, on_error=errors.append,
                         poll_interval=0.02)
    session.start(volume, build_params(question, max_new_tokens=4, **params))
    session.wait(60)
    assert not errors, errors
    assert len(done) == 1
    return done[0]
