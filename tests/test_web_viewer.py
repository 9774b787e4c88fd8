"""The web viewer at `/`, in a real headless Chromium against a real `medpruner serve` on 127.0.0.1.

Needs Debian's chromium, Playwright (PyPI) and the niivue bundle (`cd web && npm ci && npm run build`);
without them these tests skip, unless MEDPRUNER_REQUIRE_BROWSER=1 (CI), which makes a skip a failure.
WebGL runs on the SwiftShader software renderer. Overlays are checked by the pixels on screen.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from server_helpers import TOKEN, running

CHROMIUM = os.environ.get("MEDPRUNER_CHROMIUM", "/usr/bin/chromium")
BUNDLE = Path(__file__).resolve().parents[1] / "MedPrunerSlicer/medpruner/server/web/vendor/niivue.js"
SCREENSHOTS = os.environ.get("MEDPRUNER_SCREENSHOT_DIR")   # set to Resources/Screenshots to refresh the README's


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[web]')"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set MEDPRUNER_CHROMIUM)"
    if not BUNDLE.is_file():
        return "the niivue bundle is not installed (cd web && npm ci && npm run build)"
    return None


_reason = _missing()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; the tests that use it skip without it, or fail when CI requires them."""
    if _reason:
        if os.environ.get("MEDPRUNER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MEDPRUNER_REQUIRE_BROWSER=1 but {_reason}", pytrace=False)
        pytest.skip(_reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                                    "--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl, tmp_path_factory):
    with running(tiny_qwen3_vl, tmp_path_factory.mktemp("web"), token=None) as s:
        yield s


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    import SimpleITK as sitk

    from medpruner.phantom import make_phantom_ct

    path = tmp_path_factory.mktemp("vol") / "sample_ct.nrrd"
    sitk.WriteImage(make_phantom_ct(), str(path))
    return path


SPY_SENT = """
window.__sent = [];
const send = XMLHttpRequest.prototype.send;
XMLHttpRequest.prototype.send = function (body) {
  if (body instanceof FormData) window.__sent.push({volume: body.has('volume'), params: body.get('params')});
  return send.call(this, body);
};
"""


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    page.goto(url + "/")
    return page


def ask(page, question, file=None, turn=1):
    if file is not None:
        page.set_input_files("#volume-file", str(file))
    page.fill("#question", question)
    page.click("#ask")
    # The answer, or an error: a refused request fails here with the page's message, not a timeout.
    page.wait_for_selector(f"body[data-answered='{turn}'], #error:not([hidden])", timeout=120_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()


def pixels(page, selector) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB")).astype(int)


def overlay_pixels(rgb: np.ndarray) -> int:
    """Coloured pixels: the scan is grey and the crosshair green, so anything else is an overlay."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    chroma = rgb.max(-1) - rgb.min(-1)
    crosshair = (g > r + 40) & (g > b + 40)
    return int(((chroma > 60) & ~crosshair).sum())


def hide_labels(page):
    for box in page.locator("#labels input[type=checkbox]").all():
        box.uncheck()


def shot(page, name):
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def test_ask_overlays_and_follow_up(browser, server, phantom):
    page = open_page(browser, server.url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#notice").inner_text() == \
        "For research use only: not a medical device, not for diagnosis or treatment."
    assert page.locator("#demo-flag").is_visible()
    # What each upload carried (Playwright does not expose multipart bodies): wrap XHR.send in the page.
    page.add_init_script(SPY_SENT)
    page.reload()
    page.wait_for_selector("body[data-ready='1']")

    ask(page, "Is there a liver lesion?", phantom)
    job_id = page.evaluate("document.body.dataset.jobId")
    report = server.client.get(f"/v1/jobs/{job_id}/result").json()
    assert page.locator("#conversation li .a").nth(0).inner_text() == report["answer"]
    sent = page.evaluate("window.__sent")
    assert sent[0]["volume"] and "volume_id" not in json.loads(sent[0]["params"])
    page.wait_for_timeout(500)
    shot(page, "web-viewer.png")

    # The attention overlay is on a kept slice and not on a dropped one (labels hidden: only attention).
    hide_labels(page)
    page.wait_for_timeout(300)
    assert page.locator("#slice-info").get_attribute("data-kept") == "1"
    assert overlay_pixels(pixels(page, "#view-axial")) > 500
    dropped = next(s["voxel_index"] for s in report["slices"]["per_slice"] if not s["kept"])
    page.locator("#chart rect").nth(next(i for i, s in enumerate(report["slices"]["per_slice"])
                                         if s["voxel_index"] == dropped)).click()
    assert page.locator("#slice-info").get_attribute("data-voxel") == str(dropped)
    page.wait_for_timeout(300)
    assert overlay_pixels(pixels(page, "#view-axial")) == 0
    page.click("#next-kept")
    page.wait_for_timeout(300)
    assert page.locator("#slice-info").get_attribute("data-kept") == "1"
    assert overlay_pixels(pixels(page, "#view-axial")) > 500
    # Opacity 0 hides it.
    page.locator("#opacity").fill("0")
    page.wait_for_timeout(300)
    assert overlay_pixels(pixels(page, "#view-axial")) == 0

    # A follow-up names the prepared volume and sends no voxels.
    ask(page, "How large is it?", turn=2)
    sent = page.evaluate("window.__sent")
    assert not sent[1]["volume"] and json.loads(sent[1]["params"])["volume_id"] == report["volume_id"]
    follow_id = page.evaluate("document.body.dataset.jobId")
    follow = server.client.get(f"/v1/jobs/{follow_id}/result").json()
    assert follow["prefix_reused"] is True
    assert page.locator("#conversation li .a").nth(1).inner_text() == follow["answer"]
    assert not page.errors, page.errors


def test_patient_left_is_on_screen_right(browser, server, tmp_path):
    import SimpleITK as sitk

    arr = np.full((24, 64, 64), -1000, dtype=np.int16)   # (z, y, x); LPS: x grows toward the patient's left
    arr[:, 20:44, 48:60] = 1500                          # the marker: high x, the patient's left
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / "left_marker.nrrd"
    sitk.WriteImage(image, str(path))
    page = open_page(browser, server.url)
    page.wait_for_selector("body[data-ready='1']")
    ask(page, "Where is the marker?", path)
    page.locator("#opacity").fill("0")
    page.locator("#label-opacity").fill("0")
    page.wait_for_timeout(300)
    rgb = pixels(page, "#view-axial")
    if SCREENSHOTS:
        page.locator("#views").screenshot(path=str(Path(SCREENSHOTS) / "web-viewer-left-marker.png"))
    bright = (rgb.min(-1) > 250)   # the marker is the volume's maximum: white (the page is off-white)
    ys, xs = np.nonzero(bright)
    assert xs.size > 200, "the marker is not drawn"
    assert xs.mean() > rgb.shape[1] / 2, "the patient's left must be on the screen's right (radiological)"


def test_compare_with_unpruned(browser, server, phantom):
    page = open_page(browser, server.url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#compare-view").is_hidden()
    page.locator("#settings summary").click()
    assert "gamma" in page.locator("label:has(#gamma)").get_attribute("title")
    page.check("#compare")
    ask(page, "Is there a liver lesion?", phantom)
    report = server.client.get(f"/v1/jobs/{page.evaluate('document.body.dataset.jobId')}/result").json()
    assert page.locator("#compare-view").is_visible()
    assert page.locator("#compare-unpruned").inner_text() == report["unpruned"]["answer"]
    assert page.locator("#compare-pruned").inner_text() == report["answer"]


def test_png_upload_shows_servers_message(browser, server, tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(path)
    expected = server.client.post("/v1/jobs", files={"volume": ("photo.png", path.read_bytes())},
                                  data={"params": json.dumps({"question": "q"})})
    assert expected.status_code == 415
    page = open_page(browser, server.url)
    page.wait_for_selector("body[data-ready='1']")
    page.set_input_files("#volume-file", str(path))
    page.click("#ask")
    page.wait_for_selector("#error:not([hidden])")
    assert page.locator("#error-message").inner_text() == expected.json()["error"]["message"]
    assert page.locator("#error-hint").inner_text() == expected.json()["error"]["hint"]


def test_token_prompt_and_nothing_else(browser, tiny_qwen3_vl, tmp_path):
    with running(tiny_qwen3_vl, tmp_path) as s:
        assert s.client.get("/").status_code == 200              # the page holds no data: no token
        assert s.client.get("/v1/jobs/x").status_code == 401     # the API keeps it
        page = open_page(browser, s.url)
        seen = []
        page.on("request", lambda r: seen.append(r.url))
        page.reload()
        page.wait_for_selector("#token-dialog:not([hidden])")
        assert page.locator("#app").is_hidden()
        assert [u for u in seen if "/v1/" in u] == [s.url + "/v1/health"]
        page.fill("#token-input", "wrong")
        page.click("#token-form button")
        page.wait_for_selector("#token-error:not([hidden])")
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("body[data-ready='1']")
        assert page.evaluate("sessionStorage.getItem('medpruner.token')") == TOKEN
        assert not any(TOKEN in u for u in seen)


def test_dead_server_says_so_and_retries(browser, tiny_qwen3_vl, phantom, tmp_path):
    from server_helpers import free_port

    port = free_port()
    with running(tiny_qwen3_vl, tmp_path / "a", token=None, port=port) as s:
        page = open_page(browser, s.url)
        page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#server-down").is_hidden()
    page.set_input_files("#volume-file", str(phantom))
    page.click("#ask")
    page.wait_for_selector("#server-down:not([hidden])")
    assert "not answering" in page.locator("#server-down").inner_text()
    with running(tiny_qwen3_vl, tmp_path / "b", token=None, port=port):
        page.click("#retry")
        page.wait_for_selector("#server-down", state="hidden")
        ask(page, "Back again?", turn=1)


def test_page_without_bundle_says_how_to_install(tmp_path, monkeypatch):
    from medpruner.server import page

    monkeypatch.setattr(page, "NIIVUE_BUNDLE", tmp_path / "missing.js")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    page.install_page(app)
    response = TestClient(app).get("/")
    assert response.status_code == 503 and "npm ci" in response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]
