"""lm-evaluation-harness's `local-completions` model (what docs/serving.md recommends) against `neox-jax serve` on
127.0.0.1 gives the in-process neox-jax backend's metrics and log-likelihoods: a random GPT-NeoX of Pythia's vocabulary
(50304 output rows, the 20B tokenizer's 50277 ids), piqa's first 12 documents (24 loglikelihood requests, 6 HTTP
calls of 4 prompts, each with a 60 s timeout and one retry)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's `api` extra, in neox-jax's `eval` extra

TASK, LIMIT = "piqa", 12


def _evaluate(lm, task_manager):
    from lm_eval import simple_evaluate

    from neox_jax.evaluation.tasks import task_specs

    spec = task_specs([TASK])[TASK]
    assert spec != TASK, "local piqa data not found"
    r = simple_evaluate(
        model=lm, tasks=[spec], limit=LIMIT, task_manager=task_manager, log_samples=True, bootstrap_iters=0
    )
    return r["results"][TASK], r["samples"][TASK]


@pytest.fixture(scope="module")
def in_process(eval_models, task_manager):
    from neox_jax.evaluation.harness import NeoXLM

    return _evaluate(NeoXLM(pretrained=str(eval_models[1]), batch_size=4), task_manager)


@pytest.fixture(scope="module")
def through_server(eval_models, task_manager):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    import neox_jax
    from neox_jax.serve import ServerThread, Service

    hf_dir, ckpt = eval_models
    svc = Service.from_model(neox_jax.load(ckpt), max_batch=4, max_queue=16, max_model_len=128, chunk=1, name="tiny")
    with ServerThread(svc) as srv:
        lm = LocalCompletionsAPI(
            model="tiny",
            base_url=srv.url + "/v1/completions",
            tokenizer=str(hf_dir),  # the HF folder (tokenizer.json + tokenizer_config.json) the fixture saved
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            batch_size=4,
            num_concurrent=1,
            max_retries=1,
            timeout=60,
            max_length=128,  # lm-eval sends at most 127 tokens + 1 generated: piqa's documents are shorter
        )
        result = _evaluate(lm, task_manager)
        served = sum(svc.metrics.requests.labels(r)._value.get() for r in ("stop", "length"))
    return (*result, served)


def test_local_completions_equals_in_process_backend(in_process, through_server):
    ours, ours_samples = in_process
    api, api_samples, served = through_server
    assert served == 2 * LIMIT  # every loglikelihood request went through the server
    metrics = {k: v for k, v in ours.items() if "," in k and "_stderr" not in k}
    assert metrics and {k: api[k] for k in metrics} == metrics  # acc, acc_norm identical
    assert [s["doc_id"] for s in api_samples] == [s["doc_id"] for s in ours_samples]
    for a, b in zip(api_samples, ours_samples):
        (la, ga), (lb, gb) = zip(*(r[0] for r in a["resps"])), zip(*(r[0] for r in b["resps"]))
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-4)  # server float32 sums vs the scorer's float64
        assert ga == gb  # is_greedy, from the server's top_logprobs
