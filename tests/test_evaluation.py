"""neox-jax through lm-evaluation-harness gives lm-eval's own `hf` backend's numbers, on a tiny random GPT-NeoX with
the real 20B tokenizer, over the local-data tasks (lambada_openai, piqa, wsc, hellaswag, winogrande and ANLI on
invented fixtures), a rolling-window perplexity task and a generate_until task."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA, convert_hf, make_hf_model, run_cli

pytest.importorskip("lm_eval")

FIXTURES = ROOT / "tests" / "fixtures"
LIMITED = ["lambada_openai", "piqa", "hellaswag", "tinyshakespeare", "shakespeare_gen"]  # first 12 docs each
FULL = ["wsc", "winogrande", "anli_r1", "anli_r2", "anli_r3"]  # every doc (winogrande, ANLI: the fixtures)
PPL_METRICS = ("perplexity", "bits_per_byte")


@pytest.fixture(scope="module")
def data_env():
    if not (SHARED_DATA / "lambada_openai").is_dir():
        pytest.skip(f"reference data absent: {SHARED_DATA} (a fresh clone without ../shared/data)")
    old = os.environ.get("NEOX_JAX_DATA_DIR")
    os.environ["NEOX_JAX_DATA_DIR"] = os.pathsep.join([str(FIXTURES / "eval_data"), str(SHARED_DATA)])
    yield
    if old is None:
        os.environ.pop("NEOX_JAX_DATA_DIR")
    else:
        os.environ["NEOX_JAX_DATA_DIR"] = old


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory, tokenizer_file):
    """(HF directory with tokenizer, converted neox-jax checkpoint): a random GPT-NeoX of Pythia's vocabulary (50304
    rows; the 27 rows past the tokenizer's 50277 ids zeroed, so greedy decoding never picks them) and max length 128,
    so lambada contexts get truncated and tiny shakespeare takes several rolling windows."""
    import torch

    model = make_hf_model(
        seed=3,
        vocab_size=50304,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    with torch.no_grad():
        model.get_output_embeddings().weight[50277:] = 0
    d = tmp_path_factory.mktemp("eval") / "hf"
    model.save_pretrained(d)
    shutil.copyfile(tokenizer_file, d / "tokenizer.json")
    from convert.hf import tokenizer_config

    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(128)))
    ckpt = d.parent / "ckpt"
    convert_hf(d, ckpt)
    return d, ckpt


@pytest.fixture(scope="module")
def task_manager(data_env):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(FIXTURES / "eval_tasks"), include_defaults=False)


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
def both(eval_models, task_manager):
    """{'neox-jax': {task: (metrics, samples)}, 'hf': ...} over every task, each backend in one process."""
    from lm_eval.models.huggingface import HFLM

    from neox_jax.evaluation.harness import NeoXLM

    hf_dir, ckpt = eval_models
    lms = {
        "neox-jax": NeoXLM(pretrained=str(ckpt), batch_size=4),
        "hf": HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32"),
    }
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
    row, stacked layers: the packed scorer gives what one unpadded forward per request gives."""
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
    want = []
    for x, (_, cont), lg in zip(inputs, reqs, logits):
        lg = lg[len(x) - len(cont) : len(x)]
        logp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
        want.append((logp[np.arange(len(cont)), cont].sum(), bool((lg.argmax(-1) == cont).all())))
    for p in (params, stack_layers(params)):
        got = score_requests(cfg, p, reqs, max_length=length, batch_rows=3, pack_length=32)
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
