"""Test data built offline: real CT/MR/RGB images from pydicom's bundled files, written in the
seed dataset's schema (image, image_id, caption, cui) with planted bad rows."""

from __future__ import annotations

import io
import warnings
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


# --------------------------------------------------------------------------- DICOM with planted patient data

# A marker planted in every identifying attribute of a test DICOM file. No output, log line or
# written file may contain it after the file went through the reader, the data loader or the app.
SENTINEL = "ZZSENTINEL"
SENTINEL_DATE = "19010203"  # dates cannot hold letters; this one is as unlikely to appear by chance

_IDENTIFYING: dict[str, str] = {
    "PatientName": f"{SENTINEL}^PATIENT^NAME",
    "PatientID": f"{SENTINEL}-ID-4711",
    "PatientBirthDate": SENTINEL_DATE,
    "PatientAddress": f"1 {SENTINEL} Street",
    "OtherPatientNames": f"{SENTINEL}^ALIAS",
    "InstitutionName": f"{SENTINEL} General Hospital",
    "ReferringPhysicianName": f"{SENTINEL}^DOCTOR",
    "AccessionNumber": f"{SENTINEL}ACC",
    "StudyID": f"{SENTINEL}S",
    "StudyDescription": f"{SENTINEL} chest study",
    "SeriesDescription": f"{SENTINEL} series",
    "ImageComments": f"{SENTINEL} comment",
    "StudyDate": SENTINEL_DATE,
}


def write_sentinel_dicom(
    folder: Path,
    name: str = "scan.dcm",
    source: str = "CT_small.dcm",
    burned_in_annotation: str | None = None,
    **overrides: object,
) -> Path:
    """Copy a real file from pydicom's test data into ``folder`` with every identifying attribute
    set to a value holding SENTINEL (see ``sentinel_hits``). ``overrides`` set further attributes
    by keyword (e.g. ``Rows=0`` for a broken header). Returns the written path."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file(source))
    for keyword, value in _IDENTIFYING.items():
        setattr(ds, keyword, value)
    if burned_in_annotation is not None:
        ds.BurnedInAnnotation = burned_in_annotation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns, quoting it, when an override is not a valid value
        for keyword, value in overrides.items():
            setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path)
    return path


def sentinel_hits(*texts: str | bytes) -> list[str]:
    """The texts (or byte strings) that contain the planted patient data, shortened for a message."""
    needles = [SENTINEL.lower(), SENTINEL_DATE]
    hits = []
    for text in texts:
        lowered = (text.decode("latin-1") if isinstance(text, bytes) else str(text)).lower()
        wide = lowered.replace("\x00", "")  # UTF-16 text written by some tools
        if any(n in lowered or n in wide for n in needles):
            hits.append(lowered[:200])
    return hits


def files_with_sentinel(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Every file under ``root`` (except those under ``skip``, e.g. the input DICOM files) whose
    bytes contain the planted patient data."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(path == s or s in path.parents for s in skip):
            continue
        if sentinel_hits(path.read_bytes()):
            found.append(path)
    return found


def set_raw_value(data: bytes, keyword: str, value: bytes) -> bytes:
    """``data`` (an explicit VR little endian DICOM file) with the first element ``keyword`` given
    the raw ``value``, bypassing pydicom's checks: how a hostile or broken header is made.
    Only for elements with a 2-byte length (IS, DS, CS, UI, US, ...)."""
    import struct

    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    assert vr in ("AE", "AS", "CS", "DA", "DS", "IS", "LO", "PN", "SH", "UI", "US", "SS", "TM"), vr
    marker = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    at = data.index(marker)
    old_length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old_length :]

def write_empty_split(folder: Path, split: str) -> Path:
    """A parquet file in the seed dataset's schema with no rows, as FOLDER/SPLIT.parquet."""
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value

    features = Features({"image": ImageFeature(), "image_id": Value("string"), "caption": Value("string"),
                         "cui": Sequence(Value("string"))})
    path = folder / f"{split}.parquet"
    Dataset.from_dict({name: [] for name in features}, features=features).to_parquet(str(path))
    return path

# --------------------------------------------------------------------------- audit fixture


def distinct_images() -> dict[str, Image.Image]:
    """Real pictures that differ from one another (pHash 22+ bits apart): CT, MR and ultrasound from
    pydicom, plus flipped and rotated views of them (a flip is a new picture to a perceptual hash)."""
    from pydicom import examples
    from pydicom.pixels import apply_color_lut

    base = real_images()
    overlay = examples.overlay.pixel_array.astype(np.float32)
    palette = examples.palette_color
    base["mr_overlay"] = Image.fromarray((overlay / overlay.max() * 255).astype(np.uint8))
    base["us_palette"] = Image.fromarray((apply_color_lut(palette.pixel_array, palette) >> 8).astype(np.uint8))
    return {
        "ct": base["ct_16bit"],
        "ct_flipped": base["ct_16bit"].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "ct_rotated": base["ct_16bit"].transpose(Image.Transpose.ROTATE_90),
        "mr": base["mr_gray"],
        "mr_rotated": base["mr_gray"].transpose(Image.Transpose.ROTATE_90),
        "mr_overlay": base["mr_overlay"],
        "mr_overlay_rotated": base["mr_overlay"].transpose(Image.Transpose.ROTATE_270),
        "us": base["rgb"],
        "us_flipped": base["rgb"].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "us_palette": base["us_palette"].convert("P"),
        "us_palette_flipped": base["us_palette"].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }


AUDIT_CAPTIONS = [
    "Axial CT of the chest shows a spiculated nodule in the right upper lobe.",
    "Sagittal T2-weighted MRI shows a disc herniation at L4-L5.",
    "Transabdominal ultrasound shows a gallstone with posterior acoustic shadowing.",
    "Coronal MRI shows a well-defined mass in the left parotid gland.",
    "Colour Doppler ultrasound shows flow within a thyroid nodule.",
    "Axial CT shows a hypodense lesion in segment VII of the liver.",
    "Axial MRI shows a lacunar infarct in the right thalamus.",
    "Ultrasound shows a thickened appendix measuring 9 mm.",
    "Coronal MRI shows bone marrow oedema in the medial femoral condyle.",
    "Renal ultrasound shows moderate hydronephrosis on the left.",
    "Axial CT shows a fracture of the left zygomatic arch.",
    "Doppler ultrasound shows a thrombus in the popliteal vein.",
    "Axial CT shows a small subdural haematoma on the right.",
    "Transvaginal ultrasound shows a simple ovarian cyst.",
]


def _jpeg_copy(image: Image.Image, scale: float = 1.0) -> bytes:
    """The picture re-encoded as JPEG (and resized), as a copy found elsewhere would be."""
    copy = image.convert("RGB") if image.mode not in ("L", "RGB") else image
    if scale != 1.0:
        copy = copy.resize((round(copy.width * scale), round(copy.height * scale)), Image.Resampling.LANCZOS)
    return encode(copy, "JPEG")


def write_audit_fixture(folder: Path) -> dict[tuple[str, str], set[str]]:
    """train/test parquet files of distinct real images with five planted problems, and the planted
    problems as {(split, image_id): reasons the audit must give}. Every other row is clean."""
    from datasets import Dataset, Image as ImageFeature
    from PIL import ImageFilter

    pictures = distinct_images()
    captions = iter(AUDIT_CAPTIONS)

    def row(image_id: str, image: bytes, caption: str | None = None, history: str | None = None) -> dict:
        return {"image": image, "image_id": image_id, "caption": caption or next(captions), "history": history}

    train = [
        row("ct", encode(pictures["ct"]), history="58-year-old smoker, cough for 3 weeks"),
        row("mr", encode(pictures["mr"])),
        row("us", encode(pictures["us"])),
        row("mr_overlay", encode(pictures["mr_overlay"]), history="Headache for two months."),
        row("us_palette", encode(pictures["us_palette"])),
        row("ct_flipped", encode(pictures["ct_flipped"])),
        row("mr_rotated", encode(pictures["mr_rotated"])),
        row("leaked", encode(pictures["us_flipped"])),
        row("blurred", encode(pictures["mr_overlay"].filter(ImageFilter.GaussianBlur(3)))),
    ]
    mr_caption = train[1]["caption"]
    train += [
        row("duplicate", _jpeg_copy(pictures["mr"]), caption=f"  {mr_caption.upper()} "),
        row("no_caption", encode(pictures["mr_overlay_rotated"]), caption=" "),
        row("broken", b"\x89PNG\r\n\x1a\n but the rest is not an image"),
    ]
    test = [
        row("test_us_palette_flipped", encode(pictures["us_palette_flipped"])),
        row("test_ct_rotated", encode(pictures["ct_rotated"])),
        row("test_leaked", _jpeg_copy(pictures["us_flipped"], scale=0.8)),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        Dataset.from_list(rows).cast_column("image", ImageFeature()).to_parquet(str(folder / f"{split}.parquet"))
    return {
        ("train", "leaked"): {"image also in test split"},
        ("test", "test_leaked"): {"image also in train split"},
        ("train", "blurred"): {"blurry image", "duplicate image"},  # a blurred copy of mr_overlay
        ("train", "duplicate"): {"duplicate image", "duplicate caption"},  # mr again, as JPEG, same caption
        ("train", "no_caption"): {"empty caption"},
        ("train", "broken"): {"unreadable image"},
    }


# --------------------------------------------------------------------------- studies: several images per row

MR700 = "dicomdirtests/98892003/MR700"  # a real radial MR series of 7 slices (16 x 16)
CT2 = "dicomdirtests/77654033/CT2"  # a real axial CT series of 4 slices (16 x 16)


def write_sentinel_series(folder: Path, relative: str = MR700) -> Path:
    """A real series from pydicom's test data copied into ``folder``, each file under a name holding the
    sentinel and with patient data planted in its header (see write_sentinel_dicom). Returns the folder."""
    from pydicom.data import get_testdata_file

    originals = sorted(p.name for p in Path(get_testdata_file(relative, download=False)).iterdir())
    for number, original in enumerate(reversed(originals)):  # names out of anatomical order on purpose
        write_sentinel_dicom(folder, f"{SENTINEL}_{number:03d}.dcm", source=f"{relative}/{original}")
    return folder


STUDY_CAPTIONS = [
    "Frontal and lateral chest radiographs show a right lower lobe consolidation.",
    "Axial CT slices show a hypodense lesion in the liver.",
    "MR slices show a well-defined mass without oedema.",
    "Compared with the prior study the effusion has resolved.",
    "Ultrasound images show a simple renal cyst.",
]


def write_study_dataset(folder: Path, splits: dict[str, int] | None = None) -> Path:
    """A folder of JSONL splits whose rows hold 2 to 4 real images each (relative PNG paths in an ``images``
    list column), some a prior study's image (``prior``), and in each split one row whose images are a real
    DICOM series folder (pydicom's MR700, 7 slices, planted patient data): study ids ``study_N``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    pictures = list(distinct_images().items())
    (folder / "images").mkdir(exist_ok=True)
    for name, picture in pictures:
        png = picture.convert("RGB") if picture.mode == "P" else picture
        (folder / "images" / f"{name}.png").write_bytes(encode(png))
    write_sentinel_series(folder / "series" / "mr700")
    for split, n in (splits or {"train": 6, "test": 4}).items():
        rows = []
        for i in range(n):
            if i == 1:
                images = ["series/mr700"]
            else:
                count = 2 + i % 3  # 2, 3 or 4 images
                images = [f"images/{pictures[(i + k) % len(pictures)][0]}.png" for k in range(count)]
            prior = f"images/{pictures[(i + 5) % len(pictures)][0]}.png" if i % 2 == 0 else None
            rows.append({"study": f"study_{i}", "images": images, "prior": prior,
                         "caption": STUDY_CAPTIONS[i % len(STUDY_CAPTIONS)]})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


# --------------------------------------------------------------------------- questions and conversations

# VQA-RAD-style rows: (image, question, answer); closed (yes/no) and open questions, several on one image.
VQA_ROWS = [
    ("ct", "Is there a nodule in the right upper lobe?", "Yes"),
    ("mr", "Is the disc herniated?", "yes, at L4-L5"),
    ("us", "Is there free fluid?", "No."),
    ("ct", "Which lobe holds the nodule?", "The right upper lobe."),
    ("mr_rotated", "What imaging modality is this?", "MRI"),
    ("us_flipped", "Is the kidney enlarged?", "no"),
    ("mr_overlay", "In which plane is the image taken?", "Axial plane"),
    ("us_palette", "What organ is shown?", "The left kidney."),
]


def _write_pictures(folder: Path) -> dict[str, str]:
    """distinct_images() as PNG files under folder/images; their paths relative to folder, by name."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, picture in distinct_images().items():
        png = picture.convert("RGB") if picture.mode == "P" else picture
        (folder / "images" / f"{name}.png").write_bytes(encode(png))
        paths[name] = f"images/{name}.png"
    return paths


def write_vqa_dataset(folder: Path, splits: dict[str, int] | None = None) -> Path:
    """A folder of JSONL splits in the VQA-RAD style: columns image (a relative PNG path of a real image), question,
    answer and qid; yes/no and open questions mixed (VQA_ROWS, in turn)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    paths = _write_pictures(folder)
    for split, n in (splits or {"train": 8, "test": 8}).items():
        rows = [{"qid": f"{split}_{i}", "image": paths[VQA_ROWS[i % len(VQA_ROWS)][0]],
                 "question": VQA_ROWS[i % len(VQA_ROWS)][1], "answer": VQA_ROWS[i % len(VQA_ROWS)][2]}
                for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


# Conversations of three answers about one study: (images, [(question, answer), ...]); the first row has two images.
CONVERSATIONS = [
    (["ct", "ct_rotated"], [("Describe these images.", "Axial CT of the chest shows a spiculated nodule in the right "
                                                       "upper lobe."),
                            ("Is the nodule spiculated?", "Yes."),
                            ("Which lobe holds it?", "The right upper lobe.")]),
    (["mr"], [("Describe this image.", "Sagittal T2-weighted MRI shows a disc herniation at L4-L5."),
              ("Is the spinal canal narrowed?", "Yes, mildly."),
              ("At which level is the herniation?", "L4-L5.")]),
    (["us"], [("What does the ultrasound show?", "A simple cyst in the left kidney."),
              ("Is there hydronephrosis?", "No."),
              ("How would you describe the cyst?", "Anechoic with a thin wall and posterior enhancement.")]),
]


def conversation_messages(turns: list[tuple[str, str]], images: int) -> list[dict]:
    """A conversation in TRL's format: the images' items at the start of the first user turn, then the turns."""
    messages = []
    for number, (question, answer) in enumerate(turns):
        content = [{"type": "image"} for _ in range(images if number == 0 else 0)]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def write_conversation_dataset(folder: Path, splits: dict[str, int] | None = None) -> Path:
    """A folder of JSONL splits in TRL's conversational format: ``messages`` (three answers each, image items at the
    start of the first user turn) and ``images`` (relative PNG paths of real images, one or two per row), ``id``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    paths = _write_pictures(folder)
    for split, n in (splits or {"train": 6, "test": 3}).items():
        rows = []
        for i in range(n):
            names, turns = CONVERSATIONS[i % len(CONVERSATIONS)]
            rows.append({"id": f"{split}_{i}", "images": [paths[name] for name in names],
                         "messages": conversation_messages(turns, len(names))})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder
