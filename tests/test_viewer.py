"""The viewer: the reader's window/level and invert on real DICOM (pydicom's bundled CT and MR),
the checks of its controls, and a custom window sent to the model through the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from pydicom import examples
from pydicom.data import get_testdata_file

from radiology.dicom import read_dicom_image
from radiology.serve import ControlError, UploadOptionError, load_study
from radiology.viewer import (
    CENTER_LIMITS,
    WIDTH_LIMITS,
    ViewerSettings,
    read_viewer,
    reader_image,
    slider_setup,
)
from tests.test_app_study import study_args

CT = Path(examples.get_path("ct"))
MR = Path(examples.get_path("mr"))


def hounsfield(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def gray(image) -> np.ndarray:
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0].astype(np.int64)


# --------------------------------------------------------------------------- rendering


def test_a_custom_window_maps_its_range_onto_black_to_white():
    hu = hounsfield(CT)
    shown = read_dicom_image(CT, window=(40.0, 400.0))
    pixels = gray(shown.image)
    assert shown.window == "custom (C 40, W 400)" and shown.linear_window == (40.0, 400.0)
    assert (pixels[hu <= 40 - 200] == 0).all() and (pixels[hu >= 40 + 200] == 255).all()
    inside = (hu > -150) & (hu < 230)
    assert inside.sum() > 1000
    # DICOM's linear window: (x - (c - 0.5)) / (w - 1) + 0.5 onto 0..255.
    expected = np.clip(((hu - 39.5) / 399 + 0.5) * 255, 0, 255)
    assert np.abs(pixels[inside] - expected[inside]).max() <= 1
    # A narrower window at the same center shows more contrast: more pixels at black and white.
    narrow = gray(read_dicom_image(CT, window=(40.0, 80.0)).image)
    assert ((narrow == 0) | (narrow == 255)).sum() > ((pixels == 0) | (pixels == 255)).sum()


def test_the_frame_says_its_value_range_and_the_window_that_rendered_it():
    hu = hounsfield(CT)
    for window, linear in ((None, ((hu.min() + hu.max()) / 2, hu.max() - hu.min())), ("lung", (-600.0, 1500.0))):
        shown = read_dicom_image(CT, window=window)
        assert shown.value_range == (hu.min(), hu.max())
        assert shown.linear_window == pytest.approx(linear)
    multi = read_dicom_image(CT, window="multi")
    assert multi.linear_window is None and multi.value_range == (hu.min(), hu.max())
    colour = read_dicom_image(get_testdata_file("SC_rgb.dcm"))
    assert colour.linear_window is None and colour.value_range is None and slider_setup(colour) is None


def test_invert_turns_black_to_white_for_the_reader_only():
    shown = read_dicom_image(CT, window=(40.0, 400.0))
    inverted = reader_image(shown.image, invert=True)
    assert (gray(inverted) == 255 - gray(shown.image)).all()
    assert reader_image(shown.image, invert=False) is shown.image


def test_the_sliders_start_at_the_shown_window_within_the_frame_values():
    hu = hounsfield(CT)
    lung = slider_setup(read_dicom_image(CT, window="lung"))
    assert (lung.center, lung.width) == (-600.0, 1500.0)
    assert lung.center_range == (int(hu.min()), int(hu.max()))
    assert lung.width_range == (1, int(2 * (hu.max() - hu.min())))
    mr = slider_setup(read_dicom_image(MR))  # its file's own window
    assert (mr.center, mr.width) == (600.0, 1600.0)
    assert mr.center_range[0] <= mr.center <= mr.center_range[1]


def test_a_study_takes_a_custom_window_and_says_so():
    study = load_study([str(CT)], window=(40.0, 400.0))
    assert study.window == "custom (C 40, W 400)"
    assert (np.asarray(study.images[0]) == np.asarray(read_dicom_image(CT, window=(40.0, 400.0)).image)).all()
    with pytest.raises(UploadOptionError, match="grayscale"):
        load_study([get_testdata_file("SC_rgb.dcm")], window=(40.0, 400.0))


# --------------------------------------------------------------------------- the controls


def test_viewer_settings_say_which_window_the_model_and_the_reader_get():
    adjusted = ViewerSettings(center=40, width=400, adjusted=True)
    assert adjusted.reader_window == (40.0, 400.0) and adjusted.model_window is None and adjusted.differs
    assert "not sent" in adjusted.describe()
    sent = ViewerSettings(center=40, width=400, adjusted=True, send=True)
    assert sent.model_window == (40.0, 400.0) and sent.reader_window is None and not sent.differs
    assert sent.describe() == "What the model sees"
    assert ViewerSettings(center=40, width=400).reader_window is None  # sliders not moved: the model's view
    assert ViewerSettings(invert=True).differs and "inverted" in ViewerSettings(invert=True).describe()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(center="40", width=400), f"Window center must be a number from {CENTER_LIMITS[0]} to {CENTER_LIMITS[1]}"),
    (dict(center=float("nan"), width=400), "Window center must be a number"),
    (dict(center=40, width=0), f"Window width must be a number from {WIDTH_LIMITS[0]} to {WIDTH_LIMITS[1]}"),
    (dict(center=40, width=10**9), "Window width must be a number from 1"),
    (dict(center=None, width=400, send=True), "Window center must be a number from"),
    (dict(center=40, width=400, send="yes"), "Send this window to the model must be true or false"),
    (dict(center=40, width=400, invert=1), "Invert must be true or false"),
])
def test_bad_viewer_values_are_refused_naming_the_control_and_range(kwargs, message):
    with pytest.raises(ControlError, match=message):
        read_viewer(**kwargs)


def test_empty_viewer_values_mean_the_image_own_window():
    settings = read_viewer(None, None, None, None)
    assert settings == ViewerSettings() and settings.model_window is None


# --------------------------------------------------------------------------- through the API


def test_a_custom_window_sent_through_the_api_is_what_the_model_gets(app_server, tmp_path, monkeypatch):
    import radiology.generate

    seen = []
    real = radiology.generate.stream_side_by_side

    def spy(models, images, *args, **kwargs):
        seen.append([np.asarray(image) for image in images])
        return real(models, images, *args, **kwargs)

    monkeypatch.setattr("app.stream_side_by_side", spy)
    client = app_server.client()
    _, about = client.predict(*study_args(CT), 40, 400, True, api_name="/generate")
    assert "DICOM window: custom (C 40, W 400)" in about
    windowed = np.asarray(read_dicom_image(CT, window=(40.0, 400.0)).image)
    assert (seen[-1][0] == windowed).all()
    # A follow-up question is about the draft's images: the window sent with them.
    client.predict("Any fracture?", "greedy", 1.0, 0.95, 64, 4, None, api_name="/follow_up")
    assert len(seen) == 2 and (seen[-1][0] == windowed).all()
    # Not sent: the window selector's (here the file's own), whatever the sliders hold.
    _, about = client.predict(*study_args(CT), 40, 400, False, api_name="/generate")
    assert "custom" not in about and "DICOM window: full range" in about
    with pytest.raises(AppError, match="Window width must be a number from 1 to 200000"):
        client.predict(*study_args(CT), 40, -5, True, api_name="/generate")
    with pytest.raises(AppError, match="(?i)window settings apply to grayscale images"):
        client.predict(*study_args(get_testdata_file("SC_rgb.dcm")), 40, 400, True, api_name="/generate")


# --------------------------------------------------------------------------- the page's view event


def _view(upload, on_page, window="auto", center=None, width=None, invert=False, send=False, adjusted=False,
          shown=None):
    """app.show_view as the page's one view event calls it: it is not told which control fired (a
    trigger that came while it ran is run once more with the page's values then)."""
    import app

    return app.show_view(upload, window, None, None, None, 8, None, None, shown, center, width, invert, send,
                         adjusted, on_page)


def test_the_view_event_tells_a_window_pick_from_a_slider_move_by_its_state():
    import app

    upload = {"path": str(CT)}
    on_page = app.show_new_study(upload, "auto", 8, None)[-1]
    assert on_page.sliders == (135.5, 2063.0)  # the file's full range, where the sliders start
    # The sliders moved and the window sent: the model's study changes, the sliders stay where the reader put them.
    sent = _view(upload, on_page, center=40, width=400, send=True)
    assert sent[-1].study[-1] == (40.0, 400.0) and sent[-1].sliders == (40.0, 400.0)
    assert sent[14] is True and sent[9] == sent[10] == sent[12] == {"__type__": "update"}  # adjusted; kept
    # A window picked while the page still says "send": the model gets the pick, the sliders move to it.
    picked = _view(upload, sent[-1], window="lung", center=40, width=400, send=True, adjusted=True)
    assert picked[12] is False and picked[14] is False
    assert (picked[9].value, picked[10].value) == (-600.0, 1500.0) == picked[-1].sliders
    assert picked[-1].window == "lung" and picked[-1].study[-1] is None


def test_a_window_not_sent_renders_the_shown_slice_only(tmp_path, monkeypatch):
    import app
    from tests.test_series import MR700, copy_series

    copy_series(MR700, tmp_path / "mr")
    upload = [{"path": str(path)} for path in sorted((tmp_path / "mr").iterdir())]
    on_page = app.show_new_study(upload, "auto", 8, None)[-1]
    center, width = on_page.sliders
    renders = []
    real = app.read_study

    def counted(*args, render=True, **kwargs):
        renders.append(render)
        return real(*args, render=render, **kwargs)

    monkeypatch.setattr(app, "read_study", counted)
    moved = _view(upload, on_page, center=center + 50, width=width / 2, shown=2)
    assert renders and not any(renders)  # one slice at a time, as a slider step: no whole-study view to race it
    assert moved[14] is True and moved[8].visible and "not sent" in moved[0].label
    assert moved[-1].study == on_page.study and moved[-1].sliders == (center + 50, width / 2)
