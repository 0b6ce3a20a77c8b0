"""`neox-jax serve --draft` (neox_jax/serve/spec_engine.py): with a draft, greedy completions from several concurrent
clients equal the plain server's and model.generate's token for token, their log-probabilities the plain server's;
a seeded sampled request's tokens do not depend on the batch it lands in; the speculative counters on /metrics move
as stated; repetition_penalty is refused (400); nothing compiles after warm-up; a draft with another tokenizer is
refused at startup. Tiny models (the target's logits scaled up so greedy has no near-ties; the draft a noisy copy
with more embedding rows, so both accept and reject paths run) on 127.0.0.1."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from test_serve import TIMEOUT, CompileCounter, _collect_ids, http

from neox_jax.api import NeoX
from neox_jax.model.config import preset
from neox_jax.model.neox import init_params
from neox_jax.serve import ServerThread, Service
from neox_jax.serve import rows as R
from neox_jax.store.tokenizer import Tokenizer

VOCAB, MAX_LEN, K = 320, 32, 3
PROMPTS = ["The quick brown", "Einstein was", "Hello, world! 1", "fox jumps over the", "German Empire"]
NEW = 12


def _noisy_copy(params, rows: int, noise: float, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = jax.tree.unflatten(
        treedef, [x + noise * (jnp.std(x) + 1e-3) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    extra = rows - params["embed_in"]["embedding"].shape[0]
    noisy["embed_in"]["embedding"] = jnp.pad(noisy["embed_in"]["embedding"], ((0, extra), (0, 0)))
    noisy["embed_out"]["kernel"] = jnp.pad(noisy["embed_out"]["kernel"], ((0, 0), (0, extra)))
    return noisy


@pytest.fixture(scope="module")
def pair(bpe_tokenizer):
    tok = Tokenizer.from_file(bpe_tokenizer)
    cfg = dataclasses.replace(preset("tiny"), vocab_size=VOCAB, num_hidden_layers=2)
    params = init_params(cfg, seed=0)
    params["embed_out"]["kernel"] = params["embed_out"]["kernel"] * 8.0
    target = NeoX(cfg, params, tok, path="tiny")
    draft = NeoX(dataclasses.replace(cfg, vocab_size=352), _noisy_copy(params, 352, 0.15), tok)
    return target, draft


@pytest.fixture(scope="module")
def counter():
    c = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(c)
    yield c
    jax.monitoring.unregister_event_duration_listener(c)


@pytest.fixture(scope="module")
def plain(pair):
    svc = Service.from_model(pair[0], max_batch=2, max_queue=16, max_model_len=MAX_LEN, chunk=4)
    with ServerThread(svc) as srv:
        yield srv


@pytest.fixture(scope="module")
def served(pair, counter):
    svc = Service.from_model(
        pair[0], max_batch=2, max_queue=16, max_model_len=MAX_LEN, chunk=2, draft=pair[1], draft_tokens=K
    )
    with ServerThread(svc) as srv:
        yield srv


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def _ask_all(srv, prompts, **kw):
    """Every prompt from its own client thread at once (odd ones streamed): [(text, tokens, token logprobs)]."""
    client, out = _client(srv), [None] * len(prompts)

    def ask(i):
        stream = i % 2 == 1
        r = client.completions.create(model=srv.svc.name, prompt=prompts[i], stream=stream, **kw)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        out[i] = (text, sum((lp.tokens for lp in lps), []), sum((lp.token_logprobs for lp in lps), []))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return out


def test_greedy_equals_the_plain_server_and_generate(served, plain, pair):
    target = pair[0]
    kw = dict(max_tokens=NEW, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    got, want = _ask_all(served, PROMPTS, **kw), _ask_all(plain, PROMPTS, **kw)
    ref = target.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[])
    assert [g[0] for g in got] == [w[0] for w in want] == ref.texts
    for g, w in zip(got, want):
        assert g[1] == w[1] and len(g[1]) == NEW  # token for token
        np.testing.assert_allclose(g[2], w[2], atol=1e-4)
    rate = served.svc.metrics.spec[2]._value.get() / served.svc.metrics.spec[1]._value.get()
    assert 0.05 < rate < 0.95  # the draft is partly right: accept and reject paths both ran


def test_echo_logprobs_equal_the_plain_server(served, plain):
    ids = [5, 17, 99, 200, 42, 7, 8]
    kw = dict(prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=3)
    got = _client(served).completions.create(model=served.svc.name, **kw).choices[0].logprobs
    want = _client(plain).completions.create(model=plain.svc.name, **kw).choices[0].logprobs
    assert got.tokens == want.tokens and got.token_logprobs[0] is None
    np.testing.assert_allclose(got.token_logprobs[1:], want.token_logprobs[1:], atol=1e-4)


def test_seeded_sampling_does_not_depend_on_the_company(served):
    sched = served.svc.scheduler
    tok = sched.tok
    sampled = {"temperature": np.float32(0.9), "top_k": np.int32(40), "top_p": np.float32(0.95)}
    mine = {**sampled, "key": R.seed_key(11), "min_tokens": np.int32(4)}
    alone, got_alone, done = _collect_ids(sched, tok.encode(PROMPTS[0]), 14, mine)
    sched.submit(alone)
    assert done.wait(TIMEOUT)
    first = list(got_alone)
    others = [
        _collect_ids(sched, tok.encode(p), 5 + i, {**sampled, "key": R.seed_key(i)} if i % 2 else {})
        for i, p in enumerate(PROMPTS[1:])
    ]
    sched.submit(others[0][0])
    req, got, done = _collect_ids(sched, tok.encode(PROMPTS[0]), 14, mine)
    sched.submit(req)
    for r, *_ in others[1:]:
        sched.submit(r)
    assert done.wait(TIMEOUT) and all(d.wait(TIMEOUT) for *_, d in others)
    assert got == first and len(got) == 14
    other_seed, got_other, done = _collect_ids(sched, tok.encode(PROMPTS[0]), 14, {**mine, "key": R.seed_key(12)})
    sched.submit(other_seed)
    assert done.wait(TIMEOUT) and got_other != first  # the seed does matter


def _spec_counts(srv):
    return tuple(c._value.get() for c in srv.svc.metrics.spec)


def test_counters_move_as_stated(served, plain):
    before, gen0 = _spec_counts(served), served.svc.metrics.generation_tokens._value.get()
    r = _client(served).completions.create(
        model=served.svc.name, prompt=PROMPTS[1], max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 20
    drafts, drafted, accepted = (a - b for a, b in zip(_spec_counts(served), before))
    assert served.svc.metrics.generation_tokens._value.get() - gen0 == 20
    # one draft of K tokens per round; a round keeps its accepted drafts and one more (the last round maybe fewer)
    assert drafted == K * drafts and 0 <= accepted <= drafted
    assert drafts <= 20 - 1 <= drafts + accepted
    text = http(served.url + "/metrics")[1]
    for name in ("drafts_total", "draft_tokens_total", "accepted_tokens_total"):
        assert f"neox_jax:spec_decode_num_{name}" in text
    assert f"neox_jax:spec_decode_draft_tokens {float(K)}" in text
    assert "spec_decode" not in http(plain.url + "/metrics")[1]


def test_repetition_penalty_is_refused(served, plain):
    body = {"prompt": "Hello", "max_tokens": 2, "repetition_penalty": 1.2}
    status, r = http(served.url + "/v1/completions", body)
    assert status == 400 and r["error"]["param"] == "repetition_penalty"
    assert "repetition_penalty" in r["error"]["message"] and "draft" in r["error"]["message"]
    assert http(plain.url + "/v1/completions", body)[0] == 200
    assert http(served.url + "/v1/completions", {**body, "repetition_penalty": 1.0})[0] == 200
    req, *_ = _collect_ids(served.svc.scheduler, [5, 6], 2, {"repetition_penalty": np.float32(1.2)})
    with pytest.raises(ValueError, match="repetition_penalty"):  # the Python API: refused, the model loop unharmed
        served.svc.scheduler.submit(req)
    assert served.svc.scheduler.failed is None


def test_nothing_compiles_after_warm_up(served, counter):
    eng = served.svc.scheduler.engine
    assert eng.cache_len == MAX_LEN + K and eng.length_buckets == [MAX_LEN + K] and eng.row_buckets == [1, 2]
    assert eng.compiles == 1 + len(eng.buckets) + len(eng.row_buckets) * len(eng.length_buckets)
    client, before = _client(served), counter.n  # (other tests compile their own programs: count from here)
    for i, n in enumerate((1, 7, 20, 28)):  # every prompt bucket, greedy and sampled, logprobs, echo, min_tokens
        client.completions.create(
            model=served.svc.name,
            prompt=list(range(3, 3 + n)),
            max_tokens=MAX_LEN - n,
            temperature=0.8 * (i % 2),
            top_p=0.9,
            seed=i,
            logprobs=i % 3,
            echo=i % 2 == 0,
            extra_body={"top_k": 3, "min_tokens": 1},
        )
    assert counter.n == before and eng.compiles == 1 + len(eng.buckets) + len(eng.row_buckets)


def test_cli_refuses_a_draft_with_another_tokenizer(pair, bpe_tokenizer, tmp_path, capsys):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    from neox_jax.cli import main
    from neox_jax.store.checkpoint import save_params

    target, draft = pair
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["other words entirely"] * 5, trainers.BpeTrainer(vocab_size=280, show_progress=False))
    other = tmp_path / "other.json"
    hf.save(str(other))
    save_params(tmp_path / "target", target.config, target.params, tokenizer_file=bpe_tokenizer)
    save_params(tmp_path / "draft", draft.config, draft.params, tokenizer_file=other)
    argv = ["serve", "--checkpoint", str(tmp_path / "target"), "--draft", str(tmp_path / "draft")]
    assert main([*argv, "--no-compile-cache", "--max-model-len", "16"]) == 1
    err = capsys.readouterr().err
    assert "draft's tokenizer" in err and "draft/tokenizer.json" in err and "target/tokenizer.json" in err, err
