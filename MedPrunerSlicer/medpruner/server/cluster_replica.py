"""One engine replica of `medpruner serve --replicas N`: a Ray Serve deployment class, one model load each.

A replica runs its jobs one at a time on its device (the GPU Ray gave it), exactly as the single
server's worker does (`jobs.execute_job`): same reader in a limited child process, same errors,
same clean-up. What differs is only where things come from and go to:
- the upload arrives as a Ray object reference and is fetched from the object store only when the
  job begins (a queued job holds no voxels here), written into the replica's own 0700 folder,
  read, and deleted;
- progress and the answer so far go to the job board, at most every PUBLISH_INTERVAL_S;
- the outcome (state, error, and the output files' bytes with `replica` added to report.json)
  is the request's return value, which the front writes to its disk: a replica that dies later
  takes no finished answer with it.
Cancelling the Serve request (DELETE on the front) stops the job at its next stage or token.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..pipeline import OUTPUT_FILES, AskRequest
from .jobs import CANCELLED, DONE, Upload, engine_facts, execute_job, prepared_verdict, relieve_memory_pressure

PUBLISH_INTERVAL_S = 0.05
SUFFIX = {"nrrd": ".nrrd", "nifti": ".nii", "nifti_gz": ".nii.gz", "metaimage": ".mha", "zip": ".zip"}


class BoardPublisher:
    """Sends a running job's stage, progress and answer so far to the board: at once when the stage changes,
    else at most every `interval` s, with whatever changed since (the final answer travels with the outcome,
    so nothing is lost between the last send and the end)."""

    def __init__(self, send, interval: float = PUBLISH_INTERVAL_S, clock=time.monotonic) -> None:
        self.send, self.interval, self.clock = send, interval, clock
        self.stage: str | None = None
        self.fraction = 0.0
        self.answer = ""
        self.sent_stage: str | None = None
        self.sent_answer = ""
        self.last = -float("inf")

    def progress(self, stage: str, fraction: float) -> None:
        self.stage, self.fraction = stage, fraction
        self._maybe_send()

    def text(self, delta: str, answer: str) -> None:
        self.answer = answer
        self._maybe_send()

    def _maybe_send(self) -> None:
        now = self.clock()
        if self.stage == self.sent_stage and now - self.last < self.interval:
            return
        fields = {"stage": self.stage, "progress": self.fraction}
        if self.answer != self.sent_answer:
            fields["answer"] = self.answer
        self.sent_stage, self.sent_answer, self.last = self.stage, self.answer, now
        self.send(**fields)


class EngineReplica:
    """Deployed by `cluster_front.deploy` with `serve.deployment(EngineReplica)`; see the module docstring."""

    def __init__(self, model: str, device: str, dtype: str | None, cache_bytes: int, read_limits,
                 board_name: str, namespace: str) -> None:
        import ray
        from ray import serve

        from ..cli import _load_engine, _StderrProgress
        from ..prepared_cache import PreparedCache
        from .errors import register_private_path
        from .workspace import create_workspace, sweep_dead_workspaces

        self.id = serve.get_replica_context().replica_id.unique_id
        self.board = ray.get_actor(board_name, namespace=namespace)
        sweep_dead_workspaces()   # folders of replicas that were killed on this machine
        self.workspace = create_workspace(subfolders=False, kind="replica-")
        register_private_path(self.workspace)
        self.engine = _load_engine(model, device, dtype, _StderrProgress())
        self.cache = PreparedCache(cache_bytes) if cache_bytes > 0 else None
        self.read_limits = read_limits
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medpruner-replica")
        self.turn = asyncio.Lock()
        facts = engine_facts(self.engine)
        ray.get(self.board.register.remote(self.id, facts, ray.get_runtime_context().current_actor, os.getpid()))
        print(f"medpruner: replica {self.id} ready on {facts['device']} (pid {os.getpid()})", flush=True)

    async def run(self, job_id: str, request: AskRequest, upload: dict | None, volume_id: str | None,
                  target: str | None = None) -> dict[str, Any]:
        """One job to its end (`target` is for the router only). Returns {"state", "error", "files"}."""
        if not await self.board.accepted.remote(job_id, self.id):
            return {"state": CANCELLED, "error": None}
        cancel = threading.Event()
        async with self.turn:
            if not await self.board.started.remote(job_id, self.id):
                return {"state": CANCELLED, "error": None}
            volume = await upload["volume"] if upload is not None else None   # from the object store, now
            work = asyncio.get_running_loop().run_in_executor(
                self.pool, self._execute, job_id, request, volume, upload and upload["kind"], volume_id, cancel)
            del volume
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                cancel.set()   # the job stops at its next stage or token, then cleans up in its thread
                raise

    async def check_prepared(self, volume_id: str, request: AskRequest, target: str | None = None) -> str | None:
        """None when this replica can answer a follow-up about `volume_id`, else why not (`prepared_verdict`)."""
        return prepared_verdict(self.engine, self.cache, volume_id, request)

    def _execute(self, job_id: str, request: AskRequest, volume, kind: str | None, volume_id: str | None,
                 cancel: threading.Event) -> dict[str, Any]:
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.workspace))
        try:
            upload = None
            if volume is not None:
                upload_folder = folder / "upload"
                upload_folder.mkdir(mode=0o700)
                path = upload_folder / ("volume" + SUFFIX[kind])
                with open(path, "wb") as handle:
                    handle.write(memoryview(volume))
                del volume
                upload = Upload(folder=upload_folder, path=path, kind=kind)
            publisher = BoardPublisher(lambda **fields: self.board.update.remote(job_id, **fields))
            relieve_memory_pressure(self.engine, self.cache)
            out_dir = folder / "out"
            state, error = execute_job(self.engine, request, upload, volume_id, out_dir, self.cache,
                                       self.read_limits, cancel.is_set, publisher.progress, publisher.text, job_id)
            files = {}
            if state == DONE:
                report = json.loads((out_dir / "report.json").read_text())
                report["replica"] = self.id
                files = {name: (out_dir / name).read_bytes() for name in OUTPUT_FILES if name != "report.json"}
                files["report.json"] = json.dumps(report, indent=2).encode()
            self.board.replica_changed.remote(self.id, len(self.cache) if self.cache is not None else 0)
            return {"state": state, "error": error, "files": files}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def __del__(self) -> None:   # Serve calls it when it stops the replica
        workspace = getattr(self, "workspace", None)
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)
