"""``actfmt stats --plot``: the figures across layers, drawn for a paper (matplotlib, the ``plot`` extra).

One panel per quantity, each curve named by its dataset (and split), the chance level drawn, the best layer of
each pair marked and labelled; a dataset keeps one colour in every panel.  PNG at ``dpi``; SVG with its text as
text (``svg.fonttype = none``), so it can be edited and searched.
"""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from actfmt.errors import ActfmtError

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.statistics import StatsResult

__all__ = ["DEFAULT_DPI", "PlotError", "check_plot", "plot_stats"]

#: PNG resolution by default: sharp in a paper's column, small enough to attach to an issue.
DEFAULT_DPI = 150
#: Chance level of the midpoint probe on two balanced splits.
CHANCE = 0.5
#: Line styles of the splits of one dataset (EM solid, Neutral dashed, ...), in the order they are met.
_STYLES = ("-", "--", ":", "-.")


class PlotError(ActfmtError, ValueError):
    """``--plot`` cannot be drawn (no matplotlib, a file name without .png / .svg, a file that cannot be written)."""


def check_plot(path: str) -> Any:
    """Raise :class:`PlotError` unless ``path`` ends in .png / .svg and matplotlib imports; returns pyplot
    (called before the statistics are computed: a plot that cannot be drawn fails at once)."""
    if PurePosixPath(path).suffix.lower() not in (".png", ".svg"):
        raise PlotError(f"--plot {path}: give a file name ending in .png or .svg.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib; install it with `pip install 'actfmt[plot]'` (or `pip install matplotlib`)."
        ) from None
    return plt


def _parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/"))


def _short_names(places: list[str]) -> dict[str, str]:
    """Each dataset directory named by as few trailing path parts as keep them apart (``SP_docs``, or
    ``modelA/SP_docs`` and ``modelB/SP_docs``)."""
    parts = {p: [x for x in p.split("/") if x] or [p] for p in places}
    for n in range(1, max((len(v) for v in parts.values()), default=1) + 1):
        names = {p: "/".join(v[-n:]) for p, v in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {p: p for p in places}


def plot_stats(
    result: StatsResult, path: str, dpi: int = DEFAULT_DPI, size: tuple[float, float] | None = None
) -> None:
    """Draw ``result`` to ``path`` (.png or .svg): mean row norm per split; with pairs, the midpoint probe's
    accuracy (chance drawn) and Cohen's d along the difference of means, each in its own panel, the best layer
    of each pair marked and labelled.  ``size``: (width, height) in inches; ``dpi``: the PNG's resolution."""
    plt = check_plot(path)
    suffix = PurePosixPath(path).suffix.lower()
    datasets = list(
        dict.fromkeys([_parent(s.path) for s in result.splits] + [p.dataset for p in result.pairs])
    )
    label = _short_names(datasets)
    colours = {d: f"C{i % 10}" for i, d in enumerate(datasets)}
    several = len(datasets) > 1
    panels = 3 if result.pairs else 1
    width, height = size or (7.0, 2.6 * panels + 0.8)
    with plt.rc_context({"svg.fonttype": "none", "font.size": 9}):
        fig, axes = plt.subplots(panels, 1, figsize=(width, height), sharex=True, squeeze=False)
        ax = axes[0][0]
        styles: dict[str, dict[str, str]] = {}
        for s in result.splits:
            d = _parent(s.path)
            style = styles.setdefault(d, {}).setdefault(s.split, _STYLES[len(styles[d]) % len(_STYLES)])
            ax.plot(
                [li.index for li in s.layers],
                [li.row_norm_mean for li in s.layers],
                color=colours[d],
                ls=style,
                marker="o",
                ms=2.5,
                lw=1.2,
                label=f"{label[d]} · {s.split}" if several else s.split,
            )
        ax.set_ylabel("mean row norm ‖x‖₂")
        ax.set_title("Activation scale", loc="left", fontsize="medium")
        ax.grid(alpha=0.3)
        if result.splits:
            ax.legend(fontsize="small", ncol=2 if len(result.splits) > 4 else 1, frameon=False)
        if result.pairs:
            acc, eff = axes[1][0], axes[2][0]
            acc.axhline(CHANCE, color="0.4", lw=0.9, ls="--")
            acc.annotate(
                "chance",
                xy=(1.0, CHANCE),
                xycoords=("axes fraction", "data"),
                xytext=(-4, 3),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize="small",
                color="0.4",
            )
            for p in result.pairs:
                d = p.dataset
                name = f"{label[d]}: {p.a} vs {p.b}" if several else f"{p.a} vs {p.b}"
                idx = [pl.index for pl in p.layers]
                acc.plot(
                    idx,
                    [pl.midpoint_accuracy for pl in p.layers],
                    color=colours[d],
                    marker="o",
                    ms=2.5,
                    lw=1.2,
                    label=name,
                )
                eff.plot(
                    idx,
                    [pl.cohens_d for pl in p.layers],
                    color=colours[d],
                    marker="o",
                    ms=2.5,
                    lw=1.2,
                    label=name,
                )
                best = next((pl for pl in p.layers if pl.index == p.best_index), None)
                if best is not None and best.midpoint_accuracy is not None:
                    for a, y in ((acc, best.midpoint_accuracy), (eff, best.cohens_d)):
                        a.plot([best.index], [y], marker="*", ms=9, color=colours[d], zorder=3)
                    last = best.index == max(idx)  # at the right edge: the label goes to the left
                    acc.annotate(
                        f"best: {p.best_layer} ({best.midpoint_accuracy:.1%})",
                        xy=(best.index, best.midpoint_accuracy),
                        xytext=(-6 if last else 6, 6),
                        textcoords="offset points",
                        ha="right" if last else "left",
                        fontsize="small",
                        color=colours[d],
                    )
            acc.set_ylabel("midpoint-probe accuracy")
            acc.set_title(
                "EM vs Neutral: separation along the difference of means", loc="left", fontsize="medium"
            )
            top = max(
                (
                    pl.midpoint_accuracy
                    for p in result.pairs
                    for pl in p.layers
                    if pl.midpoint_accuracy is not None
                ),
                default=1.0,
            )
            acc.set_ylim(min(0.45, CHANCE - 0.05), min(1.02, max(top + 0.05, CHANCE + 0.1)))
            acc.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
            acc.grid(alpha=0.3)
            acc.legend(fontsize="small", frameon=False, loc="best")
            eff.set_ylabel("Cohen's d")
            eff.axhline(0.0, color="0.4", lw=0.6)
            eff.grid(alpha=0.3)
        axes[-1][0].set_xlabel("layer")
        axes[-1][0].xaxis.get_major_locator().set_params(integer=True)
        models = sorted({s.model_name for s in result.splits if s.model_name})
        fig.suptitle(", ".join(models) or "activations", fontsize="medium")
        fig.tight_layout()
        try:
            fig.savefig(path, format=suffix[1:], dpi=dpi)
        except OSError as exc:
            raise PlotError(f"--plot {path}: cannot write it ({exc.strerror or exc}).") from None
        finally:
            plt.close(fig)
