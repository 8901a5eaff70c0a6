"""Report stage: one self-contained HTML page from an evaluation's metrics and predictions.

    write_report(Path("eval/report.html"), metrics, rows, groups, thumbnails, rank_metric="rouge_l")

``radiology.evaluate`` calls this. The page loads nothing from anywhere: CSS inline, plots as
inline SVG, images as downscaled base64 JPEG, so it can be mailed or archived as one file. Every
piece of text (captions, model output, ids, paths) is HTML-escaped. Each example shows the images its
answer was made from: one image large, several as a strip of small thumbnails in prompt order, a
prior study's first and marked. For question datasets the summary names the group each metric is scored on
(closed yes/no questions: accuracy; open questions: the caption metrics) with its count, and the examples
add closed questions the model got wrong and right.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "STRIP_SIDE",
    "THUMBNAIL_SIDE",
    "Thumbnail",
    "render_report",
    "select_examples",
    "strip_thumbnails",
    "thumbnail_data_uri",
    "write_report",
]

THUMBNAIL_SIDE = 256  # px; large enough to recognise the study, small enough for hundreds in one file
STRIP_SIDE = 128  # px; each image of a several-image prompt (shown at 80 px, sharp on dense screens)
_PER_IMAGE = {"bleu": ("BLEU", 1), "rouge_l": ("ROUGE-L F", 3), "cider_d": ("CIDEr-D", 3)}
_DIGITS = {"bleu": 2, "rouge_l": 3, "cider_d": 3, "length_ratio": 3}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;
color:#1d2330;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d5d9e0;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #d5d9e0;padding:.35rem .6rem;text-align:left;
vertical-align:top}th{background:#f1f3f6}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
td.better{background:#e3f4e6}td.worse{background:#fbe4e4}.note{color:#566074;font-size:.9rem}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plot{flex:1 1 20rem;max-width:34rem;margin:0}
.example{display:flex;gap:1rem;border:1px solid #d5d9e0;border-radius:6px;padding:.75rem;margin:.75rem 0}
.example img{width:256px;height:256px;object-fit:contain;background:#000;flex:none}
.example dl{margin:0}.example dt{font-weight:600;margin-top:.3rem}.example dd{margin:0 0 0 .5rem;white-space:pre-wrap}
.strip{display:flex;flex-wrap:wrap;align-content:flex-start;gap:5px;width:256px;flex:none}
.strip figure{margin:0;font-size:.75rem;text-align:center;color:#566074}
.strip img{width:80px;height:80px;display:block}
.strip figure.prior img{outline:3px solid #c77c00;outline-offset:-3px}
.strip figure.prior figcaption{color:#8a4b00;font-weight:600}
.error{color:#a11}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------- pieces


def select_examples(ranking: np.ndarray, count: int, seed: int = 0) -> dict[str, list[int]]:
    """Positions of the ``count`` best, worst and random images by ``ranking`` (higher is better), disjoint."""
    ranking = np.asarray(ranking, dtype=np.float64)
    order = np.argsort(-ranking, kind="stable")  # ties keep dataset order, so the choice is reproducible
    best = [int(i) for i in order[:count]]
    worst = [int(i) for i in order[::-1] if int(i) not in best][:count]
    rest = [i for i in range(len(ranking)) if i not in best and i not in worst]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(rest, size=min(count, len(rest)), replace=False) if rest and count else []
    return {"best": best, "worst": worst, "random": sorted(int(i) for i in chosen)}


def thumbnail_data_uri(image: Image.Image, max_side: int = THUMBNAIL_SIDE) -> str:
    """The image downscaled to at most ``max_side`` pixels a side, as a base64 JPEG data URI."""
    small = image.convert("RGB")
    small.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Thumbnail:
    """One image an answer was made from, as shown in the report."""

    uri: str  # base64 JPEG data URI
    label: str  # "prior study", or the image's place in the current study ("1", "2", ...)
    prior: bool = False


def strip_thumbnails(images: Sequence[Image.Image], prior: Image.Image | None = None) -> list[Thumbnail]:
    """The images of one prompt in order, the prior study's first: one image at THUMBNAIL_SIDE, several at
    STRIP_SIDE each."""
    side = STRIP_SIDE if len(images) + (prior is not None) > 1 else THUMBNAIL_SIDE
    strip = [Thumbnail(thumbnail_data_uri(prior, side), "prior study", prior=True)] if prior is not None else []
    return strip + [Thumbnail(thumbnail_data_uri(image, side), str(k)) for k, image in enumerate(images, start=1)]


def _pictures(image_id: Any, strip: Sequence[Thumbnail] | None) -> str:
    """One image large, or the strip of a prompt's several (the prior marked)."""
    if not strip:
        return ""
    if len(strip) == 1 and not strip[0].prior:
        return f"<img alt='{_esc(image_id)}' src='{_esc(strip[0].uri)}'>"
    figures = "".join(
        f"<figure class={'prior' if t.prior else 'current'}><img alt='{_esc(t.label)}' src='{_esc(t.uri)}'>"
        f"<figcaption>{_esc(t.label)}</figcaption></figure>"
        for t in strip
    )
    return f"<div class=strip role=group aria-label='the images in the prompt, in order'>{figures}</div>"


def _images_note(row: Mapping[str, Any]) -> str:
    images, prior = row.get("images", 1), row.get("prior", False)
    if images <= 1 and not prior:
        return ""
    text = f"{images} of the current study" + (", after a prior study's image" if prior else "")
    return f"<dt>Images</dt><dd>{_esc(text)}</dd>"


def _interval_text(entry: Mapping[str, Any] | None, digits: int, signed: bool = False) -> str:
    if not entry:
        return "&ndash;"
    sign = "+" if signed else ""
    low, high = entry["ci95"]
    return f"{entry['value']:{sign}.{digits}f} <span class=note>[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]</span>"


def _summary_table(metrics: Mapping[str, Any]) -> str:
    roles = list(metrics["models"])
    confidence = round(metrics["bootstrap"]["confidence"] * 100)
    head = "".join(f"<th>{_esc(role)}<br><span class=note>{_esc(metrics['models'][role]['name'])}</span></th>" for role in roles)
    if metrics.get("difference"):
        head += f"<th>difference (model &minus; baseline)<br><span class=note>paired bootstrap {confidence}%</span></th>"
    body = []
    for name, info in metrics["metric_info"].items():
        digits = _DIGITS.get(name, 3)
        cells = "".join(
            f"<td class=num>{_interval_text(metrics['models'][role]['metrics'][name], digits)}</td>" for role in roles
        )
        if metrics.get("difference"):
            diff = metrics["difference"][name]
            css = ""
            if info["higher_is_better"] is not None:
                low, high = diff["ci95"]
                # Coloured only when the whole interval lies on one side of zero.
                if low > 0:
                    css = " better" if info["higher_is_better"] else " worse"
                elif high < 0:
                    css = " worse" if info["higher_is_better"] else " better"
            cells += f"<td class='num{css}'>{_interval_text(diff, digits, signed=True)}</td>"
        scored_on = f"<br><span class=note>on {_esc(info['scored_on'])}</span>" if metrics.get("questions") else ""
        body.append(f"<tr><th scope=row>{_esc(info['label'])}<br><span class=note>{_esc(info['scale'])}</span>"
                    f"{scored_on}</th>{cells}</tr>")
    unit = metrics["bootstrap"].get("unit", "image")
    return (
        f"<table id=summary><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<p class=note>Value [{confidence}% bootstrap interval over {_esc(unit)}s, {metrics['bootstrap']['resamples']} "
        "resamples]. A difference is shaded when its whole interval lies on one side of zero.</p>"
    )


def _bar_svg(values: Sequence[float], labels: Sequence[str], title: str, centred: bool) -> str:
    """Sorted per-image values as bars; centred=True draws a zero line in the middle (differences)."""
    width, height, pad, left = 480, 180, 28, 48  # left: room for the axis labels
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    top = max((abs(float(v)) for v in values), default=0.0) or 1.0
    plot_h = height - 2 * pad
    zero_y = pad + plot_h / 2 if centred else height - pad
    scale = (plot_h / 2 if centred else plot_h) / top
    step = (width - left - pad) / max(len(values), 1)
    bars = []
    for slot, i in enumerate(order):
        value = float(values[i])
        bar_h = abs(value) * scale
        y = zero_y - bar_h if value >= 0 else zero_y
        colour = "#3a8f4b" if value > 0 else ("#c0392b" if value < 0 else "#8a93a3")
        bars.append(
            f"<rect x='{left + slot * step:.2f}' y='{y:.2f}' width='{max(step * 0.9, 0.5):.2f}' "
            f"height='{max(bar_h, 0.5):.2f}' fill='{colour}'><title>{_esc(labels[i])}: {value:+.3f}</title></rect>"
        )
    low_label = f"{-top:+.3g}" if centred else "0"
    return (
        f"<svg role='img' viewBox='0 0 {width} {height}' width='100%' aria-label='{_esc(title)}'>"
        f"<title>{_esc(title)}</title>"
        f"<text x='{left}' y='16' font-size='13' font-weight='600'>{_esc(title)}</text>"
        f"{''.join(bars)}"
        f"<line x1='{left}' x2='{width - pad}' y1='{zero_y:.2f}' y2='{zero_y:.2f}' stroke='#1d2330' stroke-width='1'/>"
        f"<text x='{left - 4}' y='{pad + 4}' font-size='10' text-anchor='end'>{top:+.3g}</text>"
        f"<text x='{left - 4}' y='{zero_y + 4:.2f}' font-size='10' text-anchor='end'>0</text>"
        + (f"<text x='{left - 4}' y='{height - pad}' font-size='10' text-anchor='end'>{low_label}</text>" if centred else "")
        + f"<text x='{width - pad}' y='{height - 8}' font-size='10' text-anchor='end'>images, sorted ({len(values)})</text>"
        "</svg>"
    )


def _plots(rows: Sequence[Mapping[str, Any]], paired: bool) -> str:
    # Rows with caption scores: every scored row of a caption dataset, the open questions of a question dataset.
    scored = [row for row in rows if row["scored"] and "bleu" in (row["model"]["scores"] or {})]
    if not scored:
        return "<p class=note>No open questions: every scored question is closed (see the accuracy above).</p>"
    labels = [str(row["image_id"]) for row in scored]
    figures = []
    for metric, (label, _) in _PER_IMAGE.items():
        if paired:
            values = [row["model"]["scores"][metric] - row["baseline"]["scores"][metric] for row in scored]
            title = f"{label}: model − baseline, per image"
        else:
            values = [row["model"]["scores"][metric] for row in scored]
            title = f"{label}: model, per image"
        figures.append(f"<figure class=plot>{_bar_svg(values, labels, title, centred=paired)}</figure>")
    return f"<div class=plots id=plots>{''.join(figures)}</div>"


def _answer(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "&ndash;"
    if entry.get("error"):
        return f"<span class=error>failed: {_esc(entry['error'])}</span>"
    scores = entry.get("scores") or {}
    if "correct" in scores:  # a closed question
        said = f"reads as {scores['answer']}" if scores["answer"] else "says neither yes nor no"
        shown = f"{'right' if scores['correct'] else 'wrong'} ({said})"
    else:
        shown = ", ".join(f"{_PER_IMAGE[m][0]} {scores[m]:.3g}" for m in _PER_IMAGE if m in scores)
    return f"{_esc(entry['text'])}<br><span class=note>{_esc(shown)}</span>"


def _examples(
    rows: Sequence[Mapping[str, Any]],
    groups: Mapping[str, Sequence[int]],
    thumbnails: Mapping[int, Sequence[Thumbnail]],
    rank_metric: str,
    paired: bool,
) -> str:
    label = _PER_IMAGE[rank_metric][0]
    by = f"{label}, model − baseline" if paired else f"{label} of the model"
    titles = {"best": f"Best ({by})", "worst": f"Worst ({by})", "random": "Random",
              "closed_wrong": "Closed questions the model answered wrongly (at random)",
              "closed_right": "Closed questions the model answered rightly (at random)"}
    parts = []
    for group, indices in groups.items():
        if not indices:
            continue
        parts.append(f"<h3>{_esc(titles.get(group, group))}</h3>")
        for index in indices:
            row = rows[index]
            picture = _pictures(row["image_id"], thumbnails.get(index))
            context = f"<dt>Clinical context</dt><dd>{_esc(row['context'])}</dd>" if row.get("context") else ""
            if row.get("question"):
                turn = f" (answer {row['turn']} of its conversation)" if row.get("turn") else ""
                context += f"<dt>Question{_esc(turn)}</dt><dd>{_esc(row['question'])}</dd>"
            baseline = f"<dt>Baseline</dt><dd>{_answer(row.get('baseline'))}</dd>" if "baseline" in row else ""
            parts.append(
                f"<article class=example data-group='{_esc(group)}'>{picture}<dl>"
                f"<dt>Image</dt><dd>{_esc(row['image_id'])}</dd>{_images_note(row)}{context}"
                f"<dt>Reference</dt><dd>{_esc(row['reference'])}</dd>"
                f"<dt>Model</dt><dd>{_answer(row.get('model'))}</dd>{baseline}</dl></article>"
            )
    return "".join(parts) or "<p class=note>No examples.</p>"


# --------------------------------------------------------------------------- page


def render_report(
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    groups: Mapping[str, Sequence[int]],
    thumbnails: Mapping[int, Sequence[Thumbnail]],
    rank_metric: str = "rouge_l",
) -> str:
    """The whole page as a string; ``groups`` maps best/worst/random to row indices, ``thumbnails`` each shown
    row to the images its answer was made from (see strip_thumbnails)."""
    models = metrics["models"]
    paired = bool(metrics.get("difference"))
    title = f"Evaluation of {models['model']['name']}"
    if paired:
        title += f" against {models['baseline']['name']}"
    data = metrics["dataset"]
    dropped = ", ".join(f"{n} {why}" for why, n in data["dropped"].items()) or "none"
    errors = "; ".join(f"{role}: {info['errors']}" for role, info in models.items())
    speed = "; ".join(
        f"{role}: {info['images_per_second']} images/s on {info['device']} ({info['precision']})" for role, info in models.items()
    )
    questions = metrics.get("questions")
    if questions:
        scored = f"{data['scored']} answers scored" + (f" of {data['answers']}" if "answers" in data else "")
        scored += f" ({questions['closed']} closed yes/no questions, {questions['open']} open), from {data['rows']} rows"
        words = f"Reference answers average {data['reference_mean_words']} words."
        prompt = "Prompt: each row's question (the instruction is not used)"
        if questions.get("conversations"):
            prompt += "; each answer of a conversation follows its earlier turns, with the dataset's answers"
        prompt += f". Closed questions: {_esc(questions['rule'])}."
    else:
        scored = f"{data['scored']} rows scored of {data['rows']}"
        words = f"Reference captions average {data['reference_mean_words']} words."
        prompt = f"Instruction: {_esc(metrics['generation']['instruction'])}"
    intro = (
        f"<p>{_esc(data['name'])}, split <b>{_esc(data['split'])}</b>: {scored} "
        f"(dropped as unusable: {_esc(dropped)}; failed generations: {_esc(errors)}). {words}</p>"
        f"<p class=note>Generation: {_esc(metrics['generation']['described'])}, batches of "
        f"{metrics['generation']['batch_size']}, seed {metrics['generation']['seed']}. Speed: {_esc(speed)}.<br>"
        f"{prompt}</p>"
    )
    plots_title = "Per-image score differences" if paired else "Per-image scores"
    if questions:
        plots_title = "Open questions: " + ("per-question score differences" if paired else "per-question scores")
    bleu = metrics["metric_info"].get("bleu")
    footer = (
        (f"<p class=note>BLEU: {_esc(bleu.get('signature', ''))}. " if bleu else "<p class=note>")
        + f"Created {_esc(metrics.get('created'))}; "
        f"{_esc(', '.join(f'{k} {v}' for k, v in metrics.get('versions', {}).items()))}.</p>"
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>{intro}"
        f"<h2>Summary</h2>{_summary_table(metrics)}"
        f"<h2>{plots_title}</h2>{_plots(rows, paired)}"
        f"<h2>Examples</h2>{_examples(rows, groups, thumbnails, rank_metric, paired)}"
        f"{footer}</body></html>\n"
    )


def write_report(
    path: Path,
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    groups: Mapping[str, Sequence[int]],
    thumbnails: Mapping[int, Sequence[Thumbnail]],
    rank_metric: str = "rouge_l",
) -> Path:
    """Render the report and write it to ``path``; returns the path."""
    path.write_text(render_report(metrics, rows, groups, thumbnails, rank_metric), encoding="utf-8")
    return path
