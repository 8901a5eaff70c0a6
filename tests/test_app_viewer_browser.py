"""The viewer and the phone layout in a real browser (Debian's chromium, headless, Playwright):
zoom and pan, the window sliders, invert, sending the window, and the page at 390 x 844."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import examples

from tests.test_app_browser import CHROMIUM, _type_into_slider, browser  # noqa: F401 - the browser fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser installs it)"),
]

CT = Path(examples.get_path("ct"))  # 128 x 128, no window in its header: shown at its full range


def _open_with_ct(browser, url: str, tmp_path: Path, viewport: dict[str, int] | None = None):  # noqa: F811
    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 1100})
    page.goto(url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    upload = tmp_path / "ct.dcm"
    shutil.copy(CT, upload)
    page.locator("#upload input[type=file]").set_input_files(str(upload))
    page.locator("#preview img").wait_for(state="visible", timeout=30_000)
    page.locator("#window-center").wait_for(state="visible", timeout=30_000)
    return page


def _src_changes(page, selector: str, before: str | None) -> None:
    page.wait_for_function(
        f"() => {{ const i = document.querySelector({selector!r}); return i && i.getAttribute('src') !== {before!r}; }}",
        timeout=30_000,
    )


def test_zoom_and_pan_the_preview_small_images_scaled_up(browser, app_server, tmp_path):  # noqa: F811
    page = _open_with_ct(browser, app_server.url, tmp_path)
    image = page.locator("#preview img")
    whole = image.bounding_box()
    assert whole["width"] > 2 * 128, "a 128-pixel image is scaled up to the preview"
    page.locator("#zoom-in").click()
    page.wait_for_function("() => document.querySelector('#preview').dataset.zoom === '1.50'", timeout=10_000)
    zoomed = image.bounding_box()
    assert zoomed["width"] == pytest.approx(1.5 * whole["width"], rel=0.02)
    # The wheel zooms further about the pointer; a drag pans.
    page.mouse.move(whole["x"] + whole["width"] / 2, whole["y"] + whole["height"] / 2)
    page.mouse.wheel(0, -100)
    page.wait_for_function("() => Number(document.querySelector('#preview').dataset.zoom) > 1.5", timeout=10_000)
    assert image.bounding_box()["width"] > zoomed["width"]
    before = image.bounding_box()
    page.mouse.down()
    page.mouse.move(whole["x"] + whole["width"] / 2 + 60, whole["y"] + whole["height"] / 2 + 30, steps=5)
    page.mouse.up()
    moved = image.bounding_box()
    assert moved["x"] == pytest.approx(before["x"] + 60, abs=2) and moved["y"] == pytest.approx(before["y"] + 30, abs=2)
    screenshot = tmp_path / "viewer-zoomed.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    page.locator("#zoom-reset").click()
    page.wait_for_function("() => document.querySelector('#preview').dataset.zoom === '1.00'", timeout=10_000)
    assert image.bounding_box() == pytest.approx(whole)
    # A new upload (here an example) starts at the whole image.
    page.locator("#zoom-in").click()
    page.wait_for_function("() => document.querySelector('#preview').dataset.zoom === '1.50'", timeout=10_000)
    page.locator("#examples img").first.click()
    page.wait_for_function("() => document.querySelector('#preview').dataset.zoom === '1.00'", timeout=30_000)
    page.close()


def test_window_sliders_invert_and_sending_the_window(browser, app_server, tmp_path):  # noqa: F811
    page = _open_with_ct(browser, app_server.url, tmp_path)
    # The sliders start at the window shown (the file gives none: its full range) and the model's view.
    assert float(page.locator("#window-center input[type=number]").input_value()) == pytest.approx(135.5)
    assert float(page.locator("#window-width input[type=number]").input_value()) == pytest.approx(2063)
    assert not page.locator("#model-view").is_visible()
    assert "What the model sees" in page.locator("#preview").inner_text()

    # A reader's window: the preview changes, what the model gets is shown beside it.
    before = page.locator("#preview img").get_attribute("src")
    _type_into_slider(page, "window-width", 400)
    _type_into_slider(page, "window-center", 40)
    page.wait_for_function("() => document.querySelector('#preview').innerText.includes('C 40, W 400, not sent')",
                           timeout=30_000)
    _src_changes(page, "#preview img", before)
    page.locator("#model-view img").wait_for(state="visible", timeout=30_000)
    windowed = page.locator("#preview img").get_attribute("src")
    beside = tmp_path / "viewer-beside.png"
    page.screenshot(path=str(beside), full_page=True)
    print(f"screenshot: {beside}")

    # Invert: the reader's view only.
    page.locator("#invert input").check()
    page.wait_for_function("() => document.querySelector('#preview').innerText.includes('inverted')", timeout=30_000)
    _src_changes(page, "#preview img", windowed)
    page.locator("#invert input").uncheck()
    page.wait_for_function("() => !document.querySelector('#preview').innerText.includes('inverted')",
                           timeout=30_000)

    # Sent: the model gets the reader's window; one view again, and the settings line says so.
    page.locator("#send-window input").check()
    page.wait_for_function("() => document.querySelector('#preview').innerText.includes('What the model sees')",
                           timeout=30_000)
    page.locator("#model-view").wait_for(state="hidden", timeout=30_000)
    page.locator("#generate").click()
    page.wait_for_function("() => /done in/.test(document.querySelector('#answer-settings').innerText)",
                           timeout=120_000)
    assert "DICOM window: custom (C 40, W 400)" in page.locator("#answer-settings").inner_text()
    screenshot = tmp_path / "viewer-window.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    page.close()


def test_phone_layout_generate_on_the_first_screen_and_a_one_line_disclaimer(browser, app_server, tmp_path):  # noqa: F811
    import app

    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    for visit in ("first", "second"):
        page.goto(app_server.url)
        disclaimer = page.locator("#disclaimer .top-banner")
        disclaimer.wait_for(state="visible", timeout=60_000)
        page.locator("#generate").wait_for(state="visible", timeout=60_000)
        if visit == "second":
            page.wait_for_function("() => document.querySelector('#demo-model-notice .top-banner')"
                                   ".classList.contains('banner-read')", timeout=10_000)
        generate = page.locator("#generate").bounding_box()
        assert generate["y"] >= 0 and generate["y"] + generate["height"] <= 844, visit
        line = page.evaluate("() => parseFloat(getComputedStyle(document.querySelector('#disclaimer .top-banner'))"
                             ".lineHeight)")
        box = disclaimer.bounding_box()
        assert box["height"] < 2 * line + 20, f"{visit} visit: the disclaimer is one line"
        assert app.DISCLAIMER in disclaimer.inner_text()  # whole, for screen readers and a tap
        assert box["y"] >= 0
        notice = page.locator("#demo-model-notice .top-banner").bounding_box()["height"]
        if visit == "first":
            first_notice = notice
        screenshot = tmp_path / f"phone-{visit}.png"
        page.screenshot(path=str(screenshot))
        print(f"screenshot: {screenshot}")
    # Read once, the demo-model notice keeps its first sentence; a tap opens it again.
    assert notice < first_notice / 2
    page.locator("#demo-model-notice .top-banner").click()
    page.wait_for_function("() => document.querySelector('#demo-model-notice .top-banner').offsetHeight > "
                           f"{notice + 10}", timeout=10_000)
    # Scrolled down to the answer, Generate and the disclaimer are still on screen.
    page.locator("#model-panel").scroll_into_view_if_needed()
    assert 0 <= page.locator("#generate").bounding_box()["y"] <= 844
    assert 0 <= page.locator("#disclaimer").bounding_box()["y"] <= 40
    context.close()
