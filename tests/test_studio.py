"""The studio page (issue 27) in a real browser: Debian's `chromium` driven by Playwright for Python
through `executable_path` (no browser download), against in-process servers on 127.0.0.1. What the
page sends is checked where it arrives: in the engine behind the HTTP/JSON API. Screenshots at
1280x800 and 390x844, before and after a generation on the demo model, go to out/studio/."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from ci_support import import_or_skip, in_ci
from serve_support import SteppedEngine, running_server

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "out" / "studio"
DEMO_PROMPT = "a heart, a triangle and a blue star on a sand background"
DEMO_BOXES = {"heart": (0.05, 0.05, 0.45, 0.45), "star": (0.55, 0.05, 0.95, 0.45), "triangle": (0.3, 0.55, 0.7, 0.95)}
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
TIMEOUT_MS = 120_000


def _chromium() -> str:
    path = os.environ.get("CONES2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "no chromium on PATH (Debian: apt-get install -y chromium)"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: a missing browser fails instead of skipping)", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = import_or_skip("playwright.sync_api", "playwright is not installed (pip install playwright)")
    path = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True)
        yield b
        b.close()


class RecordingEngine:
    """An engine that keeps every request it samples: what the API handed to the model."""

    def __init__(self, engine):
        self._engine = engine
        self.requests = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_batch(self, requests, **kw):
        self.requests.extend(requests)
        return self._engine.generate_batch(requests, **kw)


@pytest.fixture(scope="module")
def demo_engine():
    import cones2
    from cones2.default_model import shipped_demo_model

    path = shipped_demo_model()
    if path is None:
        pytest.skip("this build does not ship the demo model")
    return cones2.Engine.from_pretrained(path, backend="sdpa")


def expect(locator):
    """Playwright's waiting assertion (the page's Content-Security-Policy forbids the string
    evaluation `wait_for_function` needs, and the tests keep that policy on)."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect(locator)


def open_page(browser, server, viewport=DESKTOP, connected=True):
    """A new tab on the server's page; its console errors and uncaught exceptions land in `.errors`."""
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.http_port}/")
    if connected:
        expect(page.locator("#model-info")).to_contain_text(" px")
    return page


def drag_box(page, box):
    """Draw `box` (normalised x0, y0, x1, y1) with the mouse on the layout canvas."""
    page.locator("#layout").evaluate("el => el.scrollIntoView({block: 'center'})")
    rect = page.locator("#layout").bounding_box()

    def at(u, v):   # a third of a pixel inside the grid point, so snapping lands on it
        return rect["x"] + u * rect["width"] + 0.3, rect["y"] + v * rect["height"] + 0.3

    x0, y0, x1, y1 = box
    page.mouse.move(*at(x0, y0))
    page.mouse.down()
    page.mouse.move(*at((x0 + x1) / 2, (y0 + y1) / 2))
    page.mouse.move(*at(x1, y1))
    page.mouse.up()


def add_subject(page, word):
    page.locator("#words .word", has_text=word).first.click()
    page.wait_for_selector(f'#subjects .subject[data-word="{word}"]')


def subject_row(page, word):
    return page.locator(f'#subjects .subject[data-word="{word}"]')


def set_fields(page, **values):
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def generate_and_wait(page):
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(re.compile("^(done|failed|cancelled)$"))
    return page.text_content("#status")


def boxes_of(request) -> dict:
    return {name: region.box for name, region in request.layout.regions.items()}


def test_page_loads_without_console_errors_at_both_viewports(browser, tiny_engine, tmp_path):
    with running_server(tiny_engine, tmp_path / "store") as server:
        for viewport in (DESKTOP, PHONE):
            page = open_page(browser, server, viewport)
            assert page.title() == "cones2 studio"
            assert page.locator("#layout").is_visible() and page.locator("#generate").is_visible()
            # usable on a phone: nothing wider than the viewport
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            assert page.errors == []
            page.close()


def test_two_boxes_drawn_by_mouse_reach_the_engine(browser, tiny_engine, tmp_path):
    engine = RecordingEngine(tiny_engine)
    with running_server(engine, tmp_path / "store") as server:
        page = open_page(browser, server)
        page.fill("#prompt", "a dog and a mug on the table")
        add_subject(page, "dog")
        drag_box(page, (0.1, 0.2, 0.4, 0.6))
        add_subject(page, "mug")
        drag_box(page, (0.55, 0.5, 0.9, 0.85))
        subject_row(page, "mug").locator("input.strength").fill("4")
        subject_row(page, "mug").locator("input.strength").dispatch_event("change")
        set_fields(page, steps=2, guidance_steps=1, seed=7)
        engine.requests.clear()       # the warm-up's request is not the page's
        assert generate_and_wait(page) == "done"
        (request,) = engine.requests
        assert request.prompt == "a dog and a mug on the table"
        assert boxes_of(request) == {"dog": pytest.approx((0.1, 0.2, 0.4, 0.6), abs=1e-12),
                                     "mug": pytest.approx((0.55, 0.5, 0.9, 0.85), abs=1e-12)}
        assert request.layout.regions["mug"].strength == 4.0 and request.layout.regions["dog"].strength == 2.5
        assert (request.config.steps, request.config.guidance_steps, request.config.seed) == (2, 1, 7)
        assert page.errors == []


def test_keyboard_alone_adds_a_box_moves_and_generates(browser, tiny_engine, tmp_path):
    engine = RecordingEngine(tiny_engine)
    with running_server(engine, tmp_path / "store") as server:
        page = open_page(browser, server)
        page.fill("#prompt", "a dog on the beach")
        page.locator("#words .word", has_text="dog").focus()
        page.keyboard.press("Enter")                       # the word becomes a subject, selected
        page.locator("#layout").focus()
        page.keyboard.press("b")                           # its default box: 0.05, 0.05, 0.35, 0.35
        for key in ["ArrowRight", "ArrowRight", "ArrowDown", "Shift+ArrowRight"]:
            page.keyboard.press(key)
        assert subject_row(page, "dog").locator(".coords").text_content() == "0.07, 0.06, 0.38, 0.36"
        set_fields(page, steps=1, guidance_steps=1)
        engine.requests.clear()
        page.locator("#layout").focus()
        page.keyboard.press("Control+Enter")
        expect(page.locator("#status")).to_have_text("done")
        assert boxes_of(engine.requests[-1]) == {"dog": pytest.approx((0.07, 0.06, 0.38, 0.36), abs=1e-12)}


def test_demo_generation_streams_previews_and_reproduces_make_demo(browser, demo_engine, tmp_path):
    import cones2
    from PIL import Image

    residuals = ROOT / "engine" / "cones2" / "data" / "demo_model" / "residuals"
    files = {"heart": residuals / "twotone_heart.safetensors", "triangle": residuals / "twotone_triangle.safetensors"}
    SHOTS.mkdir(parents=True, exist_ok=True)
    with running_server(demo_engine, tmp_path / "store") as server:
        page = open_page(browser, server)
        page.fill("#prompt", DEMO_PROMPT)
        for word in ("heart", "star", "triangle"):
            add_subject(page, word)
            if word in files:    # registered through the API, then picked for this subject
                subject_row(page, word).locator("input.upload").set_input_files(str(files[word]))
                expect(subject_row(page, word).locator("select.residual")).not_to_have_value("")
            drag_box(page, DEMO_BOXES[word])
        set_fields(page, steps=30, guidance_steps=15, seed=0)
        for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.screenshot(path=str(SHOTS / f"before-{name}.png"), full_page=True)
        page.set_viewport_size(DESKTOP)
        assert generate_and_wait(page) == "done", page.text_content("#err-generate")
        assert int(page.get_attribute("#preview", "data-count")) >= 2          # step previews streamed
        for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.screenshot(path=str(SHOTS / f"after-{name}.png"), full_page=True)
        meta = json.loads(page.text_content("#result-meta"))
        sent = {b["subject"]: (b["x0"], b["y0"], b["x1"], b["y1"]) for b in meta["request"]["layout"]["boxes"]}
        assert sent == DEMO_BOXES and str(meta["seed"]) == "0"
        png = base64.b64decode(page.get_attribute("#result-image", "src").split(",", 1)[1])
        assert page.errors == []

    expected = demo_engine.generate(DEMO_PROMPT, {w: cones2.Residual.load(f) for w, f in files.items()},
                                    cones2.Layout.from_boxes(DEMO_BOXES), seed=0, steps=30, guidance_steps=15,
                                    progress=False)
    got = Image.open(io.BytesIO(png)).convert("RGB")
    assert got.tobytes() == expected.image.convert("RGB").tobytes()      # the image `make demo` draws


def test_bad_residual_upload_shows_the_services_one_line_error(browser, tiny_engine, tmp_path):
    from cones2.serve.client import HttpClient, HttpError

    with running_server(tiny_engine, tmp_path / "store") as server:
        page = open_page(browser, server)
        page.fill("#prompt", "a dog")
        add_subject(page, "dog")
        bad = b"this is not a safetensors file"
        subject_row(page, "dog").locator("input.upload").set_input_files(
            {"name": "dog.safetensors", "mimeType": "application/octet-stream", "buffer": bad})
        error = subject_row(page, "dog").locator(".error")
        error.wait_for(state="visible")
        with pytest.raises(HttpError) as refused:
            HttpClient(f"http://127.0.0.1:{server.http_port}").register_residual(bad)
        assert error.text_content() == refused.value.message and refused.value.message.startswith("safetensors")
        assert "\n" not in error.text_content()
        assert subject_row(page, "dog").locator("select.residual").input_value() == ""


def test_cancel_stops_the_generation(browser, tiny_engine, tmp_path):
    engine = SteppedEngine(tiny_engine)
    with running_server(engine, tmp_path / "store") as server:
        page = open_page(browser, server)
        page.fill("#prompt", "a dog")
        set_fields(page, steps=40, guidance_steps=0)
        page.click("#generate")
        engine.allow(2)
        expect(page.locator("#status")).to_have_text("step 2 of 40")
        page.click("#cancel")
        expect(page.locator("#status")).to_have_text("cancelled")
        assert page.locator("#gallery li").count() == 0 and page.is_enabled("#generate")
        engine.run_freely()
        set_fields(page, steps=1)      # the one worker runs this only once the cancelled one stopped
        assert generate_and_wait(page) == "done"
        assert engine.steps_run <= 2 + 1 + 1, engine.steps_run   # 2 allowed, at most 1 more, then 1


def test_token_protected_server_refuses_without_the_token(browser, tiny_engine, tmp_path):
    with running_server(tiny_engine, tmp_path / "store", auth_token="s3cret-token") as server:
        page = open_page(browser, server, connected=False)
        expect(page.locator("#err-token")).not_to_be_empty()
        assert page.text_content("#err-token").startswith("UNAUTHENTICATED")
        page.fill("#prompt", "a dog")
        set_fields(page, steps=1, guidance_steps=0, width=128, height=128)
        assert generate_and_wait(page) == "failed"
        assert page.text_content("#err-token").startswith("UNAUTHENTICATED")
        page.fill("#token", "s3cret-token")
        page.dispatch_event("#token", "change")
        expect(page.locator("#model-info")).to_contain_text(" px", timeout=20_000), page.text_content("#err-token")
        assert generate_and_wait(page) == "done"
        assert page.evaluate("sessionStorage.getItem('cones2-token')") == "s3cret-token"
        assert page.evaluate("localStorage.length") == 0


def test_colour_map_layout_and_gallery_rerun(browser, tiny_engine, tmp_path):
    import numpy as np
    from PIL import Image

    from serve_support import png_bytes

    red, blue = (255, 0, 0), (0, 0, 255)
    png = png_bytes({red: (slice(0, 32), slice(0, 32)), blue: (slice(32, 64), slice(16, 64))})
    engine = RecordingEngine(tiny_engine)
    with running_server(engine, tmp_path / "store") as server:
        page = open_page(browser, server)
        page.fill("#prompt", "a dog and a mug")
        add_subject(page, "dog")
        add_subject(page, "mug")
        page.set_input_files("#colormap", {"name": "map.png", "mimeType": "image/png", "buffer": png})
        page.locator('#colormap-entries label:has-text("#ff0000") select').select_option("dog")
        page.locator('#colormap-entries label:has-text("#0000ff") select').select_option("mug")
        set_fields(page, steps=1, guidance_steps=1, seed=11)
        engine.requests.clear()
        assert generate_and_wait(page) == "done"
        page.locator("#gallery .rerun").click()            # the gallery's metadata runs it again
        expect(page.locator("#gallery li")).to_have_count(2)
        expect(page.locator("#status")).to_have_text("done")
        first, again = engine.requests
        for request in (first, again):
            assert request.config.seed == 11 and set(request.layout.regions) == {"dog", "mug"}
            for word, rgb in (("dog", red), ("mug", blue)):
                mask = np.asarray(request.layout.regions[word].mask)
                pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                assert mask.shape == pixels.shape[:2] and (mask == (pixels == rgb).all(-1)).all()
        assert page.errors == []
