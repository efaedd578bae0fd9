"""Training graphs and summaries drawn from the metrics files, written beside them.

For each ``graph/training_metrics[_<step>].jsonl``: ``training_losses_<step>.png``,
``kl_<step>.png``, ``validation_<step>.png`` (held-out metrics),
``learning_rates_<step>.png`` and ``batch_times_<step>.png`` (each only when the file holds
something to draw) and ``training_summary_<step>.txt``; plus
``training_overview.png``, every step's losses on one global-step axis with the stage
boundaries marked. The plain ``training_metrics.jsonl`` gives names without ``_<step>``.

Figures are drawn on the Agg canvas directly (no pyplot, so no global backend switch) and each
file is replaced atomically: a crash never leaves a half-written PNG.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fluxflow_jax.atomic import atomic_write
from fluxflow_jax.pipeline.metrics_log import (VALIDATION_PREFIX, MetricsFileError,
                                               read_metrics, session_path)

DPI = 150
PREFIX = "training_metrics"
LOSS_NAMES = frozenset({"r1_penalty"})  # loss-like besides loss_* and *_loss
STAT_COLUMNS = ("initial", "final", "min", "max", "mean", "std", "change%")


@dataclass(frozen=True)
class StepSeries:
    """One step's records as columns, NaN where a record lacks a value or it was null."""

    name: str  # "" for the plain training_metrics.jsonl
    steps: np.ndarray
    metrics: dict[str, np.ndarray]
    learning_rates: dict[str, np.ndarray]
    extras: dict[str, np.ndarray]
    first_timestamp: str


def _number(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else np.nan


def _columns(records: list[dict], group: str) -> dict[str, np.ndarray]:
    names = dict.fromkeys(name for record in records for name in record.get(group) or {})
    return {name: np.array([_number((record.get(group) or {}).get(name)) for record in records],
                           dtype=np.float64) for name in names}


def load_step(path: Path) -> StepSeries:
    """A metrics file as columns; the step name comes from the file name."""
    records = read_metrics(path)
    return StepSeries(
        name=path.stem.removeprefix(PREFIX).removeprefix("_"),
        steps=np.array([record["global_step"] for record in records], dtype=np.int64),
        metrics=_columns(records, "metrics"),
        learning_rates=_columns(records, "learning_rates"),
        extras=_columns(records, "extras"),
        first_timestamp=str(records[0].get("timestamp", "")) if records else "")


def _is_loss(name: str) -> bool:
    return name.startswith("loss_") or name.endswith("_loss") or name in LOSS_NAMES


def _losses(series: StepSeries) -> dict[str, np.ndarray]:
    """Loss-like metrics with a finite non-zero value (the train step reports zeros for the
    parts a stage does not train)."""
    return {name: values for name, values in series.metrics.items()
            if _is_loss(name) and np.any(np.isfinite(values) & (values != 0))}


def _has_data(values: np.ndarray | None) -> bool:
    return values is not None and bool(np.isfinite(values).any())


def _figure(title: str, ylabel: str, xlabel: str = "global step") -> tuple[Figure, Axes]:
    figure = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _plot(axes: Axes, x: np.ndarray, y: np.ndarray, **style: Any) -> None:
    """The finite points as a line (a single point as a marker)."""
    finite = np.isfinite(y)
    axes.plot(x[finite], y[finite], marker="o" if finite.sum() == 1 else None, **style)


def _log_if_positive(axes: Axes, columns: list[np.ndarray]) -> None:
    values = np.concatenate([column[np.isfinite(column)] for column in columns])
    if values.size and np.all(values > 0):
        axes.set_yscale("log")


def _legend(axes: Axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)


def _title(what: str, name: str) -> str:
    return f"{what}, step {name}" if name else what


def _draw_curves(series: StepSeries, what: str, ylabel: str,
                 curves: dict[str, np.ndarray]) -> Figure | None:
    """Several named curves on one log-if-positive axis; None when there are none."""
    if not curves:
        return None
    figure, axes = _figure(_title(what, series.name), ylabel)
    for name, values in curves.items():
        _plot(axes, series.steps, values, label=name)
    _log_if_positive(axes, list(curves.values()))
    _legend(axes)
    return figure


def _draw_losses(series: StepSeries) -> Figure | None:
    return _draw_curves(series, "Training losses", "loss", _losses(series))


def _draw_kl(series: StepSeries) -> Figure | None:
    kl, beta = series.metrics.get("loss_kl"), series.metrics.get("kl_beta")
    if not _has_data(kl):
        return None
    figure, axes = _figure(_title("KL divergence", series.name), "loss_kl")
    _plot(axes, series.steps, kl, label="loss_kl", color="C0")
    _log_if_positive(axes, [kl])
    if _has_data(beta):
        twin = axes.twinx()
        _plot(twin, series.steps, beta, label="kl_beta", color="C1", linestyle="--")
        twin.set_ylabel("kl_beta")
        handles = axes.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axes.legend(handles=handles, fontsize=8)
    return figure


def _validation_panel(name: str) -> str:
    """Which panel a validation metric goes on: one per kind (PSNR, SSIM, LPIPS, accuracy
    with its chance level)."""
    kind = name.removeprefix(VALIDATION_PREFIX)
    return "accuracy" if kind.endswith(("_accuracy", "_chance")) else kind.split("_")[0]


def _draw_validation(series: StepSeries) -> Figure | None:
    """The held-out metrics (``val_*``; their losses are on the loss graph), one panel per
    kind, chance levels dashed."""
    panels: dict[str, dict[str, np.ndarray]] = {}
    for name, values in series.metrics.items():
        if name.startswith(VALIDATION_PREFIX) and not _is_loss(name) and _has_data(values):
            panels.setdefault(_validation_panel(name), {})[name] = values
    if not panels:
        return None
    figure = Figure(figsize=(10, 3 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    for row, (panel, curves) in enumerate(sorted(panels.items())):
        axes = figure.add_subplot(len(panels), 1, row + 1)
        axes.set(title=_title(f"Validation: {panel}", series.name), xlabel="global step",
                 ylabel=panel)
        axes.grid(alpha=0.3)
        for name, values in curves.items():
            _plot(axes, series.steps, values, label=name,
                  linestyle="--" if name.endswith("_chance") else "-")
        _legend(axes)
    return figure


def _draw_learning_rates(series: StepSeries) -> Figure | None:
    rates = {name: values for name, values in series.learning_rates.items() if _has_data(values)}
    return _draw_curves(series, "Learning rates", "learning rate", rates)


def _draw_batch_times(series: StepSeries) -> Figure | None:
    times = series.extras.get("batch_time")
    if not _has_data(times):
        return None
    figure, axes = _figure(_title("Batch times", series.name), "seconds per batch")
    _plot(axes, series.steps, times, label="batch_time", alpha=0.4, color="C0")
    finite = np.isfinite(times)
    x, y = series.steps[finite], times[finite]
    if y.size > 10:
        window = min(50, y.size // 5)
        average = np.convolve(y, np.ones(window) / window, mode="valid")
        _plot(axes, x[window - 1:], average, label=f"moving average ({window})", color="C1")
    _legend(axes)
    return figure


def _draw_overview(all_series: list[StepSeries]) -> Figure:
    """Every step's losses in run order on one axis; a step whose global steps restart is
    shifted to follow the previous one. Dashed lines mark where a step begins."""
    ordered = sorted((series for series in all_series if series.steps.size),
                     key=lambda series: (series.first_timestamp, series.name))
    figure, axes = _figure("Training overview: losses of every step", "loss",
                           "global step (steps in run order)")
    names = sorted({name for series in ordered for name in _losses(series)})
    colors = {name: f"C{index % 10}" for index, name in enumerate(names)}
    labelled: set[str] = set()
    plotted: list[np.ndarray] = []
    end = None
    for series in ordered:
        shift = 0 if end is None else max(0, end + 1 - int(series.steps.min()))
        x = series.steps + shift
        if end is not None:
            axes.axvline(x.min(), color="0.4", linestyle="--", linewidth=1)
        axes.text(x.min(), 0.98, f" {series.name or 'training'}", va="top", fontsize=8,
                  transform=axes.get_xaxis_transform())
        for name, values in _losses(series).items():
            _plot(axes, x, values, color=colors[name], label=None if name in labelled else name)
            labelled.add(name)
            plotted.append(values)
        end = int(x.max())
    if plotted:
        _log_if_positive(axes, plotted)
    else:
        axes.text(0.5, 0.5, "no losses recorded", ha="center", transform=axes.transAxes)
    _legend(axes)
    return figure


def _stats(values: np.ndarray) -> tuple[float, ...] | None:
    """initial, final, min, max, mean, std (population) and % change of the finite values."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    initial, final = finite[0], finite[-1]
    change = (final - initial) / abs(initial) * 100 if initial != 0 else np.nan
    return (initial, final, finite.min(), finite.max(), finite.mean(), finite.std(), change)


def _cell(value: float) -> str:
    return f"{value:>16.8g}" if np.isfinite(value) else f"{'n/a':>16}"


def _table(title: str, columns: dict[str, np.ndarray], width: int) -> list[str]:
    lines = ["", f"{title:<{width}}" + "".join(f"{column:>16}" for column in STAT_COLUMNS)]
    for name, values in columns.items():
        stats = _stats(values)
        cells = "".join(map(_cell, stats)) if stats else "  no finite values"
        lines.append(f"{name:<{width}}{cells}")
    return lines


def _read_session(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summary_text(series: StepSeries, session: dict | None) -> str:
    """Session facts, then per metric (and extra) its statistics, then first and last LRs."""
    lines = [f"Training summary: {_title('metrics file', series.name)}"]
    if session:
        lines.append(f"session: {session.get('session_id')}, created {session.get('created_at')}"
                     f", resumed {session.get('resumed_count', 0)} time(s)")
    if not series.steps.size:
        return "\n".join(lines + ["records: 0"]) + "\n"
    lines.append(f"records: {series.steps.size}, global steps {series.steps.min()}.."
                 f"{series.steps.max()}")
    names = [*series.metrics, *series.extras, *series.learning_rates, "learning rates"]
    width = max(map(len, names)) + 2
    lines += _table("metrics", series.metrics, width)
    if series.extras:
        lines += _table("extras", series.extras, width)
    if series.learning_rates:
        lines += ["", f"{'learning rates':<{width}}{'first':>16}{'last':>16}"]
        for name, values in series.learning_rates.items():
            finite = values[np.isfinite(values)]
            cells = _cell(finite[0]) + _cell(finite[-1]) if finite.size else "  no finite values"
            lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines) + "\n"


def _save(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write(path, buffer.getvalue())
    return path


def metrics_files(output_path: Path) -> list[Path]:
    """The metrics files under ``output_path/graph``, by name."""
    return sorted(path for path in (output_path / "graph").glob(f"{PREFIX}*.jsonl")
                  if path.stem == PREFIX or path.stem.startswith(f"{PREFIX}_"))


def write_graphs(output_path: Path | str) -> list[Path]:
    """Draw every graph and summary for a training output directory; the files written."""
    output_path = Path(output_path)
    if not output_path.is_dir():
        raise MetricsFileError(f"{output_path} is not a directory")
    files = metrics_files(output_path)
    if not files:
        raise MetricsFileError(f"no {PREFIX}*.jsonl under {output_path / 'graph'}")
    graph_dir = files[0].parent
    all_series = [load_step(path) for path in files]
    written = []
    for series in all_series:
        suffix = f"_{series.name}" if series.name else ""
        for stem, draw in (("training_losses", _draw_losses), ("kl", _draw_kl),
                           ("validation", _draw_validation),
                           ("learning_rates", _draw_learning_rates),
                           ("batch_times", _draw_batch_times)):
            figure = draw(series)
            if figure is not None:
                written.append(_save(figure, graph_dir / f"{stem}{suffix}.png"))
        summary = summary_text(series, _read_session(session_path(output_path, series.name)))
        path = graph_dir / f"training_summary{suffix}.txt"
        atomic_write(path, summary.encode("utf-8"))
        written.append(path)
    written.append(_save(_draw_overview(all_series), graph_dir / "training_overview.png"))
    return written

