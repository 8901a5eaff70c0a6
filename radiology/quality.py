"""Data quality measures and filters, shared by the audit and by training:

    python -m radiology.audit --dataset_name DATA --output_dir audit/     # reports (radiology.audit)
    python train.py ... --min_sharpness 20 --drop_duplicates --drop_images_in_split test   # filters

Per image: size, colour mode, sharpness (variance of the Laplacian, scipy) and a 64-bit perceptual
hash (pHash, ImageHash). Two images whose hashes differ in at most ``near_duplicate_distance`` bits
are the same picture for our purposes: a re-encoded, resized or blurred copy lands within a few bits,
different images about 32 bits apart. Per caption: its number of words and exact duplicates.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import imagehash
import numpy as np
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image
from scipy import ndimage

from radiology.data import CAPTION, IMAGE, DatasetError, PreparedDataset, open_image
from radiology.images import ImageDecodeError, to_rgb

__all__ = [
    "DEFAULT_NEAR_DUPLICATE_DISTANCE",
    "ImageMeasures",
    "MeasuredImages",
    "QualityThresholds",
    "caption_key",
    "caption_words",
    "duplicate_captions",
    "duplicate_groups",
    "filter_training_rows",
    "measure_image",
    "measure_images",
    "perceptual_hash",
    "row_reasons",
    "shared_images",
    "sharpness",
]

logger = logging.getLogger(__name__)

# Bits of 64 by which two pHashes may differ and still be one picture. Measured on pydicom's CT, MR and
# ultrasound images: JPEG re-encoding, resizing and a Gaussian blur (radius 3) moved the hash 0-2 bits;
# distinct images, flips and rotations of one image were 22-40 bits apart.
DEFAULT_NEAR_DUPLICATE_DISTANCE = 6

# Sharpness is measured with the longer side brought down to this size: the Laplacian's variance
# falls as a picture is enlarged, so scans of several thousand pixels would otherwise all look blurry.
# Smaller images are measured as they are: enlarging them would invent blur.
SHARPNESS_MAX_SIDE = 512

# Reasons, as they appear in the audit and in the training log's "dropped" counts.
UNREADABLE, EMPTY_CAPTION, SHORT_CAPTION = "unreadable image", "empty caption", "short caption"
SMALL, BLURRY, DUPLICATE_IMAGE, DUPLICATE_CAPTION = "small image", "blurry image", "duplicate image", "duplicate caption"
SHARED = "image also in {split} split"


# --------------------------------------------------------------------------- one image, one caption


@dataclass(frozen=True)
class ImageMeasures:
    """What the audit and the filters know about one decoded image."""

    width: int
    height: int
    mode: str  # Pillow mode as stored (L, I;16, RGB, P...), before conversion to RGB
    sharpness: float
    phash: int  # 64-bit perceptual hash


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey-level image (higher is sharper), at most 512 px a side."""
    gray = image.convert("L")
    scale = SHARPNESS_MAX_SIDE / max(gray.size)
    if scale < 1:
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.BILINEAR)
    return float(ndimage.laplace(np.asarray(gray, dtype=np.float32)).var())


def perceptual_hash(image: Image.Image) -> int:
    """The image's 64-bit pHash as an integer (Hamming distance = bits of difference)."""
    return int(str(imagehash.phash(image)), 16)


def measure_image(value: Any) -> ImageMeasures:
    """Size, stored mode, sharpness and hash of one image (any form ``decode_image`` takes)."""
    stored = open_image(value)
    try:
        rgb = to_rgb(stored)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"the image cannot be converted to RGB ({type(err).__name__}: {err})") from err
    return ImageMeasures(
        width=rgb.width, height=rgb.height, mode=stored.mode, sharpness=sharpness(rgb), phash=perceptual_hash(rgb)
    )


def caption_words(caption: Any) -> int:
    """Number of whitespace-separated words (0 for None)."""
    return len(str(caption).split()) if caption is not None else 0


def caption_key(caption: Any) -> str:
    """The caption as compared for duplicates: case and spacing ignored."""
    return " ".join(str(caption).split()).casefold() if caption is not None else ""


# --------------------------------------------------------------------------- a whole split


@dataclass
class MeasuredImages:
    """Measures of every row of one split, in row order; ``error`` is set where the image did not decode."""

    error: list[str | None]
    width: list[int | None]
    height: list[int | None]
    mode: list[str | None]
    sharpness: list[float | None]
    phash: list[int | None]

    def __len__(self) -> int:
        return len(self.error)

    def readable(self) -> list[int]:
        """Rows whose image decoded."""
        return [i for i, err in enumerate(self.error) if err is None]


_MEASURE_FEATURES = Features({
    "error": Value("string"), "width": Value("int32"), "height": Value("int32"), "mode": Value("string"),
    "sharpness": Value("float64"), "phash": Value("string"),  # hex: Arrow has no Python-int-safe uint64 path
})


def _measure_batch(images: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in _MEASURE_FEATURES}
    for value in images:
        try:
            m = measure_image(value)
        except ImageDecodeError as err:
            for name in out:
                out[name].append(str(err) if name == "error" else None)
            continue
        row = {**asdict(m), "phash": f"{m.phash:016x}", "error": None}
        for name in out:
            out[name].append(row[name])
    return out


def measure_images(dataset: Dataset, image_column: str = IMAGE, num_proc: int | None = None) -> MeasuredImages:
    """Decode and measure every image of ``dataset`` (in parallel with ``num_proc``)."""
    if len(dataset) == 0:  # map() would return the table unchanged, without the measure columns
        return MeasuredImages(error=[], width=[], height=[], mode=[], sharpness=[], phash=[])
    if isinstance(dataset.features.get(image_column), ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))  # we decode, and count failures
    table = dataset.map(
        _measure_batch,
        input_columns=[image_column],
        batched=True,
        batch_size=32,
        remove_columns=dataset.column_names,
        features=_MEASURE_FEATURES,
        num_proc=num_proc,
        desc="Measuring images",
    ).to_dict()
    return MeasuredImages(
        error=table["error"], width=table["width"], height=table["height"], mode=table["mode"],
        sharpness=table["sharpness"], phash=[None if h is None else int(h, 16) for h in table["phash"]],
    )


# --------------------------------------------------------------------------- thresholds and checks


@dataclass(frozen=True)
class QualityThresholds:
    """Limits below which a row is flagged (audit) or dropped (training); None turns a check off."""

    min_image_side: int | None = None
    min_sharpness: float | None = None
    min_caption_words: int | None = None
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE

    def __post_init__(self) -> None:
        if self.min_image_side is not None and self.min_image_side < 1:
            raise ValueError("--min_image_side must be at least 1 pixel (or omitted to keep every size)")
        if self.min_sharpness is not None and self.min_sharpness < 0:
            raise ValueError("--min_sharpness must be 0 or more (or omitted); run the audit to choose one")
        if self.min_caption_words is not None and self.min_caption_words < 1:
            raise ValueError("--min_caption_words must be at least 1 (or omitted)")
        if not 0 <= self.near_duplicate_distance <= 16:
            raise ValueError(
                "--near_duplicate_distance must be 0-16 bits of the 64-bit hash; unrelated images differ in about "
                f"32, so larger values merge different pictures (default {DEFAULT_NEAR_DUPLICATE_DISTANCE})"
            )

    @property
    def filters_rows(self) -> bool:
        """Whether any per-row limit is set."""
        return any(v is not None for v in (self.min_image_side, self.min_sharpness, self.min_caption_words))


def row_reasons(measured: MeasuredImages, index: int, caption: Any, thresholds: QualityThresholds) -> list[str]:
    """What is wrong with one row on its own (no comparison with other rows), in a fixed order."""
    reasons = []
    if measured.error[index] is not None:
        reasons.append(UNREADABLE)
    words = caption_words(caption)
    if words == 0:
        reasons.append(EMPTY_CAPTION)
    elif thresholds.min_caption_words is not None and words < thresholds.min_caption_words:
        reasons.append(SHORT_CAPTION)
    if measured.error[index] is None:
        side = min(measured.width[index], measured.height[index])
        if thresholds.min_image_side is not None and side < thresholds.min_image_side:
            reasons.append(SMALL)
        if thresholds.min_sharpness is not None and measured.sharpness[index] < thresholds.min_sharpness:
            reasons.append(BLURRY)
    return reasons


def _hash_array(measured: MeasuredImages, indices: Sequence[int]) -> np.ndarray:
    return np.array([measured.phash[i] for i in indices], dtype=np.uint64)


# Hashes compared per block: 16M uint64 XORs hold 128 MB at once, whatever the dataset's size.
_BLOCK_COMPARISONS = 1 << 24


def _close_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> Iterable[tuple[int, int, int]]:
    """(i, j, distance) for every pair a[i], b[j] within max_distance bits, compared block by block."""
    if len(a) == 0 or len(b) == 0:
        return
    block = max(1, _BLOCK_COMPARISONS // len(b))
    for start in range(0, len(a), block):
        distances = np.bitwise_count(a[start:start + block, None] ^ b[None, :])  # (block, len(b))
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            yield start + int(i), int(j), int(distances[i, j])


def duplicate_groups(measured: MeasuredImages, indices: Sequence[int], max_distance: int) -> list[list[int]]:
    """Groups of near-identical images among ``indices``, each in row order: the first row is the one kept."""
    indices = [i for i in indices if measured.phash[i] is not None]
    hashes = _hash_array(measured, indices)
    parent = list(range(len(indices)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j, _ in _close_pairs(hashes, hashes, max_distance):
        if i < j:
            parent[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for k, row in enumerate(indices):
        members.setdefault(root(k), []).append(row)
    # The first row is kept, not the "best": JPEG artefacts raise the sharpness score of a worse copy.
    # Filtering blurry rows before grouping (as filter_training_rows does) already drops a blurred copy.
    return sorted((rows for rows in members.values() if len(rows) > 1), key=lambda rows: rows[0])


def shared_images(
    measured: MeasuredImages,
    other: MeasuredImages,
    max_distance: int,
    indices: Sequence[int] | None = None,
) -> list[tuple[int, int, int]]:
    """(row here, row in other, distance) for each image here that is (nearly) the same as one there."""
    mine = [i for i in (range(len(measured)) if indices is None else indices) if measured.phash[i] is not None]
    theirs = other.readable()
    pairs = _close_pairs(_hash_array(measured, mine), _hash_array(other, theirs), max_distance)
    return [(mine[i], theirs[j], d) for i, j, d in pairs]


def duplicate_captions(captions: Sequence[Any], indices: Sequence[int] | None = None) -> list[list[int]]:
    """Groups of rows (first row first) with the same non-empty caption, ignoring case and spacing."""
    rows_by_caption: dict[str, list[int]] = {}
    for i in range(len(captions)) if indices is None else indices:
        key = caption_key(captions[i])
        if key:
            rows_by_caption.setdefault(key, []).append(i)
    return [rows for rows in rows_by_caption.values() if len(rows) > 1]


# --------------------------------------------------------------------------- training filter


def filter_training_rows(
    prepared: PreparedDataset,
    thresholds: QualityThresholds,
    drop_duplicates: bool = False,
    held_out: Mapping[str, MeasuredImages] | None = None,
    num_proc: int | None = None,
) -> PreparedDataset:
    """Drop prepared rows that fail the thresholds, whose image is in a held-out split, or (with
    ``drop_duplicates``) that repeat another row's image; counts each under its first reason."""
    dataset = prepared.dataset
    measured = measure_images(dataset, IMAGE, num_proc)
    captions = dataset[CAPTION]
    dropped: dict[int, str] = {}
    for i in range(len(dataset)):
        reasons = row_reasons(measured, i, captions[i], thresholds)
        if reasons:
            dropped[i] = reasons[0]
    for split, other in (held_out or {}).items():
        remaining = [i for i in range(len(dataset)) if i not in dropped]
        for i, _, _ in shared_images(measured, other, thresholds.near_duplicate_distance, remaining):
            dropped.setdefault(i, SHARED.format(split=split))
    if drop_duplicates:
        # Among the rows that survived the other checks, so that each picture keeps one usable copy.
        remaining = [i for i in range(len(dataset)) if i not in dropped]
        for group in duplicate_groups(measured, remaining, thresholds.near_duplicate_distance):
            for i in group[1:]:
                dropped[i] = DUPLICATE_IMAGE
    counts = Counter(dropped.values())
    if dropped:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    logger.info(
        "Quality filters dropped %d rows%s", len(dropped),
        ": " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) if counts else "",
    )
    filtered = PreparedDataset(dataset=dataset, dropped=prepared.dropped + counts)
    logger.info("Dataset: %s", filtered.summary())
    if len(dataset) == 0:
        raise DatasetError(
            f"no rows left after the quality filters ({filtered.summary()}); relax --min_image_side, "
            "--min_sharpness or --min_caption_words (python -m radiology.audit shows the distributions)"
        )
    return filtered
