"""Loaders that read the evaluation data from local files in their original layouts, for the task YAMLs beside this
file (`custom_dataset: !function data.<task>`), giving the same fields as the Hugging Face datasets lm-eval's built-in
tasks read, so the built-in prompts and metrics apply unchanged.

Data directories: `data_dir` (task metadata, e.g. lm-eval's `--metadata '{"data_dir": "..."}'`), else the
NEOX_JAX_DATA_DIR environment variable (one directory or several joined by os.pathsep), else ../shared/data beside a
source checkout. Each task takes the first directory that holds its files:

    lambada_openai/lambada_test.jsonl            {"text"}                                  (OpenAI LAMBADA test)
    piqa/valid.jsonl, piqa/valid-labels.lst      {"goal", "sol1", "sol2"} + one label a line  (PIQA dev)
    wsc/val.jsonl                                raw SuperGLUE WSC (nested "target", boolean "label")
    hellaswag/hellaswag_val_full.txt.bz2         6 lines an item: context, gold label, 4 endings (pre-processed)
    winogrande/dev.jsonl                         {"sentence", "option1", "option2", "answer": "1"|"2"}
    anli/R1/test.jsonl (R2, R3)                  {"context" or "premise", "hypothesis", "label": "e"|"n"|"c"}
    tinyshakespeare/input.txt                    plain text
Self-contained (lm-eval loads it by file path): no neox_jax import.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path

ENV_VAR = "NEOX_JAX_DATA_DIR"
CHECKOUT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"

FILES = {
    "lambada_openai": ["lambada_openai/lambada_test.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "wsc": ["wsc/val.jsonl"],
    "hellaswag": ["hellaswag/hellaswag_val_full.txt.bz2"],
    "winogrande": ["winogrande/dev.jsonl"],
    "anli_r1": ["anli/R1/test.jsonl"],
    "anli_r2": ["anli/R2/test.jsonl"],
    "anli_r3": ["anli/R3/test.jsonl"],
    "tinyshakespeare": ["tinyshakespeare/input.txt"],
}


def data_dirs(data_dir=None) -> list[Path]:
    """The directories searched, in order."""
    spec = data_dir or os.environ.get(ENV_VAR)
    if spec:
        return [Path(p).expanduser() for p in str(spec).split(os.pathsep) if p]
    return [CHECKOUT_DATA] if CHECKOUT_DATA.is_dir() else []


def find(task: str, data_dir=None) -> Path | None:
    """The first data directory holding every file of `task`, or None."""
    for d in data_dirs(data_dir):
        if all((d / f).is_file() for f in FILES[task]):
            return d
    return None


def _files(task: str, data_dir) -> list[Path]:
    d = find(task, data_dir)
    if d is None:
        where = ", ".join(str(p) for p in data_dirs(data_dir)) or f"(none: set {ENV_VAR} or pass --data-dir)"
        raise FileNotFoundError(
            f"{task}: local data not found: expected {' and '.join(FILES[task])} under one of {where}"
        )
    return [d / f for f in FILES[task]]


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return rows


def _need(path: Path, n: int, row: dict, keys) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}: item {n} lacks {missing} (has {sorted(row)})")


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def lambada_openai(data_dir=None, **_):
    (path,) = _files("lambada_openai", data_dir)
    rows = _jsonl(path)
    for n, r in enumerate(rows):
        _need(path, n, r, ["text"])
    return _dataset("test", [{"text": r["text"]} for r in rows])


def piqa(data_dir=None, **_):
    path, labels_path = _files("piqa", data_dir)
    rows = _jsonl(path)
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(rows)} items in {path}")
    out = []
    for n, (r, lab) in enumerate(zip(rows, labels)):
        _need(path, n, r, ["goal", "sol1", "sol2"])
        if lab not in ("0", "1"):
            raise ValueError(f"{labels_path}:{n + 1}: label {lab!r}, expected 0 or 1")
        out.append({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)})
    return _dataset("validation", out)


def _fix_wsc_span(ex: dict, k: str) -> None:
    """SuperGLUE's `wsc.fixed`: make a span's text a substring of the passage (case of its first word, a trailing
    period, a newline inside the span), as the Hugging Face / TFDS super_glue builder does."""
    text = ex[k + "_text"]
    if text in ex["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
        return
    if "theyscold" in text:  # the builders set this index (their text replacement is a no-op)
        ex["span2_index"] = 10
    first = ex["text"].split()[ex[k + "_index"]]
    text = (text[0].lower() if first[0].islower() else text[0].upper()) + text[1:]
    ex[k + "_text"] = text.rstrip(".").replace("\n", " ")


def wsc(data_dir=None, **_):
    (path,) = _files("wsc", data_dir)
    out = []
    for n, r in enumerate(_jsonl(path)):
        _need(path, n, r, ["text", "target", "idx", "label"])
        t = r["target"]
        ex = {
            "text": r["text"],
            "span1_index": t["span1_index"],
            "span2_index": t["span2_index"],
            "span1_text": t["span1_text"],
            "span2_text": t["span2_text"],
        }
        _fix_wsc_span(ex, "span1")
        _fix_wsc_span(ex, "span2")
        out.append({**ex, "idx": r["idx"], "label": int(bool(r["label"]))})
    return _dataset("validation", out)


def _hellaswag_preprocess(text: str) -> str:  # lm-eval's hellaswag/utils.py preprocess
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(data_dir=None, **_):
    """The pre-processed text file has each item's context already joined ("activity: ctx_a ctx_b", without lm-eval's
    capitalisation of ctx_b), so scores are close to, not equal to, the Hub task's."""
    (path,) = _files("hellaswag", data_dir)
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, expected 6 per item (context, label, 4 endings)")
    out = []
    for i in range(0, len(lines), 6):
        ctx, label, *endings = lines[i : i + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: label {label!r}, expected 0..3")
        out.append(
            {
                "query": _hellaswag_preprocess(ctx),
                "choices": [_hellaswag_preprocess(e) for e in endings],
                "label": label.strip(),
                "gold": int(label),
            }
        )
    return _dataset("validation", out)


def winogrande(data_dir=None, **_):
    (path,) = _files("winogrande", data_dir)
    out = []
    for n, r in enumerate(_jsonl(path)):
        _need(path, n, r, ["sentence", "option1", "option2", "answer"])
        if str(r["answer"]) not in ("1", "2") or "_" not in r["sentence"]:
            raise ValueError(f"{path}: item {n}: answer must be 1 or 2 and the sentence must hold a '_'")
        out.append(
            {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])}
        )
    return _dataset("validation", out)


ANLI_LABELS = {"e": 0, "n": 1, "c": 2}  # facebook/anli: entailment, neutral, contradiction


def _anli(task: str, data_dir):
    (path,) = _files(task, data_dir)
    out = []
    for n, r in enumerate(_jsonl(path)):
        premise = r.get("premise", r.get("context"))
        if premise is None:
            raise ValueError(f"{path}: item {n} has neither 'premise' nor 'context' (has {sorted(r)})")
        _need(path, n, r, ["hypothesis", "label"])
        label = ANLI_LABELS.get(r["label"], r["label"])
        if label not in (0, 1, 2):
            raise ValueError(f"{path}: item {n}: label {r['label']!r}, expected e / n / c")
        out.append(
            {
                "uid": str(r.get("uid", n)),
                "premise": premise,
                "hypothesis": r["hypothesis"],
                "label": label,
                "reason": r.get("reason", ""),
            }
        )
    return _dataset("test", out)


def anli_r1(data_dir=None, **_):
    return _anli("anli_r1", data_dir)


def anli_r2(data_dir=None, **_):
    return _anli("anli_r2", data_dir)


def anli_r3(data_dir=None, **_):
    return _anli("anli_r3", data_dir)


def tinyshakespeare(data_dir=None, doc_chars: int = 2000, **_):
    """Documents of whole speeches (blank-line separated), each at least doc_chars characters (the last may be
    shorter), for rolling-window perplexity."""
    (path,) = _files("tinyshakespeare", data_dir)
    docs, cur = [], []
    for para in path.read_text(encoding="utf-8").split("\n\n"):
        cur.append(para)
        if sum(len(p) for p in cur) >= doc_chars:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return _dataset("test", [{"text": d} for d in docs])
