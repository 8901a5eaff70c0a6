"""Data stage: load image-caption datasets, validate rows, convert images, build chat messages.

A dataset is a Hugging Face hub id (``unsloth/Radiology_mini``), a local file (parquet, JSONL, CSV),
or a local folder that ``datasets.load_dataset`` understands (parquet/JSONL/CSV files, or an image
folder with a ``metadata.csv``/``metadata.jsonl`` giving captions). Image columns may hold images or
file paths (relative paths are resolved against the dataset's folder).

DICOM files (paths ending in .dcm, or any file with the DICOM marker) are rendered through
``radiology.dicom`` with the file's own window; header values never reach the dataset or the logs.

Rows are validated once, up front: rows with an empty caption or an image that does not decode are
dropped and counted, so that training never crashes mid-epoch on one bad file.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Image as ImageFeature, Value, load_dataset
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DatasetError",
    "ImageDecodeError",
    "PreparedDataset",
    "build_messages",
    "control_token_in",
    "decode_image",
    "load_caption_dataset",
    "load_caption_splits",
    "open_image",
    "prepare_caption_dataset",
    "require_columns",
    "to_rgb",
]

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."

# Canonical column names after preparation; the collator and evaluation read these.
IMAGE, CAPTION, IMAGE_ID, CONTEXT = "image", "caption", "image_id", "context"
# Caption length in characters: what length-grouped batching sorts by (a proxy for tokens that
# needs no tokenizer; the prompt and image block are the same length for every row).
LENGTH = "length"

_LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_EMPTY_SPLIT = re.compile(r'Instruction "([^"]+)" corresponds to no data')


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says how to fix it."""


class ImageDecodeError(ValueError):
    """An image that cannot be read; the message names the cause."""

    # The short label under which a dropped row is counted (subclasses name their cause).
    reason = "unreadable image"


# --------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image (grayscale, 16-bit, float, palette, alpha, CMYK...) as 8-bit RGB.

    High-bit-depth grayscale is stretched from its own min..max to 0..255: a 12/16-bit radiograph
    stored as PNG/TIFF would otherwise clip to white under Pillow's plain conversion. Transparent
    areas are composited onto black, the background of radiographs.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = ((pixels - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(value: Any) -> Image.Image:
    """An image from a PIL image, a path, raw bytes, or a ``datasets`` image dict, decoded in its own mode.

    DICOM is recognised by its 'DICM' marker, by a ``.dcm`` name, or (for preamble-less files
    with other names) after Pillow fails, and rendered by ``radiology.dicom`` with the file's own
    window. Raises ImageDecodeError (never a Pillow, pydicom or OS error) when it cannot be read.
    """
    # Imported here: radiology.dicom builds on this module's ImageDecodeError.
    from radiology.dicom import NotDicomError, has_dicom_preamble, read_dicom_image

    if isinstance(value, Image.Image):
        return value
    source: Any
    if isinstance(value, Mapping):
        source = value.get("bytes") or value.get("path")
    else:
        source = value
    if source is None:
        raise ImageDecodeError("the row has no image")
    if isinstance(source, (bytes, bytearray)):
        data: bytes = bytes(source)
        name = "image bytes"
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"image file not found: {path}")
        if path.suffix.lower() == ".dcm":
            return read_dicom_image(path).image  # checks the size before reading the file
        data = path.read_bytes()
        name = path.name
    if has_dicom_preamble(data):
        return read_dicom_image(data).image
    try:
        opened = Image.open(io.BytesIO(data))
        opened.load()  # decode fully now: a truncated file fails here, not mid-epoch
        return opened
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name} is too large to decode safely ({err})") from err
    except UnidentifiedImageError as err:
        # Pillow's own message names a BytesIO object and its memory address: no help to anyone.
        pillow_error: Exception = err
        reason = "unknown or damaged format"
    except (OSError, SyntaxError, ValueError) as err:
        pillow_error, reason = err, f"{type(err).__name__}: {err}"
    # Not an image Pillow knows: perhaps DICOM without the preamble and without a .dcm name.
    try:
        return read_dicom_image(data).image
    except NotDicomError:
        pass
    raise ImageDecodeError(f"{name} is not a readable image ({reason})") from pillow_error


def decode_image(value: Any) -> Image.Image:
    """An image from a PIL image, a path, raw bytes, or a ``datasets`` image dict, as 8-bit RGB.

    Raises ImageDecodeError (never a Pillow or OS error) when it cannot be read.
    """
    image = open_image(value)
    try:
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"the image cannot be converted to RGB ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------- prompts

# Gemma 3's control tokens. Inside prompt text they would tokenize as the real tokens: a stray
# <end_of_turn> ends the user turn, a stray <start_of_image> asks for an image that is not there.
_CONTROL_TOKEN = re.compile(r"<(?:start_of_turn|end_of_turn|start_of_image|end_of_image|image_soft_token|bos|eos|pad)>")


def control_token_in(text: str) -> str | None:
    """The first Gemma 3 control token (e.g. ``<end_of_turn>``) found in ``text``, or None."""
    match = _CONTROL_TOKEN.search(text)
    return match.group(0) if match else None



def build_messages(
    instruction: str,
    caption: str | None = None,
    context: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for one image: the user turn (image, instruction, optional clinical context)
    and, for training, the assistant turn holding the caption.

    Training and inference both call this, so the model sees the same prompt in both. Without
    context the user text is the instruction alone, exactly as before context existed.
    """
    text = instruction
    if context is not None and str(context).strip():
        context = str(context).strip()
        token = control_token_in(context)
        if token is not None:
            raise ValueError(
                f"the clinical context contains the chat control token {token}, which would change the "
                "prompt's structure; remove it from the context"
            )
        # One text item, not two: Gemma 3's chat template trims every item, which would glue a
        # second item straight onto the instruction ("...this image.Clinical context: ...").
        text = f"{instruction}\n\nClinical context: {context}"
    user_content: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": text}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": user_content}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


# --------------------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or Path(name).suffix.lower() in _LOCAL_BUILDERS


def _load_splits(name: str, wanted: Sequence[str] | None, *args: Any, **kwargs: Any) -> Dataset | DatasetDict:
    """``load_dataset``, except that a split with no rows that was not asked for does not block the rest."""
    try:
        return load_dataset(*args, **kwargs)
    except ValueError as err:
        # datasets cannot read a split with no rows, and fails the whole load because of it.
        empty = _EMPTY_SPLIT.search(str(err))
        if empty is None:
            raise
        if wanted is None or empty.group(1) in wanted:
            raise DatasetError(
                f"split {empty.group(1)!r} of {name} is empty (0 rows); choose another with --dataset_train_split "
                "(training) or --split (evaluation)"
            ) from err
        return DatasetDict({split: load_dataset(*args, **kwargs, split=split) for split in wanted})


def load_caption_splits(
    name: str, config: str | None = None, splits: Sequence[str] | None = None, image_column: str = IMAGE
) -> dict[str, Dataset]:
    """Some or all (the default) splits of a dataset given as a hub id, a local file or a local folder.

    A single local file holds one split, named by ``splits`` (default: train). In a local table whose
    ``image_column`` holds file paths, relative paths are resolved against the table's folder. Errors
    name the problem: a path that does not exist, a split that is not there (listing the splits
    found), or a split with no rows.
    """
    path = Path(name).expanduser()
    if path.is_file():
        if splits is not None and len(splits) != 1:
            raise DatasetError(
                f"{path} is a single file, so it holds one split; ask for one split, or give a folder with "
                "one file per split (train.parquet, test.parquet)"
            )
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetError(
                f"{path} is not a parquet, JSONL or CSV file; give one of those, a folder, or a hub dataset id"
            )
        loaded = _load_splits(name, splits, builder, data_files={(splits or ["train"])[0]: str(path)})
    elif path.is_dir():
        loaded = _load_splits(name, splits, str(path), config)
    elif _looks_like_path(name):
        raise DatasetError(
            f"dataset path {name} does not exist; pass an existing folder or file, or a hub id such as "
            "unsloth/Radiology_mini"
        )
    else:
        loaded = _load_splits(name, splits, name, config)
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({(splits or ["train"])[0]: loaded})
    for split in splits or []:
        if split not in loaded:
            raise DatasetError(
                f"split {split!r} not found in {name}; splits found: {', '.join(sorted(loaded))}. "
                "Choose one with --dataset_train_split (training), --eval_split (train.py's held-out loss and "
                "--evaluate) or --split (radiology.evaluate, radiology.audit)."
            )
    chosen = {split: loaded[split] for split in (splits or list(loaded))}
    if path.is_dir() or path.is_file():
        root = path if path.is_dir() else path.parent
        chosen = {split: _resolve_relative_image_paths(dataset, image_column, root) for split, dataset in chosen.items()}
    return chosen


def load_caption_dataset(name: str, split: str, config: str | None = None, image_column: str = IMAGE) -> Dataset:
    """One split of a dataset given as a hub id, a local file or a local folder (see load_caption_splits)."""
    return load_caption_splits(name, config, [split], image_column)[split]


def _resolve_relative_image_paths(dataset: Dataset, column: str, root: Path) -> Dataset:
    feature = dataset.features.get(column)
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return dataset

    def absolute(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        batch[column] = [
            None if value is None else str(value if Path(value).is_absolute() else root / value)
            for value in batch[column]
        ]
        return batch

    return dataset.map(absolute, batched=True, desc="Resolving image paths")


# --------------------------------------------------------------------------- validation


@dataclass
class PreparedDataset:
    """Rows ready for the collator, with what was dropped and why."""

    dataset: Dataset
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        kept = len(self.dataset)
        if not self.dropped:
            return f"{kept} rows kept, none dropped"
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
        return f"{kept} rows kept; dropped {sum(self.dropped.values())}: {reasons}"


def require_columns(dataset: Dataset, required: Mapping[str, str]) -> None:
    """Fail, naming the option to fix, when a column given as {option: column} is not in the dataset."""
    found = list(dataset.column_names)
    for option, column in required.items():
        if column not in found:
            raise DatasetError(
                f"column {column!r} not found; columns found: {', '.join(found)}. "
                f"Name the right one with --{option}."
            )


def _row_problem(image: Any, caption: Any, context: Any = None) -> str | None:
    if caption is None or not str(caption).strip():
        return "empty caption"
    if context is not None and control_token_in(str(context)):
        return "context with chat control tokens"
    try:
        decode_image(image)
    except ImageDecodeError as err:
        return err.reason
    return None


def prepare_caption_dataset(
    dataset: Dataset,
    image_column: str = IMAGE,
    caption_column: str = CAPTION,
    id_column: str | None = IMAGE_ID,
    context_column: str | None = None,
    max_samples: int | None = None,
    num_proc: int | None = None,
) -> PreparedDataset:
    """Rename to canonical columns, keep the first ``max_samples`` rows, drop and count bad rows.

    Images stay undecoded (bytes or paths) in the result: the collator decodes them in the data
    loader's workers, off the training step's critical path.
    """
    required = {"image_column": image_column, "caption_column": caption_column}
    if context_column:
        required["context_column"] = context_column
    require_columns(dataset, required)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))

    columns = {image_column: IMAGE, caption_column: CAPTION}
    if id_column and id_column in dataset.column_names:
        columns[id_column] = IMAGE_ID
    if context_column:
        columns[context_column] = CONTEXT
    dataset = dataset.select_columns(list(columns)).rename_columns(
        {old: new for old, new in columns.items() if old != new}
    )
    if isinstance(dataset.features[IMAGE], ImageFeature):
        dataset = dataset.cast_column(IMAGE, ImageFeature(decode=False))
    if IMAGE_ID not in dataset.column_names:
        dataset = dataset.add_column(IMAGE_ID, [str(i) for i in range(len(dataset))])
    if context_column and dataset.features[CONTEXT] != Value("string"):
        dataset = dataset.cast_column(CONTEXT, Value("string"))  # e.g. a CSV column of numbers; None stays None

    def problems_of(batch: dict[str, list[Any]]) -> dict[str, list[str | None]]:
        contexts = batch[CONTEXT] if CONTEXT in batch else [None] * len(batch[IMAGE])
        return {"problem": [_row_problem(*row) for row in zip(batch[IMAGE], batch[CAPTION], contexts)]}

    problems = dataset.map(
        problems_of,
        batched=True,
        batch_size=64,
        input_columns=None,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc="Validating rows",
    )["problem"]
    dropped = Counter(p for p in problems if p)
    if dropped:
        dataset = dataset.select([i for i, p in enumerate(problems) if p is None])
    dataset = dataset.add_column(LENGTH, [len(str(c)) for c in dataset[CAPTION]])
    prepared = PreparedDataset(dataset=dataset, dropped=dropped)
    logger.info("Dataset: %s", prepared.summary())
    if len(dataset) == 0:
        raise DatasetError(f"no usable rows left ({prepared.summary()}); check the image and caption columns")
    return prepared
