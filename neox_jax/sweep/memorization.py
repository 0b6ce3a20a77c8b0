"""Memorization across checkpoints, as in the Pythia papers: for each training sequence, the first k tokens are the
context, greedy decoding makes the next n, and the score is the fraction of them equal to the true next n tokens
(1.0: memorized). k = n = 32 is the papers' setting.

    run_memorization(MemorizationConfig(model="EleutherAI/pythia-70m", revisions=["step0", "step143000"],
                                        data="pile/document", items=range(0, 4096), output="mem/70m"))

writes OUT/results.jsonl (rows {revision, step, item, score}, resumable: neox_jax/sweep/resume.py), OUT/summary.md
and summary.json (per revision: items, memorized count and fraction, mean score), OUT/memorization.png (against
training step) and OUT/memorized-evals/<revision>.csv with the columns of EleutherAI's eval_memorization.py output
(index, score).

EleutherAI's script calls transformers' generate with min_length = max_length = k + n, which keeps the end-of-text
id from ever being chosen; so does this by default (allow_eos=True: plain greedy). Decoding is the Generator's: one
prefill and one decode program for the whole run (batch x k -> n tokens, no padding as every context has k tokens),
the revision's params swapped in under the same compiled programs.
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
from neox_jax.sweep.resume import by_revision, check_settings, run_study, write_atomic

RESULTS = "results.jsonl"
SETTINGS = "memorization.json"


@dataclasses.dataclass
class MemorizationConfig:
    model: str  # hub id (with revisions) or a local checkpoint directory
    revisions: list[str] | None
    data: str  # the dataset's path prefix (PREFIX.bin / PREFIX.idx), for the settings record
    items: Sequence[int]
    output: str
    context: int = 32  # k
    continuation: int = 32  # n
    batch: int = 64
    dtype: str = "float32"
    mesh: object = None  # a jax Mesh or a spec string ("data=2,model=4")
    allow_eos: bool = False

    def identity(self) -> dict:
        """What makes two runs' rows comparable: a rerun into the same OUT must agree on these."""
        return {
            "study": "memorization",
            "model": self.model,
            "data": str(Path(self.data).resolve()) if self.data else None,
            "context": self.context,
            "continuation": self.continuation,
            "dtype": self.dtype,
            "allow_eos": self.allow_eos,
        }


def greedy_scores(generate, contexts: np.ndarray, truth: np.ndarray, suppress: Sequence[int] = ()) -> np.ndarray:
    """contexts [B, k], truth [B, n] int -> the fraction of the n greedy tokens equal to truth, [B] float64.
    generate: a neox_jax Generator (compiled programs kept between calls)."""
    n = truth.shape[1]
    res = generate.generate(
        [list(map(int, c)) for c in contexts], max_new_tokens=n, stop_token_ids=[], suppress_token_ids=suppress
    )
    made = np.asarray(res.token_ids, np.int64)  # [B, n]: no stop id, so every row runs n steps
    if made.shape != truth.shape:
        raise NeoXError(f"greedy decoding made {made.shape} tokens, expected {truth.shape}")
    return (made == truth).mean(axis=1)


class MemorizationStudy:
    key = "score"

    def __init__(self, context: int, continuation: int, allow_eos: bool):
        self.k, self.n, self.allow_eos = context, continuation, allow_eos
        self.gen, self.suppress = None, ()

    def start(self, model) -> None:
        from neox_jax.inference.generate import Generator

        cfg = model.config
        if self.k + self.n > cfg.max_position_embeddings:
            raise NeoXError(
                f"--context {self.k} + --continuation {self.n} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if self.gen is None:  # no tokenizer: ids only, and greedy over the whole (padded) vocabulary, as HF does
            self.gen = Generator(cfg, model.params, None, mesh=model.mesh)
        self.gen.params = model.params
        self.suppress = () if self.allow_eos else (cfg.eos_token_id,)

    def values(self, sequences: np.ndarray) -> list[float]:
        k, n = self.k, self.n
        return greedy_scores(self.gen, sequences[:, :k], sequences[:, k : k + n], self.suppress).tolist()

    def stop(self) -> None:
        self.gen.release_params()


def summarize(rows: list[dict], revisions: Sequence[str], duplicates: dict) -> list[dict]:
    """Per revision: items, memorized (score 1.0) count and fraction, mean score."""
    out = []
    for rev, rs in by_revision(rows, revisions).items():
        scores = np.asarray([r["score"] for r in rs], np.float64)
        out.append(
            {
                "revision": rev,
                "step": rs[0]["step"] if rs else None,
                "items": len(rs),
                "memorized": int((scores == 1.0).sum()),
                "memorized_fraction": float((scores == 1.0).mean()) if len(rs) else None,
                "mean_score": float(scores.mean()) if len(rs) else None,
                "duplicate_of": duplicates.get(rev),
            }
        )
    return out


def summary_markdown(model: str, k: int, n: int, summary: list[dict]) -> str:
    lines = [
        f"# Memorization: {model}",
        "",
        f"Context {k} tokens, greedy continuation {n} tokens; memorized = all {n} equal to the training data.",
        "",
        "| revision | step | items | memorized | fraction | mean score | duplicate of |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        frac = "" if s["memorized_fraction"] is None else f"{s['memorized_fraction']:.4f}"
        mean = "" if s["mean_score"] is None else f"{s['mean_score']:.4f}"
        step = "" if s["step"] is None else s["step"]
        lines.append(
            f"| {s['revision']} | {step} | {s['items']} | {s['memorized']} | {frac} | {mean} | "
            f"{s['duplicate_of'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def write_evals_csv(folder: Path, revision: str, rows: list[dict]) -> Path:
    """EleutherAI's eval_memorization.py columns: index (the item), score; sorted by index."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{revision}.csv"
    body = "".join(f"{r['item']},{r['score']!r}\n" for r in sorted(rows, key=lambda r: r["item"]))
    write_atomic(path, "index,score\n" + body)
    return path


def run_memorization(cfg: MemorizationConfig, dataset=None, log=print) -> dict:
    """Runs (or resumes) the study. dataset: anything with len() and [i] -> 1-d token array (default: the
    neox_jax.data.IndexedDataset at cfg.data). Returns {"rows", "summary", "scored", "skipped", "files", "compiles"}."""
    if cfg.context < 1 or cfg.continuation < 1:
        raise NeoXError(f"--context {cfg.context} and --continuation {cfg.continuation} must both be >= 1")
    if dataset is None:
        from neox_jax.data import IndexedDataset

        dataset = IndexedDataset(cfg.data)
    out = Path(cfg.output)
    check_settings(out / SETTINGS, cfg.identity())
    mesh = cfg.mesh
    if isinstance(mesh, str):
        from neox_jax.parallel.sharding import make_mesh

        mesh = make_mesh(mesh)
    revs = Revisions(cfg.model, cfg.revisions, cfg.dtype, mesh=mesh)
    study = MemorizationStudy(cfg.context, cfg.continuation, cfg.allow_eos)
    res = run_study(study, revs, dataset, cfg.items, cfg.context + cfg.continuation, cfg.batch, out / RESULTS, log=log)
    summary = summarize(res["rows"], revs.names, res["duplicates"])
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_atomic(out / "summary.md", summary_markdown(cfg.model, cfg.context, cfg.continuation, summary))
    per_rev = by_revision(res["rows"], revs.names)
    csvs = [write_evals_csv(out / "memorized-evals", rev, rs) for rev, rs in per_rev.items()]
    pts = [(s["step"], s) for s in summary if s["step"] is not None and s["items"]]
    plot = plot_over_steps(
        out / "memorization.png",
        f"{cfg.model}: memorization ({cfg.context} + {cfg.continuation} tokens)",
        {
            "memorized (score 1.0)": [(st, s["memorized_fraction"]) for st, s in pts],
            "mean score": [(st, s["mean_score"]) for st, s in pts],
        },
        "fraction",
    )
    files = {"results": str(out / RESULTS), "summary": str(out / "summary.md"), "csv": [str(c) for c in csvs]}
    files["plot"] = str(plot) if plot else None
    log(f"results: {files['results']}; summary: {files['summary']}; csv: {out / 'memorized-evals'}; plot: {plot}")
    compiles = study.gen.compiles if study.gen else 0  # prefill + decode: 2 for the whole run
    return {**res, "summary": summary, "files": files, "compiles": compiles}
