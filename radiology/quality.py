"""Data quality measures and filters, shared by the audit and by training:

    python -m radiology.audit --dataset_name DATA --output_dir audit/     # reports (radiology.audit)
    python train.py ... --min_sharpness 20 --drop_duplicates --drop_images_in_split test   # filters

Per image: size, colour mode, sharpness (variance of the Laplacian, scipy) and a 64-bit perceptual
hash (pHash, ImageHash). Two images whose hashes differ in at most ``near_duplicate_distance`` bits
are the same picture for our purposes: a re-encoded, resized or blurred copy lands within a few bits,
different images about 32 bits apart. Per caption: its number of words and exact duplicates.

A row may hold several images (a study's views, a DICOM series' sampled slices, a prior study's image),
read by ``radiology.data.row_images`` as training reads them; every one of them is measured. A row is
small or blurry when any of its images is, and two rows are duplicates (or one leaks into another
split) when any image of one is (nearly) the same as any image of the other.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import imagehash
import numpy as np
from datasets import Dataset, Features, Image as ImageFeature, List, Value
from PIL import Image
from scipy import ndimage

from radiology.data import (
    CAPTION,
    IMAGE,
    PRIOR,
    DatasetError,
    ImageOptions,
    PreparedDataset,
    TooManyImagesError,
    open_image,
    row_images,
)
from radiology.images import ImageDecodeError, ImageNotFoundError, to_rgb

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
FILE_NOT_FOUND, TOO_MANY_IMAGES = ImageNotFoundError.reason, TooManyImagesError.reason
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


def _measures_of(stored: Image.Image) -> ImageMeasures:
    try:
        rgb = to_rgb(stored)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"the image cannot be converted to RGB ({type(err).__name__}: {err})") from err
    return ImageMeasures(
        width=rgb.width, height=rgb.height, mode=stored.mode, sharpness=sharpness(rgb), phash=perceptual_hash(rgb)
    )


def measure_image(value: Any) -> ImageMeasures:
    """Size, stored mode, sharpness and hash of one image (any form ``decode_image`` takes)."""
    return _measures_of(open_image(value))


def caption_words(caption: Any) -> int:
    """Number of whitespace-separated words (0 for None)."""
    return len(str(caption).split()) if caption is not None else 0


def caption_key(caption: Any) -> str:
    """The caption as compared for duplicates: case and spacing ignored."""
    return " ".join(str(caption).split()).casefold() if caption is not None else ""


# --------------------------------------------------------------------------- a whole split


@dataclass
class MeasuredImages:
    """Measures of every image of one split: one entry per image, rows in order and each row's images in
    prompt order (its prior first); ``row[k]`` is the row of entry k. A row whose images could not all be
    read has a single entry with ``error`` (the message) and ``reason`` (file not found, unreadable image,
    more images than --max_images) set and no measures. Built with one image per row (``row`` left out),
    entry k is row k."""

    error: list[str | None]
    width: list[int | None]
    height: list[int | None]
    mode: list[str | None]
    sharpness: list[float | None]
    phash: list[int | None]
    row: list[int] | None = None
    reason: list[str | None] | None = None
    prior: list[bool] | None = None  # whether entry k is its row's prior study image
    rows: int | None = None  # rows measured (a row has at least one entry)
    series_slices: list[list[int]] | None = None  # per row: slices of each series read

    def __post_init__(self) -> None:
        if self.row is None:
            self.row = list(range(len(self.error)))
        if self.reason is None:
            self.reason = [None if e is None else UNREADABLE for e in self.error]
        if self.prior is None:
            self.prior = [False] * len(self.error)
        if self.rows is None:
            self.rows = max(self.row) + 1 if self.row else 0
        if self.series_slices is None:
            self.series_slices = [[] for _ in range(self.rows)]
        self._entries: list[list[int]] = [[] for _ in range(self.rows)]
        for k, r in enumerate(self.row):
            self._entries[r].append(k)

    def __len__(self) -> int:
        return self.rows

    def entries(self, row: int) -> list[int]:
        """The entries (images) of one row, in prompt order."""
        return self._entries[row]

    def row_error(self, row: int) -> str | None:
        """Why the row's images could not be read, or None."""
        return next((self.error[k] for k in self._entries[row] if self.error[k] is not None), None)

    def row_reason(self, row: int) -> str | None:
        """The cause under which an unreadable row is counted (FILE_NOT_FOUND, UNREADABLE...), or None."""
        return next((self.reason[k] for k in self._entries[row] if self.reason[k] is not None), None)

    def readable(self) -> list[int]:
        """Rows whose every image decoded."""
        return [r for r in range(self.rows) if self.row_error(r) is None]

    def readable_entries(self) -> list[int]:
        """Entries of the readable rows: every image that was measured."""
        return [k for r in self.readable() for k in self._entries[r]]

    def images_in_row(self, row: int) -> int:
        """Images of the row's current study (its prior not counted); 0 when unreadable."""
        if self.row_error(row) is not None:
            return 0
        return sum(not self.prior[k] for k in self._entries[row])

    def has_prior(self, row: int) -> bool:
        """Whether the row's prompt starts with a prior study's image."""
        return any(self.prior[k] for k in self._entries[row])


_MEASURE_FEATURES = Features({
    "row": Value("int64"), "error": Value("string"), "reason": Value("string"), "width": Value("int32"),
    "height": Value("int32"), "mode": Value("string"), "sharpness": Value("float64"),
    "phash": Value("string"),  # hex: Arrow has no Python-int-safe uint64 path
    "prior": Value("bool"), "series_slices": List(Value("int32")),  # series_slices: on a row's first entry
})


def _failure_reason(err: ImageDecodeError) -> str:
    return err.reason if isinstance(err, (ImageNotFoundError, TooManyImagesError)) else UNREADABLE


def _measure_rows(batch: dict[str, list[Any]], indices: list[int], options: ImageOptions) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in _MEASURE_FEATURES}

    def add(**entry: Any) -> None:
        for name in out:
            out[name].append(entry.get(name, [] if name == "series_slices" else None))

    priors = batch[PRIOR] if PRIOR in batch else [None] * len(indices)
    for index, image, prior in zip(indices, batch[IMAGE], priors):
        try:
            study = row_images({IMAGE: image, PRIOR: prior}, options, rgb=False)
            measured = [(m, k == 0 and study.prior is not None)
                        for k, m in enumerate(_measures_of(picture) for picture in study.in_prompt_order)]
        except ImageDecodeError as err:
            add(row=index, error=str(err), reason=_failure_reason(err), prior=False)
            continue
        for k, (m, is_prior) in enumerate(measured):
            add(row=index, **{**asdict(m), "phash": f"{m.phash:016x}"}, prior=is_prior,
                series_slices=study.series_slices if k == 0 else [])
    return out


def measure_images(
    dataset: Dataset, options: ImageOptions | None = None, num_proc: int | None = None
) -> MeasuredImages:
    """Read (through ``row_images``, as training does) and measure every image of every row of a dataset under
    the canonical columns (IMAGE, optional PRIOR), in parallel with ``num_proc``."""
    options = options or ImageOptions()
    if len(dataset) == 0:  # map() would return the table unchanged, without the measure columns
        return MeasuredImages(error=[], width=[], height=[], mode=[], sharpness=[], phash=[], rows=0)
    for column in (IMAGE, PRIOR):
        feature = dataset.features.get(column)
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))  # we decode, and count failures
        elif isinstance(feature, List) and isinstance(feature.feature, ImageFeature):
            dataset = dataset.cast_column(column, List(ImageFeature(decode=False)))
    table = dataset.map(
        _measure_rows,
        input_columns=None,
        with_indices=True,
        fn_kwargs={"options": options},
        batched=True,
        batch_size=32,
        remove_columns=dataset.column_names,
        features=_MEASURE_FEATURES,
        num_proc=num_proc,
        desc="Measuring images",
    ).to_dict()
    series: list[list[int]] = [[] for _ in range(len(dataset))]
    for row, slices in zip(table["row"], table["series_slices"]):
        series[row] += slices
    return MeasuredImages(
        error=table["error"], width=table["width"], height=table["height"], mode=table["mode"],
        sharpness=table["sharpness"], phash=[None if h is None else int(h, 16) for h in table["phash"]],
        row=table["row"], reason=table["reason"], prior=table["prior"], rows=len(dataset), series_slices=series,
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
    """What is wrong with one row on its own (no comparison with other rows), in a fixed order. A row is small
    or blurry when any of its images is."""
    reasons = []
    failure = measured.row_reason(index)
    if failure is not None:
        reasons.append(failure)
    words = caption_words(caption)
    if words == 0:
        reasons.append(EMPTY_CAPTION)
    elif thresholds.min_caption_words is not None and words < thresholds.min_caption_words:
        reasons.append(SHORT_CAPTION)
    if failure is None:
        entries = measured.entries(index)
        side = min(min(measured.width[k], measured.height[k]) for k in entries)
        if thresholds.min_image_side is not None and side < thresholds.min_image_side:
            reasons.append(SMALL)
        lowest = min(measured.sharpness[k] for k in entries)
        if thresholds.min_sharpness is not None and lowest < thresholds.min_sharpness:
            reasons.append(BLURRY)
    return reasons


def _hash_array(measured: MeasuredImages, indices: Sequence[int]) -> np.ndarray:
    return np.array([measured.phash[i] for i in indices], dtype=np.uint64)


def _measured_entries(measured: MeasuredImages, rows: Iterable[int]) -> list[int]:
    """The measured images (entries) of those of ``rows`` whose images all decoded."""
    return [k for r in rows if measured.row_error(r) is None for k in measured.entries(r)]


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
    """Groups of rows among ``indices`` that share a near-identical image, each in row order: the first row is
    the one kept. Images within one row (neighbouring slices of a series) are not compared with each other."""
    rows = [r for r in indices if measured.row_error(r) is None]
    entries = _measured_entries(measured, rows)
    hashes = _hash_array(measured, entries)
    parent = {r: r for r in rows}

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for i, j, _ in _close_pairs(hashes, hashes, max_distance):
        a, b = root(measured.row[entries[i]]), root(measured.row[entries[j]])
        if a != b:
            parent[max(a, b)] = min(a, b)  # the earliest row stays the root
    members: dict[int, list[int]] = {}
    for r in sorted(rows):
        members.setdefault(root(r), []).append(r)
    # The first row is kept, not the "best": JPEG artefacts raise the sharpness score of a worse copy.
    # Filtering blurry rows before grouping (as filter_training_rows does) already drops a blurred copy.
    return sorted((group for group in members.values() if len(group) > 1), key=lambda group: group[0])


def shared_images(
    measured: MeasuredImages,
    other: MeasuredImages,
    max_distance: int,
    indices: Sequence[int] | None = None,
) -> list[tuple[int, int, int]]:
    """(row here, row in other, distance) for each pair of rows with a (nearly) identical image, the closest
    pair of their images giving the distance; in row order."""
    mine = _measured_entries(measured, range(len(measured)) if indices is None else indices)
    theirs = _measured_entries(other, range(len(other)))
    closest: dict[tuple[int, int], int] = {}
    for i, j, d in _close_pairs(_hash_array(measured, mine), _hash_array(other, theirs), max_distance):
        key = (measured.row[mine[i]], other.row[theirs[j]])
        closest[key] = min(d, closest.get(key, d))
    return [(a, b, d) for (a, b), d in sorted(closest.items())]


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
    measured = measure_images(dataset, prepared.options, num_proc)
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
    filtered = PreparedDataset(dataset=dataset, dropped=prepared.dropped + counts, options=prepared.options)
    logger.info("Dataset: %s", filtered.summary())
    if len(dataset) == 0:
        raise DatasetError(
            f"no rows left after the quality filters ({filtered.summary()}); relax --min_image_side, "
            "--min_sharpness or --min_caption_words (python -m radiology.audit shows the distributions)"
        )
    return filtered
