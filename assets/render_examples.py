"""Render the demo's example images from DICOM test files that ship with pydicom.

    python assets/render_examples.py

Writes the images and ``examples.json`` (file, caption, source, licence) beside this script.
Each image goes through the modality LUT (rescale slope/intercept) and the file's window, or a
standard window where the file has none, then to 8-bit: what a viewer would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

HERE = Path(__file__).resolve().parent
PYDICOM = "pydicom's bundled test data (MIT licence; pydicom's test-file README: no known restriction on use)"
GDCM = "GDCM test data bundled with pydicom (BSD-style GDCM licence, in pydicom's test-file README)"

# (DICOM test file, output name, caption, origin, licence, window (center, width) when the file has none)
EXAMPLES = [
    ("CT_small.dcm", "ct_axial.png", "CT, axial slice through a vertebra",
     "NEMA WG04 sample CT1_UNC, downsized to 128x128 by pydicom (CT_small.dcm)", PYDICOM, (40, 400)),
    ("examples_overlay.dcm", "mr_abdomen.png", "MR, abdomen (liver)",
     "MR-SIEMENS-DICOM-WithOverlays.dcm from GDCM, cropped by pydicom (examples_overlay.dcm)", GDCM, None),
    ("examples_rgb_color.dcm", "us_small_parts.jpg", "Ultrasound, power Doppler of a lymph node",
     "NEMA WG04 sample US1_UNCR, cropped by pydicom (examples_rgb_color.dcm)", PYDICOM, None),
    ("JPEG2000.dcm", "nm_bone_scan.webp", "Nuclear medicine, whole-body bone scan (shown inverted)",
     "NEMA WG04 sample NM1_J2KI, edited by pydicom (JPEG2000.dcm)", PYDICOM, (90, 180)),
]
# Bone scans are read dark-on-light: high uptake is shown black.
INVERTED = {"JPEG2000.dcm"}


def render(name: str, window: tuple[float, float] | None) -> Image.Image:
    ds = dcmread(get_testdata_file(name))
    pixels = ds.pixel_array
    if ds.PhotometricInterpretation == "RGB":
        return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window is not None:
        center, width = window
    elif "WindowCenter" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
        center, width = (values.min() + values.max()) / 2, values.max() - values.min()
    else:
        center, width = (values.min() + values.max()) / 2, values.max() - values.min()
    low = center - width / 2
    gray = ((values - low) / max(width, 1e-6) * 255).clip(0, 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1" or name in INVERTED:
        gray = 255 - gray
    return Image.fromarray(gray, mode="L")


def main() -> None:
    manifest = []
    for source, out, caption, origin, licence, window in EXAMPLES:
        image = render(source, window)
        options = {"quality": 85} if out.endswith((".jpg", ".webp")) else {"optimize": True}
        image.save(HERE / out, **options)
        manifest.append({"file": out, "caption": caption, "source": origin, "licence": licence})
        print(f"{out}: {image.size[0]}x{image.size[1]} {image.mode}, {(HERE / out).stat().st_size // 1024} KB")
    (HERE / "examples.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
