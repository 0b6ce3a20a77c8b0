"""A sweep's pictures and table: OUT/<task>.png (each metric against training step) and OUT/summary.md.

Plots use matplotlib's headless Agg backend: log-x (symlog, so step 0 is shown), a band of +-1 stderr where lm-eval
gives one, and revisions whose weights duplicate another's marked with a red x. Revisions with no step (e.g. `main`)
are listed in the summary but not plotted.
"""

from __future__ import annotations

import math
from pathlib import Path


def metric_keys(rows: list[dict]) -> list[str]:
    """The numeric metrics of a task's rows, as lm-eval names them ("acc,none"), stderrs excluded, first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k, v in (r.get("metrics") or {}).items():
            if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and k not in keys:
                keys.append(k)
    return keys


def _stderr(metrics: dict, key: str) -> float | None:
    name, _, filt = key.partition(",")
    v = metrics.get(f"{name}_stderr,{filt}")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def plot_task(path: Path, model: str, task: str, rows: list[dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.get("step") is not None and r.get("metrics")), key=lambda r: r["step"])
    keys = metric_keys(rows)
    if not rows or not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 2.6 * len(keys)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        pts = [
            (r["step"], r["metrics"][key], _stderr(r["metrics"], key), r.get("duplicate_of"))
            for r in rows
            if isinstance(r["metrics"].get(key), (int, float))
        ]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, marker="o", ms=3, lw=1.2, color="tab:blue")
        band = [(p[0], p[1] - p[2], p[1] + p[2]) for p in pts if p[2] is not None]
        if band:
            ax.fill_between(
                [b[0] for b in band],
                [b[1] for b in band],
                [b[2] for b in band],
                color="tab:blue",
                alpha=0.2,
                lw=0,
                label="± stderr",
            )
        dups = [p for p in pts if p[3]]
        if dups:
            ax.scatter(
                [p[0] for p in dups],
                [p[1] for p in dups],
                marker="x",
                s=60,
                color="red",
                zorder=3,
                label="weights identical to another revision",
            )
        if "perplexity" in key and min(y) > 0 and all(b[1] > 0 for b in band):  # log only if all of it fits
            ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_ylabel(key.split(",")[0])
        ax.grid(True, alpha=0.3)
        if band or dups:
            ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("training step")
    axes[0, 0].set_title(f"{model}: {task}", fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Written to a temporary name and renamed: an interrupted run leaves the last good picture."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_over_steps(path: Path, title: str, series: dict[str, list[tuple[int, float]]], ylabel: str) -> Path | None:
    """The per-item studies' plots: one line per series of (step, value) points against training step (symlog x, so
    step 0 shows). None when nothing has a step (e.g. a local checkpoint)."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def summary_markdown(model: str, rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [f"# Sweep: {model}", ""]
    for task in tasks:
        trows = sorted(
            (r for r in rows if r["task"] == task), key=lambda r: (r["step"] is None, r["step"] or 0, r["revision"])
        )
        keys = metric_keys(trows)
        lines += [
            f"## {task}",
            "",
            "| revision | step | commit | " + " | ".join(k.split(",")[0] for k in keys) + " | duplicate of |",
            "|---|---|---|" + "---|" * len(keys) + "---|",
        ]
        for r in trows:
            cells = []
            for k in keys:
                v = (r.get("metrics") or {}).get(k)
                err = _stderr(r.get("metrics") or {}, k)
                cells.append(
                    "skipped"
                    if r.get("metrics") is None
                    else ""
                    if not isinstance(v, (int, float))
                    else f"{v:.4f}" + (f" ± {err:.4f}" if err is not None else "")
                )
            lines.append(
                f"| {r['revision']} | {'' if r['step'] is None else r['step']} | {r['commit'][:10]} | "
                + " | ".join(cells)
                + f" | {r.get('duplicate_of') or ''} |"
            )
        lines.append("")
    dups = sorted({(r["revision"], r["duplicate_of"]) for r in rows if r.get("duplicate_of")})
    lines += ["## Integrity", ""]
    if dups:
        lines += [f"- **{a}** serves weights bit-identical to **{b}** (same weights fingerprint)" for a, b in dups]
    else:
        lines.append("- every revision's weights differ from every other's (weights fingerprints)")
    return "\n".join(lines) + "\n"


def write_report(out: Path, model: str, rows: list[dict]) -> dict:
    """Writes OUT/<task>.png for each task and OUT/summary.md; returns their paths."""
    plots = []
    for task in dict.fromkeys(r["task"] for r in rows):
        p = plot_task(out / f"{task}.png", model, task, [r for r in rows if r["task"] == task])
        if p is not None:
            plots.append(str(p))
    summary = out / "summary.md"
    tmp = summary.with_name(summary.name + ".tmp")
    tmp.write_text(summary_markdown(model, rows))
    tmp.replace(summary)
    return {"summary": str(summary), "plots": plots}
