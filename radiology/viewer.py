"""The demo's image viewer: the reader's window/level and invert for DICOM, and the page code for
zoom and pan, apart from what the model gets.

- ``read_viewer``: the viewer controls (window center, window width, invert, send the window to the
  model) as a request sends them, checked; ``ViewerSettings`` says which window the model gets and
  which one the reader sees.
- ``slider_setup``: the window sliders' ranges and starting values for a rendered DICOM frame.
- ``reader_image``: an image as the reader sees it (inverted or not).
- ``VIEWER_CSS`` / ``VIEWER_JS``: zoom (wheel, buttons), pan (drag), small images scaled up to the
  preview, the banners that collapse once read, and the phone layout (``app.launch`` passes them).

Nothing here reads or shows a header value: the sliders start from the window that rendered the
frame and the frame's value range (numbers the reader's own controls then take).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageOps

from radiology.dicom import DicomImage
from radiology.serve import ControlError, read_number

__all__ = [
    "CENTER_LIMITS",
    "VIEWER_CSS",
    "VIEWER_JS",
    "WIDTH_LIMITS",
    "SliderSetup",
    "ViewerSettings",
    "read_flag",
    "read_viewer",
    "reader_image",
    "slider_setup",
    "zoom_js",
]

# What a request may send for a custom window, in the frame's values after the modality LUT
# (Hounsfield units for CT): wide enough for any 16-bit image with its rescale, finite and bounded.
CENTER_LIMITS = (-100_000, 100_000)
WIDTH_LIMITS = (1, 200_000)


def read_flag(value: object, control: str) -> bool:
    """A checkbox's value as a request sent it: true or false (None: false); else a ControlError."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise ControlError(f"{control} must be true or false.", control)


@dataclass(frozen=True)
class ViewerSettings:
    """The viewer controls' values, checked. ``adjusted``: the reader moved a window slider (the
    preview then shows the sliders' window); ``send``: the model gets the sliders' window."""

    center: float | None = None
    width: float | None = None
    invert: bool = False
    send: bool = False
    adjusted: bool = False

    @property
    def custom_window(self) -> tuple[float, float] | None:
        """The sliders' (center, width), None when either is empty."""
        if self.center is None or self.width is None:
            return None
        return float(self.center), float(self.width)

    @property
    def model_window(self) -> tuple[float, float] | None:
        """The window the model gets instead of the DICOM window selector's, None to keep the selector's."""
        return self.custom_window if self.send else None

    @property
    def reader_window(self) -> tuple[float, float] | None:
        """The window the preview shows instead of the model's, None to show the model's."""
        if self.send or not self.adjusted:
            return None
        return self.custom_window

    @property
    def differs(self) -> bool:
        """Whether the preview differs from what the model gets (then both are shown)."""
        return self.invert or self.reader_window is not None

    def describe(self) -> str:
        """The preview's label: what it shows."""
        parts = []
        if self.reader_window is not None:
            center, width = self.reader_window
            parts.append(f"window C {center:g}, W {width:g}, not sent")
        if self.invert:
            parts.append("inverted")
        if not parts:
            return "What the model sees"
        return f"Your view ({', '.join(parts)}); the model gets the image beside"


def read_viewer(center: object, width: object, invert: object = False, send: object = False,
                adjusted: object = False) -> ViewerSettings:
    """The viewer controls' values as a request sent them (any JSON value): the window center and
    width (numbers within CENTER_LIMITS / WIDTH_LIMITS; required when the window is sent to the
    model), invert and send (true or false). ControlError names the control and its range."""
    send = read_flag(send, "Send this window to the model")
    empty = None if send else "the image's own window"
    center = read_number(center, "Window center", *CENTER_LIMITS, empty=empty)
    width = read_number(width, "Window width", *WIDTH_LIMITS, empty=empty)
    return ViewerSettings(center=center, width=width, invert=read_flag(invert, "Invert"), send=send,
                          adjusted=read_flag(adjusted, "Adjusted"))


def reader_image(image: Image.Image, invert: bool) -> Image.Image:
    """``image`` as the reader sees it: inverted (black for white) when asked."""
    return ImageOps.invert(image.convert("RGB")) if invert else image


@dataclass(frozen=True)
class SliderSetup:
    """The window sliders for one frame: their ranges, whole numbers, and their starting values."""

    center: float
    width: float
    center_range: tuple[int, int]
    width_range: tuple[int, int]


def slider_setup(dicom: DicomImage | None) -> SliderSetup | None:
    """The sliders for a rendered frame: starting at the linear window that rendered it (else the
    frame's full range), the center over the frame's values, the width up to twice their span.
    None for a colour frame or a frame without values (no window applies)."""
    if dicom is None or dicom.value_range is None:
        return None
    low, high = dicom.value_range
    if dicom.linear_window is not None:
        center, width = dicom.linear_window
    else:
        center, width = (low + high) / 2, max(high - low, 1.0)
    center_range = (math.floor(min(low, center)), math.ceil(max(high, center, math.floor(low) + 1)))
    width_range = (1, math.ceil(max(2 * (high - low), width, 2)))
    center_range = (max(center_range[0], CENTER_LIMITS[0]), min(center_range[1], CENTER_LIMITS[1]))
    width_range = (width_range[0], min(width_range[1], WIDTH_LIMITS[1]))
    return SliderSetup(center=round(center, 2), width=round(max(width, 1.0), 2), center_range=center_range,
                       width_range=width_range)


def zoom_js(action: str) -> str:
    """The page code of a zoom button: ``in``, ``out`` or ``reset``."""
    factors = {"in": "1.5", "out": "1 / 1.5"}
    call = "reset()" if action == "reset" else f"zoom({factors[action]})"
    return f"() => {{ if (window.radiologyViewer) window.radiologyViewer.{call}; }}"


# Zoom scales the preview's image about its center and pans it with a translation, through CSS
# variables on the preview block: Gradio replaces the <img> when the image changes (a slice step),
# the block stays, so zoom and pan carry over to the next slice.
VIEWER_JS = r"""
() => {
  if (window.radiologyViewer) return;
  const MIN = 1, MAX = 16;
  const state = {zoom: 1, x: 0, y: 0};
  const block = () => document.getElementById('preview');
  function apply() {
    const b = block();
    if (!b) return;
    if (state.zoom <= MIN) { state.zoom = MIN; state.x = 0; state.y = 0; }
    b.style.setProperty('--viewer-zoom', String(state.zoom));
    b.style.setProperty('--viewer-x', state.x + 'px');
    b.style.setProperty('--viewer-y', state.y + 'px');
    b.dataset.zoom = state.zoom.toFixed(2);
    b.classList.toggle('viewer-zoomed', state.zoom > MIN);
  }
  function zoomAt(factor, clientX, clientY) {
    const b = block();
    const img = b && b.querySelector('img');
    const next = Math.min(MAX, Math.max(MIN, state.zoom * factor));
    if (img && clientX !== undefined) {
      // The point under the pointer stays where it is.
      const r = img.getBoundingClientRect();
      const px = (clientX - (r.left + r.width / 2)) / state.zoom;
      const py = (clientY - (r.top + r.height / 2)) / state.zoom;
      state.x += (state.zoom - next) * px;
      state.y += (state.zoom - next) * py;
    } else {
      state.x *= next / state.zoom;
      state.y *= next / state.zoom;
    }
    state.zoom = next;
    apply();
  }
  window.radiologyViewer = {
    zoom: (factor) => zoomAt(factor),
    reset: () => { state.zoom = 1; apply(); },
    state: () => ({...state}),
  };
  document.addEventListener('wheel', (e) => {
    if (!e.target.closest || !e.target.closest('#preview img')) return;
    e.preventDefault();
    zoomAt(e.deltaY < 0 ? 1.25 : 1 / 1.25, e.clientX, e.clientY);
  }, {passive: false});
  let drag = null;
  document.addEventListener('pointerdown', (e) => {
    if (state.zoom <= MIN || !e.target.closest || !e.target.closest('#preview img')) return;
    e.preventDefault();
    drag = {x: e.clientX - state.x, y: e.clientY - state.y};
  });
  document.addEventListener('pointermove', (e) => {
    if (!drag) return;
    state.x = e.clientX - drag.x;
    state.y = e.clientY - drag.y;
    apply();
  });
  document.addEventListener('pointerup', () => { drag = null; });
  document.addEventListener('pointercancel', () => { drag = null; });
  document.addEventListener('dblclick', (e) => {
    if (e.target.closest && e.target.closest('#preview img')) { state.zoom = 1; apply(); }
  });
  // The banners: full once, then one line each (a tap opens one again). The class goes on the
  // banners themselves: Gradio scopes this page's CSS to its container, which the body is not in.
  const KEY = 'radiology-gemma-banners-read';
  let read = false;
  try {
    read = Boolean(localStorage.getItem(KEY));
    localStorage.setItem(KEY, '1');
  } catch (err) { /* storage blocked: the banners stay open */ }
  if (read) {
    let tries = 0;
    const mark = setInterval(() => {
      const banners = document.querySelectorAll('.top-banner');
      banners.forEach((b) => b.classList.add('banner-read'));
      if (banners.length || ++tries > 100) clearInterval(mark);
    }, 100);
  }
  document.addEventListener('click', (e) => {
    const banner = e.target.closest && e.target.closest('.top-banner');
    if (banner) banner.classList.toggle('banner-open');
  });
}
"""

VIEWER_CSS = r"""
/* Small images are scaled up to the preview; zoom and pan through the viewer's variables. */
#preview img, #model-view img {
  width: 100%; height: 100%; object-fit: contain;
}
#preview img {
  transform: translate(var(--viewer-x, 0px), var(--viewer-y, 0px)) scale(var(--viewer-zoom, 1));
  transform-origin: center center;
  cursor: zoom-in;
}
#preview { overflow: hidden; }
#preview.viewer-zoomed img { cursor: grab; touch-action: none; }
#viewer-zoom { gap: 4px; }
#viewer-zoom button { min-width: 0; }
/* The banners collapse to one line once read; a tap opens one again. */
.top-banner.banner-read:not(.banner-open) {
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  padding: 4px 12px !important; cursor: pointer;
}
/* Phones: the disclaimer stays one line at the top of the screen, Generate and Stop at its bottom. */
@media (max-width: 640px) {
  /* Once read, the other banners keep their first sentence: two lines on a phone. */
  .top-banner.banner-read:not(.banner-open) {
    white-space: normal; display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical;
    padding: 4px 10px !important; font-size: 0.9em !important;
  }
  .prose h1 { font-size: 1.5em; }
  /* The disclaimer: always one line, at the top of the screen. */
  #disclaimer {
    position: fixed; top: 0; left: 0; right: 0; z-index: 20; margin: 0; padding: 4px 8px;
    background: var(--background-fill-primary, #fff);
  }
  #disclaimer + * { margin-top: 48px; }
  #disclaimer .top-banner:not(.banner-open) {
    display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
    padding: 4px 10px !important; font-size: 0.9em !important; cursor: pointer;
  }
  #generate-row {
    position: fixed; left: 0; right: 0; bottom: 0; z-index: 20; margin: 0;
    padding: 8px 12px; background: var(--background-fill-primary, #fff);
    box-shadow: 0 -2px 8px rgba(0, 0, 0, 0.15);
  }
  /* (Gradio puts every rule of this sheet inside the page's container: the last blocks make the room.) */
  #model-panel, #baseline-answer-settings { margin-bottom: 72px; }
  #preview .image-container, #preview { max-height: 55vh; }
}
"""
