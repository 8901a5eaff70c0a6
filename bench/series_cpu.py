"""CPU cost of the series stage on a 300-slice CT of 512 x 512, built in a temporary folder from a
real slice (frame 0 of pydicom's eCT_Supplemental.dcm) with its position moved 1.25 mm per slice.

    python bench/series_cpu.py [--slices 300] [--images 8] [--repeat 3]

Prints the time to read the headers and order the slices, the time to render the sampled slices
(multi and header windows), and the peak Python memory (tracemalloc) of the whole load + render.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from radiology.series import load_series, render_series, sample_indices  # noqa: E402


def write_series(folder: Path, count: int) -> int:
    """``count`` single-frame CT files of 512 x 512; returns the bytes written."""
    source = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm", download=False))
    pixels = source.pixel_array[0].astype(np.uint16)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    template.Rows, template.Columns = pixels.shape
    template.BitsAllocated, template.BitsStored, template.HighBit, template.PixelRepresentation = 16, 16, 15, 0
    template.RescaleSlope, template.RescaleIntercept = 1, -1024
    template.PixelData = pixels.tobytes()
    template.ImagePositionPatient = ["0", "0", "111111.11"]  # fixed-width placeholders, replaced below
    template.InstanceNumber = "222222"
    template.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2.333333"
    buffer = io.BytesIO()
    template.save_as(buffer)
    data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    for position in range(count):
        (folder / f"{position:04d}.dcm").write_bytes(
            data.replace(b"111111.11", f"{1.25 * position:09.2f}".encode())
            .replace(b"222222", f"{position + 1:06d}".encode())
            .replace(b".333333", f".{position:06d}".encode())
        )
    return len(data) * count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        size = write_series(folder, args.slices)
        load_times, multi_times, header_times = [], [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            series = load_series(folder)
            load_times.append(time.perf_counter() - start)
            chosen = sample_indices(len(series), args.images)
            for window, times in (("multi", multi_times), ("header", header_times)):
                start = time.perf_counter()
                render_series(series, chosen, window)
                times.append(time.perf_counter() - start)
        tracemalloc.start()
        series = load_series(folder)
        images = render_series(series, sample_indices(len(series), args.images))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"series: {series.description}; {size / 2**20:.0f} MiB on disk")
    print(f"read {args.slices} headers and order: {statistics.median(load_times):.2f} s (median of {args.repeat})")
    print(f"render {len(images)} slices, multi window: {statistics.median(multi_times):.3f} s")
    print(f"render {len(images)} slices, header window: {statistics.median(header_times):.3f} s")
    print(f"peak Python memory, load + render (tracemalloc): {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
