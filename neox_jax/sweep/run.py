"""Training-dynamics sweeps: revisions x tasks -> OUT/results.jsonl (+ plots and summary.md, neox_jax/sweep/report.py).

For each revision: resolve it (one request: commit and file hashes; every revision is resolved before any work, so a
misspelt step fails at once), fetch and verify, convert into the neox-jax cache (once), load, and evaluate each task
with the project's lm-eval backend (neox_jax.evaluation.harness.NeoXLM, as scripts/evaluate.py does), appending one
line per (revision, task):

    {"revision", "step", "commit", "task", "metrics", "fingerprint", "duplicate_of", "seconds"}

One process: the jitted programs are keyed by config and shapes, so every revision after the first reuses them.
While revision i is evaluated, a background thread downloads, converts and loads revision i+1; revision i's weights
are dropped before revision i+2 is loaded, so at most two revisions' weights are held (neox_jax/sweep/prefetch.py).
Rerunning the command skips the (revision, task) pairs already in results.jsonl; a sweep killed mid-write leaves at
most a torn last line, which the next run drops (neox_jax/sweep/resume.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from neox_jax.errors import NeoXError
from neox_jax.store import hub
from neox_jax.sweep.prefetch import Revisions
from neox_jax.sweep.resume import append_rows, check_settings, read_rows

RESULTS = "results.jsonl"
SETTINGS = "sweep.json"
PYTHIA_SCHEDULES = ("log", "all")


@dataclass
class SweepConfig:
    model: str
    revisions: list[str]
    tasks: list[str]
    output: str
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: str | None = None
    data_dir: str | None = None
    dtype: str = "float32"
    batch_size: int = 8
    bootstrap_iters: int = 100000
    skip_duplicates: bool = False

    def identity(self) -> dict:
        """What makes two runs' rows comparable: a rerun into the same OUT must agree on these."""
        return {k: getattr(self, k) for k in ("model", "limit", "num_fewshot", "dtype", "bootstrap_iters")}


def revisions_from(revisions: str | None = None, steps: str | None = None, pythia: str | None = None) -> list[str]:
    """--revisions step0,step1000 | --steps START:STOP:STEP (inclusive of STOP) | --pythia-steps log|all."""
    if sum(x is not None for x in (revisions, steps, pythia)) != 1:
        raise NeoXError("give exactly one of --revisions, --steps, --pythia-steps")
    if revisions is not None:
        out = [r.strip() for r in revisions.split(",") if r.strip()]
    elif steps is not None:
        try:
            start, stop, step = (int(x) for x in steps.split(":"))
            if step <= 0:
                raise ValueError
        except ValueError:
            raise NeoXError(
                f"--steps {steps!r}: expected START:STOP:STEP integers, STEP > 0 (e.g. 0:143000:10000)"
            ) from None
        out = [f"step{n}" for n in range(start, stop + 1, step)]
    else:
        if pythia not in PYTHIA_SCHEDULES:
            raise NeoXError(f"--pythia-steps {pythia!r}: expected one of {PYTHIA_SCHEDULES}")
        # log: every log-spaced step (0, 1, 2, ..., 512), then doubling thousands (1000, 2000, ..., 128000), the last
        log = [0, *(2**i for i in range(10)), *(1000 * 2**i for i in range(8)), 143000]
        out = [f"step{n}" for n in (hub.pythia_steps() if pythia == "all" else log)]
    if not out:
        raise NeoXError("no revisions to sweep")
    dup = sorted({r for r in out if out.count(r) > 1})
    if dup:
        raise NeoXError(f"revisions listed twice: {dup}")
    return out


# ---------------------------------------------------------------------------------------------- the sweep
def _task_specs(cfg: SweepConfig):
    from lm_eval.tasks import TaskManager

    from neox_jax.evaluation.tasks import task_specs

    specs = task_specs(cfg.tasks, cfg.data_dir)
    tm = TaskManager(include_path=cfg.include_path, include_defaults=False)
    if any(specs[n] == n and n not in tm.all_tasks for n in cfg.tasks):  # a built-in task: the full index
        tm = TaskManager(include_path=cfg.include_path)
    unknown = [n for n in cfg.tasks if specs[n] == n and n not in tm.all_tasks and not Path(n).is_file()]
    if unknown:
        raise NeoXError(f"unknown task(s) {unknown}; `lm-eval ls tasks` lists them (local data: --data-dir)")
    return specs, tm


def evaluate_task(model, task: str, spec: str, tm, cfg: SweepConfig) -> dict:
    """One task on a loaded model through NeoXLM + lm-eval's simple_evaluate: that task's results dict."""
    from lm_eval import simple_evaluate

    from neox_jax.evaluation.harness import NeoXLM

    lm = NeoXLM(model=model, batch_size=cfg.batch_size)
    res = simple_evaluate(
        model=lm,
        tasks=[spec],
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=tm,
        bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False,
    )
    return res["results"][task]


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Runs (or resumes) the sweep; returns {"evaluated": n pairs, "skipped": n already done, "rows": all rows}."""
    out = Path(cfg.output)
    check_settings(out / SETTINGS, cfg.identity(), "sweep")
    if cfg.data_dir:
        os.environ["NEOX_JAX_DATA_DIR"] = cfg.data_dir  # the local task loaders read it
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap forks; forking a JAX process can hang
    rows = read_rows(out / RESULTS)
    done = {(r["revision"], r["task"]) for r in rows}
    first_with = {}  # fingerprint -> the first revision that had it (earlier rows first)
    for r in rows:
        if r.get("fingerprint"):
            first_with.setdefault(r["fingerprint"], r["revision"])
    specs, tm = _task_specs(cfg)
    revs = Revisions(  # every revision resolved here: all named errors before any work
        cfg.model, cfg.revisions, cfg.dtype, skip_duplicates=cfg.skip_duplicates, first_with=first_with
    )
    todo = [r for r in cfg.revisions if any((r, t) not in done for t in cfg.tasks)]
    log(
        f"sweep {cfg.model}: {len(cfg.revisions)} revisions x {len(cfg.tasks)} tasks; "
        f"{len(done & {(r, t) for r in cfg.revisions for t in cfg.tasks})} pairs already in {out / RESULTS}"
    )
    evaluated = 0
    for cur in revs.prepared(todo):  # the next revision loads while this one is evaluated
        if cur.duplicate_of:
            log(
                f"{cur.revision}: weights identical to {cur.duplicate_of} (fingerprint "
                f"{cur.fingerprint[:12]})" + ("; skipped" if cur.model is None else "")
            )
        for task in cfg.tasks:
            if (cur.revision, task) in done:
                continue
            t0 = time.time()
            metrics = None if cur.model is None else evaluate_task(cur.model, task, specs[task], tm, cfg)
            row = {
                "revision": cur.revision,
                "step": hub.step_of(cur.revision),
                "commit": cur.commit,
                "task": task,
                "metrics": metrics,
                "fingerprint": cur.fingerprint,
                "duplicate_of": cur.duplicate_of,
                "seconds": round(time.time() - t0, 3),
            }
            append_rows(out / RESULTS, [row])
            rows.append(row)
            evaluated += cur.model is not None
            log(f"{cur.revision} {task}: {_headline(metrics)} ({row['seconds']:.1f} s)")
    from neox_jax.sweep.report import write_report

    wanted = [r for r in rows if r["revision"] in cfg.revisions and r["task"] in cfg.tasks]
    report = write_report(out, cfg.model, wanted)
    log(f"results: {out / RESULTS}; summary: {report['summary']}; plots: {', '.join(report['plots']) or 'none'}")
    return {"evaluated": evaluated, "skipped": len(done), "rows": rows, **report}


def _headline(metrics: dict | None) -> str:
    if metrics is None:
        return "skipped (duplicate)"
    vals = [
        f"{k.split(',')[0]} {v:.4g}"
        for k, v in metrics.items()
        if "," in k and "_stderr" not in k and isinstance(v, (int, float))
    ]
    return ", ".join(vals)
