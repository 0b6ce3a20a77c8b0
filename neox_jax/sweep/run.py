"""Training-dynamics sweeps: revisions x tasks -> OUT/results.jsonl (+ plots and summary.md, neox_jax/sweep/report.py).

For each revision: resolve it (one request: commit and file hashes; every revision is resolved before any work, so a
misspelt step fails at once), fetch and verify, convert into the neox-jax cache (once), load, and evaluate each task
with the project's lm-eval backend (neox_jax.evaluation.NeoXLM, as scripts/evaluate.py does), appending one line per
(revision, task):

    {"revision", "step", "commit", "task", "metrics", "fingerprint", "duplicate_of", "seconds"}

One process: the jitted programs are keyed by config and shapes, so every revision after the first reuses them.
While revision i is evaluated, a background thread downloads, converts and loads revision i+1; revision i's weights
are dropped before revision i+2 is loaded, so at most two revisions' weights are held. Rerunning the command skips
the (revision, task) pairs already in results.jsonl; a sweep killed mid-write leaves at most a torn last line, which
the next run drops.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neox_jax.errors import NeoXError
from neox_jax.store import hub

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


def fingerprint(r: hub.Resolved) -> str | None:
    """Weights fingerprint: sha256 over (file name, sha256) of the weight files; bit-identical weights in the same
    file layout give the same fingerprint, whatever the commit (None when the Hub gave no sha256)."""
    shas = [(f, r.expected[f].get("sha256")) for f in r.weight_files()]
    if not shas or any(s is None for _, s in shas):
        return None
    return hashlib.sha256("\n".join(f"{f} {s}" for f, s in shas).encode()).hexdigest()


def tensor_fingerprint(params) -> str:
    """For revisions whose weight files differ in layout (safetensors vs .bin, other sharding): sha256 over every
    converted parameter (path, dtype, shape, bytes)."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, x in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape}\n".encode())
        h.update(a.tobytes())
    return "tensors:" + h.hexdigest()


def _first(first_with: dict, fp: str | None, revision: str) -> str | None:
    """The earlier revision with this fingerprint (None if this is the first); records this one if it is."""
    if fp is None:
        return None
    first = first_with.setdefault(fp, revision)
    return first if first != revision else None


# ---------------------------------------------------------------------------------------------- results.jsonl
def read_results(out: str | os.PathLike) -> list[dict]:
    """The rows so far. A torn last line (a sweep killed mid-write) is dropped, and cut from the file so the next
    append starts on a fresh line; a bad line elsewhere is an error naming it."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise NeoXError(f"{path}: line {i + 1} is not JSON ({e}); fix or remove it") from None
            good = "".join(ln + "\n" for ln in lines[:i] if ln.strip())  # the torn tail, cut atomically
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(good)
            tmp.replace(path)
    return rows


def append_row(out: Path, row: dict) -> None:
    with open(out / RESULTS, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _check_settings(cfg: SweepConfig, out: Path) -> None:
    f = out / SETTINGS
    ident = cfg.identity()
    if f.is_file():
        old = json.loads(f.read_text())
        differ = {k: (old.get(k), v) for k, v in ident.items() if old.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise NeoXError(f"{f}: {out} holds a sweep with other settings ({what}); use another --output")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text(json.dumps(ident, indent=1) + "\n")
        tmp.replace(f)


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class Prepared:
    revision: str
    commit: str
    fingerprint: str | None
    model: object  # neox_jax.NeoX, or None when skipped as a duplicate


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
    import neox_jax
    from neox_jax.api import hub_converter

    checkpoint_for = hub_converter().checkpoint_for

    out = Path(cfg.output)
    _check_settings(cfg, out)
    if cfg.data_dir:
        os.environ["NEOX_JAX_DATA_DIR"] = cfg.data_dir  # the local task loaders read it
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap forks; forking a JAX process can hang
    rows = read_results(out)
    done = {(r["revision"], r["task"]) for r in rows}
    first_with = {}  # fingerprint -> the first revision that had it (earlier rows first)
    for r in rows:
        if r.get("fingerprint"):
            first_with.setdefault(r["fingerprint"], r["revision"])
    specs, tm = _task_specs(cfg)
    s = hub.Settings.from_env()
    resolved = [hub.resolve(cfg.model, rev, s) for rev in cfg.revisions]  # all named errors before any work
    todo = [r for r in resolved if any((r.revision, t) not in done for t in cfg.tasks)]
    log(
        f"sweep {cfg.model}: {len(cfg.revisions)} revisions x {len(cfg.tasks)} tasks; "
        f"{len(done & {(r, t) for r in cfg.revisions for t in cfg.tasks})} pairs already in {out / RESULTS}"
    )
    # duplicates from the weight files' hashes, known before any download; if the revisions' files differ in layout
    # (or the Hub gave no sha256), from the converted tensors instead, once each is loaded
    file_fp = {r.revision: fingerprint(r) for r in resolved}
    by_tensors = len({tuple(r.weight_files()) for r in resolved}) > 1 or None in file_fp.values()
    dup_of = {} if by_tensors else {r.revision: _first(first_with, file_fp[r.revision], r.revision) for r in resolved}

    def prepare(r: hub.Resolved) -> Prepared:
        if cfg.skip_duplicates and dup_of.get(r.revision):  # known from the files: not even downloaded
            return Prepared(r.revision, r.commit, file_fp[r.revision], None)
        model = neox_jax.load(checkpoint_for(r, cfg.dtype, progress=False, settings=s), cfg.dtype)
        fp = tensor_fingerprint(model.params) if by_tensors else file_fp[r.revision]
        return Prepared(r.revision, r.commit, fp, model)

    evaluated = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep-prefetch") as pool:
        nxt = pool.submit(prepare, todo[0]) if todo else None
        for i in range(len(todo)):
            cur = nxt.result()  # the previous revision's weights were released at the end of the last iteration
            nxt = pool.submit(prepare, todo[i + 1]) if i + 1 < len(todo) else None
            if by_tensors:
                dup_of[cur.revision] = _first(first_with, cur.fingerprint, cur.revision)
                if dup_of[cur.revision] and cfg.skip_duplicates:
                    cur.model = None
            if dup_of.get(cur.revision):
                log(
                    f"{cur.revision}: weights identical to {dup_of[cur.revision]} (fingerprint "
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
                    "duplicate_of": dup_of.get(cur.revision),
                    "seconds": round(time.time() - t0, 3),
                }
                append_row(out, row)
                rows.append(row)
                evaluated += cur.model is not None
                log(f"{cur.revision} {task}: {_headline(metrics)} ({row['seconds']:.1f} s)")
            del cur  # drop this revision's weights before the one after next is loaded
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
