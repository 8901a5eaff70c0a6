"""Evaluate stage: is the fine-tuned model better than its base on held-out images?

    python -m radiology.evaluate --model runs/r1/merged --baseline google/gemma-3-4b-pt \\
        --dataset_name unsloth/Radiology_mini --split test --output_dir runs/r1/eval
    python -m radiology.evaluate --model google/gemma-3-4b-pt --adapter runs/r1 --load_in_4bit \\
        --baseline google/gemma-3-4b-pt --dataset_name data/ --output_dir runs/r1/eval --max_samples 50

Each model describes every image of the split (greedy and seeded by default, in left-padded
batches); the captions are scored against the references (BLEU, ROUGE-L, CIDEr-D, length; see
``radiology.metrics``) with bootstrap 95% intervals over images, and model - baseline with a paired
bootstrap interval. OUTPUT_DIR receives:

- metrics.json: corpus metrics per model, their difference, and everything needed to reproduce them;
- predictions.jsonl: one row per image (id, reference, each model's text or error, per-image scores);
- report.html: one self-contained page (summary table, per-image differences, examples with images).

A model that fails on one image records the error in that image's row and goes on; images where a
model failed are left out of every model's scores, so that both are scored on the same images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from radiology.data import (
    CAPTION,
    CONTEXT,
    DEFAULT_INSTRUCTION,
    IMAGE,
    IMAGE_ID,
    DatasetError,
    PreparedDataset,
    decode_image,
    load_caption_dataset,
    prepare_caption_dataset,
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
    METRICS,
    SampleScores,
    bleu_signature,
    bootstrap_indices,
    bootstrap_interval,
    paired_difference,
    score_samples,
)
from radiology.report import select_examples, thumbnail_data_uri, write_report

__all__ = [
    "BASELINE",
    "MODEL",
    "OUTPUT_FILES",
    "EvalConfig",
    "EvalOutcome",
    "EvaluationError",
    "Prediction",
    "check_eval_output_dir",
    "config_from_args",
    "display_name",
    "load_eval_dataset",
    "main",
    "make_parser",
    "predict",
    "run_evaluation",
    "summary_lines",
]

logger = logging.getLogger(__name__)

MODEL, BASELINE = "model", "baseline"  # role names, used as keys in metrics.json and predictions.jsonl
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "report.html")
PER_IMAGE_METRICS = ("bleu", "rouge_l", "cider_d")
# Radiology captions run to tens of tokens; a base model that never stops would otherwise make
# every image cost the full generate default of 256 tokens.
EVAL_MAX_NEW_TOKENS = 128


class EvaluationError(RuntimeError):
    """An evaluation that cannot produce scores; the message says why and what to do."""


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; the command line and train.py --evaluate both build one."""

    model: str
    output_dir: str
    dataset_name: str
    baseline: str | None = None
    adapter: str | None = None
    load_in_4bit: bool = False
    processor_name_or_path: str | None = None
    device: str | None = None
    dataset_config: str | None = None
    split: str = "test"
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str = "image_id"
    context_column: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    max_samples: int | None = None
    batch_size: int = 8
    settings: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    )
    seed: int = 0
    resamples: int = 1000
    confidence: float = 0.95
    examples: int = 3
    rank_metric: str = "rouge_l"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("--max_samples must be at least 1 (or omitted for the whole split)")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be at least 1")
        if self.resamples < 1:
            raise ValueError("--bootstrap_resamples must be at least 1")
        if not 0 < self.confidence < 1:
            raise ValueError("--confidence must be between 0 and 1 (e.g. 0.95)")
        if self.examples < 0:
            raise ValueError("--examples must be 0 or more")
        if self.rank_metric not in PER_IMAGE_METRICS:
            raise ValueError(f"--rank_metric must be one of {', '.join(PER_IMAGE_METRICS)}")


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
    raw = load_caption_dataset(config.dataset_name, config.split, config.dataset_config, config.image_column)
    if len(raw) == 0:
        raise DatasetError(
            f"split {config.split!r} of {config.dataset_name} is empty: there is nothing to evaluate; "
            "choose another split with --split"
        )
    return prepare_caption_dataset(
        raw,
        image_column=config.image_column,
        caption_column=config.caption_column,
        id_column=config.id_column,
        context_column=config.context_column,
        max_samples=config.max_samples,
    )


# --------------------------------------------------------------------------- generation


def _describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _predict_batch(
    loaded: LoadedModel,
    images: list[Any],
    contexts: list[str | None],
    instruction: str,
    settings: GenerationSettings,
) -> list[Prediction]:
    results: list[Prediction | None] = [None] * len(images)
    pictures, positions = [], []
    for i, value in enumerate(images):
        try:
            pictures.append(decode_image(value))
            positions.append(i)
        except Exception as err:  # e.g. an image file removed since validation
            results[i] = Prediction(None, _describe_error(err))
    try:
        texts = generate_batch(loaded, pictures, instruction, settings, [contexts[i] for i in positions])
        for i, text in zip(positions, texts):
            results[i] = Prediction(text)
    except Exception as err:
        if len(positions) == 1:
            results[positions[0]] = Prediction(None, _describe_error(err))
        else:
            # One bad image (or memory for the whole batch) must not cost the others their answer.
            logger.warning("batch failed (%s); retrying its %d images one at a time", err, len(positions))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, free the batch's leftovers first
            for i, picture in zip(positions, pictures):
                try:
                    results[i] = Prediction(generate_batch(loaded, [picture], instruction, settings, [contexts[i]])[0])
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
) -> list[Prediction]:
    """One Prediction per dataset row, in order; a row that fails gets its error, and the rest go on."""
    settings = settings or GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    has_context = CONTEXT in dataset.column_names
    results: list[Prediction] = []
    with tqdm(total=len(dataset), desc=desc, unit="image") as bar:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            contexts = rows[CONTEXT] if has_context else [None] * len(rows[IMAGE])
            batch = _predict_batch(loaded, rows[IMAGE], contexts, instruction, settings)
            for image_id, prediction in zip(rows[IMAGE_ID], batch):
                if prediction.error:
                    logger.warning("%s: %s failed: %s", desc, image_id, prediction.error)
            results.extend(batch)
            bar.update(len(batch))
    return results


def display_name(source: str, adapter: str | None = None) -> str:
    """A short, recognisable model name: a hub id as is, a folder as its last two parts (run1/merged)."""
    path = Path(source).expanduser()
    name = "/".join(path.resolve().parts[-2:]) if path.exists() else source
    return name + (f" + {Path(adapter).name}" if adapter else "")


def _generate_all(config: EvalConfig, dataset: Dataset) -> tuple[dict[str, list[Prediction]], dict[str, dict]]:
    sources = {MODEL: (config.model, config.adapter)}
    if config.baseline:
        sources[BASELINE] = (config.baseline, None)
    predictions: dict[str, list[Prediction]] = {}
    info: dict[str, dict[str, Any]] = {}
    for role, (name, adapter) in sources.items():
        torch.manual_seed(config.seed)
        # One model at a time: both may not fit on the GPU, so each is freed before the next loads.
        with load_for_generation(
            name,
            adapter=adapter,
            load_in_4bit=config.load_in_4bit,
            device=config.device,
            processor_name_or_path=config.processor_name_or_path,
        ) as loaded:
            started = time.perf_counter()
            predictions[role] = predict(
                loaded, dataset, config.instruction, config.settings, config.batch_size, desc=f"Generating ({role})"
            )
            seconds = time.perf_counter() - started
            info[role] = {
                "name": display_name(name, adapter),
                "source": name,
                "adapter": adapter,
                "precision": loaded.precision,
                "device": loaded.device,
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


def _metrics_document(
    config: EvalConfig,
    prepared: PreparedDataset,
    scored: list[int],
    scores: dict[str, SampleScores],
    info: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    indices = bootstrap_indices(len(scored), config.resamples, config.seed)
    models = {}
    for role, role_scores in scores.items():
        models[role] = {
            **info[role],
            "mean_words": round(float(role_scores.words.mean()), 3),
            "metrics": {
                metric: bootstrap_interval(metric, role_scores, indices, config.confidence).as_dict()
                for metric in METRICS
            },
        }
    difference = None
    if BASELINE in scores:
        difference = {
            metric: paired_difference(metric, scores[MODEL], scores[BASELINE], indices, config.confidence).as_dict()
            for metric in METRICS
        }
    reference_words = scores[MODEL].reference_words
    return {
        "dataset": {
            "name": config.dataset_name,
            "config": config.dataset_config,
            "split": config.split,
            "max_samples": config.max_samples,
            "rows": len(prepared.dataset),
            "dropped": dict(prepared.dropped),
            "scored": len(scored),
            "reference_mean_words": round(float(reference_words.mean()), 3),
        },
        "generation": {
            "instruction": config.instruction,
            "settings": asdict(config.settings),
            "described": config.settings.describe(),
            "batch_size": config.batch_size,
            "seed": config.seed,
        },
        "models": models,
        "difference": difference,  # model - baseline, paired bootstrap; null without a baseline
        "bootstrap": {
            "method": "percentile",
            "unit": "image",
            "resamples": config.resamples,
            "confidence": config.confidence,
            "seed": config.seed,
        },
        "metric_info": {
            name: {**asdict(meta), **({"signature": bleu_signature()} if name == "bleu" else {})}
            for name, meta in METRICS.items()
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _package_versions(),
    }


def _prediction_rows(
    dataset: Dataset,
    predictions: dict[str, list[Prediction]],
    scored: list[int],
    scores: dict[str, SampleScores],
) -> list[dict[str, Any]]:
    position = {row: i for i, row in enumerate(scored)}
    has_context = CONTEXT in dataset.column_names
    columns = dataset.select_columns([IMAGE_ID, CAPTION] + ([CONTEXT] if has_context else []))
    rows = []
    for index, record in enumerate(columns):
        row: dict[str, Any] = {"index": index, "image_id": record[IMAGE_ID], "reference": record[CAPTION]}
        if has_context:
            row["context"] = record[CONTEXT]
        row["scored"] = index in position
        for role, role_predictions in predictions.items():
            prediction = role_predictions[index]
            row[role] = {
                "text": prediction.text,
                "error": prediction.error,
                "scores": scores[role].row(position[index]) if index in position else None,
            }
        rows.append(row)
    return rows


def _write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _example_thumbnails(dataset: Dataset, rows: list[int]) -> dict[int, str]:
    thumbnails = {}
    for index in rows:
        try:
            thumbnails[index] = thumbnail_data_uri(decode_image(dataset[index][IMAGE]))
        except Exception as err:  # the report still shows the texts
            logger.warning("no thumbnail for row %d: %s", index, err)
    return thumbnails


def run_evaluation(config: EvalConfig) -> EvalOutcome:
    """Generate with each model, score, and write metrics.json, predictions.jsonl and report.html."""
    output_dir = Path(config.output_dir)
    check_eval_output_dir(output_dir, config.overwrite)
    _check_local_model(config.model, "--model")
    _check_local_model(config.adapter, "--adapter")
    _check_local_model(config.baseline, "--baseline")
    prepared = load_eval_dataset(config)
    dataset = prepared.dataset
    logger.info("Evaluating on %s/%s: %s", config.dataset_name, config.split, prepared.summary())

    predictions, info = _generate_all(config, dataset)
    scored = [i for i in range(len(dataset)) if all(p[i].error is None for p in predictions.values())]
    references = dataset[CAPTION]
    scores = {
        role: score_samples([role_predictions[i].text or "" for i in scored], [references[i] for i in scored])
        for role, role_predictions in predictions.items()
    } if scored else {}
    rows = _prediction_rows(dataset, predictions, scored, scores)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(output_dir / "predictions.jsonl", rows)  # written even when nothing scored: it holds the errors
    if not scored:
        raise EvaluationError(
            f"every image failed in at least one model, so nothing could be scored; the errors are in "
            f"{output_dir / 'predictions.jsonl'}"
        )

    metrics = _metrics_document(config, prepared, scored, scores, info)
    _write_json(output_dir / "metrics.json", metrics)
    ranking = getattr(scores[MODEL], config.rank_metric)
    if BASELINE in scores:
        ranking = ranking - getattr(scores[BASELINE], config.rank_metric)
    groups = {
        name: [scored[i] for i in positions]
        for name, positions in select_examples(ranking, config.examples, config.seed).items()
    }
    thumbnails = _example_thumbnails(dataset, sorted({i for group in groups.values() for i in group}))
    write_report(output_dir / "report.html", metrics, rows, groups, thumbnails, config.rank_metric)
    return EvalOutcome(output_dir=output_dir, metrics=metrics, predictions=rows)


# --------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    """The command line; its generation flags are radiology.generate's."""
    parser = argparse.ArgumentParser(
        description="Score a fine-tuned Gemma 3 (and a baseline) on held-out radiology images.",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--model", required=True, help="fine-tuned model: merged folder, hub id, or base for --adapter")
    models.add_argument("--adapter", default=None, help="LoRA adapter folder to apply to --model")
    models.add_argument("--baseline", default=None, help="model to compare against (e.g. the base model), folder or hub id")
    models.add_argument("--load_in_4bit", action="store_true", help="load both models in 4-bit NF4")
    models.add_argument("--processor_name_or_path", default=None, help="processor (chat template) for both models")
    models.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", required=True, help="hub id, local parquet/JSONL/CSV file, or folder")
    data.add_argument("--dataset_config", default=None)
    data.add_argument("--split", default="test", help="held-out split to score (default: test)")
    data.add_argument("--max_samples", type=int, default=None, help="score only the first N rows")
    data.add_argument("--image_column", default="image")
    data.add_argument("--caption_column", default="caption")
    data.add_argument("--id_column", default="image_id")
    data.add_argument("--context_column", default=None, help="column of clinical context added to the prompt")
    generation = parser.add_argument_group("generation (as radiology.generate; greedy unless --do_sample)")
    add_generation_arguments(generation, max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=0)
    generation.add_argument("--batch_size", type=int, default=8, help="images per generate call (left padded)")
    output = parser.add_argument_group("scoring and output")
    output.add_argument("--output_dir", required=True, help="folder for metrics.json, predictions.jsonl, report.html")
    output.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier evaluation there")
    output.add_argument("--bootstrap_resamples", type=int, default=1000)
    output.add_argument("--confidence", type=float, default=0.95)
    output.add_argument("--examples", type=int, default=3, help="best, worst and random examples in the report")
    output.add_argument("--rank_metric", default="rouge_l", choices=PER_IMAGE_METRICS,
                        help="per-image score that ranks the report's best and worst examples")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An EvalConfig from parsed command-line flags."""
    return EvalConfig(
        model=args.model,
        output_dir=args.output_dir,
        dataset_name=args.dataset_name,
        baseline=args.baseline,
        adapter=args.adapter,
        load_in_4bit=args.load_in_4bit,
        processor_name_or_path=args.processor_name_or_path,
        device=args.device,
        dataset_config=args.dataset_config,
        split=args.split,
        image_column=args.image_column,
        caption_column=args.caption_column,
        id_column=args.id_column,
        context_column=args.context_column,
        instruction=args.instruction,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        settings=settings_from_args(args),
        seed=args.seed if args.seed is not None else 0,
        resamples=args.bootstrap_resamples,
        confidence=args.confidence,
        examples=args.examples,
        rank_metric=args.rank_metric,
        overwrite=args.overwrite_output_dir,
    )


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline numbers, one metric a line, for the terminal."""
    lines = []
    for name, meta in METRICS.items():
        parts = []
        for role, model in metrics["models"].items():
            value = model["metrics"][name]
            parts.append(f"{role} {value['value']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]")
        if metrics["difference"]:
            diff = metrics["difference"][name]
            parts.append(f"difference {diff['value']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]")
        lines.append(f"{meta.label}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a message on bad input)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        outcome = run_evaluation(config_from_args(args))
    except (ValueError, OSError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(outcome.metrics)))
    print(f"results: {outcome.output_dir} ({', '.join(OUTPUT_FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
