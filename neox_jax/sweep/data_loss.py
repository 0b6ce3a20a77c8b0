"""Training-data loss across checkpoints: each sequence's mean next-token loss under each revision, so one sees what
a checkpoint makes of the batch it trained on at step t, and of batches before and after it.

    run_data_loss(DataLossConfig(model="EleutherAI/pythia-160m", revisions=["step1000", "step2000", "step4000"],
                                 data="pile/document", items=pythia_items(2000, 1024), output="loss/160m"))

writes OUT/results.jsonl (rows {revision, step, item, loss, data_step}, resumable: neox_jax/sweep/resume.py),
OUT/summary.md and summary.json (mean loss per revision and data step) and OUT/data-loss.png (one line per data step,
against the checkpoint's step). loss = -(1/(L-1)) sum_t log p(x_t | x_<t) over an item's L tokens, in float32 logits
with the sum in float64; sequences go through the scorer (neox_jax/evaluation/scoring.py), batched, one compile per
row shape.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neox_jax.errors import NeoXError
from neox_jax.sweep.prefetch import Revisions
from neox_jax.sweep.report import plot_over_steps
from neox_jax.sweep.resume import check_settings, run_study, write_atomic

RESULTS = "results.jsonl"
SETTINGS = "data-loss.json"


@dataclasses.dataclass
class DataLossConfig:
    model: str  # hub id (with revisions) or a local checkpoint directory
    revisions: list[str] | None
    data: str  # the dataset's path prefix, for the settings record
    items: Sequence[int]
    output: str
    data_steps: dict[int, int] | None = None  # item -> the training step whose batch holds it (from --steps)
    batch: int = 8
    dtype: str = "float32"
    mesh: object = None

    def identity(self) -> dict:
        return {
            "study": "data-loss",
            "model": self.model,
            "data": str(Path(self.data).resolve()) if self.data else None,
            "dtype": self.dtype,
        }


def sequence_losses(model, sequences: Sequence[np.ndarray], batch_rows: int) -> list[float]:
    """Each sequence's mean next-token loss (its first token is the context of the rest) under a neox_jax.NeoX."""
    from neox_jax.evaluation.scoring import score_requests
    from neox_jax.parallel import sharding

    cfg, mesh = model.config, model.mesh
    limit = cfg.max_position_embeddings
    for j, s in enumerate(sequences):
        if not 2 <= len(s) <= limit + 1:
            raise NeoXError(
                f"sequence {j} has {len(s)} tokens: the loss needs 2 to max_position_embeddings + 1 = {limit + 1}"
            )
    place = None if mesh is None else (lambda x: sharding.put_batch(x, mesh))
    scored = score_requests(
        cfg,
        model.params,
        [([int(s[0])], [int(t) for t in s[1:]]) for s in sequences],
        max_length=limit,
        batch_rows=batch_rows,
        row_multiple=sharding.data_size(mesh),
        place=place,
    )
    return [-logp / (len(s) - 1) for (logp, _), s in zip(scored, sequences)]


class DataLossStudy:
    key = "loss"

    def __init__(self, batch: int):
        self.batch, self.model = batch, None

    def start(self, model) -> None:
        self.model = model

    def values(self, sequences) -> list[float]:
        return sequence_losses(self.model, sequences, self.batch)

    def stop(self) -> None:
        self.model = None


def summarize(rows: list[dict], revisions: Sequence[str], duplicates: dict) -> list[dict]:
    """Per revision and data step: items and mean loss."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["revision"], r.get("data_step")), []).append(r["loss"])
    order = {r: k for k, r in enumerate(revisions)}
    steps = {r["revision"]: r["step"] for r in rows}
    return [
        {
            "revision": rev,
            "step": steps[rev],
            "data_step": ds,
            "items": len(v),
            "mean_loss": float(np.mean(v)),
            "duplicate_of": duplicates.get(rev),
        }
        for (rev, ds), v in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] is None, kv[0][1] or 0))
    ]


def summary_markdown(model: str, summary: list[dict]) -> str:
    lines = [
        f"# Training-data loss: {model}",
        "",
        "Mean next-token loss (nats) of each training sequence, averaged per revision and data step.",
        "",
        "| revision | step | data step | items | mean loss | duplicate of |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        step = "" if s["step"] is None else s["step"]
        ds = "" if s["data_step"] is None else s["data_step"]
        lines.append(
            f"| {s['revision']} | {step} | {ds} | {s['items']} | {s['mean_loss']:.5f} | {s['duplicate_of'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def run_data_loss(cfg: DataLossConfig, dataset=None, log=print) -> dict:
    """Runs (or resumes) the study. dataset: anything with len() and [i] -> 1-d token array (default: the
    neox_jax.data.IndexedDataset at cfg.data). Returns {"rows", "summary", "scored", "skipped", "files"}."""
    if dataset is None:
        from neox_jax.data import IndexedDataset

        dataset = IndexedDataset(cfg.data)
    out = Path(cfg.output)
    check_settings(out / SETTINGS, cfg.identity(), "data-loss run")
    mesh = cfg.mesh
    if isinstance(mesh, str):
        from neox_jax.parallel.sharding import make_mesh

        mesh = make_mesh(mesh)
    revs = Revisions(cfg.model, cfg.revisions, cfg.dtype, mesh=mesh)
    steps = cfg.data_steps or {}
    res = run_study(
        DataLossStudy(cfg.batch),
        revs,
        dataset,
        cfg.items,
        None,
        cfg.batch,
        out / RESULTS,
        extra=lambda i: {"data_step": steps.get(int(i))},
        log=log,
    )
    summary = summarize(res["rows"], revs.names, res["duplicates"])
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_atomic(out / "summary.md", summary_markdown(cfg.model, summary))
    series: dict[str, list] = {}
    for s in summary:
        if s["step"] is not None:
            name = "items" if s["data_step"] is None else f"batch of step {s['data_step']}"
            series.setdefault(name, []).append((s["step"], s["mean_loss"]))
    plot = plot_over_steps(out / "data-loss.png", f"{cfg.model}: training-data loss", series, "mean loss (nats)")
    files = {"results": str(out / RESULTS), "summary": str(out / "summary.md"), "plot": str(plot) if plot else None}
    log(f"results: {files['results']}; summary: {files['summary']}; plot: {plot}")
    return {**res, "summary": summary, "files": files}
