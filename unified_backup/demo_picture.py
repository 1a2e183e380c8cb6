"""The demo's picture: per framework, the loss per epoch of the uninterrupted run and of the killed
and resumed one on the same axes, each SIGKILL marked, drawn from the curves ``demo`` records.

matplotlib is an optional extra (``pip install 'unified-backup[demo]'``, included in ``[all]``); the
figure is drawn on its own Agg canvas, so no pyplot (process-global) state is touched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

MISSING = "matplotlib is not installed: pip install 'unified-backup[demo]' (or '[all]') to get the picture"
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def draw(curves: dict[str, dict[str, Any]], path: Path) -> Path:
    """Write the PNG for ``curves`` (framework -> the record ``demo.curves`` makes) to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * len(curves), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (framework, curve) in zip(axes, curves.items(), strict=True):
        reference = curve["reference"]
        epochs = range(1, len(reference) + 1)
        ax.plot(epochs, reference, color="0.6", linewidth=5, label="uninterrupted", zorder=1)
        for i, attempt in enumerate(curve["attempts"]):
            trained = sorted((int(epoch), loss) for epoch, loss in attempt["losses"].items())
            if trained:
                xs, ys = zip(*[(epoch + 1, loss) for epoch, loss in trained], strict=True)
                ax.plot(
                    xs, ys, marker="o", markersize=5, linewidth=1.5, color=COLOURS[i % len(COLOURS)],
                    label=f"attempt {i + 1}", zorder=2,
                )  # fmt: skip
        for j, at in enumerate(curve["kills"]):
            ax.annotate(  # numbered, so that two kills in one epoch show as two
                f"kill {j + 1}", (at + 0.5, 1 - 0.06 * (j + 1)), xycoords=("data", "axes fraction"),
                color="tab:red", fontsize="x-small", ha="left",
            )  # fmt: skip
            ax.axvline(
                at + 0.5, color="tab:red", linestyle="--", linewidth=1, label="SIGKILL" if j == 0 else None
            )
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (epoch mean)")
        same = "same final weights" if curve["max_abs_diff"] == 0 else f"max diff {curve['max_abs_diff']:.2g}"
        ax.set_title(f"{framework}: {len(curve['kills'])} SIGKILL(s), {same}")
        ax.legend(fontsize="small", loc="center right")
    figure.suptitle("unified-backup demo: uninterrupted vs killed and resumed")
    figure.savefig(path, dpi=100)
    return path
