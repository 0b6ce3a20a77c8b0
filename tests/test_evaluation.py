"""neox-jax through lm-evaluation-harness gives lm-eval's own `hf` backend's numbers, on a tiny random GPT-NeoX with
the real 20B tokenizer, over the local-data tasks (lambada_openai, piqa, wsc, hellaswag, winogrande and ANLI on
invented fixtures), a rolling-window perplexity task and a generate_until task."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("lm_eval")

LIMITED = ["lambada_openai", "piqa", "hellaswag", "tinyshakespeare", "shakespeare_gen"]  # first 12 docs each
FULL = ["wsc", "winogrande", "anli_r1", "anli_r2", "anli_r3"]  # every doc (winogrande, ANLI: the fixtures)
PPL_METRICS = ("perplexity", "bits_per_byte")


def _run(lm, tm, names, limit):
    from lm_eval import simple_evaluate

    from neox_jax.evaluation.tasks import task_specs

    specs = task_specs(names)
    missing = [n for n in names if specs[n] == n and n != "shakespeare_gen"]
    assert not missing, f"local data not found for {missing}"
    return simple_evaluate(
        model=lm, tasks=list(specs.values()), limit=limit, task_manager=tm, log_samples=True, bootstrap_iters=0
    )


@pytest.fixture(scope="module")
def lms(eval_models):
    """{'neox-jax': NeoXLM, 'hf': lm-eval's HFLM} over the same tiny model."""
    from lm_eval.models.huggingface import HFLM

    from neox_jax.evaluation.harness import NeoXLM

    hf_dir, ckpt = eval_models
    return {
        "neox-jax": NeoXLM(pretrained=str(ckpt), batch_size=4),
        "hf": HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32"),
    }


@pytest.fixture(scope="module")
def both(lms, task_manager):
    """{'neox-jax': {task: (metrics, samples)}, 'hf': ...} over every task, each backend in one process."""
    out = {}
    for name, lm in lms.items():
        out[name] = {}
        for names, limit in ((LIMITED, 12), (FULL, None)):
            r = _run(lm, task_manager, names, limit)
            out[name].update({t: (r["results"][t], r["samples"][t]) for t in r["results"]})
    return out


def _metrics(res: dict) -> dict:
    return {k: v for k, v in res.items() if "," in k and "_stderr" not in k}


@pytest.mark.parametrize("task", LIMITED + FULL)
def test_same_metrics_as_hf_backend(both, task):
    ours, ours_samples = both["neox-jax"][task]
    ref, ref_samples = both["hf"][task]
    assert _metrics(ours).keys() == _metrics(ref).keys() and _metrics(ref)
    for key, want in _metrics(ref).items():
        got = ours[key]
        if any(p in key for p in PPL_METRICS):
            assert got == pytest.approx(want, rel=1e-4), key
        else:
            assert got == want, key  # accuracies (and exact_match) identical
    assert len(ours_samples) == len(ref_samples) > 0
    for a, b in zip(ours_samples, ref_samples):
        assert a["doc_id"] == b["doc_id"]
        for ra, rb in zip(a["resps"], b["resps"]):
            if isinstance(rb[0], str):  # generate_until: the same text
                assert ra == rb
            else:  # (log-likelihood, is_greedy) pairs, or a rolling log-likelihood
                np.testing.assert_allclose(
                    np.ravel(np.asarray(ra[0], float)), np.ravel(np.asarray(rb[0], float)), rtol=1e-5, atol=1e-4
                )


def test_generation_stops(both, tokenizer_file):
    """The generate_until task exercised both endings: continuations cut at a stop string (shorter than max_gen_toks,
    16) and continuations that ran to max_gen_toks."""
    from neox_jax.store.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    lengths = [len(tok.encode(s["resps"][0][0])) for s in both["hf"]["shakespeare_gen"][1]]
    assert min(lengths) < 10 and max(lengths) >= 14, lengths


def test_packed_scores_equal_one_request_at_a_time():
    """Shared contexts, duplicate requests, left truncation at max length, a one-token context, several trees per
    row, stacked layers, log-probabilities over fewer rows: the packed scorer gives what one unpadded forward per
    request gives."""
    from neox_jax.api import NeoX
    from neox_jax.evaluation.scoring import score_requests
    from neox_jax.model.config import preset
    from neox_jax.model.neox import init_params, stack_layers

    cfg, length = preset("tiny").replace(max_position_embeddings=64), 64
    params = init_params(cfg, seed=1)
    rng = np.random.RandomState(0)
    reqs = []
    for _ in range(12):
        ctx = rng.randint(0, cfg.vocab_size, rng.randint(1, 90)).tolist()  # some longer than max length
        reqs += [(ctx, rng.randint(0, cfg.vocab_size, rng.randint(1, 9)).tolist()) for _ in range(rng.randint(1, 4))]
    reqs += [reqs[3], ([7], rng.randint(0, cfg.vocab_size, length).tolist())]  # a duplicate; a full-length one
    model = NeoX(cfg, params)

    inputs = [(c + k)[-(length + 1) :][:-1] for c, k in reqs]
    grid = np.array([x + [0] * (length - len(x)) for x in inputs])  # right padding: causally invisible
    logits = model.logits(grid)  # one forward, [N, length, V]

    def expected(rows):  # over the first `rows` logits (a tokenizer smaller than the embedding), -inf past them
        want = []
        for x, (_, cont), lg in zip(inputs, reqs, logits):
            lg = np.where(np.arange(lg.shape[-1]) < rows, lg[len(x) - len(cont) : len(x)], -np.inf)
            logp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
            want.append((logp[np.arange(len(cont)), cont].sum(), bool((lg.argmax(-1) == cont).all())))
        return want

    want = expected(cfg.vocab_size)
    for p in (params, stack_layers(params)):
        got = score_requests(cfg, p, reqs, max_length=length, batch_rows=3, pack_length=32)
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
        assert [g[1] for g in got] == [w[1] for w in want]
    rows = cfg.vocab_size // 2  # logprob_vocab="tokenizer": normalised over these rows only
    want = expected(rows)
    got = score_requests(cfg, params, reqs, max_length=length, batch_rows=3, pack_length=32, logprob_rows=rows)
    finite = [i for i, w in enumerate(want) if np.isfinite(w[0])]
    assert 0 < len(finite) < len(want)  # some targets fall past the rows: log p = -inf, as the reference says
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_greedy_test_breaks_ties_like_argmax():
    """The scorer's greedy flag is argmax(logits) == target, the first maximum winning a tie, as in the hf backend;
    and its log-probabilities are log_softmax's."""
    from neox_jax.evaluation.scoring import logprob_and_greedy

    logits = np.array(
        [[0.0, 3.0, 3.0, 1.0], [0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 2.0, 5.0], [0.0, 1.0, 2.0, 7.0]], np.float32
    )
    targets = np.array([1, 2, 0, 2])
    lp, greedy = logprob_and_greedy(logits, targets)
    assert np.asarray(greedy).tolist() == (logits.argmax(-1) == targets).tolist() == [True, False, True, False]
    want = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(lp), want[np.arange(4), targets], rtol=1e-6)


@pytest.mark.parametrize("vocab", [50304, 50287, 3000])  # chunked (6288 wide), prime (one pass), short (one pass)
def test_chunked_sum_exp_matches_one_pass(vocab):
    """reductions.sum_exp (vocabulary rows cut into chunks for XLA CPU) equals the one-pass sum, and the scorer's
    log-probabilities built on it equal log_softmax's at the pythia vocabulary size."""
    import jax.numpy as jnp

    from neox_jax.evaluation.scoring import logprob_and_greedy
    from neox_jax.model.reductions import sum_exp

    x = np.random.default_rng(0).standard_normal((3, 5, vocab)).astype(np.float32) * 4
    m = x.max(-1, keepdims=True)
    got = np.asarray(sum_exp(jnp.asarray(x), jnp.asarray(m)))
    np.testing.assert_allclose(got, np.exp(x.astype(np.float64) - m).sum(-1), rtol=1e-5)
    targets = np.arange(15).reshape(3, 5) * 7
    lp, _ = logprob_and_greedy(jnp.asarray(x), jnp.asarray(targets))
    want = x - np.logaddexp.reduce(x.astype(np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(lp), np.take_along_axis(want, targets[..., None], -1)[..., 0], rtol=1e-5, atol=1e-5
    )


def test_cli_on_a_mesh_matches_hf(both, eval_models, tmp_path):
    """scripts/evaluate.py with the params split over data=2,model=4 (8 simulated devices): hf's metrics, the
    reference README's table layout, and the results JSON."""
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    out = tmp_path / "res" / "results.json"
    r = run_cli(
        "scripts/evaluate.py",
        "--checkpoint",
        eval_models[1],
        "--tasks",
        "lambada_openai,piqa",
        "--limit",
        "12",
        "--mesh",
        "data=2,model=4",
        "--batch-size",
        "4",
        "--bootstrap-iters",
        "0",
        "--output",
        out,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert "| Task | Metric | Value |" in r.stdout and "| piqa | acc | " in r.stdout
    assert f"results written to {out}" in r.stdout and not out.with_name("results.json.tmp").exists()
    results = json.loads(out.read_text())["results"]
    for task in ("lambada_openai", "piqa"):
        for key, want in _metrics(both["hf"][task][0]).items():
            assert results[task][key] == pytest.approx(want, rel=1e-4 if "perplexity" in key else 0), (task, key)


def test_unknown_task_lists_close_matches(eval_models, data_env, capsys):
    from neox_jax.cli import main

    assert main(["evaluate", "--checkpoint", str(eval_models[1]), "--tasks", "lambada_opena,piqa"]) == 1
    assert re.search("'lambada_opena' .*close: .*lambada_openai", capsys.readouterr().err)


def test_half_precision_close_to_float32(eval_models, data_env):
    from neox_jax.evaluation.harness import NeoXLM

    reqs = [("The quick brown fox", " jumps over the lazy dog"), ("To be, or not to be", ": that is the question")]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        lm = NeoXLM(pretrained=str(eval_models[1]), dtype=dtype, batch_size=2)
        scores[dtype] = [
            lp for lp, _ in lm._loglikelihood_tokens([(r, *lm._encode_pair(*r)) for r in reqs], disable_tqdm=True)
        ]
    np.testing.assert_allclose(scores["bfloat16"], scores["float32"], rtol=0.05)


def test_neox_jax_imports_without_lm_eval():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'lm_eval': raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import neox_jax, neox_jax.evaluation.tasks, neox_jax.evaluation.scoring\n"
        "try:\n"
        "    import neox_jax.evaluation.harness\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert "pip install 'neox-jax[eval]'" in run_cli("-c", code).stdout


# A user's own task over local files, the way lm-eval documents it: datasets' packaged `json` builder
JSON_TASK = """task: my_json_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
JSON_DOCS = [
    {"question": "The cat sat on the", "choices": [" mat", " moon", " idea"], "answer": 0},
    {"question": "Water boils at one hundred degrees", "choices": [" Celsius", " apples"], "answer": 0},
    {"question": "To be, or not to be:", "choices": [" that is the question", " a banana", " blue"], "answer": 0},
    {"question": "One, two, three,", "choices": [" seven", " four"], "answer": 1},
]


@pytest.fixture(scope="module")
def json_task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("json_task")
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSON_DOCS))
    (d / "my_json_mc.yaml").write_text(JSON_TASK.format(data=d / "docs.jsonl"))
    return d


@pytest.fixture(scope="module")
def cli_offline(eval_models, data_env, json_task_dir, tmp_path_factory):
    """`python -m neox_jax evaluate` offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) over the local json task and the
    local lambada_openai, with --log_samples --output: (results JSON, output folder)."""
    out = tmp_path_factory.mktemp("cli_offline") / "res.json"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out.parent / "cache")}
    run_cli(
        "-m", "neox_jax", "evaluate", "--checkpoint", eval_models[1], "--tasks", "my_json_mc,lambada_openai",
        "--include-path", json_task_dir, "--limit", "12", "--batch-size", "4", "--bootstrap-iters", "0",
        "--output", out, "--log_samples", env=offline,
    )  # fmt: skip
    return json.loads(out.read_text()), out.parent


def test_log_samples_writes_one_file_per_task(cli_offline, both):
    """--log_samples --output exits 0 and writes samples_TASK.jsonl beside the results: one line per document, each
    holding that document's requests (one per choice, or the one continuation), as lm-eval's hf backend records."""
    _, folder = cli_offline
    assert sorted(p.name for p in folder.glob("samples_*.jsonl")) == [
        "samples_lambada_openai.jsonl",
        "samples_my_json_mc.jsonl",
    ]
    rows = [json.loads(line) for line in (folder / "samples_my_json_mc.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(len(JSON_DOCS)))
    assert [len(r["resps"]) for r in rows] == [len(d["choices"]) for d in JSON_DOCS]
    rows = [json.loads(line) for line in (folder / "samples_lambada_openai.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [s["doc_id"] for s in both["hf"]["lambada_openai"][1]] and len(rows) == 12
    assert all(len(r["resps"]) == 1 for r in rows)


def test_local_json_task_runs_offline_like_hf(cli_offline, lms, json_task_dir, both):
    """A `dataset_path: json` task with local data_files, from --include-path, evaluates offline (the pre-check lets
    it through) and gives the metrics lm-eval's hf backend gives on the same model; so does the local lambada."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = cli_offline[0]["results"]
    tm = TaskManager(include_path=str(json_task_dir), include_defaults=False)
    ref = simple_evaluate(model=lms["hf"], tasks=["my_json_mc"], task_manager=tm, bootstrap_iters=0)["results"]
    assert _metrics(ref["my_json_mc"]) and _metrics(results["my_json_mc"]) == _metrics(ref["my_json_mc"])
    for key, want in _metrics(both["hf"]["lambada_openai"][0]).items():
        assert results["lambada_openai"][key] == pytest.approx(want, rel=1e-4 if "perplexity" in key else 0), key
