"""`medpruner serve` as a client meets it: a real uvicorn process on 127.0.0.1 with the tiny model."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from medpruner.phantom import make_phantom_ct

from server_helpers import AUTH, TOKEN, free_port, wait_state
VOLATILE = ("timings_s", "software", "peak_memory_bytes", "volume_id", "prefix_reused", "prepare_s")


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medpruner", "serve", "--model", str(tiny_qwen3_vl), "--port", str(port),
             "--token", TOKEN, "--max-upload-mb", "1", "--max-queue", "4", "--dtype", "float32"],
            stdout=handle, stderr=subprocess.STDOUT,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.time() + 90
    while True:
        try:
            if client.get("/v1/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server did not start:\n" + log.read_text())
        time.sleep(0.3)
    yield client
    proc.terminate()
    proc.wait(timeout=30)
    client.close()


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vol") / "ct.nrrd"
    sitk.WriteImage(make_phantom_ct(shape=(10, 64, 64)), str(path))
    return path


def submit(client, params, volume_path=None, content=None, headers=AUTH):
    files = None
    if volume_path is not None:
        files = {"volume": ("volume.nrrd", Path(volume_path).read_bytes())}
    elif content is not None:
        files = {"volume": ("volume.nrrd", content)}
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return client.post("/v1/jobs", files=files, data=data, headers=headers)


def wait(client, job_id, states=("done", "failed", "cancelled"), timeout=120):
    return wait_state(client, job_id, states, timeout)


def ask(client, params, volume_path):
    response = submit(client, params, volume_path)
    assert response.status_code == 202, response.text
    status = wait(client, response.json()["job_id"])
    assert status["state"] == "done", status
    return response.json()["job_id"], client.get(f"/v1/jobs/{response.json()['job_id']}/result", headers=AUTH).json()


def _stable(report):
    out = {k: v for k, v in report.items() if k not in VOLATILE}
    if "unpruned" in out:
        out["unpruned"] = {k: v for k, v in out["unpruned"].items() if k not in VOLATILE}
    return out


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 99, (3, 4, 8, 8)).astype(np.int16), isVector=False), str(four))
    whole = tmp_path / "whole.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(-999, 999, (8, 32, 32)).astype(np.int16)), str(whole))
    data = whole.read_bytes()
    lying = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 64\nencoding: raw\nendian: little\n\n" + \
        b"\0" * 1000
    return {"four": four.read_bytes(), "truncated": data[:-300], "lying": lying,
            "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "big": b"NRRD0004\n" + b"\0" * (2 * 2**20),
            "gzip junk": gzip.compress(b"not a nifti at all" * 40)}


BAD_REQUESTS = [
    # (name, params, file key or None, headers, status, error code, words in the message)
    ("no file", {"question": "Q?"}, None, AUTH, 400, "no_file", "No volume file"),
    ("empty file", {"question": "Q?"}, "empty", AUTH, 400, "empty_file", "empty"),
    ("a PNG", {"question": "Q?"}, "png", AUTH, 415, "unsupported_file", "PNG"),
    ("a 4D volume", {"question": "Q?"}, "four", AUTH, 422, "bad_volume", "4D"),
    ("truncated NRRD", {"question": "Q?"}, "truncated", AUTH, 422, "bad_volume", ""),
    ("lying NRRD header", {"question": "Q?"}, "lying", AUTH, 422, "bad_volume", ""),
    ("gzip that is no NIfTI", {"question": "Q?"}, "gzip junk", AUTH, 422, "bad_volume", ""),
    ("oversized upload", {"question": "Q?"}, "big", AUTH, 413, "upload_too_large", "limit"),
    ("bad JSON", "{question: oops", "volume", AUTH, 422, "invalid_params", "not valid JSON"),
    ("unknown field", {"question": "Q?", "temprature": 2}, "volume", AUTH, 422, "invalid_params", "temprature"),
    ("tau out of range", {"question": "Q?", "pruning": {"tau": 1.5}}, "volume", AUTH, 422, "invalid_params",
     "pruning.tau"),
    ("tau as a string", {"question": "Q?", "pruning": {"tau": "0.5"}}, "volume", AUTH, 422, "invalid_params",
     "pruning.tau"),
    ("empty question", {"question": "   "}, "volume", AUTH, 422, "invalid_params", "question"),
    ("huge question", {"question": "x" * 5000}, "volume", AUTH, 422, "invalid_params", "question"),
    ("bad window", {"question": "Q?", "window": "purple"}, "volume", AUTH, 422, "invalid_params", "window"),
    ("unknown volume_id", {"question": "Q?", "volume_id": "0" * 32}, None, AUTH, 404, "unknown_volume", ""),
    ("missing token", {"question": "Q?"}, "volume", {}, 401, "unauthorized", "token"),
    ("wrong token", {"question": "Q?"}, "volume", {"Authorization": "Bearer nope"}, 401, "unauthorized", "token"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, volume, tmp_path, case):
    name, params, file_key, headers, status, code, words = case
    files = _bad_files(tmp_path)
    content = {"empty": b"", **files}.get(file_key) if file_key not in (None, "volume") else None
    response = submit(server, params, volume if file_key == "volume" else None, content, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"] and error["hint"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert server.get("/v1/health").json()["status"] == "ok"


def test_unknown_jobs_routes_and_heatmaps(server):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/result", "/v1/jobs/nope/heatmaps/kept"):
        response = server.get(path, headers=AUTH)
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_job"
    assert server.delete("/v1/jobs/nope", headers=AUTH).status_code == 404
    response = server.get("/v2/anything", headers=AUTH)
    assert response.status_code == 404 and "error" in response.json()
    assert server.get("/v2/anything").status_code == 401   # auth before routing: unknown paths reveal nothing
    assert server.get("/v1/jobs/nope").status_code == 401   # the token is checked before anything else


def test_health_needs_no_token_and_says_what_runs(server):
    health = server.get("/v1/health").json()
    assert health["model_family"] == "qwen3_vl" and health["device"] == "cpu" and health["auth"] is True
    assert {"model_id", "dtype", "version", "queue_length"} <= set(health)
    assert health["demo_model"] is True   # the tiny checkpoint: clients flag its answers as meaningless


def test_refuses_a_network_address_without_a_token(tiny_qwen3_vl):
    proc = subprocess.run([sys.executable, "-m", "medpruner", "serve", "--model", str(tiny_qwen3_vl),
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "without an access token" in proc.stderr


def test_http_result_equals_what_the_cli_writes(server, volume, tiny_qwen3_vl, tmp_path):
    params = {"question": "Is there a liver lesion?", "max_new_tokens": 6, "pruning": {"tau": 0.8}, "compare": True}
    job_id, report = ask(server, params, volume)
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "medpruner", "ask", str(volume), params["question"], "--model",
                           str(tiny_qwen3_vl), "--out", str(out), "--max-new-tokens", "6", "--tau", "0.8",
                           "--compare", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _stable(report) == _stable(json.loads((out / "report.json").read_text()))
    for kind in ("kept", "attention"):
        response = server.get(f"/v1/jobs/{job_id}/heatmaps/{kind}", headers=AUTH)
        assert response.status_code == 200
        served = tmp_path / f"{kind}.nrrd"
        served.write_bytes(response.content)
        a, b = sitk.ReadImage(str(served)), sitk.ReadImage(str(out / f"heatmap_{kind}.nrrd"))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
            (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())


def test_follow_up_by_volume_id_reuses_the_prefix(server, volume):
    _, first = ask(server, {"question": "Is there a liver lesion?", "max_new_tokens": 5}, volume)
    response = submit(server, {"question": "Where is it?", "max_new_tokens": 5, "volume_id": first["volume_id"]})
    assert response.status_code == 202
    assert wait(server, response.json()["job_id"])["state"] == "done"
    follow = server.get(f"/v1/jobs/{response.json()['job_id']}/result", headers=AUTH).json()
    assert follow["prefix_reused"] and follow["timings_s"]["vision"] == 0.0
    # the follow-up did not spend what preparing the volume cost the first answer
    assert not first["prefix_reused"] and first["prepare_s"] >= first["timings_s"]["vision"] > 0
    assert follow["prepare_s"] == first["prepare_s"]
    _, fresh = ask(server, {"question": "Where is it?", "max_new_tokens": 5, "pruning": {"gamma": 0.05}}, volume)
    assert follow["generated_token_ids"] == fresh["generated_token_ids"]
    changed = submit(server, {"question": "Q?", "volume_id": first["volume_id"], "pruning": {"tau": 0.5}})
    assert changed.status_code == 409
    error = changed.json()["error"]
    assert error["code"] == "settings_mismatch" and "settings differ" in error["message"]
    assert "pruning.tau 0.9 -> 0.5" in error["message"]     # names what differs


def test_twenty_concurrent_submissions(server, volume):
    questions = ["Is there a lesion?", "Is the liver normal?", "Any fluid?", "Where is the spine?"]
    responses: list[tuple[int, httpx.Response]] = []
    lock = threading.Lock()
    volume_bytes = volume.read_bytes()

    def one(i: int) -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=60) as client:
            response = submit(client, {"question": questions[i % 4], "max_new_tokens": 4}, content=volume_bytes)
        with lock:
            responses.append((i, response))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(responses) == 20
    accepted = [(i, r.json()["job_id"]) for i, r in responses if r.status_code == 202]
    refused = [r for _, r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == 20 and accepted and refused
    assert all(r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full" for r in refused)
    assert len({job_id for _, job_id in accepted}) == len(accepted)
    alone: dict[str, dict] = {}
    for i, job_id in accepted:
        assert wait(server, job_id)["state"] == "done"
        report = server.get(f"/v1/jobs/{job_id}/result", headers=AUTH).json()
        question = questions[i % 4]
        assert report["question"] == question
        if question not in alone:
            alone[question] = ask(server, {"question": question, "max_new_tokens": 4}, volume)[1]
        for key in ("answer", "generated_token_ids", "slices", "tokens"):
            assert report[key] == alone[question][key]


def test_cancel_a_queued_and_a_running_job(server, volume):
    long = {"question": "Describe everything.", "max_new_tokens": 2048, "compare": True}
    running = submit(server, long, volume).json()["job_id"]
    wait(server, running, states=("running",))
    queued = submit(server, {"question": "Q?", "max_new_tokens": 4}, volume).json()["job_id"]
    assert server.get(f"/v1/jobs/{queued}", headers=AUTH).json()["state"] == "queued"
    assert server.delete(f"/v1/jobs/{queued}", headers=AUTH).json()["state"] == "cancelled"
    server.delete(f"/v1/jobs/{running}", headers=AUTH)
    assert wait(server, running, timeout=60)["state"] == "cancelled"
    refused = server.get(f"/v1/jobs/{running}/result", headers=AUTH)
    assert refused.status_code == 409 and "never have one" in refused.json()["error"]["hint"]
    after = submit(server, {"question": "Still there?", "max_new_tokens": 4}, volume).json()["job_id"]
    assert wait(server, after)["state"] == "done"
    assert wait(server, queued)["state"] == "cancelled", "a cancelled queued job must never run"


def _zip_folder(folder: Path, archive: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, f"series/{path.name}")
    return archive


def _submit_folder_as_zip(server, folder: Path, tmp_path: Path, max_new_tokens: int = 2):
    archive = _zip_folder(folder, tmp_path / f"{folder.name}.zip")
    response = server.post("/v1/jobs", files={"volume": (archive.name, archive.read_bytes())},
                           data={"params": json.dumps({"question": "Q?", "max_new_tokens": max_new_tokens})},
                           headers=AUTH)
    assert response.status_code == 202, response.text
    return response


def test_dicom_zip_upload(server, tmp_path):
    from volume_helpers import write_dicom_series

    folder = tmp_path / "series"
    image = make_phantom_ct(shape=(8, 48, 48))
    folder.mkdir()
    write_dicom_series(image, folder, series_uid="1.2.826.0.1.3680043.2.1125.99")
    response = _submit_folder_as_zip(server, folder, tmp_path, max_new_tokens=3)
    assert wait(server, response.json()["job_id"])["state"] == "done"
    report = server.get(f"/v1/jobs/{response.json()['job_id']}/result", headers=AUTH).json()
    assert report["input"]["size"] == [48, 48, 8]
    assert "1.2.826.0.1.3680043" not in json.dumps(report), "no DICOM UIDs may be kept"


def test_dicom_zip_with_several_series_fails_without_naming_uids(server, tmp_path):
    """What only the reader sees (the series in a zip) fails the job; the message counts the series and names no
    UID, no server path, and the option it suggests exists."""
    from volume_helpers import write_dicom_series

    folder = tmp_path / "series"
    uids = ["1.2.826.0.1.3680043.2.1125.98.1", "1.2.826.0.1.3680043.2.1125.98.2"]
    for uid in uids:
        write_dicom_series(make_phantom_ct(shape=(4, 32, 32)), folder, series_uid=uid)
    response = _submit_folder_as_zip(server, folder, tmp_path)
    status = wait(server, response.json()["job_id"])
    assert status["state"] == "failed" and status["error"]["code"] == "bad_volume", status
    error = status["error"]
    assert "several DICOM series" in error["message"] and "CT, 4 images; CT, 4 images" in error["message"]
    assert "one series" in error["hint"]
    text = json.dumps(error)
    assert "1.2.826" not in text and "medpruner-serve-" not in text and "/tmp" not in text and "series-uid" not in text


def test_dicom_zip_follows_the_same_geometry_rules(server, tmp_path):
    """A zip of a series with a gap fails its job with the CLI's message (no paths, no UIDs); a zip of pydicom-data's
    enhanced CT is read from its functional groups."""
    from dicom_shapes import line, pydicom_data_file, write_series

    write_series(tmp_path / "gap", line(3) + line(3, start=(-158.135803, -179.035797, -40.0)))
    response = _submit_folder_as_zip(server, tmp_path / "gap", tmp_path)
    status = wait(server, response.json()["job_id"])
    assert status["state"] == "failed" and "not evenly spaced" in status["error"]["message"], status
    assert "/tmp" not in json.dumps(status["error"]) and "1.3.6.1" not in json.dumps(status["error"])
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    (enhanced / "ct.dcm").write_bytes(pydicom_data_file("eCT_Supplemental.dcm").read_bytes())
    response = _submit_folder_as_zip(server, enhanced, tmp_path)
    assert wait(server, response.json()["job_id"])["state"] == "done"
    report = server.get(f"/v1/jobs/{response.json()['job_id']}/result", headers=AUTH).json()
    assert report["input"]["size"] == [512, 512, 2] and report["input"]["spacing"][2] == 10.0
    assert report["input"]["geometry_assumed"] is False
