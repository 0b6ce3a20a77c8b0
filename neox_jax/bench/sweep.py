"""A sweep of K revisions in one process vs K separate convert + evaluate runs, same revisions, same machine, same run.

    neox-jax benchmark sweep                  # K=4 revisions of a tiny GPT-NeoX (Pythia vocabulary)
    neox-jax benchmark sweep --k 6 --limit 50 --shape small

The revisions are served by the loopback Hub stand-in of the tests (tests/hub_stub.py, 127.0.0.1), so both arms
download, verify and convert the same files; nothing leaves the machine. Arm "sweep": one `neox-jax sweep` process.
Arm "separate": for each revision, `neox-jax convert hf REPO OUT --revision R` then `neox-jax evaluate
--checkpoint OUT`, each a fresh process (the hand-written loop a sweep replaces). Reported: wall seconds of each arm,
their ratio, and peak RSS (the sweep process; the largest of the separate processes), each read from wait4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neox_jax.bench._common import PACKAGE_ROOT, child_env, markdown_table, require, write_json
from neox_jax.errors import NeoXError
from neox_jax.evaluation.tasks import data

TESTS = PACKAGE_ROOT / "tests"  # tests/hub_stub.py: the loopback Hub, in a source checkout only

SHAPES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 1024},
}
REPO = "EleutherAI/pythia-benchtiny"


def make_revisions(root: Path, k: int, shape: str, tokenizer: Path) -> dict[str, Path]:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    out = {}
    for i in range(k):
        torch.manual_seed(i)
        cfg = GPTNeoXConfig(
            vocab_size=50304,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            use_parallel_residual=True,
            bos_token_id=0,
            eos_token_id=0,
            **SHAPES[shape],
        )
        d = root / f"rev{i}"
        GPTNeoXForCausalLM(cfg).eval().save_pretrained(d)
        shutil.copyfile(tokenizer, d / "tokenizer.json")
        out[f"step{i * 1000}"] = d
    return out


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4, help="revisions (default 4)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--tasks", default="lambada_openai")
    ap.add_argument("--limit", type=int, default=20, help="documents per task (default 20)")
    ap.add_argument("--data-dir", default=str(next(iter(data.data_dirs()), "")), help="the reference data folder")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    tokenizer = Path(a.data_dir) / "20B_tokenizer.json"
    if not tokenizer.is_file():
        sys.exit(f"needs {tokenizer} and the task data beside it (--data-dir)")
    require(["torch", "transformers"], "the revisions are built in transformers")
    if not (TESTS / "hub_stub.py").is_file():
        raise NeoXError(f"this benchmark needs a source checkout: {TESTS / 'hub_stub.py'} (the loopback Hub) is absent")
    sys.path.insert(0, str(TESTS))
    from hub_stub import HubStub

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        revs = make_revisions(tmp / "src", a.k, a.shape, tokenizer)
        common = ["--tasks", a.tasks, "--limit", str(a.limit), "--bootstrap-iters", "1000"]
        py = sys.executable
        with HubStub({REPO: revs}) as stub:
            base = child_env(HF_ENDPOINT=stub.url, HF_HUB_OFFLINE="0", NEOX_JAX_DATA_DIR=a.data_dir, TQDM_DISABLE="1")
            env = {**base, "HF_HUB_CACHE": str(tmp / "hf-sweep"), "NEOX_JAX_CACHE": str(tmp / "nx-sweep")}
            sweep_s, sweep_rss = run(
                [
                    py,
                    "-m",
                    "neox_jax",
                    "sweep",
                    "--model",
                    REPO,
                    "--revisions",
                    ",".join(revs),
                    "--output",
                    str(tmp / "sweep"),
                    *common,
                ],
                env,
            )
            env = {**base, "HF_HUB_CACHE": str(tmp / "hf-sep"), "NEOX_JAX_CACHE": str(tmp / "nx-sep")}
            sep_s, sep_rss, per = 0.0, 0.0, []
            for rev in revs:
                ckpt = tmp / "sep" / rev
                convert = [py, "-m", "neox_jax", "convert", "hf", REPO, str(ckpt), "--revision", rev, "--quiet"]
                c_s, c_rss = run(convert, env)
                e_s, e_rss = run(
                    [
                        py,
                        "-m",
                        "neox_jax",
                        "evaluate",
                        "--checkpoint",
                        str(ckpt),
                        *common,
                        "--output",
                        str(tmp / "sep" / f"{rev}.json"),
                    ],
                    env,
                )
                sep_s, sep_rss = sep_s + c_s + e_s, max(sep_rss, c_rss, e_rss)
                per.append(c_s + e_s)
        # same numbers from both arms (the sweep's rows vs the separate runs' results)
        rows = [json.loads(x) for x in (tmp / "sweep" / "results.jsonl").read_text().splitlines()]
        task0 = a.tasks.split(",")[0]
        same = all(
            r["metrics"] == json.loads((tmp / "sep" / f"{r['revision']}.json").read_text())["results"][r["task"]]
            for r in rows
            if r["task"] == task0
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = [
        {
            "arm": f"sweep (1 process, {a.k} revisions)",
            "seconds": sweep_s,
            "s/revision": sweep_s / a.k,
            "peak RSS MB": sweep_rss,
        },
        {
            "arm": f"separate ({2 * a.k} processes: convert + evaluate)",
            "seconds": sep_s,
            "s/revision": sep_s / a.k,
            "peak RSS MB": sep_rss,
        },
    ]
    print(markdown_table(table, ["arm", "seconds", "s/revision", "peak RSS MB"]))
    print(
        f"\nseparate / sweep = {sep_s / sweep_s:.2f}x  (shape {a.shape}, tasks {a.tasks}, limit {a.limit}; "
        f"same metrics in both arms: {same})"
    )
    write_json(
        "sweep",
        {
            "k": a.k,
            "shape": a.shape,
            "tasks": a.tasks,
            "limit": a.limit,
            "sweep_seconds": sweep_s,
            "separate_seconds": sep_s,
            "ratio": sep_s / sweep_s,
            "sweep_peak_rss_mb": sweep_rss,
            "separate_peak_rss_mb": sep_rss,
            "separate_per_revision": per,
            "same_metrics": same,
        },
        a.out,
    )


if __name__ == "__main__":
    main()
