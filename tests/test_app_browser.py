"""The demo in a real browser: Debian's chromium, headless, driven by Playwright."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import app
from radiology.draft import STOPPED_MARK
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser installs it)"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


# Answers of the long-answer app: the tiny model, whose decode engine ignores stop tokens (the
# mechanism the benchmarks use to force a length), so that every answer runs to its max new tokens.
# At this length no answer can end before Stop or a closed tab reaches it.
LONG_ANSWER_TOKENS = 3500


@pytest.fixture(scope="module")
def long_answer_app(tmp_path_factory):
    from radiology.serve import StopRegistry, load_for_demo
    from tests.conftest import RunningApp, free_port

    served = load_for_demo(None, cache_dir=tmp_path_factory.mktemp("long-cache"))
    engine = served.loaded.engine
    assert engine is not None and engine.fits(64, LONG_ANSWER_TOKENS), "the engine must serve the whole answer"
    engine.ignore_stop_tokens = True
    options = app.AppConfig(host="127.0.0.1", port=free_port(), max_new_tokens=LONG_ANSWER_TOKENS)
    stops = StopRegistry()
    demo = app.build_demo(served, options, stops=stops)
    app.launch(demo, options, prevent_thread_lock=True, quiet=True)
    running = RunningApp(served, options, demo, stops)
    yield running
    running.close()


def _type_into_slider(page, elem_id: str, value: int) -> None:
    """Types a value into a slider's number box and waits until the slider itself holds it (Generate
    sends the slider's value). Under load the page may miss a first Enter: type it again until it holds."""
    box = page.locator(f"#{elem_id} input[type=number]")
    holds = f"() => document.querySelector('#{elem_id} input[type=range]').value === '{value}'"
    deadline = time.monotonic() + 60
    while True:
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            page.wait_for_function(holds, timeout=5_000)
            return
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise


def _start_long_generation(page, image: Path) -> None:
    page.locator("#upload input[type=file]").set_input_files(str(image))
    page.locator("#preview img").wait_for(state="visible", timeout=30_000)
    # The longest answer the app allows, so that Stop (or closing the tab) lands while it is written.
    page.get_by_text("Decoding", exact=True).first.click()
    _type_into_slider(page, "max-new-tokens", LONG_ANSWER_TOKENS)
    page.locator("#generate").click()


def test_page_shows_the_disclaimer_and_the_demo_model_notice(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(app_server.url)
    disclaimer = page.locator("#disclaimer")
    disclaimer.wait_for(state="visible", timeout=60_000)
    assert app.DISCLAIMER in disclaimer.inner_text()
    assert page.locator("#demo-model-notice").is_visible()
    assert "tiny demo model (random weights)" in page.locator("#model-panel").inner_text()
    # The preview offers download and full screen, no Share button (it would post a patient's image).
    page.locator("#upload input[type=file]").set_input_files(str(ROOT / "assets" / "ct_axial.png"))
    page.locator("#preview img").wait_for(state="visible", timeout=30_000)
    page.locator("#preview").hover()
    assert page.locator("#preview button[title='Download'], #preview a[download]").count() >= 1
    assert page.locator("#preview button[title='Share'], #preview button[aria-label='Share']").count() == 0
    page.close()


def test_upload_generate_read_streamed_text_and_stop(browser, long_answer_app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(long_answer_app.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    _start_long_generation(page, ROOT / "assets" / "mr_abdomen.png")
    answer = page.locator("#answer textarea")
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while len(seen) < 3 and time.monotonic() < deadline:
        value = answer.input_value()
        if value and (not seen or value != seen[-1]):
            seen.append(value)
        time.sleep(0.05)
    assert len(seen) >= 3, f"expected the answer to grow in pieces, saw {seen!r}"
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))

    page.locator("#stop").click()
    settings_line = page.locator("#answer-settings")
    page.wait_for_function(
        "() => /stopped by user|done in/.test(document.querySelector('#answer-settings').innerText)",
        timeout=60_000,
    )
    assert "stopped by user" in settings_line.inner_text()
    stopped = answer.input_value()
    assert stopped.startswith(seen[-1]) and stopped.endswith(f"\n\n{STOPPED_MARK}")  # marked in the text itself
    stopped = stopped.removesuffix(f"\n\n{STOPPED_MARK}")
    # The whole answer, written by the package with the same greedy settings, for comparison: the
    # stopped one is its beginning, well short of its end. (Characters, not tokens: the tiny model's
    # tokenizer splits decoded text into other pieces than the ones generated.)
    from radiology.generate import GenerationSettings, generate_text

    whole = generate_text(long_answer_app.served.loaded, ROOT / "assets" / "mr_abdomen.png",
                          settings=GenerationSettings(max_new_tokens=LONG_ANSWER_TOKENS))
    assert whole.startswith(stopped.strip()) and len(stopped) < len(whole) / 2

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    page.close()


def test_picking_an_example_fills_the_upload_and_preview(browser, app_server):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(app_server.url)
    page.locator("#examples img").first.wait_for(state="visible", timeout=60_000)
    page.locator("#examples img").first.click()
    page.locator("#preview img").wait_for(state="visible", timeout=30_000)
    assert "ct_axial" in page.locator("#upload").inner_text()
    page.close()


def test_closing_the_tab_ends_its_generation(browser, long_answer_app):
    page = browser.new_page()
    page.goto(long_answer_app.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    _start_long_generation(page, ROOT / "assets" / "ct_axial.png")
    deadline = time.monotonic() + 120
    while not page.locator("#answer textarea").input_value() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(long_answer_app.stops) == 1, "the generation should be running"
    page.close()
    deadline = time.monotonic() + 30
    while len(long_answer_app.stops) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(long_answer_app.stops) == 0, "closing the tab should have ended the generation"


def test_dicom_upload_window_history_and_a_baseline_side_by_side(browser, baseline_server, tmp_path):
    from radiology.dicom import BURNED_IN_WARNING
    from tests.fixtures import sentinel_hits, write_sentinel_dicom

    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(baseline_server.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    dicom = write_sentinel_dicom(tmp_path, name="chest.dcm", burned_in_annotation="YES")
    page.locator("#upload input[type=file]").set_input_files(str(dicom))
    preview = page.locator("#preview img")
    preview.wait_for(state="visible", timeout=30_000)
    warning = page.locator("#burned-in-warning")
    warning.wait_for(state="visible", timeout=30_000)
    assert BURNED_IN_WARNING in warning.inner_text()
    attributes = page.locator("#dicom-attributes")
    assert "Modality: CT" in attributes.inner_text() and "Window: full range" in attributes.inner_text()

    # A CT preset re-renders the preview and says which window is used.
    before = preview.get_attribute("src")
    page.locator("#window input").click()
    page.get_by_text("lung: C -600 / W 1500 (CT only)").click()
    page.wait_for_function(
        "() => document.querySelector('#dicom-attributes').innerText.includes('lung (C -600, W 1500)')",
        timeout=30_000,
    )
    assert preview.get_attribute("src") != before

    page.locator("#context textarea").fill("58-year-old smoker, cough for 3 weeks")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => /done in/.test(document.querySelector('#baseline-answer-settings').innerText)", timeout=120_000,
    )
    answers = [page.locator(f"#{name} textarea").input_value() for name in ("answer", "baseline-answer")]
    assert all(answer.strip() for answer in answers) and answers[0] != answers[1]
    for name in ("answer-settings", "baseline-answer-settings"):
        line = page.locator(f"#{name}").inner_text()
        assert "DICOM window: lung" in line and "with clinical history" in line and "done in" in line
    assert "**Baseline:**" not in page.locator("#model-panel").inner_text()  # rendered, not raw Markdown
    assert "Baseline:" in page.locator("#model-panel").inner_text()
    assert not sentinel_hits(page.content())  # nothing from the header reached the page

    screenshot = tmp_path / "dicom-baseline.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    page.close()


def test_multi_frame_dicom_is_a_series_on_the_slider(browser, app_server, tmp_path):
    from pydicom.data import get_testdata_file

    series = tmp_path / "series.dcm"
    series.write_bytes(Path(get_testdata_file("emri_small.dcm")).read_bytes())  # 10 frames
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(app_server.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files(str(series))
    slider = page.locator("#slice")
    slider.wait_for(state="visible", timeout=30_000)
    assert "Slice 6 of 10: sent to the model" in slider.inner_text()  # the middle frame, as before
    assert "Slices: 10" in page.locator("#dicom-attributes").inner_text()
    assert not page.locator("#frame").is_visible()
    page.wait_for_function("() => document.querySelectorAll('#sent img').length === 8", timeout=30_000)
    before = page.locator("#preview img").get_attribute("src")
    slider.locator("input[type=range]").focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.querySelector('#slice').innerText.includes('Slice 5 of 10: sent')",
                           timeout=30_000)
    page.wait_for_function(f"() => document.querySelector('#preview img').getAttribute('src') !== {before!r}",
                           timeout=30_000)
    assert not page.locator("#burned-in-warning").is_visible()
    page.close()


def test_a_zipped_series_slice_slider_sent_slices_and_a_prior(browser, app_server, tmp_path):
    import zipfile

    from tests.fixtures import sentinel_hits, write_sentinel_dicom
    from tests.test_series import MR700, copy_series

    copy_series(MR700, tmp_path / "mr")  # 7 slices, names and headers with planted patient data
    archive = tmp_path / "study.zip"  # (the upload box shows the name the person picked; its members hold the data)
    with zipfile.ZipFile(archive, "w") as study:
        for path in sorted((tmp_path / "mr").iterdir()):
            study.write(path, path.name)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(app_server.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    _type_into_slider(page, "max-images", 3)
    page.locator("#upload input[type=file]").set_input_files(str(archive))
    slider = page.locator("#slice")
    slider.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("() => document.querySelectorAll('#sent img').length === 3", timeout=30_000)
    # The middle slice is shown, and it is one the model gets; the gallery shows the three it gets.
    assert "Slice 4 of 7: sent to the model" in slider.inner_text()
    sent = page.locator("#sent").inner_text()
    assert "Sent to the model, in order: 3 (slices 1, 4, 7 of 7)" in sent
    assert all(f"slice {n}" in sent for n in (1, 4, 7))
    attributes = page.locator("#dicom-attributes").inner_text()
    assert "DICOM series" in attributes and "Modality: MR" in attributes and "Slices: 7" in attributes

    # One step along the slider: slice 5, shown as the model would get it, not sent.
    before = page.locator("#preview img").get_attribute("src")
    slider.locator("input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('#slice').innerText.includes('Slice 5 of 7: not sent')",
                           timeout=30_000)
    page.wait_for_function(f"() => document.querySelector('#preview img').getAttribute('src') !== {before!r}",
                           timeout=30_000)

    # A prior study comes first among the images sent.
    page.locator("#prior input[type=file]").set_input_files(str(write_sentinel_dicom(tmp_path, "prior.dcm")))
    page.wait_for_function("() => document.querySelectorAll('#sent img').length === 4", timeout=30_000)
    sent = page.locator("#sent").inner_text()  # read once: a progress line may come and go above the images
    assert sent.index("prior study") < sent.index("slice 1")

    page.locator("#generate").click()
    page.wait_for_function("() => /done in/.test(document.querySelector('#answer-settings').innerText)",
                           timeout=120_000)
    assert "images: 3 (slices 1, 4, 7 of 7) + prior" in page.locator("#answer-settings").inner_text()
    assert not sentinel_hits(page.content())

    screenshot = tmp_path / "series.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    page.close()


def _zipped_mr_series(folder: Path) -> Path:
    """pydicom's 7-slice MR series, with planted patient data, as one .zip."""
    import zipfile

    from tests.test_series import MR700, copy_series

    copy_series(MR700, folder / "mr")
    archive = folder / "study.zip"
    with zipfile.ZipFile(archive, "w") as study:
        for path in sorted((folder / "mr").iterdir()):
            study.write(path, path.name)
    return archive


def test_a_slider_step_is_not_undone_by_a_slower_study_view(browser, app_server, tmp_path, monkeypatch):
    """Max images' number box fires its event when it loses focus (here: to the slice slider), and that
    view renders the whole study; a slider step right after it must be what the page ends on. A slow
    whole-study render makes the order certain: the step is taken while that view still runs."""
    import threading
    import urllib.request

    from PIL import Image

    from radiology.serve import load_study

    archive = _zipped_mr_series(tmp_path)
    slow = threading.Event()
    read_study = app.read_study

    def slow_whole_study(*args, render=True, **kwargs):
        if render and slow.is_set():
            time.sleep(3)
        return read_study(*args, render=render, **kwargs)

    monkeypatch.setattr(app, "read_study", slow_whole_study)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(app_server.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files(str(archive))
    slider = page.locator("#slice")
    slider.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("() => document.querySelectorAll('#sent img').length === 7", timeout=30_000)

    slow.set()
    page.locator("#max-images input[type=number]").fill("3")
    slider.locator("input[type=range]").focus()  # Max images loses focus: the whole study, slowly
    page.keyboard.press("ArrowRight")  # slice 5, while that view runs
    page.wait_for_function(
        "() => document.querySelector('#slice').innerText.includes('Slice 5 of 7: not sent (the model gets 3 of 7)')"
        " && document.querySelector('#slice input[type=range]').value === '5'"
        " && document.querySelectorAll('#sent img').length === 3",
        timeout=30_000,
    )
    with urllib.request.urlopen(page.locator("#preview img").get_attribute("src"), timeout=30) as answer:
        shown = Image.open(answer).convert("RGB")
    expected = load_study([str(archive)], max_images=3, render=False).item(4).image.convert("RGB")
    assert shown.tobytes() == expected.tobytes()  # slice 5 as the model would get it
    page.close()


def test_generating_through_a_served_model(browser, server, tmp_path_factory):
    """`python app.py --server_url URL`: the page names the server, and the answer it shows is the
    server's answer to the image the app rendered."""
    from radiology.data import DEFAULT_INSTRUCTION
    from radiology.generate import GenerationSettings
    from radiology.remote import RemoteModel
    from radiology.serve import load_study
    from tests.conftest import start_app

    image = ROOT / "assets" / "ct_axial.png"
    running = start_app(tmp_path_factory.mktemp("served-cache"), server_url=server.url)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(running.url)
        page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
        assert f"served by {server.url}" in page.locator("#model-panel").inner_text()
        assert page.locator("#demo-model-notice").count() == 0 and not page.locator("#server-notice").is_visible()
        page.locator("#upload input[type=file]").set_input_files(str(image))
        page.locator("#preview img").wait_for(state="visible", timeout=30_000)
        page.get_by_text("Decoding", exact=True).first.click()
        _type_into_slider(page, "max-new-tokens", 20)
        page.locator("#generate").click()
        page.wait_for_function("() => /done in/.test(document.querySelector('#answer-settings').innerText)",
                               timeout=120_000)
        assert "served by" in page.locator("#answer-settings").inner_text()
        expected = RemoteModel(server.url).generate(load_study([str(image)]).images, DEFAULT_INSTRUCTION,
                                                    GenerationSettings(max_new_tokens=20))
        assert expected and page.locator("#answer textarea").input_value() == expected
        page.close()
    finally:
        running.close()


def _settings_say(page, elem_id: str, pattern: str, timeout: int = 120_000) -> None:
    page.wait_for_function(f"() => /{pattern}/.test(document.querySelector('#{elem_id}').innerText)", timeout=timeout)


def test_follow_ups_with_stop_export_history_and_a_new_upload_clearing_the_draft(browser, long_answer_app, tmp_path):
    import zipfile

    from radiology.draft import DRAFT_HEADER

    page = browser.new_page(viewport={"width": 1280, "height": 1600}, accept_downloads=True)
    page.goto(long_answer_app.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    page.locator("#upload input[type=file]").set_input_files(str(ROOT / "assets" / "mr_abdomen.png"))
    page.locator("#preview img").wait_for(state="visible", timeout=30_000)
    page.get_by_text("Decoding", exact=True).first.click()
    _type_into_slider(page, "max-new-tokens", 16)
    page.locator("#generate").click()
    _settings_say(page, "answer-settings", "done in")
    draft = page.locator("#answer textarea").input_value()
    assert draft.endswith("[cut at 16 new tokens: raise Max new tokens]")  # every answer runs to its limit here

    # Question 1, asked with Ctrl+Enter in the question box.
    question = page.locator("#question textarea, #question input").first
    question.fill("Is there free fluid?")
    question.press("Control+Enter")
    _settings_say(page, "follow-up-settings", "follow-up 1 · done in")
    # Question 2, a long answer stopped with Esc while it is written.
    _type_into_slider(page, "max-new-tokens", LONG_ANSWER_TOKENS)
    question.fill("Where is it?")
    page.locator("#ask").click()
    _settings_say(page, "follow-up-settings", "follow-up 2 · generating")
    page.wait_for_function("() => document.querySelector('#conversation').innerText.split('Where is it?')[1]"
                           "?.trim().length > 20", timeout=60_000)
    page.keyboard.press("Escape")
    _settings_say(page, "follow-up-settings", "follow-up 2 · stopped by user")
    # Question 3, after the stop.
    _type_into_slider(page, "max-new-tokens", 16)
    question.fill("How large is the liver?")
    page.locator("#ask").click()
    _settings_say(page, "follow-up-settings", "follow-up 3 · done in")
    conversation = page.locator("#conversation").inner_text()
    assert all(q in conversation for q in ("Is there free fluid?", "Where is it?", "How large is the liver?"))
    assert "[stopped by user]" in conversation.split("How large is the liver?")[0]
    assert page.locator("#answer textarea").input_value() == draft  # the draft itself stays as it was

    # Export: the .zip downloaded from the page holds the draft, its three questions and the image.
    page.get_by_text("Export and history", exact=True).first.click()
    page.locator("#export").click()
    link = page.locator("#export-file a").first
    link.wait_for(state="visible", timeout=30_000)
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "export.zip"
    download.value.save_as(exported)
    with zipfile.ZipFile(exported) as archive:
        assert sorted(archive.namelist()) == ["image-1.png", "report.md", "report.txt"]
        report = archive.read("report.txt").decode()
    assert report.splitlines()[0] == DRAFT_HEADER
    assert "Question 3: How large is the liver?" in report and "[stopped by user]" in report
    assert draft.splitlines()[0] in report
    screenshots = [tmp_path / "follow-ups.png", tmp_path / "cleared.png", tmp_path / "restored.png"]
    page.screenshot(path=str(screenshots[0]), full_page=True)

    # A new upload empties the draft at once: no answer about the previous image beside the new one.
    page.locator("#upload input[type=file]").set_input_files(str(ROOT / "assets" / "ct_axial.png"))
    page.wait_for_function(
        "() => document.querySelector('#answer textarea').value === '' && "
        "document.querySelector('#answer-settings').innerText.trim() === '' && "
        "!document.querySelector('#conversation').innerText.includes('Is there free fluid?')",
        timeout=10_000,
    )
    assert not page.locator("#export-file a").count()
    page.screenshot(path=str(screenshots[1]), full_page=True)

    # The session's history brings the draft back, with its conversation.
    page.locator("#history input").click()
    page.locator("[data-testid='dropdown-option']").first.click()
    page.locator("#restore").click()
    page.wait_for_function(f"() => document.querySelector('#answer textarea').value === {draft!r}", timeout=30_000)
    assert "How large is the liver?" in page.locator("#conversation").inner_text()
    page.screenshot(path=str(screenshots[2]), full_page=True)
    for screenshot in screenshots:
        assert screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")
    page.close()


def test_a_new_upload_during_generation_stops_it_and_leaves_no_stale_text(browser, long_answer_app):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(long_answer_app.url)
    page.locator("#disclaimer").wait_for(state="visible", timeout=60_000)
    _start_long_generation(page, ROOT / "assets" / "mr_abdomen.png")
    page.wait_for_function("() => document.querySelector('#answer textarea').value.length > 20", timeout=120_000)
    page.locator("#upload input[type=file]").set_input_files(str(ROOT / "assets" / "ct_axial.png"))
    page.wait_for_function("() => document.querySelector('#answer textarea').value === ''", timeout=10_000)
    deadline = time.monotonic() + 30
    while len(long_answer_app.stops) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(long_answer_app.stops) == 0, "the old study's generation should have been stopped"
    time.sleep(1.0)  # anything the stopped generation still sent would show now
    assert page.locator("#answer textarea").input_value() == ""
    assert page.locator("#answer-settings").inner_text().strip() == ""
    page.close()
