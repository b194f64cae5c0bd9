"""PNG plots of a run (matplotlib's Agg canvas: no display, no pyplot state).

* `loss-by-mode.png` — per cache mode, summed over its judged cells: writes
  acknowledged and durable by the contract; and what was lost (allowed or
  expected vs a violation) and corrupt, in the oracle's sectors.
* `cell-timings.png` — per cell: the time of each phase, stacked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.report.grid import MODE_ORDER
from harness.report.results import CellResult, RunResults

log = logging.getLogger(__name__)

PHASE_ORDER = ("boot", "workload", "cut", "recover", "reboot", "check")
_COLOURS = {
    "acknowledged": "#9bb7d4",
    "durable by contract": "#2e7d32",
    "lost, allowed or expected": "#f0a202",
    "lost, violation": "#c62828",
    "corrupt": "#6a1b9a",
}


def plot_loss_by_mode(results: RunResults, path: Path) -> Path | None:
    """Left: writes acknowledged and durable by contract. Right: loss, allowed or not."""
    cells = [c for c in results.cells if c.verdict in ("pass", "fail")]
    if not cells:
        return None
    modes = sorted(
        {c.mode for c in cells}, key=lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else 9
    )

    def total(attr: str, keep: Callable[[CellResult], bool] = lambda c: True) -> list[int]:
        return [sum(getattr(c, attr) for c in cells if c.mode == m and keep(c)) for m in modes]

    kept = {
        "acknowledged": total("writes_acknowledged"),
        "durable by contract": total("writes_durable"),
    }
    lost = {
        "lost, allowed or expected": total("lost", lambda c: c.passed),
        "lost, violation": total("lost", lambda c: not c.passed),
        "corrupt": total("corrupt"),
    }
    units = sorted({c.loss_unit for c in cells})
    fig = Figure(figsize=(max(7.0, 2.2 * len(modes) + 2), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for ax, series, title, ylabel in (
        (left, kept, "Writes per cache mode", "writes"),
        (right, lost, "Loss per cache mode", "/".join(units)),
    ):
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(modes))]
            bars = ax.bar(xs, values, width, label=name, color=_COLOURS[name])
            ax.bar_label(bars, fontsize=7, padding=1)
        ax.set_xticks(range(len(modes)), modes, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=3, frameon=False
        )
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_cell_timings(results: RunResults, path: Path) -> Path | None:
    cells = [c for c in results.cells if c.timings]
    if not cells:
        return None
    phases = [p for p in PHASE_ORDER if any(p in c.timings for c in cells)]
    phases += sorted({p for c in cells for p in c.timings if p not in phases and p != "total"})
    fig = Figure(figsize=(8.0, max(2.0, 0.32 * len(cells) + 1.2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [c.id for c in cells]
    left = [0.0] * len(cells)
    cmap = matplotlib.colormaps["tab10"]
    for i, phase in enumerate(phases):
        values = [float(c.timings.get(phase, 0.0)) for c in cells]
        ax.barh(labels, values, left=left, label=phase, color=cmap(i % 10))
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("seconds")
    ax.set_title("Time per cell")
    if phases:
        ax.legend(
            fontsize=7,
            ncols=min(len(phases), 6),
            loc="lower center",
            bbox_to_anchor=(0.5, 1.06),
            frameon=False,
        )
    fig.tight_layout()
    fig.savefig(path)
    return path


def render_plots(results: RunResults, directory: Path) -> list[Path]:
    """Write every plot into `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [
        plot_loss_by_mode(results, directory / "loss-by-mode.png"),
        plot_cell_timings(results, directory / "cell-timings.png"),
    ]
    return [p for p in written if p is not None]
