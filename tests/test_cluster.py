"""`medpruner serve --replicas 2` on a real local Ray instance (CPU, the tiny model), driven over HTTP.

One replica set for the module (starting Ray and two replicas takes ~20 s), so the tests run in file
order and the destructive ones (a replica killed, the server stopped) come last. Bounded: every
wait has a deadline and the module has a pytest timeout. CI sets MEDPRUNER_REQUIRE_CLUSTER=1, so a
missing Ray fails there instead of skipping.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from server_helpers import AUTH, TOKEN, start_server, wait_state

if os.environ.get("MEDPRUNER_REQUIRE_CLUSTER") != "1":
    pytest.importorskip("ray.serve", reason="the replica-set tests need Ray Serve (pip install -e '.[cluster]')")

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

MAX_QUEUE = 4
REPLICAS = 2


def params(question: str = "Is there a liver lesion?", **extra) -> dict:
    return {"params": json.dumps({"question": question, "max_new_tokens": 6, **extra})}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[Path]:
    """Six different CT phantoms as NRRD files."""
    from medpruner.phantom import make_phantom_ct

    folder = tmp_path_factory.mktemp("volumes")
    paths = []
    for seed in range(6):
        path = folder / f"ct{seed}.nrrd"
        sitk.WriteImage(make_phantom_ct(shape=(24, 96, 96), seed=seed), str(path), True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cluster(tiny_qwen3_vl, tmp_path_factory):
    server = start_server(tiny_qwen3_vl, tmp_path_factory.mktemp("cluster"), "--replicas", str(REPLICAS),
                          "--max-queue", str(MAX_QUEUE),
                          # the limits of the single server's hostile-file suite, so every case applies
                          "--max-upload-mb", "2", "--max-volume-mb", "8", wait=False)
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def single(tiny_qwen3_vl, tmp_path_factory):
    """The single-process server on the same checkpoint, for the answers to compare with."""
    server = start_server(tiny_qwen3_vl, tmp_path_factory.mktemp("single"))
    try:
        yield server
    finally:
        server.stop()


def submit(client: httpx.Client, volume: Path | None = None, **extra) -> httpx.Response:
    files = {"volume": (volume.name, volume.read_bytes(), "application/octet-stream")} if volume else None
    return client.post("/v1/jobs", data=params(**extra), files=files, headers=AUTH)


def finished(client: httpx.Client, volume: Path | None = None, **extra) -> tuple[dict, dict]:
    """(status, report) of one job that must end done."""
    response = submit(client, volume, **extra)
    assert response.status_code == 202, response.text
    status = wait_state(client, response.json()["job_id"], timeout=120)
    assert status["state"] == "done", status
    return status, client.get(f"/v1/jobs/{status['job_id']}/result", headers=AUTH).json()


def replica_ids(client: httpx.Client) -> set[str]:
    return {r["id"] for r in client.get("/v1/health").json()["replicas"]}


def replica_pid(server, replica: str) -> int:
    match = re.search(rf"replica {replica} on \S+ \(pid (\d+)\)", server.log.read_text())
    assert match, f"no ready line for replica {replica}"
    return int(match.group(1))


def test_health_lists_the_replicas_with_the_single_server_fields(cluster, single):
    health = cluster.client.get("/v1/health").json()
    alone = single.client.get("/v1/health").json()
    assert set(alone) <= set(health)
    assert health["model_id"] == alone["model_id"] and health["model_family"] == alone["model_family"]
    assert len(health["replicas"]) == REPLICAS
    assert len({r["id"] for r in health["replicas"]}) == REPLICAS
    for replica in health["replicas"]:
        assert replica["device"] == "cpu" and replica["queue_length"] == 0 and replica["prepared_volumes"] == 0


def test_six_concurrent_jobs_on_different_volumes_all_finish_on_both_replicas(cluster, volumes):
    results: dict[int, tuple] = {}

    def one(index: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=120) as client:
            results[index] = finished(client, volumes[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert sorted(results) == list(range(6))
    used = {report["replica"] for _, report in results.values()}
    assert used == replica_ids(cluster.client)                # both replicas took jobs
    for status, report in results.values():
        assert status["replica"] == report["replica"]
        assert report["prefix_reused"] is False
    health = cluster.client.get("/v1/health").json()
    assert sum(r["prepared_volumes"] for r in health["replicas"]) == 6   # each volume prepared once, somewhere


def test_answers_equal_the_single_process_server(cluster, single, volumes):
    for volume in volumes[:2]:
        _, ours = finished(cluster.client, volume, question="Describe the liver.")
        _, theirs = finished(single.client, volume, question="Describe the liver.")
        assert ours["answer"] == theirs["answer"]
        # The same decisions; scores equal up to float rounding (the replica's torch runs on one thread)
        assert_same(ours["slices"], theirs["slices"])
        assert_same(ours["tokens"], theirs["tokens"])
        assert [s["kept"] for s in ours["slices"]["per_slice"]] == [s["kept"] for s in theirs["slices"]["per_slice"]]
        assert "replica" in ours and "replica" not in theirs


def assert_same(ours, theirs, where: str = "") -> None:
    """Equal values, floats within a relative 1e-5 (so a kept/dropped flip or a changed count fails)."""
    if isinstance(ours, float) or isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), where
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert ours == theirs, where


def heatmap(client: httpx.Client, job_id: str, kind: str, folder: Path) -> np.ndarray:
    response = client.get(f"/v1/jobs/{job_id}/heatmaps/{kind}", headers=AUTH)
    assert response.status_code == 200
    path = folder / f"{job_id}-{kind}.nrrd"
    path.write_bytes(response.content)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_heatmaps_equal_the_single_process_server(cluster, single, volumes, tmp_path):
    ours, _ = finished(cluster.client, volumes[3], question="Any fracture?")
    theirs, _ = finished(single.client, volumes[3], question="Any fracture?")
    for kind in ("kept", "attention"):
        mine = heatmap(cluster.client, ours["job_id"], kind, tmp_path)
        alone = heatmap(single.client, theirs["job_id"], kind, tmp_path)
        if kind == "kept":
            np.testing.assert_array_equal(mine, alone)
        else:
            np.testing.assert_allclose(mine, alone, rtol=1e-4, atol=1e-7)


def test_a_follow_up_goes_to_the_replica_that_prepared_the_volume(cluster, volumes):
    first, report = finished(cluster.client, volumes[4], question="Where is the liver?")
    for question in ("And the spleen?", "Any fluid?", "Kidneys?"):
        status, again = finished(cluster.client, None, question=question, volume_id=report["volume_id"])
        assert again["prefix_reused"] is True
        assert again["replica"] == report["replica"] == status["replica"]
        assert again["volume_id"] == report["volume_id"]


def test_follow_up_refusals_have_the_single_server_shapes(cluster, single, volumes):
    _, report = finished(cluster.client, volumes[5])
    unknown = submit(cluster.client, None, volume_id="0" * 32)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_volume"
    alone = submit(single.client, None, volume_id="0" * 32)
    assert unknown.json() == alone.json()
    mismatch = submit(cluster.client, None, volume_id=report["volume_id"], axis="coronal")
    assert mismatch.status_code == 409 and mismatch.json()["error"]["code"] == "settings_mismatch"
    assert "axis axial -> coronal" in mismatch.json()["error"]["message"]


def test_events_stream_the_answer_and_end_with_the_status(cluster, volumes):
    response = submit(cluster.client, volumes[0], question="Stream it?")
    job_id = response.json()["job_id"]
    events = []
    with cluster.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=AUTH, timeout=120) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert events[-1][0] == "done"
    text = "".join(data["delta"] for name, data in events if name == "token")
    report = cluster.client.get(f"/v1/jobs/{job_id}/result", headers=AUTH).json()
    assert text == report["answer"] == events[-1][1]["answer_so_far"]


def long_job(client: httpx.Client, volume: Path) -> str:
    """A job that runs for seconds (the tiny model writing 2048 tokens), once it is running with an answer."""
    response = submit(client, volume, question="Tell me everything.", max_new_tokens=2048)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.time() + 60
    while time.time() < deadline:
        status = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if status["state"] == "running" and status["answer_so_far"]:
            return job_id
        assert status["state"] in ("queued", "running"), status
        time.sleep(0.05)
    raise AssertionError("the long job never started answering")


def test_cancel_stops_a_running_job_on_its_replica(cluster, volumes):
    job_id = long_job(cluster.client, volumes[1])
    assert cluster.client.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200
    status = wait_state(cluster.client, job_id, timeout=30)
    assert status["state"] == "cancelled"
    result = cluster.client.get(f"/v1/jobs/{job_id}/result", headers=AUTH)
    assert result.status_code == 409 and result.json()["error"]["code"] == "not_done"


def test_twenty_concurrent_submissions_are_all_answered_or_refused_with_429(cluster, volumes):
    outcomes: list[tuple[int, dict, dict]] = []
    lock = threading.Lock()
    gate = threading.Barrier(20)

    def one(index: int) -> None:
        with httpx.Client(base_url=cluster.url, timeout=120) as client:
            gate.wait()
            response = submit(client, volumes[index % 6], question=f"Question {index}?")
            with lock:
                outcomes.append((response.status_code, dict(response.headers), response.json()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == 20
    accepted = [body["job_id"] for code, _, body in outcomes if code == 202]
    refused = [(headers, body) for code, headers, body in outcomes if code == 429]
    assert len(accepted) + len(refused) == 20, [code for code, _, _ in outcomes]
    assert len(accepted) >= REPLICAS + MAX_QUEUE     # the whole capacity was used
    assert refused, "20 at once must overflow a capacity of 6"
    for headers, body in refused:
        assert headers["retry-after"] and body["error"]["code"] == "queue_full"
    for job_id in accepted:                          # none lost
        assert wait_state(cluster.client, job_id, timeout=180)["state"] == "done"


def test_hostile_files_get_the_single_server_answers_and_nothing_outside_is_read(cluster, tmp_path):
    """The front runs the single server's checks unchanged: every hostile case is refused alike."""
    from hostile_files import hostile_cases

    secret = tmp_path / "secret.raw"
    secret.write_bytes(os.urandom(256))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    os.utime(secret, (1_000_000, time.time()))
    for name, data, status, code, words in hostile_cases(secret, fifo):
        response = cluster.client.post("/v1/jobs", files={"volume": ("volume.nrrd", data)},
                                       data=params(), headers=AUTH)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code and words in error["message"], (name, error)
        assert "medpruner-serve-" not in json.dumps(error)
    assert os.stat(secret).st_atime == 1_000_000 or not _atime_shows_reads(tmp_path)
    assert all(not any((ws / "uploads").iterdir()) for ws in cluster.workspaces() if (ws / "uploads").exists())


def _atime_shows_reads(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"x")
    os.utime(probe, (1_000_000, time.time()))
    probe.read_bytes()
    return os.stat(probe).st_atime != 1_000_000


def test_damage_only_the_reader_sees_fails_the_job_on_its_replica_and_leaves_no_file(cluster, tmp_path):
    from medpruner.phantom import make_phantom_ct

    sitk.WriteImage(make_phantom_ct(shape=(8, 48, 48)), str(tmp_path / "ct.nrrd"), True)
    data = bytearray((tmp_path / "ct.nrrd").read_bytes())
    start = data.find(b"\n\n") + 2
    middle = start + (len(data) - start) // 2
    data[middle:middle + 64] = os.urandom(64)
    response = cluster.client.post("/v1/jobs", files={"volume": ("ct.nrrd", bytes(data))}, data=params(), headers=AUTH)
    assert response.status_code == 202, response.text
    status = wait_state(cluster.client, response.json()["job_id"], timeout=60)
    assert status["state"] == "failed" and status["error"]["code"] == "bad_volume", status
    assert "medpruner-serve-" not in json.dumps(status["error"])


def test_uploads_are_stored_once_and_no_patient_file_stays_anywhere(cluster, volumes):
    """An accepted upload leaves the front's disk at once (it is in the object store), and after the job
    neither the front's upload folder nor any replica's folder holds a file of it."""
    response = submit(cluster.client, volumes[0], question="Where is it stored?")
    assert response.status_code == 202
    fronts = [ws for ws in cluster.workspaces() if (ws / "uploads").exists()]
    assert len(fronts) == 1 and not any((fronts[0] / "uploads").iterdir())
    assert wait_state(cluster.client, response.json()["job_id"])["state"] == "done"
    replicas = [ws for ws in cluster.workspaces() if ws.name.startswith("medpruner-serve-replica-")]
    assert len(replicas) == REPLICAS
    assert [p for ws in replicas for p in ws.rglob("*") if p.name != "owner.json"] == []


def test_every_route_but_health_needs_the_token(cluster):
    for method, path in (("GET", "/v1/jobs/0123"), ("GET", "/v1/jobs/0123/events"), ("DELETE", "/v1/jobs/0123"),
                         ("POST", "/v1/jobs"), ("GET", "/docs")):
        response = cluster.client.request(method, path)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized", (method, path)


def test_killing_a_replica_mid_job_fails_that_job_and_the_other_keeps_serving(cluster, volumes):
    earlier, earlier_report = finished(cluster.client, volumes[2], question="Before the failure?")
    job_id = long_job(cluster.client, volumes[1])
    victim = cluster.client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["replica"]
    os.kill(replica_pid(cluster, victim), signal.SIGKILL)
    status = wait_state(cluster.client, job_id, timeout=60)
    assert status["state"] == "failed"
    assert status["error"]["code"] == "replica_lost" and "Submit the question again" in status["error"]["hint"]
    survivor = (replica_ids(cluster.client) - {victim}).pop()
    _, after = finished(cluster.client, volumes[0], question="After the failure?")
    assert after["replica"] != victim
    # nothing already finished is lost
    kept = cluster.client.get(f"/v1/jobs/{earlier['job_id']}/result", headers=AUTH)
    assert kept.status_code == 200 and kept.json()["answer"] == earlier_report["answer"]
    if earlier_report["replica"] == victim:   # its prepared volume died with it: 404, as after an eviction
        gone = submit(cluster.client, None, volume_id=earlier_report["volume_id"])
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_volume"
    # Ray starts a new replica in the dead one's place
    deadline = time.time() + 120
    while time.time() < deadline and len(replica_ids(cluster.client) - {victim}) < REPLICAS:
        time.sleep(0.5)
    assert survivor in replica_ids(cluster.client) and len(replica_ids(cluster.client) - {victim}) == REPLICAS


def test_sigterm_mid_job_stops_the_set_and_leaves_no_folder_or_process(cluster, volumes):
    long_job(cluster.client, volumes[1])             # running, with an upload read and outputs on the way
    pids = [int(pid) for pid in re.findall(r"replica \w+ (?:ready )?on \S+ \(pid (\d+)\)", cluster.log.read_text())]
    assert len(pids) >= REPLICAS
    ray_dirs = [p for p in Path("/tmp").glob("medpruner-serve-ray-*")
                if json.loads((p / "owner.json").read_text())["pid"] == cluster.proc.pid]
    assert len(ray_dirs) == 1 and cluster.workspaces()
    started = time.time()
    assert cluster.stop(signal.SIGTERM, timeout=60) == 0
    assert time.time() - started < 30
    assert not ray_dirs[0].exists()
    assert cluster.workspaces() == []                # the front's and the replicas' folders
    time.sleep(1)
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
