"""Data stage: load image-caption datasets, validate rows, convert images, build chat messages.

A dataset is a Hugging Face hub id (``unsloth/Radiology_mini``), a local file (parquet, JSONL, CSV),
or a local folder that ``datasets.load_dataset`` understands (parquet/JSONL/CSV files, or an image
folder with a ``metadata.csv``/``metadata.jsonl`` giving captions). Image columns may hold images or
file paths (relative paths are resolved against the dataset's folder).

A row may hold several images of one study: one image column or several (``--image_column front
lateral``), or a column holding a list of images per row (``--images_column``); any image value may be
a DICOM series (a folder or .zip of DICOM files, or a multi-frame DICOM file), sampled to at most
``--max_images`` evenly spaced slices. ``--prior_image_column`` adds a prior study's image, placed
first in the prompt. ``row_images`` turns a prepared row into the images the model gets; the collator,
evaluation, the audit and the quality filters all call it, so they all see the same pixels.

DICOM files (paths ending in .dcm, or any file with the DICOM marker) are rendered through
``radiology.dicom`` with the file's own window, series through ``radiology.series`` with
``--series_window``; header values never reach the dataset or the logs.

Rows are validated once, up front: rows with an empty caption, an image file that is not there, an
image that does not decode, or Gemma control tokens (``<end_of_turn>``...) in the caption or context
are dropped and counted by cause, so that training never crashes mid-epoch on one bad file and never
learns a structure the prompt does not have.

Besides captions, a dataset may hold questions: a question and an answer column per row (VQA-RAD, SLAKE,
PMC-VQA style: ``--question_column``, ``--answer_column``), the question taking the instruction's place in
the user turn; or whole conversations in TRL's conversational format (``--messages_column``: user and
assistant turns, ``{"type": "image"}`` items at the start of the first user turn, the row's images in
order in ``--images_column``). Both become the same canonical columns: QUESTION (the first user turn's
text), CAPTION (the first answer) and FOLLOW_UPS (the later turns), which ``row_dialogue`` turns into
``build_messages``' arguments, so every prompt still comes from the one prompt builder. Conversations
whose shape that builder cannot give (images elsewhere, roles out of order, a system turn...) are dropped
and counted by cause.

``DatasetArguments`` describes a dataset (where it is, which column holds what) once for every command.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value, load_dataset
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image, UnidentifiedImageError

from radiology.dicom import (
    MULTI_WINDOW,
    WINDOW_CHOICES,
    NotDicomError,
    _check_window_choice,
    _quiet_pydicom,
    has_dicom_preamble,
    read_dicom_image,
)
from radiology.images import ImageDecodeError, ImageNotFoundError, to_rgb
from radiology.series import DEFAULT_MAX_IMAGES, load_series, render_series, sample_indices

__all__ = [
    "DEFAULT_INSTRUCTION",
    "FINDINGS_IMPRESSION_REQUEST",
    "REPORT_FORMATS",
    "WHOLE_FILE",
    "DatasetArguments",
    "DatasetError",
    "ImageOptions",
    "PreparedDataset",
    "RowImages",
    "TooManyImagesError",
    "CURRENT_LABEL",
    "PRIOR_LABEL",
    "Dialogue",
    "build_messages",
    "conversation_fields",
    "evaluation_items",
    "prompt_dialogue",
    "row_dialogue",
    "canonical_columns",
    "has_prior",
    "image_counts",
    "user_content",
    "user_text",
    "control_token_in",
    "decode_image",
    "with_report_format",
    "is_single_file",
    "load_caption_dataset",
    "load_caption_splits",
    "open_image",
    "prepare_caption_dataset",
    "refuse_control_tokens",
    "require_columns",
    "row_images",
]

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."
# How an answer is laid out (--report_format): "free" text, or "Findings:" and "Impression:" sections, which the
# instruction asks for (with_report_format); the prompt is otherwise the same (build_messages).
REPORT_FORMATS = ("free", "findings_impression")
FINDINGS_IMPRESSION_REQUEST = (
    'Write the report in two sections: "Findings:" with what the image shows, then "Impression:" with the '
    "conclusion in one or two sentences."
)

# Canonical column names after preparation; the collator and evaluation read these. IMAGE holds one
# image value per row, or a list of them (several image columns, or --images_column); PRIOR the prior study's.
IMAGE, CAPTION, IMAGE_ID, CONTEXT, PRIOR = "image", "caption", "image_id", "context", "prior"
# Questions (--question_column, --messages_column): QUESTION holds the first user turn's text, which takes the
# instruction's place (CAPTION then holds its answer); FOLLOW_UPS a conversation's later turns, as a list of
# {"question", "answer"}. TURN numbers the answers of a conversation in evaluation (see evaluation_items).
QUESTION, FOLLOW_UPS, TURN = "question", "follow_ups", "turn"
# Written while a conversation is read into the canonical columns: why it cannot be used (None: it can).
CONVERSATION_PROBLEM = "conversation_problem"
# Written by validation: the current study's image count per row (a series counted as its sampled slices)
# and the slice count of each series the row's images were sampled from.
IMAGE_COUNT, SERIES_SLICES = "image_count", "series_slices"
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


# --------------------------------------------------------------------------- a row's images


class TooManyImagesError(ImageDecodeError):
    """A row whose study holds more images than --max_images allows."""

    reason = "more images than --max_images"


@dataclass(frozen=True)
class ImageOptions:
    """How a row's images become the model's: at most ``max_images`` for the current study (a DICOM
    series is sampled down to that many evenly spaced slices, first and last included) and the window a
    series is rendered with (None: ``multi`` for grayscale CT, the files' own window otherwise)."""

    max_images: int = DEFAULT_MAX_IMAGES
    series_window: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 1:
            raise ValueError(f"--max_images must be a whole number from 1 (got {self.max_images!r})")
        try:
            _check_window_choice(self.series_window)
        except ValueError as err:
            raise ValueError(f"--series_window: {err}") from None


@dataclass
class RowImages:
    """One row's images as the model gets them: the current study's in order, and a prior study's image."""

    images: list[Image.Image]
    prior: Image.Image | None = None
    series_slices: list[int] = field(default_factory=list)  # slices of each series read for this row

    @property
    def in_prompt_order(self) -> list[Image.Image]:
        """The prior first (when there is one), then the current study's images."""
        return ([self.prior] if self.prior is not None else []) + self.images


_ZIP_MAGIC = b"PK\x03\x04"


def _is_empty(value: Any) -> bool:
    if isinstance(value, Mapping):
        return not value.get("bytes") and not value.get("path")
    return value is None or (isinstance(value, str) and not value.strip())


def _frame_count(source: Path | io.BytesIO) -> int:
    """NumberOfFrames from a DICOM header (1 when absent or unreadable: the image reader then explains)."""
    with _quiet_pydicom():  # pydicom's warnings may quote header values
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=["NumberOfFrames"], force=True)
            return int(header.get("NumberOfFrames", 1) or 1)
        except Exception:  # noqa: BLE001 - any damage: read as a single image, whose reader names the cause
            return 1


def _series_source(value: Any) -> Path | bytes | None:
    """The value as a DICOM series source (a folder, a .zip, a multi-frame DICOM file), or None for one image."""
    if isinstance(value, Image.Image):
        return None
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if data[:4] == _ZIP_MAGIC or (has_dicom_preamble(data) and _frame_count(io.BytesIO(data)) > 1):
            return data
        return None
    if not isinstance(value, (str, os.PathLike)):
        return None
    path = Path(value)
    if path.is_dir():
        return path
    if not path.is_file():
        return None  # open_image says that it is not there
    if path.suffix.lower() == ".zip":
        return path
    with open(path, "rb") as handle:
        head = handle.read(132)
    if head[:4] == _ZIP_MAGIC:
        return path
    if (has_dicom_preamble(head) or path.suffix.lower() == ".dcm") and _frame_count(path) > 1:
        return path
    return None


def _images_of(value: Any, max_images: int, window: str | None) -> tuple[list[Image.Image], int | None]:
    """One image value as images (as opened): itself, or a series' sampled slices and the series' size."""
    source = _series_source(value)
    if source is None:
        return [open_image(value)], None
    series = load_series(source)  # SeriesError subclasses (ImageDecodeError) name the cause, never a file
    return render_series(series, sample_indices(len(series), max_images), window), len(series)


def row_images(row: Mapping[str, Any], options: ImageOptions | None = None, rgb: bool = True) -> RowImages:
    """The images of a prepared row, as the model gets them, for the collator, evaluation, the audit and the filters.

    ``row[IMAGE]`` is one image value or a list of them (images, paths, bytes, ``datasets`` image dicts); a value
    that is a DICOM series (a folder or .zip of DICOM files, a multi-frame DICOM file) becomes at most
    ``max_images`` evenly spaced slices rendered with ``series_window``. ``row[PRIOR]`` (optional) is one image; a
    series there gives its middle slice. ``rgb=False`` keeps single images in their stored mode (the audit
    reports it). Raises ImageDecodeError (TooManyImagesError when the study has more than ``max_images``).
    """
    options = options or ImageOptions()
    value = row.get(IMAGE)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    images: list[Image.Image] = []
    slices: list[int] = []
    for item in values:
        if len(values) > 1 and _is_empty(item):
            continue  # a view this row does not have (e.g. no lateral film)
        part, size = _images_of(item, options.max_images, options.series_window)
        images += part
        slices += [size] if size is not None else []
    if not images:
        raise ImageDecodeError("the row has no image")
    if len(images) > options.max_images:
        raise TooManyImagesError(
            f"the row's study has {len(images)} images, more than --max_images {options.max_images}; raise "
            "--max_images (each image costs its image tokens in --max_length) or split the study"
        )
    prior = None
    if not _is_empty(row.get(PRIOR)):
        part, size = _images_of(row[PRIOR], 1, options.series_window)  # a series gives its middle slice
        prior = part[0]
        slices += [size] if size is not None else []
    if rgb:
        images = [decode_image(image) for image in images]
        prior = decode_image(prior) if prior is not None else None
    return RowImages(images=images, prior=prior, series_slices=slices)


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


def with_report_format(instruction: str, report_format: str = "free") -> str:
    """The instruction that asks for ``report_format`` (one of REPORT_FORMATS): itself for "free"; for
    "findings_impression" followed by FINDINGS_IMPRESSION_REQUEST (once, however often it is applied)."""
    if report_format not in REPORT_FORMATS:
        raise ValueError(f"unknown report format {report_format!r}: use one of {', '.join(REPORT_FORMATS)}")
    if report_format == "free" or instruction.rstrip().endswith(FINDINGS_IMPRESSION_REQUEST):
        return instruction
    return f"{instruction.rstrip()} {FINDINGS_IMPRESSION_REQUEST}"


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


@dataclass(frozen=True)
class Dialogue:
    """What one prompt says besides its images and clinical context: the first user turn's question (None: the
    instruction) and, for a later question of a conversation, the first answer and the follow-up turns, the last
    of them without its answer (training gives every answer). See build_messages."""

    question: str | None = None
    answer: str | None = None
    follow_ups: tuple[tuple[str, str | None], ...] = ()

    def messages(self, instruction: str, context: str | None = None, images: int = 1, prior: bool = False
                 ) -> list[dict[str, Any]]:
        """The chat messages, through build_messages: the question replaces ``instruction`` when there is one."""
        return build_messages(self.question or instruction, self.answer, context, images, prior, self.follow_ups)

    @property
    def asked(self) -> str | None:
        """The question the next answer replies to (None: the instruction)."""
        return self.follow_ups[-1][0] if self.follow_ups else self.question


def _question(row: Mapping[str, Any]) -> str | None:
    question = row.get(QUESTION)
    return None if question is None or not str(question).strip() else str(question).strip()


def _follow_ups(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(turn["question"]), str(turn["answer"])) for turn in row.get(FOLLOW_UPS) or []]


def row_dialogue(row: Mapping[str, Any]) -> Dialogue:
    """A prepared row's whole dialogue, for training: its question (None on caption rows: the instruction is
    asked), its first answer (CAPTION) and its follow-up turns, every one answered."""
    return Dialogue(_question(row), str(row[CAPTION]), tuple(_follow_ups(row)))


def prompt_dialogue(row: Mapping[str, Any]) -> tuple[Dialogue, str]:
    """A prepared row (or one of evaluation_items) as a prompt and its reference answer: everything up to its last
    question, and the last answer."""
    follow_ups = _follow_ups(row)
    if not follow_ups:
        return Dialogue(_question(row)), str(row[CAPTION])
    *earlier, (question, answer) = follow_ups
    return Dialogue(_question(row), str(row[CAPTION]), (*earlier, (question, None))), answer


def evaluation_items(dataset: Dataset) -> Dataset:
    """One row per answer to score. A caption or question row is its own item; a conversation of n answers gives
    n items, the k-th holding the turns up to its k-th answer (the earlier answers are the dataset's, as in
    training), numbered by TURN from 1. prompt_dialogue gives each item's prompt and reference."""
    if FOLLOW_UPS not in dataset.column_names:
        return dataset
    counts = [len(turns or []) + 1 for turns in dataset[FOLLOW_UPS]]
    items = dataset.select([row for row, n in enumerate(counts) for _ in range(n)])
    items = items.add_column(TURN, [turn for n in counts for turn in range(1, n + 1)])
    return items.map(lambda row: {FOLLOW_UPS: (row[FOLLOW_UPS] or [])[: row[TURN] - 1]}, desc="One item per answer")


# --------------------------------------------------------------------------- conversations (TRL's format)

# Why a conversation cannot be used, as counted when rows are dropped.
UNREADABLE_CONVERSATION = "unreadable conversation"
SYSTEM_TURN = "conversation with a system or tool turn"
ROLES_OUT_OF_ORDER = "conversation not alternating user, assistant"
NO_LAST_ANSWER = "conversation not ending with an answer"
IMAGES_ELSEWHERE = "images outside the start of the first user turn"
IMAGE_COUNT_MISMATCH = "image items not matching the row's images"
EMPTY_TURN = "empty turn"
TURN_WITH_CONTROL_TOKENS = "turn with chat control tokens"


@dataclass
class _Turn:
    role: str
    texts: list[str]
    leading_images: int = 0  # image items before the turn's first text
    misplaced_images: int = 0  # image items after a text
    plain: bool = False  # content given as a string: TRL puts every image of the row before the first user turn's


def _read_turn(message: Any) -> _Turn | str:
    """One message as a _Turn, or the cause that makes it unusable."""
    if not isinstance(message, Mapping):
        return UNREADABLE_CONVERSATION
    role, content = message.get("role"), message.get("content")
    if role in ("system", "tool"):
        return SYSTEM_TURN
    if role not in ("user", "assistant"):
        return UNREADABLE_CONVERSATION
    if isinstance(content, str):
        return _Turn(role, [content], plain=True)
    if not isinstance(content, (list, tuple)):
        return UNREADABLE_CONVERSATION
    turn = _Turn(role, [])
    for item in content:
        # Arrow gives every item every key (None where absent): the type says what an item is.
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "image":
            if turn.texts:
                turn.misplaced_images += 1
            else:
                turn.leading_images += 1
        elif kind == "text":
            turn.texts.append(str(item.get("text") or ""))
        else:
            return UNREADABLE_CONVERSATION
    return turn


def conversation_fields(messages: Any, images: int) -> tuple[dict[str, Any], str | None]:
    """A conversation in TRL's format, of a row holding ``images`` images, as the canonical QUESTION, CAPTION and
    FOLLOW_UPS, or the cause that makes it unusable (the fields are then empty).

    The one shape build_messages gives: user and assistant turns alternating, from a user turn to an answer; every
    image item at the start of the first user turn, as many as the row has images (a first user turn given as a
    string gets all of them, as TRL does); a text in every turn, without chat control tokens. Several text items
    of one turn are joined by a blank line (Gemma's template would glue them together).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return {}, UNREADABLE_CONVERSATION
    turns = []
    for message in messages:
        turn = _read_turn(message)
        if isinstance(turn, str):
            return {}, turn
        turns.append(turn)
    if any(turn.role != ("user" if i % 2 == 0 else "assistant") for i, turn in enumerate(turns)):
        return {}, ROLES_OUT_OF_ORDER
    if turns[-1].role != "assistant":
        return {}, NO_LAST_ANSWER
    first = turns[0]
    if first.misplaced_images or any(t.leading_images or t.misplaced_images for t in turns[1:]):
        return {}, IMAGES_ELSEWHERE
    if (images if first.plain else first.leading_images) != images:
        return {}, IMAGE_COUNT_MISMATCH
    texts = ["\n\n".join(text.strip() for text in turn.texts if text.strip()) for turn in turns]
    if not all(texts):
        return {}, EMPTY_TURN
    if any(control_token_in(text) for text in texts):
        return {}, TURN_WITH_CONTROL_TOKENS
    follow_ups = [{"question": texts[i], "answer": texts[i + 1]} for i in range(2, len(texts), 2)]
    return {QUESTION: texts[0], CAPTION: texts[1], FOLLOW_UPS: follow_ups}, None


def _image_value_count(value: Any) -> int:
    """How many image values a canonical IMAGE cell holds (a series counted once; empty views left out)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return sum(not _is_empty(v) for v in values)


_FOLLOW_UP_FEATURE = List({"question": Value("string"), "answer": Value("string")})


def _read_conversations(dataset: Dataset, column: str) -> Dataset:
    """The messages column replaced by QUESTION, CAPTION, FOLLOW_UPS and CONVERSATION_PROBLEM (see conversation_fields)."""
    features = Features({name: f for name, f in dataset.features.items() if name != column})
    features.update({QUESTION: Value("string"), CAPTION: Value("string"), FOLLOW_UPS: _FOLLOW_UP_FEATURE,
                     CONVERSATION_PROBLEM: Value("string")})

    def read(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {QUESTION: [], CAPTION: [], FOLLOW_UPS: [], CONVERSATION_PROBLEM: []}
        for messages, image in zip(batch[column], batch[IMAGE]):
            fields, problem = conversation_fields(messages, _image_value_count(image))
            out[QUESTION].append(fields.get(QUESTION))
            out[CAPTION].append(fields.get(CAPTION))
            out[FOLLOW_UPS].append(fields.get(FOLLOW_UPS, []))
            out[CONVERSATION_PROBLEM].append(problem)
        return out

    return dataset.map(read, batched=True, remove_columns=[column], features=features, desc="Reading conversations")


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
    name: str,
    config: str | None = None,
    splits: Sequence[str] | None = None,
    image_column: str | Sequence[str] = IMAGE,
) -> dict[str, Dataset]:
    """Some or all (the default) splits of a dataset given as a hub id, a local file or a local folder.

    A single local file holds one split: it is returned under the one name in ``splits``, or as
    WHOLE_FILE when no split is asked for (a file has no "test" or "train" of its own). In a local
    table whose ``image_column`` (one name, or several: every column that may hold paths) holds file
    paths or lists of them, relative paths are resolved against the table's folder. Errors name the
    problem: a path that does not exist, a hub dataset that cannot be found or reached, a split that is
    not there (listing the splits found), or a split with no rows.
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
        columns = [image_column] if isinstance(image_column, str) else list(image_column)
        for column in columns:
            chosen = {split: _resolve_relative_image_paths(dataset, column, root) for split, dataset in chosen.items()}
    return chosen


def load_caption_dataset(
    name: str, split: str, config: str | None = None, image_column: str | Sequence[str] = IMAGE
) -> Dataset:
    """One split of a dataset given as a hub id, a local file or a local folder (see load_caption_splits)."""
    return load_caption_splits(name, config, [split], image_column)[split]


def _is_text(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _resolve_relative_image_paths(dataset: Dataset, column: str, root: Path) -> Dataset:
    feature = dataset.features.get(column)
    listed = isinstance(feature, List) and _is_text(feature.feature)
    if not (_is_text(feature) or listed):
        return dataset

    def absolute_path(value: str | None) -> str | None:
        return None if value is None else str(value if Path(value).is_absolute() else root / value)

    def absolute(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if listed:
            batch[column] = [None if values is None else [absolute_path(v) for v in values] for values in batch[column]]
        else:
            batch[column] = [absolute_path(value) for value in batch[column]]
        return batch

    return dataset.map(absolute, batched=True, desc="Resolving image paths")


# --------------------------------------------------------------------------- validation


@dataclass
class PreparedDataset:
    """Rows ready for the collator, with what was dropped and why, and how their images are read."""

    dataset: Dataset
    dropped: Counter[str] = field(default_factory=Counter)
    options: ImageOptions = field(default_factory=ImageOptions)

    def summary(self) -> str:
        kept = len(self.dataset)
        if not self.dropped:
            return f"{kept} rows kept, none dropped"
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
        return f"{kept} rows kept; dropped {sum(self.dropped.values())}: {reasons}"

    def image_summary(self) -> str:
        """Images per row, priors and series sizes, for the log: ``images per row: 1 (10 rows), 4 (2 rows); ...``."""
        counts = Counter(image_counts(self.dataset))
        text = "images per row: " + ", ".join(f"{n} ({rows} row{'s' if rows != 1 else ''})"
                                              for n, rows in sorted(counts.items()))
        if PRIOR in self.dataset.column_names:
            text += f"; {sum(has_prior(self.dataset))} row(s) with a prior study"
        if SERIES_SLICES in self.dataset.column_names:
            sizes = sorted(size for row in self.dataset[SERIES_SLICES] for size in row)
            if sizes:
                spread = (f"{sizes[0]}" if sizes[0] == sizes[-1] else
                          f"{sizes[0]} to {sizes[-1]} (median {sizes[len(sizes) // 2]})")
                text += (
                    f"; {len(sizes)} DICOM series of {spread} slices, each sampled to at most "
                    f"{self.options.max_images} images (--max_images)"
                )
        return text


    def question_summary(self) -> str:
        """Answers per row, for the log: ``120 rows of 1 answer (a question each)`` or ``answers per row: 1 (4 rows), 3 (10 rows)``."""
        if FOLLOW_UPS not in self.dataset.column_names:
            rows = len(self.dataset)
            return f"{rows} row{'s' if rows != 1 else ''}, a question and its answer each"
        counts = Counter(len(turns or []) + 1 for turns in self.dataset[FOLLOW_UPS])
        return "answers per conversation: " + ", ".join(
            f"{n} ({rows} row{'s' if rows != 1 else ''})" for n, rows in sorted(counts.items())
        ) + f"; {sum(n * rows for n, rows in counts.items())} answers in all"


def image_counts(dataset: Dataset) -> list[int]:
    """Images of each prepared row's current study (one per row where validation did not count them)."""
    if IMAGE_COUNT in dataset.column_names:
        return list(dataset[IMAGE_COUNT])
    return [1] * len(dataset)


def has_prior(dataset: Dataset) -> list[bool]:
    """Whether each canonical row has a prior study's image."""
    if PRIOR not in dataset.column_names:
        return [False] * len(dataset)
    return [not _is_empty(value) for value in dataset[PRIOR]]


def require_columns(dataset: Dataset, required: Mapping[str, str]) -> None:
    """Fail, naming the option to fix, when a column given as {option: column} is not in the dataset."""
    found = list(dataset.column_names)
    for option, column in required.items():
        if column not in found:
            raise DatasetError(
                f"column {column!r} not found; columns found: {', '.join(found)}. "
                f"Name the right one with --{option}."
            )


def _holds_lists(feature: Any) -> bool:
    return isinstance(feature, List)


def _as_image_value(value: Any) -> dict[str, Any] | None:
    """One value of an image column as a ``datasets`` image dict (bytes or path), None when empty."""
    if _is_empty(value):
        return None
    if isinstance(value, Mapping):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    return {"bytes": None, "path": str(value)}


_STUDY = "__study_images__"  # a temporary name while several image columns are joined into one list
_MESSAGES = "__messages__"  # a temporary name while conversations are read into the canonical columns


def canonical_columns(
    dataset: Dataset,
    image_column: str | Sequence[str] = IMAGE,
    caption_column: str = CAPTION,
    id_column: str | None = IMAGE_ID,
    context_column: str | None = None,
    images_column: str | None = None,
    prior_image_column: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    messages_column: str | None = None,
) -> Dataset:
    """The dataset under the canonical columns (IMAGE, CAPTION, IMAGE_ID, optional CONTEXT and PRIOR; with questions
    QUESTION, and for conversations FOLLOW_UPS and CONVERSATION_PROBLEM), unvalidated.

    IMAGE holds each row's one image value, or a list of them when images come from several columns (in the
    order given, empty ones left out) or from ``images_column`` (a column of lists; it replaces
    ``image_column``). Images stay undecoded (bytes or paths). ``question_column`` and ``answer_column`` give
    QUESTION and CAPTION; ``messages_column`` (a conversation in TRL's format) gives QUESTION, CAPTION and
    FOLLOW_UPS through conversation_fields, its images coming from ``images_column``, else from a column named
    ``images`` (TRL's name), else from ``image_column``. Errors name the option to fix.
    """
    if messages_column and not images_column and "images" in dataset.column_names:
        images_column = "images"
    if images_column:
        sources = [images_column]
    else:
        sources = [image_column] if isinstance(image_column, str) else list(image_column)
    for column in sources:
        require_columns(dataset, {"images_column" if images_column else "image_column": column})
    if messages_column:
        required = {"messages_column": messages_column}
    elif question_column:
        required = {"question_column": question_column, "answer_column": answer_column or caption_column}
    else:
        required = {"caption_column": caption_column}
    if context_column:
        required["context_column"] = context_column
    if prior_image_column:
        required["prior_image_column"] = prior_image_column
    require_columns(dataset, required)
    for column in sources:
        lists = _holds_lists(dataset.features[column])
        if images_column and not lists:
            raise DatasetError(
                f"column {column!r} holds one image per row, not a list of them; name it with --image_column "
                f"{column} instead of --images_column"
            )
        if not images_column and lists:
            raise DatasetError(
                f"column {column!r} holds a list of images per row; name it with --images_column {column} "
                "(--image_column takes columns of one image, or one DICOM series, per row)"
            )
    texts = list(required.values())  # the columns of words: captions, questions and answers, or conversations
    kept = list(dict.fromkeys([*sources, *texts]))
    if id_column and id_column in dataset.column_names:
        kept.append(id_column)
    kept += [c for c in (context_column, prior_image_column) if c]
    dataset = dataset.select_columns(list(dict.fromkeys(kept)))
    for column in dict.fromkeys([*sources, prior_image_column or ""]):
        feature = dataset.features.get(column)
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))  # decoded by row_images, counted
        elif _holds_lists(feature) and isinstance(feature.feature, ImageFeature):
            dataset = dataset.cast_column(column, List(ImageFeature(decode=False)))
    image_source = sources[0]
    if len(sources) > 1:
        joined = [c for c in sources if c not in (*texts, id_column, context_column, prior_image_column)]
        features = Features({name: f for name, f in dataset.features.items() if name not in joined})
        features[_STUDY] = List(ImageFeature(decode=False))
        dataset = dataset.map(
            lambda batch: {_STUDY: [
                [v for v in (_as_image_value(batch[c][i]) for c in sources) if v is not None]
                for i in range(len(batch[sources[0]]))
            ]},
            batched=True,
            remove_columns=joined,
            features=features,
            desc="Joining image columns",
        )
        image_source = _STUDY
    renames = {image_source: IMAGE}
    if messages_column:
        renames[messages_column] = _MESSAGES
    elif question_column:
        renames.update({question_column: QUESTION, answer_column or caption_column: CAPTION})
    else:
        renames[caption_column] = CAPTION
    if id_column and id_column in dataset.column_names:
        renames[id_column] = IMAGE_ID
    if context_column:
        renames[context_column] = CONTEXT
    if prior_image_column:
        renames[prior_image_column] = PRIOR
    dataset = dataset.select_columns(list(renames)).rename_columns(
        {old: new for old, new in renames.items() if old != new}
    )
    if IMAGE_ID not in dataset.column_names:
        dataset = dataset.add_column(IMAGE_ID, [str(i) for i in range(len(dataset))])
    if messages_column:
        dataset = _read_conversations(dataset, _MESSAGES)
    for column in (CONTEXT, QUESTION, CAPTION):
        feature = dataset.features.get(column)
        if feature is not None and feature != Value("string") and (column == CONTEXT or isinstance(feature, Value)):
            # e.g. a CSV column of numbers (contexts, or answers such as "2"); None stays None
            dataset = dataset.cast_column(column, Value("string"))
    return dataset


def _row_problem(row: Mapping[str, Any], options: ImageOptions) -> tuple[str | None, int, list[int]]:
    """What makes a canonical row unusable (or None), the current study's image count, and its series' sizes."""
    if row.get(CONVERSATION_PROBLEM):
        return row[CONVERSATION_PROBLEM], 0, []
    caption, context = row.get(CAPTION), row.get(CONTEXT)
    answer = "answer" if QUESTION in row else "caption"  # question rows: CAPTION holds the answer
    if caption is None or not str(caption).strip():
        return f"empty {answer}", 0, []
    if control_token_in(str(caption)):
        # The collator would end the answer at an <end_of_turn> and silently mask the rest; the
        # other control tokens start turns or images that are not there, or plant <eos> mid-answer.
        return f"{answer} with chat control tokens", 0, []
    if QUESTION in row:
        if _question(row) is None:
            return "empty question", 0, []
        if control_token_in(str(row[QUESTION])):
            return "question with chat control tokens", 0, []
    if context is not None and control_token_in(str(context)):
        return "context with chat control tokens", 0, []
    try:
        images = row_images(row, options)
    except ImageDecodeError as err:
        return err.reason, 0, []
    return None, len(images.images), images.series_slices


def _text_length(row: Mapping[str, Any]) -> int:
    """Characters of a row's words that vary: its question, answers and follow-up questions (the instruction is
    the same for every row)."""
    return (len(str(row[CAPTION])) + len(row.get(QUESTION) or "")
            + sum(len(q) + len(a) for q, a in _follow_ups(row)))


_VALIDATION_FEATURES = Features(
    {"problem": Value("string"), IMAGE_COUNT: Value("int32"), SERIES_SLICES: List(Value("int32"))}
)


def prepare_caption_dataset(
    dataset: Dataset,
    image_column: str | Sequence[str] = IMAGE,
    caption_column: str = CAPTION,
    id_column: str | None = IMAGE_ID,
    context_column: str | None = None,
    max_samples: int | None = None,
    num_proc: int | None = None,
    images_column: str | None = None,
    prior_image_column: str | None = None,
    options: ImageOptions | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    messages_column: str | None = None,
) -> PreparedDataset:
    """Rename to canonical columns (see canonical_columns), keep the first ``max_samples`` rows, drop and count
    bad rows, and record each row's image count (IMAGE_COUNT) and series sizes (SERIES_SLICES).

    Every image of a row is read here once, through row_images (series sampled and rendered as training
    will), so that a bad file drops its row now rather than stopping training mid-epoch. Images stay
    undecoded (bytes or paths) in the result: the collator reads them again in the data loader's workers.
    """
    options = options or ImageOptions()
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    dataset = canonical_columns(
        dataset, image_column, caption_column, id_column, context_column, images_column, prior_image_column,
        question_column, answer_column, messages_column,
    )

    def problems_of(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        found = [_row_problem(row, options) for row in rows]
        return {
            "problem": [problem for problem, _, _ in found],
            IMAGE_COUNT: [count for _, count, _ in found],
            SERIES_SLICES: [slices for _, _, slices in found],
        }

    checked = dataset.map(
        problems_of,
        batched=True,
        batch_size=64,
        remove_columns=dataset.column_names,
        features=_VALIDATION_FEATURES,
        num_proc=num_proc,
        desc="Validating rows",
    )
    problems = checked["problem"]
    dropped = Counter(p for p in problems if p)
    keep = [i for i, p in enumerate(problems) if p is None]
    if dropped:
        dataset, checked = dataset.select(keep), checked.select(keep)
    prepared = PreparedDataset(dataset=dataset, dropped=dropped, options=options)
    logger.info("Dataset: %s", prepared.summary())
    if len(dataset) == 0:
        raise DatasetError(f"no usable rows left ({prepared.summary()}); {_how_to_fix(dropped)}")
    if CONVERSATION_PROBLEM in dataset.column_names:
        dataset = dataset.remove_columns(CONVERSATION_PROBLEM)  # None on every row kept
    dataset = dataset.add_column(IMAGE_COUNT, checked[IMAGE_COUNT]).add_column(SERIES_SLICES, checked[SERIES_SLICES])
    words = dataset.select_columns([c for c in (CAPTION, QUESTION, FOLLOW_UPS) if c in dataset.column_names])
    prepared.dataset = dataset.add_column(LENGTH, [_text_length(row) for row in words])
    logger.info("Images: %s", prepared.image_summary())
    if QUESTION in dataset.column_names:
        logger.info("Questions: %s", prepared.question_summary())
    return prepared


# What to check when every row was dropped, by the reason most rows were dropped for.
_FIXES = {
    "empty caption": "check that --caption_column names the column holding the captions",
    "file not found": "check --image_column and the image paths: relative paths are read from the table's folder",
    "caption with chat control tokens": "remove Gemma control tokens such as <end_of_turn> from the captions",
    "context with chat control tokens": "remove Gemma control tokens such as <end_of_turn> from the context column",
    TooManyImagesError.reason: "raise --max_images to the largest study's image count (it costs --max_length)",
    "empty answer": "check that --answer_column names the column holding the answers",
    "empty question": "check that --question_column names the column holding the questions",
    "answer with chat control tokens": "remove Gemma control tokens such as <end_of_turn> from the answers",
    "question with chat control tokens": "remove Gemma control tokens such as <end_of_turn> from the questions",
    UNREADABLE_CONVERSATION: "check that --messages_column names a column of conversations in TRL's format (a list "
    "of {'role': 'user'|'assistant', 'content': [...]})",
    SYSTEM_TURN: "move a system turn's text into the first user turn",
    ROLES_OUT_OF_ORDER: "let each conversation start with a user turn and alternate user, assistant",
    NO_LAST_ANSWER: "end each conversation with an assistant turn (its answer is what the model learns)",
    IMAGES_ELSEWHERE: "put every {'type': 'image'} item at the start of the first user turn, before its text",
    IMAGE_COUNT_MISMATCH: "give as many {'type': 'image'} items as the row has images (--images_column)",
    EMPTY_TURN: "give every turn some text",
    TURN_WITH_CONTROL_TOKENS: "remove Gemma control tokens such as <end_of_turn> from the conversations",
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

_SERIES_WINDOWS = [*WINDOW_CHOICES, MULTI_WINDOW]


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
    image_column: list[str] = field(
        default_factory=lambda: [IMAGE],
        metadata={
            "help": "Column(s) holding one image, image path or DICOM series (a folder or .zip of DICOM files, a "
            "multi-frame DICOM file) per row. Several columns give each row several images in the order named, "
            "e.g. --image_column front lateral."
        },
    )
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
    images_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding a list of images (or paths, or DICOM series) per row, in order: one study's "
            "images. Used instead of --image_column."
        },
    )
    prior_image_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding a prior study's image for comparison (empty: no prior); it goes first in the "
            "prompt, labelled 'Prior study:', before 'Current study:' and the row's images."
        },
    )
    max_images: int = field(
        default=DEFAULT_MAX_IMAGES,
        metadata={
            "help": "Most images of one row's study: a DICOM series is sampled to this many evenly spaced slices "
            "(first and last included); rows with more images are dropped and counted. Each image costs its image "
            "tokens (256 on Gemma 3) in --max_length."
        },
    )
    series_window: str | None = field(
        default=None,
        metadata={
            "choices": _SERIES_WINDOWS,
            "help": "Window for DICOM series: multi (three CT windows in R, G, B), header (the files' own), full, or "
            "a CT preset; default: multi for CT, header otherwise.",
        },
    )
    question_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding a question per row (VQA-RAD, SLAKE, PMC-VQA style), with --answer_column: the "
            "question replaces --instruction as the user turn's text (clinical context still follows it) and the "
            "answer is the assistant turn. Evaluation scores yes/no answers by accuracy, the others as captions."
        },
    )
    answer_column: str | None = field(
        default=None,
        metadata={"help": "Column holding each question's reference answer (with --question_column; it takes the "
                          "place of --caption_column)."},
    )
    messages_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding a conversation per row in TRL's conversational format: user and assistant "
            "turns, {'type': 'image'} items at the start of the first user turn; the row's images, in order, come "
            "from --images_column (default: the column named images). The loss is on every answer; evaluation "
            "scores each answer given the turns before it. --instruction is not used."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.image_column, str):  # a YAML value or a Python caller naming one column
            self.image_column = [self.image_column]
        self.image_column = list(self.image_column)
        if not self.image_column:
            raise ValueError("--image_column needs at least one column name")
        if self.images_column and self.image_column != [IMAGE]:
            raise ValueError(
                "give a row's images either with --image_column (one or more columns of one image each) or with "
                "--images_column (one column holding a list of images per row), not both"
            )
        if bool(self.question_column) != bool(self.answer_column):
            raise ValueError(
                "--question_column and --answer_column go together: name the column of questions and the column of "
                "their answers"
            )
        if self.answer_column and self.caption_column != CAPTION:
            raise ValueError(
                "with --question_column the answers are --answer_column's; drop --caption_column (questions and "
                "captions in one dataset are two datasets)"
            )
        if self.messages_column and (self.question_column or self.caption_column != CAPTION):
            what = "--question_column and --answer_column" if self.question_column else "--caption_column"
            raise ValueError(
                f"--messages_column holds each row's questions and answers itself; drop {what}"
            )
        if self.messages_column and self.prior_image_column:
            raise ValueError(
                "--prior_image_column does not combine with --messages_column: a conversation places its images "
                "itself; give the prior study's image first in --images_column and say so in the first user turn"
            )
        self.image_options()  # an impossible --max_images or --series_window fails here, before any loading

    @property
    def asks_questions(self) -> bool:
        """Whether rows hold questions (and answers, or conversations) rather than captions."""
        return bool(self.question_column or self.messages_column)

    def note_unused_instruction(self, instruction: str) -> None:
        """Log that ``instruction`` (when not the default) goes unused: each row's question takes its place."""
        if self.asks_questions and instruction != DEFAULT_INSTRUCTION:
            flag = "--question_column" if self.question_column else "--messages_column"
            logger.warning("--instruction is not used with %s: each row's question is the user turn's text", flag)

    @classmethod
    def of(cls, arguments: Any) -> DatasetArguments:
        """The dataset description held by a larger set of arguments (train.py's, which extend this class)."""
        return cls(**{name: getattr(arguments, name) for name in cls.__dataclass_fields__})

    def flags(self) -> list[str]:
        """The command-line flags that give this description (defaults left out), for a command to rerun."""
        flags = []
        for name, spec in self.__dataclass_fields__.items():
            value = getattr(self, name)
            default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
            if value is not None and value != default:
                flags += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
        return flags

    def image_options(self) -> ImageOptions:
        """How rows' images are read: --max_images and --series_window."""
        return ImageOptions(max_images=self.max_images, series_window=self.series_window)

    def path_columns(self) -> list[str]:
        """The columns that may hold image paths (relative ones are read from the dataset's folder)."""
        images = [self.images_column] if self.images_column else self.image_column
        if self.messages_column and not self.images_column:
            images = ["images", *images]  # TRL's name, read when the dataset has it (see canonical_columns)
        return images + ([self.prior_image_column] if self.prior_image_column else [])

    def load_splits(self, splits: Sequence[str] | None = None) -> dict[str, Dataset]:
        """Some or all splits, as read (see load_caption_splits)."""
        return load_caption_splits(self.dataset_name, self.dataset_config, splits, self.path_columns())

    def load(self, split: str) -> Dataset:
        """One split, as read."""
        return self.load_splits([split])[split]

    def canonical(self, raw: Dataset) -> Dataset:
        """A split read by ``load`` under the canonical columns, nothing dropped (see canonical_columns)."""
        return canonical_columns(
            raw,
            image_column=self.image_column,
            caption_column=self.caption_column,
            id_column=self.id_column,
            context_column=self.context_column,
            images_column=self.images_column,
            prior_image_column=self.prior_image_column,
            question_column=self.question_column,
            answer_column=self.answer_column,
            messages_column=self.messages_column,
        )

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
            images_column=self.images_column,
            prior_image_column=self.prior_image_column,
            options=self.image_options(),
            question_column=self.question_column,
            answer_column=self.answer_column,
            messages_column=self.messages_column,
        )
