"""The drawing pad end to end in real headless Chromium (Debian's ``chromium``, driven by
Playwright): characters drawn along KanjiVG strokes with the mouse (desktop) and with touch (a
phone-sized screen) are recognised by the page. Screenshots go to ``tmp_path`` and, when
``$HWEXP_ARTIFACTS`` is set, are copied there.

Skipped only when no Chromium binary exists (``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hwexp.recognition.loading import load_onnx
from test_serve_api import NAME, exported_model, glyph_strokes, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary on PATH (install it: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def pad_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = load_onnx(exported_model(tmp_path_factory).onnx)
    with running_server([model]) as (host, port):
        yield f"http://{host}:{port}/"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright  # pip install playwright (no browsers)

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def save_artifact(page: Any, tmp_path: Path, name: str) -> Path:
    """Screenshot ``page`` to ``tmp_path/name``, copied to ``$HWEXP_ARTIFACTS`` when set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("HWEXP_ARTIFACTS"):
        target = Path(os.environ["HWEXP_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def canvas_strokes(page: Any, char: str) -> list[list[tuple[float, float]]]:
    """``char``'s KanjiVG strokes in page coordinates over the pad's canvas."""
    box = page.locator("#pad").bounding_box()
    assert box and box["width"] > 100 and box["width"] == pytest.approx(box["height"], abs=1)
    return [
        [(box["x"] + x, box["y"] + y) for x, y in stroke[::2] + stroke[-1:]]
        for stroke in glyph_strokes(char, box["width"])
    ]


def draw_with_mouse(page: Any, char: str) -> int:
    strokes = canvas_strokes(page, char)
    for stroke in strokes:
        page.mouse.move(*stroke[0])
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*point)
        page.mouse.up()
    return len(strokes)


def draw_with_touch(page: Any, char: str) -> int:
    """Real touch input (Chrome DevTools Protocol), which the page sees as pointer events."""
    cdp = page.context.new_cdp_session(page)
    strokes = canvas_strokes(page, char)
    for stroke in strokes:
        for kind, points in (("touchStart", stroke[:1]), ("touchMove", stroke[1:])):
            for x, y in points:
                cdp.send(
                    "Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]}
                )
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()
    return len(strokes)


def top_candidate_after(page: Any, strokes: int) -> str:
    """The first candidate shown once the page shows candidates for ``strokes`` strokes."""
    page.wait_for_selector(f"#candidates[data-strokes='{strokes}'] li", timeout=15000)
    return page.locator("#candidates li .char").first.inner_text()


def test_drawing_with_the_mouse_shows_the_character_first(browser, pad_url, tmp_path):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=pad_url.rstrip("/"))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(pad_url)
    page.wait_for_selector("body[data-ready='true']")
    assert page.locator("#models button[aria-checked='true']").inner_text().startswith(NAME)

    strokes = draw_with_mouse(page, "あ")
    assert top_candidate_after(page, strokes) == "あ"
    assert page.locator("#candidates li").count() == 5
    page.locator("#debug summary").click()
    assert page.eval_on_selector("#input", "img => img.naturalWidth") == 48
    save_artifact(page, tmp_path, "pad-desktop.png")

    page.locator("#candidates li button").first.click()
    page.wait_for_selector("#toast.show")
    assert page.locator("#toast").inner_text() == "Copied あ"
    assert page.evaluate("navigator.clipboard.readText()") == "あ"

    page.locator("#undo").click()  # the last stroke goes; candidates follow the drawing
    page.wait_for_selector(f"#candidates[data-strokes='{strokes - 1}'] li")
    page.locator("#clear").click()
    page.wait_for_selector("#candidates[data-strokes='0']", state="attached")
    assert page.locator("#candidates li").count() == 0
    assert page.locator("#undo").is_disabled()
    assert errors == []
    context.close()


def test_drawing_by_touch_on_a_phone_sized_screen(browser, pad_url, tmp_path):
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = context.new_page()
    page.goto(pad_url)
    page.wait_for_selector("body[data-ready='true']")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scroll
    assert page.eval_on_selector("#pad", "c => getComputedStyle(c).touchAction") == "none"

    strokes = draw_with_touch(page, "お")
    assert top_candidate_after(page, strokes) == "お"
    save_artifact(page, tmp_path, "pad-phone.png")
    context.close()
