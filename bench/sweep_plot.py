"""A threshold sweep as a plot: speedup against quality, one point per method setting.

Input: a ``ragdec bench`` JSON whose methods are settings of one method, e.g.
``bild:fallback_threshold=0.6:rollback_threshold=2``, plus the reference (hf-greedy).
Usage: python -m ragdec.bench.sweep_plot RESULT.json PLOT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def settings_label(spec: str) -> str:
    """'bild:fallback_threshold=0.6:rollback_threshold=2' -> 'bild f0.6 r2'."""
    name, *settings = spec.split(":")
    short = [f"{key.split('_')[0][0]}{value}" for key, _, value in (s.partition("=") for s in settings)]
    return " ".join([name, *short])


def plot_sweep(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    reference = "hf-greedy" if "hf-greedy" in methods else next(iter(methods))
    speedup_key = f"speedup_vs_{reference.replace('-', '_')}"
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, quality_key, title in (
        (axes[0], "rougeL", "ROUGE-L F against the gold summaries"),
        (axes[1], "rougeL_vs_reference_method", f"ROUGE-L F against {reference}'s output"),
    ):
        for spec, entry in methods.items():
            x, y = entry.get(speedup_key), entry.get(quality_key)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], color="tab:red" if spec == reference else "tab:blue")
            ax.annotate(settings_label(spec), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if quality_key == "rougeL" and methods[reference].get("rougeL") is not None:
            ax.axhline(methods[reference]["rougeL"] - 0.01, color="gray", linestyle="--", linewidth=0.8)
            ax.text(ax.get_xlim()[0], methods[reference]["rougeL"] - 0.01, " 1 point below greedy", fontsize=7, va="bottom")
        ax.set_xlabel(f"decode speedup vs {reference} (median of per-prompt ratios)")
        ax.set_ylabel(quality_key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    settings = result["settings"]
    fig.suptitle(
        f"{result['workload']}, {result['model']} ({settings.get('dtype', 'float32')}), "
        f"{settings['prompts']} prompts, {settings['max_new_tokens']} new tokens at most; {result['machine']['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    plot_sweep(json.loads(Path(args[0]).read_text()), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
