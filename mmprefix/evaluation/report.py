"""Reports of evaluation runs: ``results.json``, a Markdown table (``results.md``) and a self-contained HTML page
(``report.html``) with sample images, inputs, references and every run's prediction side by side.

``results`` is what :func:`mmprefix.evaluation.evaluate_runs` returns: ``{label: {"metrics", "predictions",
"errors", ...}}``. :func:`markdown_table` alone is what ``eval/evaluate.py`` prints.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import metrics
from ..core.files import write_text
from ..data import CaptionSample, TextSample, VQASample, load_image
from .predict import GENERATIVE_TASKS, PRIMARY_METRIC, sample_id

__all__ = ["breakdown_table", "markdown_table", "primary_metric", "write_report"]

BREAKDOWN = "vqa_accuracy_by_question/"  # per question type: a table of its own (VQAv2 has 65 types)
PERCENT = ("vqa_accuracy", "exact_match", "top", "i2t_", "t2i_")  # metrics reported in percent
THUMBNAIL = 160  # pixels, longest side


# -- Markdown --------------------------------------------------------------------------------------------------


def primary_metric(task: str, results: Mapping[str, Mapping]) -> str | None:
    """The metric a task's table leads with; VQA with only single-answer questions (GQA) leads with exact_match."""
    present = {name for run in results.values() for name in run.get("metrics", {})}
    primary = PRIMARY_METRIC.get(task)
    if primary not in present and task == "vqa" and "exact_match" in present:
        return "exact_match"
    return primary if primary in present else None


def _columns(task: str | None, results: Mapping[str, Mapping]) -> list[str]:
    names: list[str] = []
    for run in results.values():
        names += [n for n in run.get("metrics", {}) if n not in names and not n.startswith(BREAKDOWN)]
    primary = primary_metric(task, results) if task else None
    return ([primary] if primary else []) + [n for n in names if n != primary]


def _number(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.2f}" if name.startswith(PERCENT) else f"{value:.4f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: Mapping[str, Mapping], task: str | None = None) -> str:
    """One row per run, one column per metric (the task's primary metric first, per-question-type breakdowns
    left to :func:`breakdown_table`), then the number of samples and of unreadable ones."""
    columns = _columns(task, results)
    rows = []
    for label, run in results.items():
        scores = run.get("metrics", {})
        counts = [str(run.get("num_samples", "–")), str(len(run.get("errors", [])))]
        rows.append([label, *[_number(c, scores.get(c)) for c in columns], *counts])
    return _table(["run", *columns, "samples", "errors"], rows)


def breakdown_table(results: Mapping[str, Mapping], prefix: str = BREAKDOWN) -> str:
    """Metrics named ``prefix + group`` (VQA accuracy per question type): one row per group, one column per
    run. Empty when no run has them."""
    groups: list[str] = []
    for run in results.values():
        groups += [n[len(prefix):] for n in run.get("metrics", {}) if n.startswith(prefix) and n[len(prefix):] not in groups]
    if not groups:
        return ""
    rows = [[group, *[_number(prefix, run.get("metrics", {}).get(prefix + group)) for run in results.values()]]
            for group in groups]
    return _table([prefix.rstrip("/"), *results], rows)


def _markdown(task: str, results: Mapping[str, Mapping]) -> str:
    parts = [f"# Evaluation: {task}", markdown_table(results, task)]
    breakdown = breakdown_table(results)
    if breakdown:
        parts += ["## VQA accuracy per question type", breakdown]
    notes = [f"- {label}: {name} unavailable: {reason}" for label, run in results.items()
             for name, reason in run.get("unavailable", {}).items()]
    notes += [f"- {label}: {len(run['errors'])} unreadable image(s), not scored (see results.json)"
              for label, run in results.items() if run.get("errors")]
    if notes:
        parts += ["## Notes", "\n".join(notes)]
    return "\n\n".join(parts) + "\n"


# -- HTML ------------------------------------------------------------------------------------------------------


def _thumbnail(image: Any) -> str:
    """An ``<img>`` with the image embedded as a base64 JPEG, or a note when it cannot be read."""
    picture = load_image(image, on_bad_image="skip") if image is not None else None
    if picture is None:
        return '<span class="missing">image unreadable</span>' if image is not None else ""
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(_name(image))}" src="data:image/jpeg;base64,{data}">'


def _name(image: Any) -> str:
    return os.path.basename(image) if isinstance(image, (str, os.PathLike)) else "image"


def _describe(sample: Any) -> tuple[Any, str, list[str]]:
    """(image, input text, references) of any sample."""
    if isinstance(sample, VQASample):
        counts = Counter(sample.answers)
        return sample.image, sample.question, [a if n == 1 else f"{a} ×{n}" for a, n in counts.most_common()]
    if isinstance(sample, CaptionSample):
        return sample.image, "", list(sample.captions)
    if isinstance(sample, TextSample):
        return None, sample.prompt, [sample.target] if sample.target else []
    image, label = sample  # classification: (image, label)
    return image, "", [str(label)]


def _hit(task: str, prediction: str, sample: Any) -> bool:
    references = {"vqa": lambda s: s.answers, "caption": lambda s: s.captions, "text": lambda s: [s.target]}[task](sample)
    return any(metrics.exact_match(prediction, r) for r in references if r)


def _spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``range(count)``, first and last included."""
    if wanted >= count:
        return list(range(count))
    if wanted <= 1:
        return [0][:wanted]
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def pick_examples(samples: Sequence[Any], examples: int) -> list[int]:
    """``examples`` sample indices: spread over the data, and over every question type when samples have one
    (round-robin across types, so that a type that got worse is never left out)."""
    groups: dict[Any, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(getattr(sample, "question_type", None), []).append(index)
    if len(groups) <= 1:
        return _spread(len(samples), examples)
    shares = dict.fromkeys(groups, 0)
    wanted = min(max(examples, len(groups)), len(samples))  # at least one of each type
    while sum(shares.values()) < wanted:
        for kind, members in groups.items():  # round-robin: a small type's unused share goes to the others
            if shares[kind] < len(members) and sum(shares.values()) < wanted:
                shares[kind] += 1
    return sorted(members[i] for kind, members in groups.items() for i in _spread(len(members), shares[kind]))


def _example_rows(task: str, samples: Sequence[Any], results: Mapping[str, Mapping], examples: int,
                  with_input: bool) -> list[str]:
    rows = []
    for index in pick_examples(samples, examples):
        sample = samples[index]
        image, text, references = _describe(sample)
        cells = [_thumbnail(image), *([html.escape(text)] if with_input else []),
                 "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in references) + "</ul>"]
        for run in results.values():
            key = sample_id(task, sample) if task in GENERATIVE_TASKS else None
            prediction = run.get("predictions", {}).get(key)
            if prediction is None:
                cells.append('<span class="missing">–</span>')
            else:
                css = ' class="hit"' if _hit(task, prediction, sample) else ""
                cells.append(f"<span{css}>{html.escape(prediction)}</span>")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return rows


def _html_scores(task: str, results: Mapping[str, Mapping]) -> str:
    columns = _columns(task, results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", *columns, "samples", "errors"])
    body = ""
    for label, run in results.items():
        cells = [label, *[_number(c, run.get("metrics", {}).get(c)) for c in columns],
                 run.get("num_samples", "–"), len(run.get("errors", []))]
        body += "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_errors(results: Mapping[str, Mapping]) -> str:
    items = [f"<li>{html.escape(label)}: {html.escape(str(e.get('id')))} {html.escape(str(e.get('image')))}: "
             f"{html.escape(str(e.get('reason')))}</li>" for label, run in results.items() for e in run.get("errors", [])]
    return f"<h2>Unreadable images</h2><ul>{''.join(items)}</ul>" if items else ""


STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f3f3f3}
ul{margin:0;padding-left:1.2em}.hit{color:#070;font-weight:bold}.missing{color:#999}"""


def _html_about(about: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in about.items())
    return f"<table>{rows}</table>" if rows else ""


def _html_breakdown(results: Mapping[str, Mapping]) -> str:
    """VQA accuracy per question type, one column per run."""
    groups: list[str] = []
    for run in results.values():
        groups += [n[len(BREAKDOWN):] for n in run.get("metrics", {}) if n.startswith(BREAKDOWN) and n[len(BREAKDOWN):] not in groups]
    if not groups:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["question type", *results])
    body = "".join("<tr>" + f"<td>{html.escape(group)}</td>" + "".join(
        f"<td>{_number(BREAKDOWN, run.get('metrics', {}).get(BREAKDOWN + group))}</td>" for run in results.values())
        + "</tr>" for group in groups)
    return f"<h2>Accuracy per question type</h2><table><tr>{head}</tr>{body}</table>"


def _html_curves(curves: Path | None) -> str:
    if curves is None or not Path(curves).is_file():
        return ""
    data = base64.b64encode(Path(curves).read_bytes()).decode("ascii")
    return f'<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{data}">'


def _html(task: str, samples: Sequence[Any], results: Mapping[str, Mapping], examples: int,
          about: Mapping[str, Any], curves: Path | None) -> str:
    title = html.escape(f"mmprefix evaluation: {task}" + (f", {about['method']} on {about['model']}"
                                                          if "method" in about and "model" in about else ""))
    with_input = any(_describe(sample)[1] for sample in samples)  # captions and class labels have no input text
    head = "".join(f"<th>{html.escape(c)}</th>" for c in
                   ["image", *(["input"] if with_input else []), "references", *results])
    rows = "".join(_example_rows(task, samples, results, examples, with_input))
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style>'
            f"</head><body><h1>{title}</h1>{_html_about(about)}<h2>Scores</h2>{_html_scores(task, results)}"
            f"{_html_breakdown(results)}{_html_curves(curves)}"
            f"<h2>Examples</h2><table><tr>{head}</tr>{rows}</table>{_html_errors(results)}</body></html>\n")


# -- all three files -------------------------------------------------------------------------------------------


def write_report(
    output_dir: str | os.PathLike,
    task: str,
    samples: Sequence[Any],
    results: Mapping[str, Mapping],
    examples: int = 12,
    settings: Mapping[str, Any] | None = None,
    about: Mapping[str, Any] | None = None,
    curves: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write ``results.json`` (every run's metrics, counts, unreadable images and ``settings``), ``results.md``
    and ``report.html`` into ``output_dir``; return their paths. The HTML page opens with ``about`` (what was
    evaluated: model, method, run...), then the scores, the per-question-type table, the training ``curves``
    (a PNG, embedded) and ``examples`` samples spread over the data and over every question type."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "task": task,
        "primary_metric": primary_metric(task, results),
        "settings": dict(settings or {}),
        "runs": {label: {"metrics": run.get("metrics", {}), "unavailable": run.get("unavailable", {}),
                         "num_samples": run.get("num_samples"), "num_predictions": len(run.get("predictions", {})),
                         "num_errors": len(run.get("errors", [])), "errors": run.get("errors", [])}
                 for label, run in results.items()},
    }
    paths = {"json": output / "results.json", "markdown": output / "results.md", "html": output / "report.html"}
    write_text(paths["json"], json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    write_text(paths["markdown"], _markdown(task, results))
    write_text(paths["html"], _html(task, samples, results, examples, dict(about or {}), curves))
    return paths
