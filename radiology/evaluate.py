"""Evaluate stage: is the fine-tuned model better than its base on held-out images?

    python -m radiology.evaluate --model runs/r1/merged --baseline google/gemma-3-4b-pt \\
        --dataset_name unsloth/Radiology_mini --split test --output_dir runs/r1/eval
    python -m radiology.evaluate --model google/gemma-3-4b-pt --adapter runs/r1 --load_in_4bit \\
        --baseline google/gemma-3-4b-pt --dataset_name data/ --output_dir runs/r1/eval --max_samples 50
    python -m radiology.evaluate --config eval.yaml --output_dir runs/r1/eval    # options from a YAML file
    python -m radiology.evaluate --server_url http://gpu-box:8000/v1 --concurrency 16 \
        --baseline google/gemma-3-4b-pt --dataset_name unsloth/Radiology_mini --output_dir runs/r1/eval

The options are EvalArguments, the dataset description shared with train.py and radiology.audit
(``radiology.data.DatasetArguments``), the served model's (``radiology.remote.ServerArguments``) and
radiology.generate's decoding flags. The split defaults to test; a dataset given as one file holds one
split, scored whole and recorded as "whole file".

A model is loaded here (--model, --baseline; --batch_size rows per generate call) or served by an
OpenAI-compatible server (--server_url, --baseline_server_url: vLLM, SGLang, transformers serve) with
--concurrency requests in flight. Served models get the same prompts: each row's images are rendered
here and sent as PNG pixels only (no DICOM header, file name or metadata), the prior first and labelled.
With --server_url, --model is only the name shown in the results (default: the served model's name);
likewise --baseline with --baseline_server_url. A server that cannot be reached, or does not serve
the model, stops the run before anything is generated.

Each model describes every row of the split (greedy and seeded by default, in left-padded
batches): one image, or a study's several (several image columns, --images_column, a DICOM series'
sampled slices) with a prior study's image first when --prior_image_column gives one, read by
``radiology.data.row_images`` as training reads them. The captions are scored against the references
(BLEU, ROUGE-L, CIDEr-D, length; see ``radiology.metrics``) with bootstrap 95% intervals over rows,
and model - baseline with a paired bootstrap interval.

With questions (--question_column and --answer_column, or --messages_column) each question replaces the
instruction; a conversation gives one prompt per answer, holding the turns before it with the dataset's
answers. A question whose reference answer is yes or no (``radiology.metrics.YES_NO_RULE``) is closed and
scored by accuracy, with its bootstrap interval and the paired model - baseline difference; the others are
open and scored with the caption metrics. OUTPUT_DIR receives:

- metrics.json: corpus metrics per model, their difference, and everything needed to reproduce them
  (a served model's source reads "served by URL (model NAME)", with its concurrency);
- predictions.jsonl: one line per row (id, reference, images in the prompt, each model's text or error,
  per-row scores);
- report.html: one self-contained page (summary table, per-row differences, examples with the strip of
  images each answer was made from).

A model that fails on one image records the error in that image's row and goes on (for a served model
also a refused request, or a server that goes away mid-run: every row left records why); images where
a model failed are left out of every model's scores, so that both are scored on the same images.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from radiology.config import ProjectParser
from radiology.data import (
    CAPTION,
    CONTEXT,
    DEFAULT_INSTRUCTION,
    FOLLOW_UPS,
    IMAGE_ID,
    QUESTION,
    TURN,
    WHOLE_FILE,
    DatasetArguments,
    DatasetError,
    Dialogue,
    ImageOptions,
    PreparedDataset,
    RowImages,
    evaluation_items,
    has_prior,
    image_counts,
    is_single_file,
    prompt_dialogue,
    refuse_control_tokens,
    row_images,
)
from radiology.generate import (
    GenerationSettings,
    LoadedModel,
    add_generation_arguments,
    generate_batch,
    load_for_generation,
    settings_from_args,
)
from radiology.metrics import (
    CLOSED_METRICS,
    METRICS,
    YES_NO_RULE,
    ClosedScores,
    MetricInfo,
    SampleScores,
    bleu_signature,
    bootstrap_indices,
    bootstrap_interval,
    closed_answer,
    paired_difference,
    score_closed,
    score_samples,
    words,
)
from radiology.remote import SERVER_ARGUMENTS_TITLE, RemoteModel, RemoteRequest, ServerArguments
from radiology.report import Thumbnail, select_examples, strip_thumbnails, write_report

__all__ = [
    "BASELINE",
    "MODEL",
    "OUTPUT_FILES",
    "EvalArguments",
    "EvalConfig",
    "EvalOutcome",
    "EvaluationError",
    "ModelSource",
    "Prediction",
    "ScoredItems",
    "check_eval_output_dir",
    "display_name",
    "load_eval_dataset",
    "main",
    "make_parser",
    "model_sources",
    "parse_config",
    "predict",
    "predict_served",
    "run_evaluation",
    "score_items",
    "summary_lines",
]

logger = logging.getLogger(__name__)

MODEL, BASELINE = "model", "baseline"  # role names, used as keys in metrics.json and predictions.jsonl
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "report.html")
PER_IMAGE_METRICS = ("bleu", "rouge_l", "cider_d")
# Radiology captions run to tens of tokens; a base model that never stops would otherwise make
# every image cost the full generate default of 256 tokens.
EVAL_MAX_NEW_TOKENS = 128
DEFAULT_CONCURRENCY = 8


class EvaluationError(RuntimeError):
    """An evaluation that cannot produce scores; the message says why and what to do."""


@dataclass
class EvalArguments:
    """radiology.evaluate's own options (the dataset is DatasetArguments, the served model ServerArguments,
    decoding radiology.generate's flags)."""

    output_dir: str = field(metadata={"help": "Folder for metrics.json, predictions.jsonl and report.html."})
    model: str | None = field(
        default=None,
        metadata={"help": "Fine-tuned model: merged folder, hub id, or the base model for --adapter. With "
                          "--server_url: only the name shown in the results (default: the served model's)."},
    )
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder to apply to --model."})
    baseline: str | None = field(
        default=None,
        metadata={"help": "Model to compare against (e.g. the base model), folder or hub id. With "
                          "--baseline_server_url: only the name shown in the results."},
    )
    baseline_server_url: str | None = field(
        default=None,
        metadata={"help": "API base of a server (http://HOST:PORT/v1) serving the baseline; it shares "
                          "--server_api_key_env and the timeouts with --server_url."},
    )
    baseline_server_model: str | None = field(
        default=None, metadata={"help": "Served baseline's name (default: the first the server lists)."}
    )
    concurrency: int = field(
        default=DEFAULT_CONCURRENCY,
        metadata={"help": "Requests in flight to a served model (models loaded here use --batch_size)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the models loaded here in 4-bit NF4."})
    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor (with chat template) for the models loaded here."}
    )
    device: str | None = field(
        default=None, metadata={"help": "cuda or cpu for the models loaded here; none: cuda when present."}
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": f"Held-out split to score; none: test, or for a dataset given as one file (which holds one "
            f"split) the whole file, recorded as '{WHOLE_FILE}'."
        },
    )
    max_samples: int | None = field(default=None, metadata={"help": "Score only the first N rows."})
    batch_size: int = field(default=8, metadata={"help": "Rows (prompts) per generate call (left padded)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an earlier evaluation there."})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples for the intervals."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})
    examples: int = field(default=3, metadata={"help": "Best, worst and random examples shown in the report."})
    rank_metric: str = field(
        default="rouge_l",
        metadata={
            "choices": PER_IMAGE_METRICS,
            "help": "Per-image score that ranks the report's best and worst examples.",
        },
    )

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("--max_samples must be at least 1 (or omitted for the whole split)")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be at least 1")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.baseline_server_model is not None and self.baseline_server_url is None:
            raise ValueError("--baseline_server_model names a model on a server: give it with --baseline_server_url")
        if self.bootstrap_resamples < 1:
            raise ValueError("--bootstrap_resamples must be at least 1")
        if not 0 < self.confidence < 1:
            raise ValueError("--confidence must be between 0 and 1 (e.g. 0.95)")
        if self.examples < 0:
            raise ValueError("--examples must be 0 or more")
        if self.rank_metric not in PER_IMAGE_METRICS:
            raise ValueError(f"--rank_metric must be one of {', '.join(PER_IMAGE_METRICS)}")


@dataclass
class EvalConfig:
    """Everything one evaluation run needs: its options, the dataset, the decoding settings and the
    instruction. The command line and train.py --evaluate both build one."""

    args: EvalArguments
    data: DatasetArguments
    settings: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    )
    instruction: str = DEFAULT_INSTRUCTION
    server: ServerArguments = field(default_factory=ServerArguments)

    def __post_init__(self) -> None:
        refuse_control_tokens(self.instruction, "--instruction")  # before minutes of loading, not after
        self.data.note_unused_instruction(self.instruction)
        model_sources(self)  # a missing or contradictory model option, before anything loads

    @property
    def split(self) -> str:
        """The split scored: --split, else the whole of a single file, else test."""
        if self.args.split is not None:
            return self.args.split
        return WHOLE_FILE if is_single_file(self.data.dataset_name) else "test"

    @property
    def seed(self) -> int:
        """Seeds generation, the bootstrap and the report's random examples."""
        return self.settings.seed if self.settings.seed is not None else 0


@dataclass
class Prediction:
    """One model's answer for one image: the text, or the error that prevented it."""

    text: str | None
    error: str | None = None


@dataclass
class EvalOutcome:
    """Where the results went, and the metrics as written to metrics.json."""

    output_dir: Path
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


# --------------------------------------------------------------------------- checks and data


def check_eval_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse to replace an earlier evaluation's results unless asked to."""
    folder = Path(output_dir)
    existing = [name for name in OUTPUT_FILES if (folder / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds an evaluation ({', '.join(existing)}); choose another --output_dir "
            "or pass --overwrite_output_dir"
        )


def _check_local_model(name: str | None, flag: str) -> None:
    # Fail before minutes of generation, not when the second model loads.
    if name and name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{flag} {name}: no such folder; give a model folder or a hub id")


def load_eval_dataset(config: EvalConfig) -> PreparedDataset:
    """The split to evaluate, validated (unreadable or caption-less rows dropped and counted)."""
    raw = config.data.load(config.split)
    if len(raw) == 0:
        raise DatasetError(
            f"split {config.split!r} of {config.data.dataset_name} is empty: there is nothing to evaluate; "
            "choose another split with --split"
        )
    return config.data.prepare(raw, max_samples=config.args.max_samples)


# --------------------------------------------------------------------------- generation


def _describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _generate(loaded: LoadedModel, studies: list[RowImages], contexts: list[str | None], instruction: str,
              settings: GenerationSettings, dialogues: list[Dialogue] | None = None) -> list[str]:
    return generate_batch(loaded, [study.images for study in studies], instruction, settings, contexts,
                          priors=[study.prior for study in studies], dialogues=dialogues)


def _predict_batch(
    loaded: LoadedModel,
    rows: list[dict[str, Any]],
    instruction: str,
    settings: GenerationSettings,
    options: ImageOptions,
) -> list[Prediction]:
    results: list[Prediction | None] = [None] * len(rows)
    studies, positions = [], []
    for i, row in enumerate(rows):
        try:
            studies.append(row_images(row, options))  # the images training read for this row, in order
            positions.append(i)
        except Exception as err:  # e.g. an image file removed since validation
            results[i] = Prediction(None, _describe_error(err))
    contexts = [rows[i].get(CONTEXT) for i in positions]
    # A row's question (None: the instruction) and, for a conversation's later answer, the turns before it.
    dialogues = [prompt_dialogue(rows[i])[0] for i in positions]
    try:
        texts = _generate(loaded, studies, contexts, instruction, settings, dialogues)
        for i, text in zip(positions, texts):
            results[i] = Prediction(text)
    except Exception as err:
        if len(positions) == 1:
            results[positions[0]] = Prediction(None, _describe_error(err))
        else:
            # One bad row (or memory for the whole batch) must not cost the others their answer.
            logger.warning("batch failed (%s); retrying its %d rows one at a time", err, len(positions))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, free the batch's leftovers first
            for i, study, context, dialogue in zip(positions, studies, contexts, dialogues):
                try:
                    results[i] = Prediction(_generate(loaded, [study], [context], instruction, settings, [dialogue])[0])
                except Exception as single_err:
                    results[i] = Prediction(None, _describe_error(single_err))
    return [r if r is not None else Prediction(None, "no result") for r in results]


def predict(
    loaded: LoadedModel,
    dataset: Dataset,
    instruction: str = DEFAULT_INSTRUCTION,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    desc: str = "Generating",
    options: ImageOptions | None = None,
) -> list[Prediction]:
    """One Prediction per dataset row (canonical columns), in order; a row that fails gets its error, and the
    rest go on. ``options``: how the rows' images are read (--max_images, --series_window), as in training."""
    settings = settings or GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    options = options or ImageOptions()
    results: list[Prediction] = []
    with tqdm(total=len(dataset), desc=desc, unit="row") as bar:
        for start in range(0, len(dataset), batch_size):
            columns = dataset[start : start + batch_size]
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            batch = _predict_batch(loaded, rows, instruction, settings, options)
            for image_id, prediction in zip((row[IMAGE_ID] for row in rows), batch):
                if prediction.error:
                    logger.warning("%s: %s failed: %s", desc, image_id, prediction.error)
            results.extend(batch)
            bar.update(len(batch))
    return results


@dataclass
class ModelSource:
    """Where one role's answers come from: a model loaded here (``name``, ``adapter``) or a served one
    (``served``; ``name`` is then only the name shown, None for the served model's own)."""

    name: str | None
    adapter: str | None = None
    served: RemoteModel | None = None
    flag: str = "--server_url"  # the option that named the server, for messages


def model_sources(config: EvalConfig) -> dict[str, ModelSource]:
    """The model and, when one is given, the baseline: each loaded here or served. Raises ValueError
    naming the option to fix when the options leave a model out or contradict each other."""
    args, server = config.args, config.server
    if server.server_url is None and not args.model:
        raise ValueError("no model to evaluate: give --model (a folder or hub id), or --server_url for a served one")
    if server.server_url is not None and args.adapter:
        raise ValueError(
            "--adapter applies to a model loaded here, but --server_url serves the model: serve the merged "
            "folder (train.py writes OUTPUT_DIR/merged), or drop --server_url to load --model with --adapter"
        )
    sources = {MODEL: ModelSource(args.model, args.adapter, server.remote(), "--server_url")}
    if args.baseline or args.baseline_server_url:
        served = server.remote(args.baseline_server_url, args.baseline_server_model, "--baseline_server_url") \
            if args.baseline_server_url else None
        sources[BASELINE] = ModelSource(args.baseline, None, served, "--baseline_server_url")
    return sources


def _check_servers(config: EvalConfig, sources: dict[str, ModelSource]) -> None:
    """Stop before anything is generated (or the data loads) when a server cannot answer."""
    for role, source in sources.items():
        if source.served is not None:
            problem = config.server.check(source.served)
            if problem is not None:
                raise EvaluationError(f"{role} ({source.flag} {source.served.url}): {problem}")


def _served_request(row: dict[str, Any], instruction: str, options: ImageOptions) -> RemoteRequest:
    study = row_images(row, options)  # rendered here: only the pixels travel
    return RemoteRequest(study.in_prompt_order, instruction, row.get(CONTEXT), prior=study.prior is not None,
                         dialogue=prompt_dialogue(row)[0])


def predict_served(
    served: RemoteModel,
    dataset: Dataset,
    instruction: str = DEFAULT_INSTRUCTION,
    settings: GenerationSettings | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    desc: str = "Generating",
    options: ImageOptions | None = None,
) -> list[Prediction]:
    """``predict`` for a served model: one Prediction per row, in order, with ``concurrency`` requests in
    flight. Each row's images are read in the worker that sends them, so only the rows in flight are held."""
    settings = settings or GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    options = options or ImageOptions()
    ids = dataset[IMAGE_ID]
    lock = threading.Lock()

    def request(index: int) -> Callable[[], RemoteRequest]:
        return lambda: _served_request(dataset[index], instruction, options)

    with tqdm(total=len(dataset), desc=desc, unit="row") as bar:
        def done(index: int, answer: str | Exception) -> None:
            if isinstance(answer, Exception):
                logger.warning("%s: %s failed: %s", desc, ids[index], _describe_error(answer))
            with lock:
                bar.update(1)

        answers = served.generate_many([request(i) for i in range(len(dataset))], settings, concurrency, done)
    return [
        Prediction(None, _describe_error(answer)) if isinstance(answer, Exception) else Prediction(answer)
        for answer in answers
    ]


def display_name(source: str, adapter: str | None = None) -> str:
    """A short, recognisable model name: a hub id as is, a folder as its last two parts (run1/merged)."""
    path = Path(source).expanduser()
    name = "/".join(path.resolve().parts[-2:]) if path.exists() else source
    return name + (f" + {Path(adapter).name}" if adapter else "")


def _generate_locally(config: EvalConfig, dataset: Dataset, role: str, source: ModelSource
                      ) -> tuple[list[Prediction], dict[str, Any]]:
    args = config.args
    assert source.name is not None  # model_sources guarantees a name for a model loaded here
    # One model at a time: both may not fit on the GPU, so each is freed before the next loads.
    with load_for_generation(
        source.name,
        adapter=source.adapter,
        load_in_4bit=args.load_in_4bit,
        device=args.device,
        processor_name_or_path=args.processor_name_or_path,
    ) as loaded:
        started = time.perf_counter()  # generation alone, not loading
        predictions = predict(
            loaded, dataset, config.instruction, config.settings, args.batch_size, desc=f"Generating ({role})",
            options=config.data.image_options(),
        )
        seconds = time.perf_counter() - started
    info = {
        "name": display_name(source.name, source.adapter),
        "source": source.name,
        "adapter": source.adapter,
        "precision": loaded.precision,
        "device": loaded.device,
        "seconds": seconds,
    }
    return predictions, info


def _generate_served(config: EvalConfig, dataset: Dataset, role: str, source: ModelSource
                     ) -> tuple[list[Prediction], dict[str, Any]]:
    served, concurrency = source.served, config.args.concurrency
    assert served is not None
    started = time.perf_counter()
    predictions = predict_served(served, dataset, config.instruction, config.settings, concurrency,
                                 desc=f"Generating ({role}, served)", options=config.data.image_options())
    seconds = time.perf_counter() - started
    model = served.resolve_model()
    info = {
        "name": source.name or model,
        "source": f"served by {served.url} (model {model})",
        "adapter": None,
        "precision": served.precision,
        "device": f"the server at {served.url} (model {model}, {concurrency} requests in flight)",
        "server_url": served.url,
        "server_model": model,
        "concurrency": concurrency,
        "seconds": seconds,
    }
    return predictions, info


def _generate_all(config: EvalConfig, dataset: Dataset, sources: dict[str, ModelSource] | None = None
                  ) -> tuple[dict[str, list[Prediction]], dict[str, dict]]:
    sources = sources if sources is not None else model_sources(config)
    predictions: dict[str, list[Prediction]] = {}
    info: dict[str, dict[str, Any]] = {}
    for role, source in sources.items():
        torch.manual_seed(config.seed)
        generate = _generate_served if source.served is not None else _generate_locally
        predictions[role], details = generate(config, dataset, role, source)
        seconds = details.pop("seconds")
        info[role] = {
            **details,
            "errors": sum(p.error is not None for p in predictions[role]),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(dataset) / seconds, 3) if seconds > 0 else None,
        }
    return predictions, info


# --------------------------------------------------------------------------- scoring and files


def _package_versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "peft", "sacrebleu", "rouge-score"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


@dataclass
class ScoredItems:
    """The scored rows (dataset positions), split into what is scored as a caption (every row of a caption dataset,
    the open questions of a question dataset) and the closed (yes/no) questions, with each model's scores."""

    references: list[str]
    scored: list[int]
    open: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    captions: dict[str, SampleScores] = field(default_factory=dict)  # aligned with ``open``
    answers: dict[str, ClosedScores] = field(default_factory=dict)  # aligned with ``closed``

    def __post_init__(self) -> None:
        self._open_at = {row: i for i, row in enumerate(self.open)}
        self._closed_at = {row: i for i, row in enumerate(self.closed)}

    def row_scores(self, role: str, index: int) -> dict[str, Any] | None:
        """One row's scores for predictions.jsonl: caption scores, or a closed question's answer and correctness."""
        if index in self._open_at:
            return self.captions[role].row(self._open_at[index])
        if index in self._closed_at:
            return self.answers[role].row(self._closed_at[index])
        return None


def score_items(
    predictions: dict[str, list[Prediction]], references: list[str], questions: bool
) -> ScoredItems:
    """Score every row on which no model failed. Without questions every row is scored as a caption. With
    questions, a row whose reference is yes or no (metrics.YES_NO_RULE) is a closed question, scored by
    accuracy; the others are open, scored as captions."""
    scored = [i for i in range(len(references)) if all(p[i].error is None for p in predictions.values())]
    closed = [i for i in scored if questions and closed_answer(references[i]) is not None]
    taken = set(closed)
    items = ScoredItems(references, scored, open=[i for i in scored if i not in taken], closed=closed)
    for role, role_predictions in predictions.items():
        if items.open:
            items.captions[role] = score_samples(
                [role_predictions[i].text or "" for i in items.open], [references[i] for i in items.open]
            )
        if items.closed:
            items.answers[role] = score_closed(
                [role_predictions[i].text or "" for i in items.closed], [references[i] for i in items.closed]
            )
    return items


def _metric_entries(
    names: dict[str, MetricInfo], scores: dict[str, Any], count: int, config: EvalConfig
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Each model's value and interval of each metric, and model - baseline, on the same resamples of ``count``."""
    args = config.args
    indices = bootstrap_indices(count, args.bootstrap_resamples, config.seed)
    values = {
        role: {name: bootstrap_interval(name, role_scores, indices, args.confidence).as_dict() for name in names}
        for role, role_scores in scores.items()
    }
    difference = None
    if BASELINE in scores:
        difference = {
            name: paired_difference(name, scores[MODEL], scores[BASELINE], indices, args.confidence).as_dict()
            for name in names
        }
    return values, difference


def _metrics_document(
    config: EvalConfig,
    prepared: PreparedDataset,
    items: ScoredItems,
    predictions: dict[str, list[Prediction]],
    info: dict[str, dict[str, Any]],
    questions: bool,
    conversations: bool,
) -> dict[str, Any]:
    args = config.args
    roles = list(predictions)
    metrics: dict[str, dict[str, Any]] = {role: {} for role in roles}
    difference: dict[str, Any] | None = {} if BASELINE in predictions else None
    metric_info: dict[str, Any] = {}
    groups = []
    if items.closed:
        groups.append((CLOSED_METRICS, items.answers, len(items.closed), f"closed questions ({len(items.closed)})"))
    if items.open:
        groups.append((METRICS, items.captions, len(items.open),
                       f"open questions ({len(items.open)})" if questions else "every scored image"))
    for names, scores, count, scored_on in groups:
        values, paired = _metric_entries(names, scores, count, config)
        for role in roles:
            metrics[role].update(values[role])
        if difference is not None and paired is not None:
            difference.update(paired)
        for name, meta in names.items():
            metric_info[name] = {
                **asdict(meta),
                **({"signature": bleu_signature()} if name == "bleu" else {}),
                "scored_on": scored_on,
                "count": count,
            }
    models = {}
    for role in roles:
        texts = [predictions[role][i].text or "" for i in items.scored]
        models[role] = {
            **info[role],
            "mean_words": round(float(np.mean([len(words(t)) for t in texts])), 3),
            "metrics": metrics[role],
        }
        if items.closed:
            answered = items.answers[role].answers
            models[role]["closed"] = {
                "correct": int(items.answers[role].correct.sum()),
                "answered_yes_or_no": sum(a is not None for a in answered),
            }
    references = [items.references[i] for i in items.scored]
    question_counts = None
    if questions:
        expected = [closed_answer(items.references[i]) for i in items.closed]
        question_counts = {
            "closed": len(items.closed),
            "closed_yes": expected.count("yes"),
            "closed_no": expected.count("no"),
            "open": len(items.open),
            "rule": YES_NO_RULE,
            "conversations": conversations,  # each answer of a conversation scored, given the turns before it
        }
    return {
        "dataset": {
            "name": config.data.dataset_name,
            "config": config.data.dataset_config,
            "split": config.split,
            "columns": {
                name: value
                for name, value in asdict(config.data).items()
                if name not in ("dataset_name", "dataset_config")
            },
            "max_samples": args.max_samples,
            "rows": len(prepared.dataset),
            **({"answers": len(items.references)} if conversations else {}),
            "dropped": dict(prepared.dropped),
            "scored": len(items.scored),
            "reference_mean_words": round(float(np.mean([len(words(r)) for r in references])), 3),
        },
        "questions": question_counts,  # null for captions
        "generation": {
            "instruction": None if questions else config.instruction,  # questions replace it
            "settings": asdict(config.settings),
            "described": config.settings.describe(),
            "batch_size": args.batch_size,
            "seed": config.seed,
        },
        "models": models,
        "difference": difference,  # model - baseline, paired bootstrap; null without a baseline
        "bootstrap": {
            "method": "percentile",
            "unit": "question" if questions else "image",
            "resamples": args.bootstrap_resamples,
            "confidence": args.confidence,
            "seed": config.seed,
        },
        "metric_info": metric_info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _package_versions(),
    }


def _prediction_rows(
    dataset: Dataset,
    predictions: dict[str, list[Prediction]],
    items: ScoredItems,
) -> list[dict[str, Any]]:
    scored = set(items.scored)
    has_context = CONTEXT in dataset.column_names
    questions = QUESTION in dataset.column_names
    text_columns = [IMAGE_ID, CAPTION] + [c for c in (CONTEXT, QUESTION, FOLLOW_UPS, TURN) if c in dataset.column_names]
    columns = dataset.select_columns(text_columns)
    counts, priors = image_counts(dataset), has_prior(dataset)
    rows = []
    for index, record in enumerate(columns):
        row: dict[str, Any] = {"index": index, "image_id": record[IMAGE_ID]}
        if TURN in record:
            row["turn"] = record[TURN]  # the answer's place in its conversation, from 1
        if questions:
            row["question"] = prompt_dialogue(record)[0].asked
        row["reference"] = items.references[index]
        if questions:
            row["closed"] = closed_answer(items.references[index])  # yes / no, or None: an open question
        if has_context:
            row["context"] = record[CONTEXT]
        # The images in the prompt: the current study's (a series counted as its sampled slices), and a prior.
        row["images"] = counts[index]
        row["prior"] = priors[index]
        row["scored"] = index in scored
        for role, role_predictions in predictions.items():
            prediction = role_predictions[index]
            row[role] = {
                "text": prediction.text,
                "error": prediction.error,
                "scores": items.row_scores(role, index),
            }
        rows.append(row)
    return rows


def _write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _example_thumbnails(dataset: Dataset, rows: list[int], options: ImageOptions) -> dict[int, list[Thumbnail]]:
    """Each example row's images, as the models got them, as a strip of thumbnails (the prior first, marked)."""
    thumbnails = {}
    for index in rows:
        try:
            study = row_images(dataset[index], options)
            thumbnails[index] = strip_thumbnails(study.images, study.prior)
        except Exception as err:  # the report still shows the texts
            logger.warning("no thumbnail for row %d: %s", index, err)
    return thumbnails


def _example_groups(items: ScoredItems, rank_metric: str, count: int, seed: int) -> dict[str, list[int]]:
    """Rows shown in the report: the best, worst and random captions (or open answers) by ``rank_metric`` (model -
    baseline when there is one), and closed questions the model got wrong and right, drawn at random."""
    groups: dict[str, list[int]] = {}
    if items.open:
        ranking = getattr(items.captions[MODEL], rank_metric)
        if BASELINE in items.captions:
            ranking = ranking - getattr(items.captions[BASELINE], rank_metric)
        groups = {name: [items.open[i] for i in positions]
                  for name, positions in select_examples(ranking, count, seed).items()}
    if items.closed:
        rng = np.random.default_rng(seed)
        correct = items.answers[MODEL].correct
        for name, wanted in (("closed_wrong", False), ("closed_right", True)):
            pool = [row for row, right in zip(items.closed, correct) if bool(right) == wanted]
            chosen = rng.choice(pool, size=min(count, len(pool)), replace=False) if pool and count else []
            groups[name] = sorted(int(i) for i in chosen)
    return groups


def run_evaluation(config: EvalConfig) -> EvalOutcome:
    """Generate with each model, score, and write metrics.json, predictions.jsonl and report.html."""
    args = config.args
    output_dir = Path(args.output_dir)
    check_eval_output_dir(output_dir, args.overwrite_output_dir)
    sources = model_sources(config)
    for flag, source in (("--model", sources[MODEL]), ("--baseline", sources.get(BASELINE))):
        if source is not None and source.served is None:
            _check_local_model(source.name, flag)
    _check_local_model(args.adapter, "--adapter")
    _check_servers(config, sources)
    prepared = load_eval_dataset(config)
    dataset = evaluation_items(prepared.dataset)  # one row per answer: a conversation gives one per assistant turn
    logger.info("Evaluating on %s (split: %s): %s", config.data.dataset_name, config.split, prepared.summary())

    predictions, info = _generate_all(config, dataset, sources)
    questions, conversations = QUESTION in dataset.column_names, FOLLOW_UPS in dataset.column_names
    text_columns = [c for c in (CAPTION, QUESTION, FOLLOW_UPS) if c in dataset.column_names]
    references = [prompt_dialogue(record)[1] for record in dataset.select_columns(text_columns)]
    items = score_items(predictions, references, questions)
    rows = _prediction_rows(dataset, predictions, items)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(output_dir / "predictions.jsonl", rows)  # written even when nothing scored: it holds the errors
    if not items.scored:
        raise EvaluationError(
            f"every image failed in at least one model, so nothing could be scored; the errors are in "
            f"{output_dir / 'predictions.jsonl'}"
        )

    metrics = _metrics_document(config, prepared, items, predictions, info, questions, conversations)
    _write_json(output_dir / "metrics.json", metrics)
    groups = _example_groups(items, args.rank_metric, args.examples, config.seed)
    thumbnails = _example_thumbnails(
        dataset, sorted({i for group in groups.values() for i in group}), config.data.image_options()
    )
    write_report(output_dir / "report.html", metrics, rows, groups, thumbnails, args.rank_metric)
    return EvalOutcome(output_dir=output_dir, metrics=metrics, predictions=rows)


# --------------------------------------------------------------------------- command line


def make_parser() -> ProjectParser:
    """The command line: EvalArguments, the shared DatasetArguments and radiology.generate's decoding flags."""
    parser = ProjectParser(
        [("evaluation: models, split, scoring and output", EvalArguments), ("dataset", DatasetArguments),
         (SERVER_ARGUMENTS_TITLE, ServerArguments)],
        description="Score a fine-tuned Gemma 3 (and a baseline), loaded here or served, on held-out radiology images.",
    )
    generation = parser.add_argument_group(
        "generation (as radiology.generate; greedy unless --do_sample or --temperature)"
    )
    add_generation_arguments(generation, max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    return parser


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """An EvalConfig from the command line (and a YAML file given with --config)."""
    args, data, server, generation = make_parser().parse_args_and_config(args=argv)
    return EvalConfig(args=args, data=data, settings=settings_from_args(generation), instruction=generation.instruction,
                      server=server)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline numbers, one metric a line, for the terminal; with questions each line names its group
    (closed or open questions) and count."""
    lines = []
    for name, meta in metrics["metric_info"].items():
        parts = []
        for role, model in metrics["models"].items():
            value = model["metrics"][name]
            parts.append(f"{role} {value['value']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]")
        if metrics["difference"]:
            diff = metrics["difference"][name]
            parts.append(f"difference {diff['value']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]")
        group = f" on {meta['scored_on']}" if metrics.get("questions") else ""
        lines.append(f"{meta['label']}{group}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a message on bad input)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        outcome = run_evaluation(parse_config(argv))
    except (ValueError, OSError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(outcome.metrics)))
    print(f"results: {outcome.output_dir} ({', '.join(OUTPUT_FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
