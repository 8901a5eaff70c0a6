"""Data quality audit of an image-caption dataset: OUTPUT_DIR/report.html and OUTPUT_DIR/audit.json.

    python -m radiology.audit --dataset_name unsloth/Radiology_mini --output_dir audit/
    python -m radiology.audit --dataset_name data/ --split train --min_sharpness 20 --output_dir audit/

Per split: rows, unreadable images, empty or short captions, image sizes, aspect ratios and colour
modes, sharpness (variance of the Laplacian) with the blurriest images shown, near-duplicate images
(perceptual hash) and duplicate captions; for rows of several images (--image_column front lateral,
--images_column, DICOM series, --prior_image_column), images per row and series sizes, every image
of a row read as training reads it (``radiology.data.row_images``) and checked. Across splits:
images found in more than one split (train/test leakage); every split is audited unless --split
names some. The measures live in ``radiology.quality``; train.py applies them as filters
(--min_sharpness, --drop_duplicates...).

The report is one self-contained page with thumbnails of flagged images: keep it where the dataset
itself may be kept. audit.json holds ids, numbers and reasons, never image content or captions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from radiology.config import ProjectParser
from radiology.data import (
    CAPTION,
    IMAGE,
    IMAGE_ID,
    DatasetArguments,
    DatasetError,
    ImageOptions,
    canonical_columns,
    row_images,
)
from radiology.images import ImageDecodeError
from radiology.quality import (
    BLURRY,
    DEFAULT_NEAR_DUPLICATE_DISTANCE,
    DUPLICATE_CAPTION,
    DUPLICATE_IMAGE,
    EMPTY_CAPTION,
    FILE_NOT_FOUND,
    SHARED,
    SHORT_CAPTION,
    SMALL,
    TOO_MANY_IMAGES,
    UNREADABLE,
    MeasuredImages,
    QualityThresholds,
    caption_words,
    duplicate_captions,
    duplicate_groups,
    measure_images,
    row_reasons,
    shared_images,
)

__all__ = [
    "AuditArguments",
    "AuditResult",
    "Leak",
    "RowAudit",
    "SplitAudit",
    "audit_splits",
    "main",
    "make_parser",
    "write_report",
]

DEFAULT_MIN_CAPTION_WORDS = 3  # fewer words cannot describe a finding ("Chest X-ray.")
THUMBNAIL_SIDE = 128
MAX_SHOWN = 60  # items per report section; audit.json lists them all


# --------------------------------------------------------------------------- audit


@dataclass
class RowAudit:
    """One row's measures and what is wrong with it (empty ``reasons``: nothing). For a row of several images,
    ``width`` and ``height`` are those of its smallest image (by shorter side), ``sharpness`` its lowest and
    ``mode`` its first image's; ``images`` counts the current study's images (a series' sampled slices),
    ``prior`` says whether a prior study's image comes first, ``series_slices`` gives each series' size."""

    split: str
    row: int
    image_id: str
    width: int | None
    height: int | None
    mode: str | None
    sharpness: float | None
    caption_words: int
    reasons: list[str] = field(default_factory=list)
    related: list[str] = field(default_factory=list)  # "same image as test/ROCO_12", ...
    error: str | None = None
    images: int = 1
    prior: bool = False
    series_slices: list[int] = field(default_factory=list)

    def flag(self, reason: str, related: str | None = None) -> None:
        """Add a reason (once) and what it relates to."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        if related and related not in self.related:
            self.related.append(related)


@dataclass
class SplitAudit:
    """One split: its rows, the groups of duplicates found in it, and its blurriest images."""

    name: str
    dataset: Dataset  # canonical columns, images left undecoded; read again only for thumbnails
    options: ImageOptions
    captions: list[Any]
    measured: MeasuredImages
    rows: list[RowAudit]
    duplicate_images: list[list[int]]
    duplicate_captions: list[list[int]]
    blurriest: list[int]

    def problem_counts(self) -> Counter[str]:
        """Rows per reason."""
        return Counter(reason for row in self.rows for reason in row.reasons)


@dataclass(frozen=True)
class Leak:
    """An image (nearly) the same in two splits."""

    split: str
    row: int
    other_split: str
    other_row: int
    distance: int


@dataclass
class AuditResult:
    """The audit of a dataset's splits."""

    dataset: str
    thresholds: QualityThresholds
    splits: dict[str, SplitAudit]
    leaks: list[Leak]

    def flagged(self) -> list[RowAudit]:
        """Rows with at least one problem, split by split."""
        return [row for split in self.splits.values() for row in split.rows if row.reasons]

    def train_flags(self, train_split: str = "train") -> list[str]:
        """train.py options that drop, from ``train_split``, the problems this audit found there."""
        split = self.splits.get(train_split)
        if split is None:
            return []
        counts, t = split.problem_counts(), self.thresholds
        flags = []
        if counts[SMALL]:
            flags += ["--min_image_side", str(t.min_image_side)]
        if counts[BLURRY]:
            flags += ["--min_sharpness", f"{t.min_sharpness:g}"]
        if counts[SHORT_CAPTION]:
            flags += ["--min_caption_words", str(t.min_caption_words)]
        if counts[DUPLICATE_IMAGE]:
            flags.append("--drop_duplicates")
        leaked_into = sorted({leak.other_split for leak in self.leaks if leak.split == train_split}
                             | {leak.split for leak in self.leaks if leak.other_split == train_split})
        if leaked_into:
            flags += ["--drop_images_in_split", *leaked_into]
        if flags and t.near_duplicate_distance != DEFAULT_NEAR_DUPLICATE_DISTANCE and (
            counts[DUPLICATE_IMAGE] or leaked_into
        ):
            flags += ["--near_duplicate_distance", str(t.near_duplicate_distance)]
        return flags

    def to_json(self) -> dict[str, Any]:
        """Ids, numbers and reasons (no image content, no caption text)."""
        def ref(split: str, row: int) -> dict[str, Any]:
            return {"split": split, "row": row, "image_id": self.splits[split].rows[row].image_id}

        return {
            "dataset": self.dataset,
            "splits": list(self.splits),
            "thresholds": asdict(self.thresholds),
            "summary": {name: _split_summary(split) for name, split in self.splits.items()},
            "train_flags": self.train_flags(),
            "leakage": [
                {"a": ref(leak.split, leak.row), "b": ref(leak.other_split, leak.other_row),
                 "hash_distance": leak.distance}
                for leak in self.leaks
            ],
            "duplicate_images": {
                name: [[split.rows[r].image_id for r in group] for group in split.duplicate_images]
                for name, split in self.splits.items()
            },
            "duplicate_captions": {
                name: [[split.rows[r].image_id for r in group] for group in split.duplicate_captions]
                for name, split in self.splits.items()
            },
            "blurriest": {
                name: [{"row": r, "image_id": split.rows[r].image_id, "sharpness": split.rows[r].sharpness}
                       for r in split.blurriest]
                for name, split in self.splits.items()
            },
            "rows": [asdict(row) for split in self.splits.values() for row in split.rows],
        }


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.quantile(np.asarray(values, dtype=float), [0, 0.1, 0.5, 0.9, 1])
    return {name: round(float(v), 3) for name, v in zip(("min", "p10", "median", "p90", "max"), q)}


def _image_values(split: SplitAudit) -> dict[str, list[Any]]:
    """Every measured image of the split (all images of every readable row): the distributions' data."""
    m = split.measured
    entries = m.readable_entries()
    return {
        "shorter_side": [min(m.width[k], m.height[k]) for k in entries],
        "aspect_ratio": [m.width[k] / m.height[k] for k in entries],
        "sharpness": [m.sharpness[k] for k in entries],
        "mode": [m.mode[k] for k in entries],
    }


def _several_images(split: SplitAudit) -> bool:
    """Whether any row has more than one image or a series: only then are per-row counts worth showing."""
    return any(row.images > 1 or row.prior or row.series_slices for row in split.rows)


def _split_summary(split: SplitAudit) -> dict[str, Any]:
    readable = [row for row in split.rows if row.error is None]
    values = _image_values(split)
    slices = [n for row in split.rows for n in row.series_slices]
    return {
        "rows": len(split.rows),
        "flagged_rows": sum(bool(row.reasons) for row in split.rows),
        "problems": dict(sorted(split.problem_counts().items())),
        "images": len(values["mode"]),
        "images_per_row": {str(n): c for n, c in sorted(Counter(r.images for r in readable).items())},
        "rows_with_prior": sum(row.prior for row in readable),
        "series": {"count": len(slices), "slices": _quantiles(slices)},
        "shorter_side": _quantiles(values["shorter_side"]),
        "aspect_ratio": _quantiles(values["aspect_ratio"]),
        "sharpness": _quantiles(values["sharpness"]),
        "caption_words": _quantiles([r.caption_words for r in split.rows]),
        "modes": dict(Counter(values["mode"]).most_common()),
    }


def _row_audit(name: str, i: int, image_id: str, caption: Any, measured: MeasuredImages,
               thresholds: QualityThresholds) -> RowAudit:
    entries = measured.entries(i)
    error = measured.row_error(i)
    smallest = min(entries, key=lambda k: min(measured.width[k], measured.height[k])) if error is None else entries[0]
    return RowAudit(
        split=name, row=i, image_id=image_id, width=measured.width[smallest], height=measured.height[smallest],
        mode=measured.mode[entries[0]],
        sharpness=min(measured.sharpness[k] for k in entries) if error is None else None,
        caption_words=caption_words(caption), error=error, reasons=row_reasons(measured, i, caption, thresholds),
        images=measured.images_in_row(i), prior=measured.has_prior(i), series_slices=list(measured.series_slices[i]),
    )


def _audit_split(
    name: str,
    dataset: Dataset,
    thresholds: QualityThresholds,
    blurriest: int,
    num_proc: int | None,
    options: ImageOptions,
) -> SplitAudit:
    """Audit one split under the canonical columns (radiology.data.canonical_columns)."""
    measured = measure_images(dataset, options, num_proc)
    captions = dataset[CAPTION]
    ids = [str(v) for v in dataset[IMAGE_ID]]
    rows = [_row_audit(name, i, ids[i], captions[i], measured, thresholds) for i in range(len(dataset))]
    images = duplicate_groups(measured, range(len(dataset)), thresholds.near_duplicate_distance)
    for group in images:
        for r in group[1:]:
            rows[r].flag(DUPLICATE_IMAGE, f"same image as {name}/{rows[group[0]].image_id}")
    texts = duplicate_captions(captions)
    for group in texts:
        for r in group[1:]:
            rows[r].flag(DUPLICATE_CAPTION, f"same caption as {name}/{rows[group[0]].image_id}")
    readable = measured.readable()
    return SplitAudit(
        name=name, dataset=dataset, options=options, captions=captions, measured=measured, rows=rows,
        duplicate_images=images, duplicate_captions=texts,
        blurriest=sorted(readable, key=lambda r: rows[r].sharpness)[:blurriest],
    )


def audit_splits(
    splits: Mapping[str, Dataset],
    image_column: str | Sequence[str] = IMAGE,
    caption_column: str = CAPTION,
    id_column: str | None = IMAGE_ID,
    thresholds: QualityThresholds | None = None,
    blurriest: int = 12,
    num_proc: int | None = None,
    dataset_name: str = "",
    images_column: str | None = None,
    prior_image_column: str | None = None,
    options: ImageOptions | None = None,
    context_column: str | None = None,
) -> AuditResult:
    """Audit each split (its columns named as for train.py; ``options``: --max_images and --series_window),
    then look for images shared between splits."""
    thresholds = thresholds or QualityThresholds(min_caption_words=DEFAULT_MIN_CAPTION_WORDS)
    options = options or ImageOptions()
    audited = {
        name: _audit_split(
            name,
            canonical_columns(ds, image_column, caption_column, id_column, context_column, images_column,
                              prior_image_column),
            thresholds, blurriest, num_proc, options,
        )
        for name, ds in splits.items()
    }
    names = list(audited)
    leaks = []
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            pairs = shared_images(audited[a].measured, audited[b].measured, thresholds.near_duplicate_distance)
            for i, j, distance in pairs:
                leaks.append(Leak(a, i, b, j, distance))
                row_a, row_b = audited[a].rows[i], audited[b].rows[j]
                row_a.flag(SHARED.format(split=b), f"same image as {b}/{row_b.image_id}")
                row_b.flag(SHARED.format(split=a), f"same image as {a}/{row_a.image_id}")
    return AuditResult(dataset=dataset_name, thresholds=thresholds, splits=audited, leaks=leaks)


# --------------------------------------------------------------------------- report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#1d2430;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #d0d6e0;padding-bottom:.3rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d6e0;padding:.25rem .55rem;text-align:left;
vertical-align:top;font-size:.9rem}th{background:#eef1f6}td.num{text-align:right}td.bad{background:#fde8e8}
.note{color:#5a6475;font-size:.9rem}.warn{background:#fff6d6;border:1px solid #e8d48a;padding:.5rem .8rem}
.charts{display:flex;flex-wrap:wrap;gap:1rem}.gallery{display:flex;flex-wrap:wrap;gap:.6rem}
figure{margin:0;width:140px;font-size:.75rem;overflow-wrap:anywhere}figure img{display:block;max-width:128px;
max-height:128px;border:1px solid #c4cad4;background:#000}.group{display:flex;gap:.6rem;padding:.5rem;
border:1px solid #e1e5ec;margin:.4rem 0;flex-wrap:wrap}code{background:#eef1f6;padding:.1rem .3rem}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def svg_histogram(values: Sequence[float], title: str, log: bool = False, integer: bool = False) -> str:
    """An inline SVG bar chart of ``values`` (log-spaced bins with ``log``); hovering a bar shows its count."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if log:
        data = data[data > 0]
    if data.size == 0:
        return f'<figure style="width:auto"><b>{_esc(title)}</b><p class="note">no values</p></figure>'
    low, high = float(data.min()), float(data.max())
    if integer and high - low <= 40:
        edges = np.arange(np.floor(low), np.floor(high) + 2) - 0.5
    elif low == high:
        edges = np.array([low * 0.9, high * 1.1]) if low else np.array([-0.5, 0.5])
    elif log:
        edges = np.geomspace(low, high * 1.0001, 21)
    else:
        edges = np.linspace(low, high, 21)
    counts, edges = np.histogram(data, edges)
    # Integer bins are centred on the values: label the values, not the bin edges (0, not -0.5).
    first, last = (edges[0] + 0.5, edges[-1] - 0.5) if integer and high - low <= 40 else (edges[0], edges[-1])
    width, height, left, bottom, top = 360, 150, 34, 22, 18
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max(int(counts.max()), 1)
    bar_w = plot_w / len(counts)
    bars = []
    for k, count in enumerate(counts):
        h = plot_h * count / peak
        label = f"{_fmt(edges[k])} to {_fmt(edges[k + 1])}: {count}"
        bars.append(
            f'<rect x="{left + k * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#4c78a8"><title>{_esc(label)}</title></rect>'
        )
    scale = " (log scale)" if log else ""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_esc(title)}">'
        f'<text x="{left}" y="12" font-size="12" font-weight="bold">{_esc(title + scale)}</text>'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" stroke="#888"/>'
        f'<text x="{left - 4}" y="{top + 9}" font-size="10" text-anchor="end">{peak}</text>'
        f'<text x="{left - 4}" y="{top + plot_h}" font-size="10" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 6}" font-size="10">{_esc(_fmt(first))}</text>'
        f'<text x="{width - 8}" y="{height - 6}" font-size="10" text-anchor="end">{_esc(_fmt(last))}</text>'
        + "".join(bars) + "</svg>"
    )


class _Thumbnails:
    """Base64 JPEG thumbnails of rows' images (read as training reads them), made on demand, kept for the report."""

    def __init__(self, result: AuditResult):
        self.result = result
        self.cache: dict[tuple[str, int], list[str] | None] = {}

    def uris(self, split: str, row: int) -> list[str] | None:
        """The row's images in prompt order (its prior first) as thumbnails, or None when they cannot be read."""
        key = (split, row)
        if key not in self.cache:
            audit = self.result.splits[split]
            try:
                images = row_images(audit.dataset[row], audit.options).in_prompt_order
            except ImageDecodeError:
                self.cache[key] = None
                return None
            uris = []
            for image in images:
                image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
                uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
            self.cache[key] = uris
        return self.cache[key]

    def _position(self, split: str, row: int, pick: str) -> int:
        """Which of the row's images to show: the first of its current study, its smallest or its blurriest."""
        measured = self.result.splits[split].measured
        entries = measured.entries(row)
        if measured.row_error(row) is not None or len(entries) == 1:
            return 0
        if pick == "smallest":
            return min(range(len(entries)), key=lambda k: min(measured.width[entries[k]], measured.height[entries[k]]))
        if pick == "blurriest":
            return min(range(len(entries)), key=lambda k: measured.sharpness[entries[k]])
        return 1 if measured.has_prior(row) else 0

    def figure(self, split: str, row: int, caption: str, pick: str = "first") -> str:
        uris = self.uris(split, row)
        if not uris:
            return f'<figure><p class="note">(not readable)</p><figcaption>{_esc(caption)}</figcaption></figure>'
        position = self._position(split, row, pick)
        if len(uris) > 1:
            prior = self.result.splits[split].measured.has_prior(row)
            if prior and position == 0:
                caption += " (prior study)"
            else:
                caption += f" (image {position + 1 - prior} of {len(uris) - prior}{' + prior' if prior else ''})"
        return f'<figure><img src="{uris[position]}" alt=""><figcaption>{_esc(caption)}</figcaption></figure>'


def _more(total: int) -> str:
    return f'<p class="note">and {total - MAX_SHOWN} more (all listed in audit.json)</p>' if total > MAX_SHOWN else ""


def _summary_table(result: AuditResult) -> str:
    reasons = [UNREADABLE, FILE_NOT_FOUND, EMPTY_CAPTION, SHORT_CAPTION, SMALL, BLURRY, DUPLICATE_IMAGE,
               DUPLICATE_CAPTION]
    if any(s.problem_counts()[TOO_MANY_IMAGES] for s in result.splits.values()):
        reasons.insert(2, TOO_MANY_IMAGES)
    shared = sorted({r for s in result.splits.values() for r in s.problem_counts() if r.startswith("image also in")})
    head = "".join(f"<th>{_esc(r)}</th>" for r in ["split", "rows", *reasons, *shared])
    body = []
    for name, split in result.splits.items():
        counts = split.problem_counts()
        cells = "".join(
            f'<td class="num{" bad" if counts[r] else ""}">{counts[r]}</td>' for r in [*reasons, *shared]
        )
        body.append(f'<tr><td>{_esc(name)}</td><td class="num">{len(split.rows)}</td>{cells}</tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _distributions(split: SplitAudit) -> str:
    values = _image_values(split)  # every image of every readable row
    modes = Counter(values["mode"]).most_common()
    mode_rows = "".join(f'<tr><td>{_esc(m)}</td><td class="num">{n}</td></tr>' for m, n in modes)
    charts = [
        svg_histogram(values["shorter_side"], "shorter side (px)"),
        svg_histogram(values["aspect_ratio"], "aspect ratio (width / height)", log=True),
        svg_histogram(values["sharpness"], "sharpness (Laplacian variance)", log=True),
        svg_histogram([r.caption_words for r in split.rows], "caption length (words)", integer=True),
    ]
    study = ""
    if _several_images(split):
        readable = [r for r in split.rows if r.error is None]
        charts.append(svg_histogram([r.images for r in readable], "images per row (current study)", integer=True))
        slices = [n for r in split.rows for n in r.series_slices]
        if slices:
            charts.append(svg_histogram(slices, "DICOM series size (slices)", integer=True))
        study = (
            f'<p class="note">{len(values["mode"])} images in {len(readable)} readable rows; '
            f"{sum(r.prior for r in readable)} rows with a prior study; {len(slices)} DICOM series, each sampled "
            f"to at most {split.options.max_images} images (--max_images).</p>"
        )
    return (
        f'<div class="charts">{"".join(charts)}</div>{study}'
        f"<table><tr><th>colour mode (as stored)</th><th>images</th></tr>{mode_rows}</table>"
    )


def _problem_sections(result: AuditResult, thumbs: _Thumbnails) -> str:
    parts = []
    if result.leaks:
        groups = [
            '<div class="group">'
            + thumbs.figure(leak.split, leak.row, f"{leak.split}/{result.splits[leak.split].rows[leak.row].image_id}")
            + thumbs.figure(
                leak.other_split, leak.other_row,
                f"{leak.other_split}/{result.splits[leak.other_split].rows[leak.other_row].image_id}",
            )
            + f'<p class="note">hash distance {leak.distance}</p></div>'
            for leak in result.leaks[:MAX_SHOWN]
        ]
        parts.append("<h3>Images in more than one split (leakage)</h3>"
                     '<p class="note">A model evaluated on an image it trained on looks better than it is.</p>'
                     + "".join(groups) + _more(len(result.leaks)))
    for name, split in result.splits.items():
        rows = split.rows
        if split.duplicate_images:
            groups = [
                '<div class="group">' + "".join(
                    thumbs.figure(name, r, f"{rows[r].image_id}" + (" (kept)" if k == 0 else ""))
                    for k, r in enumerate(group)) + "</div>"
                for group in split.duplicate_images[:MAX_SHOWN]
            ]
            parts.append(f"<h3>{_esc(name)}: near-duplicate images</h3>" + "".join(groups)
                         + _more(len(split.duplicate_images)))
        if split.duplicate_captions:
            items = "".join(
                f"<tr><td>{_esc(split.captions[group[0]])}</td>"
                f"<td>{_esc(', '.join(rows[r].image_id for r in group))}</td></tr>"
                for group in split.duplicate_captions[:MAX_SHOWN]
            )
            parts.append(f"<h3>{_esc(name)}: duplicate captions</h3><table><tr><th>caption</th><th>rows</th></tr>"
                         f"{items}</table>" + _more(len(split.duplicate_captions)))
        listed = [
            (UNREADABLE, "unreadable images", lambda r: r.error or ""),
            (FILE_NOT_FOUND, "files not found", lambda r: r.error or ""),
            (TOO_MANY_IMAGES, "rows with more images than --max_images", lambda r: r.error or ""),
            (EMPTY_CAPTION, "empty captions", lambda r: "(empty)"),
            (SHORT_CAPTION, "short captions", lambda r: split.captions[r.row]),
        ]
        for reason, title, detail in listed:
            hits = [r for r in rows if reason in r.reasons]
            if hits:
                items = "".join(f"<tr><td>{_esc(r.image_id)}</td><td>{_esc(detail(r))}</td></tr>"
                                for r in hits[:MAX_SHOWN])
                parts.append(f"<h3>{_esc(name)}: {_esc(title)}</h3><table>{items}</table>" + _more(len(hits)))
        for reason, title, pick in ((SMALL, "small images", "smallest"), (BLURRY, "blurry images", "blurriest")):
            hits = [r for r in rows if reason in r.reasons]
            if hits:
                figures = "".join(
                    thumbs.figure(name, r.row, f"{r.image_id}: {r.width}x{r.height}, sharpness {_fmt(r.sharpness)}",
                                  pick)
                    for r in hits[:MAX_SHOWN]
                )
                parts.append(f'<h3>{_esc(name)}: {_esc(title)}</h3><div class="gallery">{figures}</div>'
                             + _more(len(hits)))
    return "".join(parts) or '<p>No problems found.</p>'


def render_report(result: AuditResult) -> str:
    """The whole report as one HTML page (inline CSS, SVG charts, base64 thumbnails; all text escaped)."""
    thumbs = _Thumbnails(result)
    t = result.thresholds
    checks = [f"near-duplicate: pHash within {t.near_duplicate_distance} bits"]
    checks.append(f"short caption: under {t.min_caption_words} words" if t.min_caption_words else
                  "short captions not checked")
    checks.append(f"small image: shorter side under {t.min_image_side} px" if t.min_image_side else
                  "image size not checked (--min_image_side)")
    checks.append(f"blurry: sharpness under {_fmt(t.min_sharpness)}" if t.min_sharpness is not None else
                  "blur not flagged (--min_sharpness); the blurriest images are shown below")
    settings = "; ".join(checks)
    flags = result.train_flags()
    advice = (
        f'<p>To drop these problems from the train split when training: <code>python train.py ... '
        f'{_esc(" ".join(flags))}</code> (unreadable images and empty captions are always dropped).</p>'
        if flags else ""
    )
    sections = [
        f"<h1>Data audit: {_esc(result.dataset)}</h1>",
        '<p class="warn">This page shows thumbnails and captions from the dataset: keep and share it only '
        "where the dataset itself may go.</p>",
        f'<p class="note">Splits: {_esc(", ".join(result.splits))}. Checks: {_esc(settings)}.</p>',
        "<h2>Summary</h2>", _summary_table(result), advice,
        "<h2>Problems</h2>", _problem_sections(result, thumbs),
    ]
    for name, split in result.splits.items():
        blurriest = "".join(
            thumbs.figure(name, r, f"{split.rows[r].image_id}: {_fmt(split.rows[r].sharpness)}", "blurriest")
            for r in split.blurriest
        )
        sections += [
            f"<h2>Split {_esc(name)}: {len(split.rows)} rows</h2>",
            "<h3>Distributions</h3>", _distributions(split),
            "<h3>Blurriest images (lowest sharpness first)</h3>",
            f'<div class="gallery">{blurriest}</div>' if blurriest else '<p class="note">no readable images</p>',
        ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Data audit: {_esc(result.dataset)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def write_report(result: AuditResult, output_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html and audit.json into ``output_dir``; returns their paths."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    report, summary = folder / "report.html", folder / "audit.json"
    report.write_text(render_report(result), encoding="utf-8")
    summary.write_text(json.dumps(result.to_json(), indent=1, allow_nan=False), encoding="utf-8")
    return report, summary


# --------------------------------------------------------------------------- command line


@dataclass
class AuditArguments:
    """radiology.audit's own options (the dataset is DatasetArguments)."""

    output_dir: str = field(metadata={"help": "Folder for report.html and audit.json."})
    split: list[str] | None = field(
        default=None,
        metadata={"help": "Split(s) to audit; none: every split, so that leakage between them is checked."},
    )
    min_image_side: int | None = field(default=None, metadata={"help": "Flag images whose shorter side is below N px."})
    min_sharpness: float | None = field(
        default=None, metadata={"help": "Flag images whose sharpness is below this (none: only show the blurriest)."}
    )
    min_caption_words: int = field(
        default=DEFAULT_MIN_CAPTION_WORDS, metadata={"help": "Flag captions with fewer words."}
    )
    near_duplicate_distance: int = field(
        default=DEFAULT_NEAR_DUPLICATE_DISTANCE,
        metadata={"help": "Bits of the 64-bit perceptual hash within which two images are the same picture."},
    )
    blurriest: int = field(default=12, metadata={"help": "How many of the blurriest images to show per split."})
    max_samples: int | None = field(default=None, metadata={"help": "Audit only the first N rows of each split."})
    num_proc: int | None = field(default=None, metadata={"help": "Processes for decoding and measuring images."})

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("--max_samples must be at least 1 (or omitted for whole splits)")

    def thresholds(self) -> QualityThresholds:
        """The limits above, checked (an impossible one is a ValueError naming its flag)."""
        return QualityThresholds(
            min_image_side=self.min_image_side, min_sharpness=self.min_sharpness,
            min_caption_words=self.min_caption_words, near_duplicate_distance=self.near_duplicate_distance,
        )


def make_parser() -> ProjectParser:
    """The command line: the shared DatasetArguments and AuditArguments."""
    return ProjectParser(
        [("dataset", DatasetArguments), ("audit", AuditArguments)],
        description="Audit an image-caption dataset's quality; write report.html and audit.json.",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the audit from the command line; returns the exit status (2 on a usage or data error)."""
    try:
        data, args = make_parser().parse_args_and_config(args=argv)
        thresholds = args.thresholds()
        splits = data.load_splits(args.split)
        if args.max_samples is not None:
            splits = {n: ds.select(range(min(args.max_samples, len(ds)))) for n, ds in splits.items()}
        result = audit_splits(
            splits, data.image_column, data.caption_column, data.id_column, thresholds,
            blurriest=args.blurriest, num_proc=args.num_proc, dataset_name=data.dataset_name,
            images_column=data.images_column, prior_image_column=data.prior_image_column,
            options=data.image_options(),
            # not audited, but a wrong name is better found now than when training
            context_column=data.context_column,
        )
        report, summary = write_report(result, args.output_dir)
    except (DatasetError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, split in result.splits.items():
        counts = split.problem_counts()
        found = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "no problems found"
        print(f"{name}: {len(split.rows)} rows; {found}")
        if _several_images(split):
            summary_row = _split_summary(split)
            per_row = ", ".join(f"{n} ({c} rows)" for n, c in summary_row["images_per_row"].items())
            print(f"{name}: images per row: {per_row}; {summary_row['rows_with_prior']} rows with a prior study; "
                  f"{summary_row['series']['count']} DICOM series")
    if len(result.splits) == 1:
        print("leakage not checked: only one split audited")
    if result.train_flags():
        print("to drop these from training: python train.py ... " + " ".join(result.train_flags()))
    print(f"report: {report}\njson: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
