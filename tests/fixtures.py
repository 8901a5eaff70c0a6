"""Test data built offline: real CT/MR/RGB images from pydicom's bundled files, written in the
seed dataset's schema (image, image_id, caption, cui) with planted bad rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = [
    "Axial CT of the chest shows a spiculated nodule in the right upper lobe.",
    "Sagittal T2-weighted MRI shows a disc herniation at L4-L5.",
    "Frontal chest radiograph shows a left pleural effusion.",
    "Coronal CT shows free air under the right hemidiaphragm.",
    "Ultrasound shows a simple cyst in the left kidney.",
]


def real_images() -> dict[str, Image.Image]:
    """Real images in several Pillow modes: 16-bit CT, 8-bit MR, RGB, palette, RGBA, CMYK."""
    from pydicom import examples

    ct = examples.ct.pixel_array.astype(np.int32)
    mr = examples.mr.pixel_array.astype(np.float32)
    rgb = examples.rgb_color.pixel_array
    ct16 = Image.fromarray((ct - ct.min()).astype(np.uint16))
    mr8 = Image.fromarray((mr / mr.max() * 255).astype(np.uint8))
    color = Image.fromarray(rgb)
    return {
        "ct_16bit": ct16,
        "mr_gray": mr8,
        "rgb": color,
        "palette": color.convert("P"),
        "rgba": color.convert("RGBA"),
        "cmyk": color.convert("CMYK"),
    }


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def seed_rows(n: int = 12, bad_rows: bool = True) -> list[dict]:
    images = list(real_images().items())
    rows = []
    for i in range(n):
        name, image = images[i % len(images)]
        fmt = "JPEG" if image.mode == "CMYK" else "PNG"
        rows.append({
            "image": {"bytes": encode(image, fmt), "path": None},
            "image_id": f"ROCOv2_2023_train_{i:06d}",
            "caption": CAPTIONS[i % len(CAPTIONS)],
            "cui": ["C0040405"],
        })
    if bad_rows:
        rows.append({"image": {"bytes": b"this is not an image", "path": None},
                     "image_id": "broken", "caption": "Broken file.", "cui": []})
        rows.append({"image": {"bytes": encode(images[0][1]), "path": None},
                     "image_id": "no_caption", "caption": "   ", "cui": []})
    return rows


def write_seed_parquet(folder: Path, splits: dict[str, int] | None = None, bad_rows: bool = True) -> Path:
    """A folder of parquet files (one per split) in the seed dataset's schema."""
    from datasets import Dataset, Image as ImageFeature

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (splits or {"train": 12, "test": 6}).items():
        rows = seed_rows(n, bad_rows=bad_rows and split == "train")
        Dataset.from_list(rows).cast_column("image", ImageFeature()).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def write_empty_split(folder: Path, split: str) -> Path:
    """A parquet file in the seed dataset's schema with no rows, as FOLDER/SPLIT.parquet."""
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value

    features = Features({"image": ImageFeature(), "image_id": Value("string"), "caption": Value("string"),
                         "cui": Sequence(Value("string"))})
    path = folder / f"{split}.parquet"
    Dataset.from_dict({name: [] for name in features}, features=features).to_parquet(str(path))
    return path
