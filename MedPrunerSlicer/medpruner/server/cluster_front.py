"""The HTTP front of a replica set (`medpruner serve --replicas N`): the same API over Ray Serve replicas.

The front is the single server's process with its model swapped for a replica set: the same
uvicorn, guard, limits, upload parsing and header checks (`app.create_app`), so the hardening
rules hold unchanged. Only the job manager differs (`ClusterJobManager`):
- admission and job records are on the job board (`cluster_board`), a Ray actor on this machine;
- an accepted upload is put into the Ray object store once and its folder deleted; only the
  replica that runs the job fetches it, when the job begins;
- a new job goes to the least-loaded replica, a follow-up to the replica that prepared its volume
  (`cluster_router`); the request's return value carries the output files, written here;
- a replica that dies fails its jobs with `replica_lost` (not retried: the job may be what killed
  it); Ray Serve starts a new replica in its place; finished answers are on this machine's disk.
Ray is imported only here, so a server without `--replicas` never needs it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..errors import InputError
from ..pipeline import AskRequest
from .cluster_board import CANCELLED, DONE, FAILED, FINISHED, JobBoardActor
from .errors import ApiError, scrub
from .events import KEEPALIVE_S, Snapshot, status_events
from .jobs import QueueFull, Slot, Upload

log = logging.getLogger("medpruner.server")

APP_NAME = "medpruner"
DEPLOYMENT_NAME = "engine"
NAMESPACE = "medpruner"
BOARD_NAME = "medpruner-job-board"
ROUTER = "medpruner.server.cluster_router.VolumeAffinityRouter"
CHECK_HEADROOM = 4           # follow-up checks a replica takes beside its queued jobs
CALL_TIMEOUT_S = 30.0        # a board call or a follow-up check that takes longer is an error, not a hang
EXPIRE_EVERY_S = 30.0
REPLICA_KIND = "replica-"    # replicas' folders are named medpruner-serve-replica-*


@dataclass
class ClusterJob:
    """A job as the board knows it at one moment (what the routes of `app` read)."""

    id: str
    state: str
    record: dict[str, Any]
    out_dir: Path

    def status(self, position: int | None = None) -> dict[str, Any]:
        return self.record


def _replica_lost_error() -> dict[str, str]:
    return {"code": "replica_lost",
            "message": "The replica running this job stopped before it finished (its process ended).",
            "hint": "Submit the question again: the other replicas keep serving, and Ray starts a new replica "
                    "in its place. If it happens again with this volume, report it with the server's log."}


class ClusterJobManager:
    """`jobs.JobManager`'s interface over a job board and a Ray Serve deployment handle."""

    def __init__(self, board, handle, root: Path, max_queue: int, replicas: int, shutdown) -> None:
        import ray

        self.ray = ray
        self.board, self.handle, self.root, self.max_queue = board, handle, root, max_queue
        self.shutdown_cluster = shutdown
        self.responses: dict[str, Any] = {}       # job id -> its Serve response, while the job is outstanding
        self.lock = threading.Lock()
        # One thread waits on each outstanding job: as many as the set admits (a restarted replica adds one).
        self.followers = ThreadPoolExecutor(max_workers=2 * replicas + max_queue,
                                            thread_name_prefix="medpruner-follow")
        self.stopping = threading.Event()
        self.streams_closed = asyncio.Event()
        self.expirer = threading.Thread(target=self._expire_periodically, name="medpruner-expire", daemon=True)
        self.expirer.start()

    def _call(self, method: str, *args, **kwargs):
        return self.ray.get(getattr(self.board, method).remote(*args, **kwargs), timeout=CALL_TIMEOUT_S)

    # -- what app.py calls ------------------------------------------------------------------------
    def reserve(self) -> Slot:
        if self.stopping.is_set() or not self._call("reserve"):
            raise QueueFull()
        return Slot()

    def release(self, slot: Slot) -> None:
        if slot.open:
            slot.open = False
            self.board.release.remote()

    def submit(self, slot: Slot, request: AskRequest, upload: Upload | None, volume_id: str | None) -> ClusterJob:
        """Record the job, put its upload into the object store (deleting the folder) and send it to a replica."""
        job_id = uuid.uuid4().hex
        slot.open = False   # create() consumes the reservation
        record = self._call("create", job_id, volume_id)
        if record is None or self.stopping.is_set():
            raise QueueFull()
        payload = None
        try:
            if upload is not None:
                import numpy as np

                try:
                    voxels_file = np.memmap(upload.path, dtype=np.uint8, mode="r")
                    payload = {"volume": self.ray.put(voxels_file), "kind": upload.kind}   # the one stored copy
                    del voxels_file
                finally:
                    shutil.rmtree(upload.folder, ignore_errors=True)
            target = self._call("volume_owner", volume_id) if volume_id is not None else None
            response = self.handle.run.remote(job_id, request, payload, volume_id, target=target)
        except Exception as exc:   # the job never reached a replica: it must not hold its place for ever
            log.exception("job %s could not be sent to a replica", job_id)
            self._call_quietly("finish", job_id, FAILED, {"code": "internal_error",
                               "message": scrub(f"The job could not be sent to a replica: {type(exc).__name__}.")[:500],
                               "hint": "See the server's log; submit the question again."})
            raise ApiError(503, "unavailable", "The replica set could not take the job.",
                           "Try again in a little while; see the server's log.") from None
        with self.lock:
            self.responses[job_id] = response
        self.followers.submit(self._follow, job_id, response, payload)
        return ClusterJob(job_id, record["state"], record, self.root / job_id)

    def get(self, job_id: str) -> ClusterJob | None:
        record = self._call("status", job_id)
        if record is None:
            return None
        return ClusterJob(job_id, record["state"], record, self.root / job_id)

    def position(self, job: ClusterJob) -> int | None:
        return job.record["position"]

    def cancel(self, job: ClusterJob) -> None:
        record = self._call("cancel", job.id)
        if record is not None:
            job.record, job.state = record, record["state"]
        with self.lock:
            response = self.responses.get(job.id)
        if response is not None:
            response.cancel()   # a waiting job never starts; a running one stops at its next stage or token
        log.info("job %s cancel requested", job.id)

    def health(self) -> dict[str, Any]:
        return self._call("live_health")

    def queue_length(self) -> int:
        return self.health()["queue_length"]

    def prepared_verdict(self, volume_id: str, request: AskRequest) -> str | None:
        owner = self._call("volume_owner", volume_id)
        if owner is None:
            return "unknown"
        # Routed to the owner; if it is gone, to another replica, which does not hold the volume either.
        response = self.handle.check_prepared.remote(volume_id, request, target=owner)
        try:
            return response.result(timeout_s=CALL_TIMEOUT_S)
        except TimeoutError:
            response.cancel()
            raise ApiError(503, "replica_busy", "The replica holding this prepared volume did not answer in time.",
                           "Try again in a little while, or send the volume file again.",
                           headers={"Retry-After": "10"}) from None

    def events(self, job: ClusterJob):
        return status_events(self._snapshots(job.id))

    def end_streams(self) -> None:
        """The HTTP server is stopping (called on its event loop): end every event stream now."""
        self.streams_closed.set()

    # -- following jobs -------------------------------------------------------------------------
    async def _snapshots(self, job_id: str, keepalive_s: float = KEEPALIVE_S):
        seen = -1
        closed = asyncio.ensure_future(self.streams_closed.wait())
        try:
            while True:
                change = asyncio.ensure_future(self._await_ref(self.board.wait.remote(job_id, seen, keepalive_s)))
                await asyncio.wait({change, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not change.done():
                    change.cancel()
                    return
                got = change.result()
                if got is None:   # expired meanwhile
                    return
                version, record = got
                if version == seen:
                    yield None
                    continue
                seen = version
                finished = record["state"] in FINISHED
                yield Snapshot(record["state"], record["stage"], record["progress"], record["answer_so_far"],
                               record if finished else None)
                if finished:
                    return
        finally:
            closed.cancel()

    @staticmethod
    async def _await_ref(ref):
        return await ref

    def _follow(self, job_id: str, response, payload) -> None:
        """Wait for the job's replica to return, then record the outcome (in a thread of its own)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import RequestCancelledError

        answer = volume_id = None
        try:
            outcome = response.result()
            state, error = outcome["state"], outcome.get("error")
            if state == DONE:
                answer, volume_id = self._store_files(job_id, outcome["files"])
        except RequestCancelledError:
            state, error = CANCELLED, None
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            state, error = FAILED, _replica_lost_error()
            record = self._call_quietly("status", job_id)
            if record is not None and record.get("replica"):
                self._call_quietly("replica_lost", record["replica"])
            log.error("job %s failed: its replica died", job_id)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            state, error = FAILED, {"code": "internal_error", "message": scrub(f"{type(exc).__name__}: {exc}")[:500],
                                    "hint": "See the server's log."}
        finally:
            del payload   # the upload leaves the object store with its last reference
            with self.lock:
                self.responses.pop(job_id, None)
        if error is not None:
            error = {key: scrub(value) if key != "code" else value for key, value in error.items()}
        if state != DONE:
            shutil.rmtree(self.root / job_id, ignore_errors=True)
        expired = self._call_quietly("finish", job_id, state, error, answer, volume_id) or []
        self._delete(expired)
        log.info("job %s %s", job_id, state)

    def _store_files(self, job_id: str, files: dict[str, bytes]) -> tuple[str, str | None]:
        """Write a finished job's files under the front's workspace; (answer, volume_id) from its report."""
        import json

        out_dir = self.root / job_id
        out_dir.mkdir(mode=0o700)
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"unexpected output file name {name!r}")
            write_atomic(out_dir / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        report = json.loads(files["report.json"])
        return report.get("answer", ""), report.get("volume_id")

    def _call_quietly(self, method: str, *args):
        try:
            return self._call(method, *args)
        except Exception:   # the board is gone: the front is stopping
            log.warning("job board unreachable for %s", method)
            return None

    def _delete(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            shutil.rmtree(self.root / job_id, ignore_errors=True)

    def _expire_periodically(self) -> None:
        while not self.stopping.wait(EXPIRE_EVERY_S):
            self._delete(self._call_quietly("expire") or [])

    # -- stopping ---------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new jobs, cancel every outstanding one, wait up to `timeout` s for their replicas to let go,
        then take the replica set down (Ray itself too when this front started it)."""
        self.stopping.set()
        self._call_quietly("stop")
        with self.lock:
            responses = list(self.responses.values())
        for response in responses:
            response.cancel()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.responses:
                    break
            time.sleep(0.05)
        with self.lock:
            ended = not self.responses
        self.shutdown_cluster()
        self.followers.shutdown(wait=False, cancel_futures=True)
        return ended


# -- starting a replica set ---------------------------------------------------------------------------
def short_private_dir() -> Path:
    """A 0700 folder for a local Ray instance, marked as this process's like a workspace (so a later server
    sweeps it after a crash), with a short path: Ray's socket paths must stay under 108 characters."""
    from .workspace import PREFIX, create_workspace

    parent = tempfile.gettempdir()
    if len(parent) + len(PREFIX) + 70 > 107:
        parent = "/tmp"
    return create_workspace(parent, subfolders=False, kind="ray-")


@dataclass
class ReplicaPlan:
    replicas: int
    gpus_per_replica: float
    device: str


def plan_replicas(replicas: int, device: str, gpus_per_replica: float | None, cluster_gpus: float,
                  cluster_cpus: float, local: bool) -> ReplicaPlan:
    """The replicas' device and resources, or an InputError saying why the cluster cannot hold them."""
    if device.startswith("cuda:"):
        raise InputError(f"--device {device} cannot be used with --replicas: Ray gives each replica its own GPU.",
                         "Use --device cuda (or auto), and --gpus-per-replica to size them.")
    if gpus_per_replica is None:
        gpus_per_replica = 0.0 if device == "cpu" else (1.0 if cluster_gpus >= 1 or device == "cuda" else 0.0)
    if gpus_per_replica < 0 or (0 < gpus_per_replica < 1 and round(1 / gpus_per_replica, 6) % 1):
        raise InputError(f"--gpus-per-replica must be 0, a whole number, or 1/k (e.g. 0.5), got {gpus_per_replica}.")
    if device == "cpu" and gpus_per_replica > 0:
        raise InputError("--device cpu with --gpus-per-replica above 0 would hold GPUs the replicas never use.",
                         "Leave out --gpus-per-replica, or use --device cuda.")
    if device == "cuda" and gpus_per_replica == 0:
        raise InputError("--device cuda needs --gpus-per-replica above 0 (Ray gives each replica its GPUs).")
    needed = replicas * gpus_per_replica
    if needed > cluster_gpus + 1e-9:
        raise InputError(f"{replicas} replicas with {gpus_per_replica:g} GPU each need {needed:g} GPUs; the Ray "
                         f"cluster has {cluster_gpus:g}.",
                         "Use fewer --replicas, a smaller --gpus-per-replica, or add GPU machines to the cluster.")
    if gpus_per_replica == 0 and not local and replicas > cluster_cpus:
        raise InputError(f"{replicas} CPU replicas need {replicas} CPUs; the Ray cluster has {cluster_cpus:g}.",
                         "Use fewer --replicas.")
    return ReplicaPlan(replicas, gpus_per_replica, "cuda" if gpus_per_replica > 0 else "cpu")


def _sweep_replica_folders(wait_s: float = 3.0) -> None:
    """Delete the folders of this machine's replicas once their processes have ended (a stopped local
    instance does not run their clean-up)."""
    from .workspace import sweep_dead_workspaces

    deadline = time.monotonic() + wait_s
    while True:
        sweep_dead_workspaces(announce=False)
        if time.monotonic() > deadline or not _live_replica_folders():
            return
        time.sleep(0.1)


def _live_replica_folders() -> list[Path]:
    from .workspace import PREFIX

    base = Path(tempfile.gettempdir())
    return list(base.glob(PREFIX + REPLICA_KIND + "*"))


def _board_exists(ray) -> bool:
    """Whether a job board runs on the cluster (a board left by a front that died went with it: not detached)."""
    try:
        ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def start_replica_set(args, model: str, root: Path, read_limits, say) -> ClusterJobManager:
    """Start (or join) Ray, put the job board on this machine, deploy the replicas and wait until they are ready."""
    try:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError as exc:
        raise InputError(f"--replicas needs Ray Serve ({exc.name} is not installed).",
                         'Install the cluster extras: pip install -e ".[cluster]" in the MedPrunerSlicer checkout.') from exc
    local = args.ray_address is None
    ray_dir = None
    if local:
        ray_dir = short_private_dir()
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")   # each replica's lines as they are, not merged
        say(f"[cluster] starting a local Ray instance for {args.replicas} replicas ...")
        ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas), include_dashboard=False, namespace=NAMESPACE,
                 _temp_dir=str(ray_dir), _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True)
    else:
        say(f"[cluster] joining the Ray cluster at {args.ray_address} ...")
        try:
            ray.init(address=args.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"Cannot join the Ray cluster at {args.ray_address}: {exc}",
                             "Start it first (ray start --head on the head machine), give its address as "
                             "HOST:6379 from a machine of the cluster, and when it uses token authentication "
                             "set RAY_AUTH_MODE=token with its token (ray get-auth-token).") from None

    def shutdown() -> None:
        try:
            if local:
                ray.shutdown()   # the whole local instance: replicas, board, Serve
            else:
                serve.delete(APP_NAME)
                ray.kill(board)
                ray.shutdown()
        except Exception:
            log.exception("stopping the replica set")
        finally:
            if ray_dir is not None:
                shutil.rmtree(ray_dir, ignore_errors=True)
            if local:
                _sweep_replica_folders()

    board = None
    try:
        resources = ray.cluster_resources()
        plan = plan_replicas(args.replicas, args.device, args.gpus_per_replica, resources.get("GPU", 0.0),
                             resources.get("CPU", 0.0), local)
        if _board_exists(ray):
            raise InputError("Another medpruner serve front is already running on this Ray cluster.",
                             "Stop it first, or use it: one front per cluster.")
        board = ray.remote(JobBoardActor).options(
            name=BOARD_NAME, namespace=NAMESPACE, num_cpus=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(args.max_queue, args.keep_jobs, args.keep_minutes * 60)
        serve.start(http_options={"location": "NoServer"})   # this front is the HTTP server
        from .cluster_replica import EngineReplica

        deployment = serve.deployment(EngineReplica).options(
            name=DEPLOYMENT_NAME, num_replicas=plan.replicas,
            max_ongoing_requests=1 + args.max_queue + CHECK_HEADROOM,
            ray_actor_options={"num_cpus": 1, "num_gpus": plan.gpus_per_replica},
            request_router_config=RequestRouterConfig(request_router_class=ROUTER),
            graceful_shutdown_timeout_s=5, health_check_period_s=5,
        )
        say(f"[cluster] deploying {plan.replicas} replicas of {model} ({plan.device}"
            f"{f', {plan.gpus_per_replica:g} GPU each' if plan.gpus_per_replica else ''}); each loads the model ...")
        try:
            handle = serve.run(deployment.bind(model, plan.device, args.dtype, int(args.cache_gb * 2**30),
                                               read_limits, BOARD_NAME, NAMESPACE),
                               name=APP_NAME, route_prefix=None)
        except RuntimeError as exc:
            raise InputError(f"The replicas could not start: {str(exc).strip().splitlines()[-1][:400]}",
                             "See the replicas' log lines above.") from None
        ready = ray.get(board.live_health.remote())["replicas"]
        pids = ray.get(board.replica_pids.remote())
        say(f"[cluster] {len(ready)} replicas ready: " +
            ", ".join(f"replica {r['id']} on {r['device']} (pid {pids.get(r['id'])})" for r in ready))
    except BaseException:
        shutdown()
        raise
    return ClusterJobManager(board, handle, root, args.max_queue, plan.replicas, shutdown)
