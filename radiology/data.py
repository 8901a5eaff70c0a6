"""Data stage: load image-caption datasets, validate rows, convert images, build chat messages.

A dataset is a Hugging Face hub id (``unsloth/Radiology_mini``), a local file (parquet, JSONL, CSV),
or a local folder that ``datasets.load_dataset`` understands (parquet/JSONL/CSV files, or an image
folder with a ``metadata.csv``/``metadata.jsonl`` giving captions). Image columns may hold images or
file paths (relative paths are resolved against the dataset's folder).

DICOM files (paths ending in .dcm, or any file with the DICOM marker) are rendered through
``radiology.dicom`` with the file's own window; header values never reach the dataset or the logs.

Rows are validated once, up front: rows with an empty caption, an image file that is not there, an
image that does not decode, or Gemma control tokens (``<end_of_turn>``...) in the caption or context
are dropped and counted by cause, so that training never crashes mid-epoch on one bad file and never
learns a structure the prompt does not have.

``DatasetArguments`` describes a dataset (where it is, which column holds what) once for every command.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Image as ImageFeature, Value, load_dataset
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image, UnidentifiedImageError

from radiology.dicom import NotDicomError, has_dicom_preamble, read_dicom_image
from radiology.images import ImageDecodeError, ImageNotFoundError, to_rgb

__all__ = [
    "DEFAULT_INSTRUCTION",
    "WHOLE_FILE",
    "DatasetArguments",
    "DatasetError",
    "PreparedDataset",
    "CURRENT_LABEL",
    "PRIOR_LABEL",
    "build_messages",
    "user_content",
    "user_text",
    "control_token_in",
    "decode_image",
    "is_single_file",
    "load_caption_dataset",
    "load_caption_splits",
    "open_image",
    "prepare_caption_dataset",
    "refuse_control_tokens",
    "require_columns",
]

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."

# Canonical column names after preparation; the collator and evaluation read these.
IMAGE, CAPTION, IMAGE_ID, CONTEXT = "image", "caption", "image_id", "context"
# Caption length in characters: what length-grouped batching sorts by (a proxy for tokens that
# needs no tokenizer; the prompt and image block are the same length for every row).
LENGTH = "length"
# The split name of a dataset given as one file: it holds every row, not a "train" or "test" split.
WHOLE_FILE = "whole file"

_LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_EMPTY_SPLIT = re.compile(r'Instruction "([^"]+)" corresponds to no data')


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says how to fix it."""


# --------------------------------------------------------------------------- images


def open_image(value: Any) -> Image.Image:
    """An image from a PIL image, a path, raw bytes, or a ``datasets`` image dict, decoded in its own mode.

    DICOM is recognised by its 'DICM' marker, by a ``.dcm`` name, or (for preamble-less files
    with other names) after Pillow fails, and rendered by ``radiology.dicom`` with the file's own
    window. Raises ImageDecodeError (never a Pillow, pydicom or OS error) when it cannot be read.
    """
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
            raise ImageNotFoundError(f"image file not found: {path}")
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



def refuse_control_tokens(text: str, what: str) -> None:
    """Raise ValueError naming ``what`` ("the instruction", "--instruction"...) when ``text`` holds a control token."""
    token = control_token_in(text)
    if token is not None:
        raise ValueError(
            f"{what} contains the chat control token {token}, which would change the prompt's structure (a turn or "
            "an image that is not there); remove it"
        )


# Labels of a comparison prompt (see user_content): the prior study's image comes first.
PRIOR_LABEL = "Prior study:"
CURRENT_LABEL = "Current study:"


def user_text(instruction: str, context: str | None = None) -> str:
    """The user turn's text: the instruction, then the clinical context when there is one."""
    refuse_control_tokens(instruction, "the instruction")
    if context is None or not str(context).strip():
        return instruction
    context = str(context).strip()
    refuse_control_tokens(context, "the clinical context")
    return f"{instruction}\n\nClinical context: {context}"


def user_content(instruction: str, context: str | None = None, images: int = 1, prior: bool = False
                 ) -> list[dict[str, Any]]:
    """The first user turn's items: ``images`` image places, then one text item.

    With ``prior`` the first image is a prior study's, labelled, before the current study's images:
    ``Prior study: <image> Current study: <image>... instruction``. Several images of one study (slices of a
    series, two views) follow each other in order. One image without a prior is exactly the original prompt.
    """
    current = images - 1 if prior else images
    if current < 1:
        raise ValueError(
            f"a prompt needs at least one image of the current study (got {images} image(s)"
            + (", the first of them the prior study's)" if prior else ")")
        )
    items: list[dict[str, Any]] = []
    if prior:
        items += [{"type": "text", "text": PRIOR_LABEL}, {"type": "image"}, {"type": "text", "text": CURRENT_LABEL}]
    items += [{"type": "image"} for _ in range(current)]
    # One text item, not two: Gemma 3's chat template trims every item, which would glue a
    # second item straight onto the instruction ("...this image.Clinical context: ...").
    items.append({"type": "text", "text": user_text(instruction, context)})
    return items


def build_messages(
    instruction: str,
    caption: str | None = None,
    context: str | None = None,
    images: int = 1,
    prior: bool = False,
    follow_ups: Sequence[tuple[str, str | None]] = (),
) -> list[dict[str, Any]]:
    """Chat messages: the user turn (image(s), instruction, optional clinical context; see user_content)
    and, for training or a conversation, the assistant turn holding the caption; then each follow-up
    question as a user turn with its answer, when it has one, as an assistant turn.

    Training and inference both call this, so the model sees the same prompt in both. A prompt for the
    next answer ends with a user turn: no caption, or a last follow-up without an answer.
    """
    messages: list[dict[str, Any]] = [{"role": "user", "content": user_content(instruction, context, images, prior)}]
    if caption is None:
        if follow_ups:
            raise ValueError("follow-up questions come after the first answer: give it as the caption")
        return messages
    messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    for number, (question, answer) in enumerate(follow_ups, start=1):
        if not str(question).strip():
            raise ValueError(f"follow-up question {number} is empty")
        refuse_control_tokens(str(question), f"follow-up question {number}")
        messages.append({"role": "user", "content": [{"type": "text", "text": str(question).strip()}]})
        if answer is None:
            if number != len(follow_ups):
                raise ValueError(f"follow-up question {number} has no answer, but later questions follow it")
            break
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
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


def is_single_file(name: str) -> bool:
    """Whether a dataset name is one local file (which holds one split) rather than a folder or hub id."""
    return Path(name).expanduser().is_file()


def _offline_setting() -> str | None:
    """The variable that keeps datasets off the hub, if one is set."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return variable
    return None


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _load_from_hub(name: str, config: str | None, splits: Sequence[str] | None) -> Dataset | DatasetDict:
    """A hub dataset, with what to do when it is not there or the hub cannot be reached."""
    local = "or pass a local folder or parquet/JSONL/CSV file (local paths start with ./ or /)"
    try:
        return _load_splits(name, splits, name, config)
    except DatasetNotFoundError as err:
        raise DatasetError(
            f"dataset {name} was not found on the Hugging Face Hub: check the id (owner/name); for a private or gated "
            f"dataset log in with `hf auth login` and accept its terms on its page; {local}"
        ) from err
    except ConnectionError as err:
        offline = _offline_setting()
        if offline is not None or _caused_by(err, OfflineModeIsEnabled):
            setting = offline or "offline mode"
            raise DatasetError(
                f"dataset {name} is neither a local path nor in the local cache, and {setting} is set, so the Hugging "
                f"Face Hub was not asked for it. Unset {setting} to download it, {local}"
            ) from err
        raise DatasetError(
            f"could not reach the Hugging Face Hub to download dataset {name} (no network, or a proxy in the way?). "
            f"Check the connection, {local}"
        ) from err


def load_caption_splits(
    name: str, config: str | None = None, splits: Sequence[str] | None = None, image_column: str = IMAGE
) -> dict[str, Dataset]:
    """Some or all (the default) splits of a dataset given as a hub id, a local file or a local folder.

    A single local file holds one split: it is returned under the one name in ``splits``, or as
    WHOLE_FILE when no split is asked for (a file has no "test" or "train" of its own). In a local
    table whose ``image_column`` holds file paths, relative paths are resolved against the table's
    folder. Errors name the problem: a path that does not exist, a hub dataset that cannot be found or
    reached, a split that is not there (listing the splits found), or a split with no rows.
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
        # datasets wants a split name of word characters; the file's rows go under the name asked for.
        whole = _load_splits(name, None, builder, data_files={"train": str(path)}, split="train")
        loaded = DatasetDict({(splits or [WHOLE_FILE])[0]: whole})
    elif path.is_dir():
        loaded = _load_splits(name, splits, str(path), config)
    elif _looks_like_path(name):
        raise DatasetError(
            f"dataset path {name} does not exist; pass an existing folder or file, or a hub id such as "
            "unsloth/Radiology_mini"
        )
    else:
        loaded = _load_from_hub(name, config, splits)
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
    if control_token_in(str(caption)):
        # The collator would end the answer at an <end_of_turn> and silently mask the rest; the
        # other control tokens start turns or images that are not there, or plant <eos> mid-answer.
        return "caption with chat control tokens"
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
    prepared = PreparedDataset(dataset=dataset, dropped=dropped)
    logger.info("Dataset: %s", prepared.summary())
    if len(dataset) == 0:
        raise DatasetError(f"no usable rows left ({prepared.summary()}); {_how_to_fix(dropped)}")
    prepared.dataset = dataset.add_column(LENGTH, [len(str(c)) for c in dataset[CAPTION]])
    return prepared


# What to check when every row was dropped, by the reason most rows were dropped for.
_FIXES = {
    "empty caption": "check that --caption_column names the column holding the captions",
    "file not found": "check --image_column and the image paths: relative paths are read from the table's folder",
    "caption with chat control tokens": "remove Gemma control tokens such as <end_of_turn> from the captions",
    "context with chat control tokens": "remove Gemma control tokens such as <end_of_turn> from the context column",
}


def _how_to_fix(dropped: Counter[str]) -> str:
    hints = [_FIXES[reason] for reason, _ in dropped.most_common() if reason in _FIXES]
    if any(reason not in _FIXES for reason in dropped) or not dropped:
        hints.append(
            "check that --image_column holds the images; python -m radiology.audit --dataset_name ... "
            "lists every unreadable image"
        )
    return "; ".join(hints)


# --------------------------------------------------------------------------- the dataset description


@dataclass
class DatasetArguments:
    """Where a dataset is and which column holds what: the one description that train.py, radiology.evaluate and
    radiology.audit parse (as --dataset_name, --image_column...) and pass on. A new kind of column is added here.

    The split is each command's own choice, as their needs differ: train.py reads --dataset_train_split and a
    held-out --eval_split, radiology.evaluate one --split, radiology.audit any number (--split a b).
    """

    dataset_name: str = field(
        metadata={"help": "Hub dataset id, a local parquet/JSONL/CSV file, or a local folder (files or images)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    image_column: str = field(default=IMAGE, metadata={"help": "Column holding images or image paths."})
    caption_column: str = field(default=CAPTION, metadata={"help": "Column holding the reference caption."})
    id_column: str = field(
        default=IMAGE_ID, metadata={"help": "Column holding an image identifier, if any (else the row number)."}
    )
    context_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding optional clinical context (history or question, e.g. '58-year-old smoker, "
            "cough for 3 weeks'); it goes into the prompt after the instruction. Rows without it keep the plain prompt."
        },
    )

    @classmethod
    def of(cls, arguments: Any) -> DatasetArguments:
        """The dataset description held by a larger set of arguments (train.py's, which extend this class)."""
        return cls(**{name: getattr(arguments, name) for name in cls.__dataclass_fields__})

    def flags(self) -> list[str]:
        """The command-line flags that give this description (defaults left out), for a command to rerun."""
        flags = []
        for name, spec in self.__dataclass_fields__.items():
            value = getattr(self, name)
            if value is not None and value != spec.default:
                flags += [f"--{name}", str(value)]
        return flags

    def load_splits(self, splits: Sequence[str] | None = None) -> dict[str, Dataset]:
        """Some or all splits, as read (see load_caption_splits)."""
        return load_caption_splits(self.dataset_name, self.dataset_config, splits, self.image_column)

    def load(self, split: str) -> Dataset:
        """One split, as read."""
        return self.load_splits([split])[split]

    def prepare(self, raw: Dataset, max_samples: int | None = None, num_proc: int | None = None) -> PreparedDataset:
        """A split read by ``load`` under the canonical columns, bad rows dropped and counted."""
        return prepare_caption_dataset(
            raw,
            image_column=self.image_column,
            caption_column=self.caption_column,
            id_column=self.id_column,
            context_column=self.context_column,
            max_samples=max_samples,
            num_proc=num_proc,
        )
