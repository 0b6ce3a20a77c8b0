"""The OpenAI-compatible server over 127.0.0.1 with the official `openai` client: completions (plain and streamed)
equal model.generate, 16 concurrent clients, a row's ids independent of its company (float32 and bfloat16), errors,
429, client disconnects, nothing compiled after warm-up, and SIGTERM. One tiny model (vocab 320) with a byte-level
BPE tokenizer (300 ids) trained here. Every request has a client timeout and max_retries=0."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest

import neox_jax
from conftest import ROOT, make_hf_model, run_cli, train_byte_bpe
from neox_jax.serve import ServerThread, Service
from neox_jax.serve import rows as R
from neox_jax.serve.chat import compile_template
from neox_jax.serve.engine import Engine
from neox_jax.serve.scheduler import Request, Scheduler

MODEL_VOCAB, TOK_VOCAB, MAX_LEN = 320, 300, 32
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Einstein was born in the German Empire.",
    "Über naïve café: déjà vu, 東京 and Zürich.",
    "Hello, world! 1 2 3 4 5 6 7 8 9 10",
] * 20
WORDS = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "Einstein",
    "was",
    "born",
    "German",
    "Empire",
    "Hello",
    "world",
]
PROMPTS = [" ".join(WORDS[i % 14 : i % 14 + 1 + i % 4]) for i in range(16)]  # 16 different prompts of 1-4 words
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf_serve")
    make_hf_model(seed=7, vocab_size=MODEL_VOCAB).save_pretrained(src)
    train_byte_bpe(src / "tokenizer.json", CORPUS, TOK_VOCAB)
    out = tmp_path_factory.mktemp("ckpt_serve") / "tiny"
    run_cli("-m", "convert", "hf", src, out, "--quiet")
    return out


@pytest.fixture(scope="module")
def lm(ckpt):
    return neox_jax.load(ckpt)


REF_NEW = 12


@pytest.fixture(scope="module")
def ref(lm):
    """model.generate's greedy ids for every prompt (one call: one set of compiled programs)."""
    return lm.generate(PROMPTS, max_new_tokens=REF_NEW).token_ids


def ref_text(lm, ref, i, n):
    """(text, finish_reason) of model.generate's greedy completion of PROMPTS[i] with max_new_tokens n."""
    ids = ref[i][:n]
    eos = ids[-1] == lm.tokenizer.eos_id
    return lm.tokenizer.decode(ids[:-1] if eos else ids), "stop" if eos else "length"


class CompileCounter:
    """Counts XLA backend compiles anywhere in the process (jax.monitoring)."""

    def __init__(self):
        self.n = 0

    def __call__(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


@pytest.fixture(scope="module")
def served(lm):
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    svc = Service.from_model(lm, max_batch=16, max_queue=16, max_model_len=MAX_LEN, chunk=4)
    with ServerThread(svc) as srv:
        srv.compiles_at_start = counter.n
        srv.counter = counter
        yield srv
    jax.monitoring.unregister_event_duration_listener(counter)


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def test_completions_equal_generate_plain_and_streamed(served, client, lm, ref):
    name = served.svc.name
    want = [ref_text(lm, ref, i, 10) for i in range(3)]
    r = client.completions.create(model=name, prompt=PROMPTS[:3], max_tokens=10, temperature=0)
    assert [(c.text, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert r.usage.completion_tokens == sum(len(x[:10]) for x in ref[:3])
    ids = lm.tokenizer.encode(PROMPTS[0])  # a token-id prompt, streamed
    pieces, reasons = [], []
    for chunk in client.completions.create(model=name, prompt=ids, max_tokens=10, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert ("".join(pieces), reasons[-1]) == want[0]
    assert len(pieces) > 1  # it did stream


def test_stop_strings_and_echo_logprobs(served, client, lm, ref):
    name = served.svc.name
    full = ref_text(lm, ref, 1, REF_NEW)[0]
    assert len(full) >= 5
    stop = full[3:5]
    r = client.completions.create(
        model=name, prompt=PROMPTS[1], max_tokens=REF_NEW, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    # echo + logprobs (what lm-eval's local-completions asks for loglikelihoods) equals the forward pass
    ids = lm.tokenizer.encode(PROMPTS[2])
    r = client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    logits = lm.logits(np.array([ids + ref[2][:1]]))[0]  # [T, MODEL_VOCAB]
    at = np.arange(len(ids)), ids[1:] + ref[2][:1]
    want = jax.nn.log_softmax(logits, axis=-1)[at]  # over every output row: lm-eval's hf backend and the scorer's
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)  # the prompt's and the generated token's
    tokenizer_only = jax.nn.log_softmax(logits[:, :TOK_VOCAB], axis=-1)[at]  # --logprob-vocab tokenizer
    assert np.abs(np.asarray(tokenizer_only) - want).min() > 1e-3  # so the choice is visible here
    assert r.choices[0].text.startswith(PROMPTS[2])


def test_sixteen_concurrent_clients_get_their_own_greedy_text(served, client, lm, ref):
    want = [ref_text(lm, ref, i, REF_NEW)[0] for i in range(16)]
    out = [None] * 16

    def ask(i):
        out[i] = client.completions.create(
            model=served.svc.name, prompt=PROMPTS[i], max_tokens=REF_NEW, temperature=0, stream=i % 2 == 1
        )
        if i % 2:
            out[i] = "".join(c.choices[0].text for c in out[i])
        else:
            out[i] = out[i].choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert out == want


def _collect_ids(sched, prompt_ids, n, rows_update=None):
    got, done = [], threading.Event()

    def deliver(d):
        got.extend(d.ids)
        if d.finish_reason:
            done.set()

    row = {k: v[0] for k, v in R.empty_rows(1, MODEL_VOCAB).items()}
    row["max_new"] = np.int32(n)
    row.update(rows_update or {})
    return Request(prompt_ids, n, row, [], [], deliver), got, done


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ids_do_not_depend_on_the_company(ckpt, dtype, served):
    """A prompt's greedy ids alone == among 15 others (different lengths, sampling and greedy, joining mid-way)."""
    if dtype == "float32":
        sched = served.svc.scheduler
    else:  # its own small engine in bfloat16
        half = neox_jax.load(ckpt, dtype="bfloat16")
        from neox_jax.serve.metrics import Metrics

        sched = Scheduler(
            Engine(half.config, half.params, slots=16, max_model_len=16, vocab_limit=TOK_VOCAB, chunk=4),
            half.tokenizer,
            Metrics(16, 32),
            max_queue=32,
        )
        sched.start()
        assert sched.ready.wait(600)
    tok = sched.tok
    target = tok.encode(PROMPTS[5])
    alone, got, done = _collect_ids(sched, target, 8)
    sched.submit(alone)
    assert done.wait(TIMEOUT)
    alone_ids = list(got)
    others = []
    for i in range(15):  # greedy and sampled neighbours, several prompt lengths
        upd = {"temperature": np.float32(0.9), "top_k": np.int32(5), "key": R.seed_key(i)} if i % 3 == 0 else {}
        others.append(_collect_ids(sched, tok.encode(PROMPTS[i])[:6], 4 + i % 5, upd))
    for r, *_ in others[:7]:
        sched.submit(r)
    req, got, done = _collect_ids(sched, target, 8)
    sched.submit(req)
    for r, *_ in others[7:]:
        sched.submit(r)
    assert done.wait(TIMEOUT) and all(d.wait(TIMEOUT) for *_, d in others)
    assert got == alone_ids and len(got) == 8
    if dtype != "float32":
        sched.shutdown(5)


def test_compacted_rows_and_width_buckets_equal_generate(lm):
    """Rows finishing at different times (the live rows gathered into 4, 2, 1-row programs, not contiguous) and a row
    growing past the 64-slot width: every row's greedy ids == model.generate's."""
    from neox_jax.serve.metrics import Metrics

    eng = Engine(lm.config, lm.params, slots=4, max_model_len=80, vocab_limit=TOK_VOCAB, chunk=4)
    assert eng.row_buckets == [1, 2, 4] and eng.length_buckets == [64, 80]
    used = set()
    decode = eng.decode

    def spy(force_done):
        out = decode(force_done)
        used.add(eng.last_bucket)
        return out

    eng.decode = spy
    sched = Scheduler(eng, lm.tokenizer, Metrics(4, 8), max_queue=8)
    sched.start()
    try:
        assert sched.ready.wait(600)
        prompts = [list(range(3, 3 + n)) for n in (5, 9, 40, 12)]
        news = (3, 21, 30, 8)
        want = lm.generate(prompts, max_new_tokens=max(news), stop_token_ids=[]).token_ids
        reqs = [_collect_ids(sched, p, n) for p, n in zip(prompts, news)]
        for r, *_ in reqs:
            sched.submit(r)
        assert all(d.wait(TIMEOUT) for *_, d in reqs)
        assert [got for _, got, _ in reqs] == [w[:n] for w, n in zip(want, news)]
        assert {r for r, _ in used} >= {1, 2, 4} and {w for _, w in used} == {64, 80}
    finally:
        sched.shutdown(5)


def test_every_row_decode_slices_instead_of_gathering(lm):
    """take_rows / put_rows with rows None (the every-row program): the state itself over the whole cache, a slice
    equal to gathering arange(B) over fewer slots, and writing back touches only those slots."""
    from neox_jax.serve.engine import put_rows, take_rows

    eng = Engine(lm.config, lm.params, slots=4, max_model_len=80, vocab_limit=TOK_VOCAB, chunk=4)
    eng.reset()
    for slot, n in enumerate((5, 9, 40, 12)):
        eng.admit(slot, list(range(3, 3 + n)), {k: v[0] for k, v in R.empty_rows(1, lm.config.vocab_size).items()})
    st = eng.state._replace(key=None)

    def same(a):  # the very buffers of st, no copy
        return all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(st)))

    assert same(take_rows(st, None, 80, False)) and same(put_rows(st, st, None, 80, False))
    every = jax.device_get(take_rows(st, None, 64, False))
    gathered = jax.device_get(take_rows(st, jax.numpy.arange(4), 64, False))
    assert jax.tree.all(jax.tree.map(np.array_equal, every, gathered))
    assert every.kv_valid.shape == (4, 64) and int(every.kv_valid.sum()) == 5 + 9 + 40 + 12
    small = take_rows(st, None, 64, False)
    small = small._replace(tokens=small.tokens + 1, kv_valid=~small.kv_valid)
    back = jax.device_get(put_rows(st, small, None, 64, False))
    assert np.array_equal(back.tokens, np.asarray(st.tokens) + 1)
    assert np.array_equal(back.kv_valid[:, :64], ~np.asarray(st.kv_valid)[:, :64])
    assert np.array_equal(back.kv_valid[:, 64:], np.asarray(st.kv_valid)[:, 64:])


def test_warm_up_runs_every_program_then_frees_every_slot(lm):
    """warm_up runs each decode (rows, width) and batched admission program once (XLA CPU's first run of a program
    is the slow one) and leaves the state as fresh as before: no stand-in row stays in a slot."""
    eng = Engine(lm.config, lm.params, slots=4, max_model_len=80, vocab_limit=TOK_VOCAB, chunk=4)
    ran, admitted = set(), set()
    run_decode, admit_many = eng._run_decode, eng.admit_many
    eng._run_decode = lambda r, w, rows, done: (ran.add((r, w)), run_decode(r, w, rows, done))[1]
    eng.admit_many = lambda slots, ids, rows: (admitted.add((len(slots), len(ids[0]))), admit_many(slots, ids, rows))[1]
    eng.warm_up()
    assert ran == {(r, w) for r in eng.row_buckets for w in eng.length_buckets}
    assert admitted == {(r, p) for p in eng.buckets for r in eng.admit_rows[p]} and admitted
    assert not eng._lengths.any()
    fresh = eng._init_program()()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), eng.state, fresh)


def test_nothing_compiles_after_warm_up(served, client):
    eng = served.svc.scheduler.engine  # init, one admit per prompt bucket, one decode per (rows, width) bucket
    batched = sum(map(len, eng.admit_rows.values()))  # one batched admission per (rows, prompt bucket)
    assert eng.compiles == 1 + len(eng.buckets) + batched + len(eng.row_buckets) * len(eng.length_buckets)
    assert eng.row_buckets == [1, 2, 4, 8, 16] and eng.length_buckets == [MAX_LEN]
    before = (served.counter.n, served.svc.scheduler.engine.compiles)
    for i, n in enumerate((1, 7, 15, 20, 28)):  # every prompt bucket, sampling and greedy, logprobs, echo
        prompt = list(range(3, 3 + n))
        client.completions.create(
            model=served.svc.name,
            prompt=prompt,
            max_tokens=MAX_LEN - n,
            temperature=0.7 * (i % 2),
            top_p=0.9,
            seed=i,
            logprobs=i % 3,
            echo=i % 2 == 0,
            extra_body={"top_k": 3, "repetition_penalty": 1.2, "min_tokens": 1},
        )
    assert (served.counter.n, served.svc.scheduler.engine.compiles) == before


BAD = [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, "context length"),
    ({"prompt": "x", "max_tokens": MAX_LEN}, "context length"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": 1e-9}, "too small"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "model": "gpt-4"}, "does not exist"),
    ({"prompt": "x", "n": 2}, "'n'"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 99999]]}, "outside"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
]


def http(url, body=None, timeout=TIMEOUT):
    """(status, parsed JSON or text) of a GET (body None) or a POST of body (bytes, or an object sent as JSON)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


def test_bad_requests_get_400_and_the_server_lives(served, client):
    for body, words in BAD:
        status, r = http(served.url + "/v1/completions", body)
        assert status == 400, body
        assert words in r["error"]["message"], (body, r)
        assert r["error"]["type"] == "invalid_request_error"
    status, r = http(served.url + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in r["error"]["message"]
    status, r = http(served.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "chat template" in r["error"]["message"]  # none in this checkpoint
    assert http(served.url + "/health")[0] == 200
    assert http(served.url + "/v1/models")[1]["data"][0]["id"] == served.svc.name
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=served.svc.name, prompt="x", temperature=-1)
    assert client.completions.create(model=served.svc.name, prompt="Hello", max_tokens=2).choices[0].text is not None


def _errors(served, status: int) -> float:
    return served.svc.metrics.errors.labels(str(status))._value.get()


def test_unknown_routes_and_methods_are_counted_errors(served):
    before = _errors(served, 404), _errors(served, 405)
    status, r = http(served.url + "/v1/nothing")
    assert status == 404 and "no route GET /v1/nothing" in r["error"]["message"]
    status, r = http(served.url + "/health", {"x": 1})  # POST on a GET route
    assert status == 405 and "no route POST /health" in r["error"]["message"]
    assert (_errors(served, 404), _errors(served, 405)) == (before[0] + 1, before[1] + 1)
    assert 'neox_jax:request_errors_total{status="405"}' in http(served.url + "/metrics")[1]


def test_requests_are_refused_while_health_says_503(served, client):
    """Before the programs are compiled (/health 503) a request is answered 503 at once, not queued behind them."""
    sched = served.svc.scheduler
    before = _errors(served, 503)
    sched.ready.clear()
    try:
        assert http(served.url + "/health")[0] == 503
        status, r = http(served.url + "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert status == 503 and "still loading" in r["error"]["message"] and r["error"]["type"] == "server_error"
        assert sched.waiting.empty() and _errors(served, 503) == before + 1
    finally:
        sched.ready.set()
    assert client.completions.create(model=served.svc.name, prompt="Hello", max_tokens=2).choices[0].finish_reason


def test_chat_top_logprobs_errors_name_top_logprobs(served, client):
    svc = served.svc
    svc.chat_template = compile_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    url, msgs = served.url + "/v1/chat/completions", [{"role": "user", "content": PROMPTS[3]}]
    try:
        for extra, words in (
            ({"logprobs": True, "top_logprobs": 9}, "'top_logprobs' must be <= 5"),
            ({"logprobs": True, "top_logprobs": "two"}, "'top_logprobs' must be an integer"),
            ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
        ):
            status, r = http(url, {"messages": msgs, "max_tokens": 2, **extra})
            assert status == 400 and words in r["error"]["message"] and r["error"]["param"] == "top_logprobs", r
        r = client.chat.completions.create(
            model=svc.name, messages=msgs, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
        )
    finally:
        svc.chat_template = None
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == max(t.logprob for t in content[0].top_logprobs)  # greedy: the top one


def test_log_probs_normalise_over_all_rows_or_the_tokenizers():
    """sampling.choose (per row) and sampling.logprobs: log_softmax over every row (default) or the first
    logprob_rows; either way only decodable ids are chosen or listed."""
    from neox_jax.inference import sampling

    logits = np.random.RandomState(0).randn(3, MODEL_VOCAB).astype(np.float32) * 3
    logits[:, TOK_VOCAB:] += 6.0  # the undecodable rows would win every argmax and top-k
    rows = {k: jax.numpy.asarray(v) for k, v in R.empty_rows(3, MODEL_VOCAB).items()}
    made, seen = jax.numpy.zeros(3, jax.numpy.int32), jax.numpy.zeros((3, MODEL_VOCAB), bool)
    static = sampling.per_row_static(TOK_VOCAB)
    tok = np.asarray(jax.jit(sampling.choose, static_argnums=0)(static, rows, logits, rows["key"], seen, made))
    assert (tok == logits[:, :TOK_VOCAB].argmax(-1)).all()
    lps = jax.jit(sampling.logprobs, static_argnums=(2, 3, 4))
    for logprob_rows, width in ((None, MODEL_VOCAB), (TOK_VOCAB, TOK_VOCAB)):
        lp, top_ids, top_lp = map(np.asarray, lps(logits, tok, R.TOP_LOGPROBS, TOK_VOCAB, logprob_rows))
        want = np.asarray(jax.nn.log_softmax(logits[:, :width], axis=-1))
        assert (top_ids < TOK_VOCAB).all()
        np.testing.assert_allclose(lp, want[np.arange(3), tok], rtol=1e-6)
        np.testing.assert_allclose(top_lp, np.take_along_axis(want, top_ids, -1), rtol=1e-6)


def test_full_queue_gets_429_at_once(served, client):
    sched = served.svc.scheduler
    gate, blocked = threading.Event(), threading.Event()

    def stall(d):  # runs on the scheduler thread: holds it until the test lets go
        blocked.set()
        gate.wait(TIMEOUT)

    staller, *_ = _collect_ids(sched, [5, 6], 2)
    staller.deliver = stall
    sched.submit(staller)
    assert blocked.wait(TIMEOUT)
    fillers = [_collect_ids(sched, [5, 6], 2) for _ in range(sched.waiting.maxsize)]
    for r, *_ in fillers:
        sched.submit(r)
    t = time.perf_counter()
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=served.svc.name, prompt="Hello", max_tokens=2)
        assert time.perf_counter() - t < TIMEOUT
    finally:
        gate.set()
    assert all(d.wait(TIMEOUT) for *_, d in fillers)


def test_client_disconnect_frees_its_slot(served, client, monkeypatch):
    sched = served.svc.scheduler
    orig = sched.engine.decode
    monkeypatch.setattr(sched.engine, "decode", lambda force: (time.sleep(0.05), orig(force))[1])
    aborted = served.svc.metrics.requests.labels("abort")._value.get()
    stream = client.completions.create(
        model=served.svc.name,
        prompt="Hello",
        max_tokens=MAX_LEN - 4,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    assert any(r is not None for r in sched.slots)
    stream.close()  # the client goes away mid-generation
    end = time.monotonic() + TIMEOUT
    while any(r is not None for r in sched.slots) and time.monotonic() < end:
        time.sleep(0.02)
    assert all(r is None for r in sched.slots)
    assert served.svc.metrics.requests.labels("abort")._value.get() == aborted + 1
    assert served.svc.metrics.occupancy._value.get() == 0  # no decode step ran after it to update the gauge
    monkeypatch.undo()
    assert client.completions.create(model=served.svc.name, prompt="Hello", max_tokens=3).choices[0].finish_reason


def test_chat_completions_with_a_template(served, client, lm, ref):
    svc = served.svc
    svc.chat_template = compile_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    try:
        r = client.chat.completions.create(
            model=svc.name, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=6, temperature=0
        )
    finally:
        svc.chat_template = None
    assert r.choices[0].message.content == ref_text(lm, ref, 3, 6)[0]


def test_metrics_text(served, client):
    client.completions.create(model=served.svc.name, prompt="Hello", max_tokens=2)
    text = http(served.url + "/metrics")[1]
    for name in (
        "neox_jax:request_success_total",
        "neox_jax:generation_tokens_total",
        "neox_jax:num_requests_waiting",
        "neox_jax:num_requests_running",
        "neox_jax:time_to_first_token_seconds_count",
    ):
        assert name in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_and_exits_0(ckpt):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NEOX_JAX_COMPILE_CACHE": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "scripts/serve.py",
            "--checkpoint",
            str(ckpt),
            "--port",
            str(port),
            "--max-model-len",
            "16",
            "--max-batch",
            "2",
            "--chunk",
            "1",
            "--drain-timeout",
            "20",
            "--log-level",
            "info",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 600
        while time.monotonic() < end and proc.poll() is None:
            try:
                if http(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        stream = client.completions.create(
            model="tiny", prompt=[5, 6], max_tokens=12, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)  # in flight: it must still finish
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(TIMEOUT) == 0
        log = proc.stdout.read()  # the server's own info lines, though orbax's absl import configured the root first
        assert re.search(r"INFO neox_jax\.serve: serving .* as 'tiny'", log) and "compiled " in log, log
        with pytest.raises(openai.APIConnectionError):  # and it no longer listens
            client.completions.create(model="tiny", prompt=[5, 6], max_tokens=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_seeded_sampling_is_reproducible(served, client):
    def ask(seed):
        return (
            client.completions.create(
                model=served.svc.name,
                prompt=PROMPTS[4],
                max_tokens=12,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    first = ask(3)
    assert ask(3) == first
    assert any(ask(s) != first for s in (4, 5, 6))


def test_sharded_engine_gives_the_same_ids(ckpt, served):
    """Params and KV cache over a data=2 x model=2 mesh: the same greedy ids as the unsharded server."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    from neox_jax.parallel import sharding
    from neox_jax.serve.metrics import Metrics

    mesh = sharding.make_mesh("data=2,model=2", jax.devices()[:4])
    lm = neox_jax.load(ckpt, mesh=mesh)
    sched = Scheduler(
        Engine(lm.config, lm.params, slots=2, max_model_len=16, vocab_limit=TOK_VOCAB, chunk=4, mesh=mesh),
        lm.tokenizer,
        Metrics(2, 8),
        max_queue=8,
    )
    sched.start()
    try:
        assert sched.ready.wait(600)
        results = []
        for s in (served.svc.scheduler, sched):
            reqs = [_collect_ids(s, lm.tokenizer.encode(p), 6) for p in PROMPTS[:3]]
            for r, *_ in reqs:
                s.submit(r)
            assert all(d.wait(TIMEOUT) for *_, d in reqs)
            results.append([got for _, got, _ in reqs])
        assert results[0] == results[1] and all(len(x) == 6 for x in results[0])
    finally:
        sched.shutdown(5)


def test_cli_user_errors_are_one_line(tmp_path, capsys, ckpt):
    from neox_jax.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(ckpt), "--max-model-len", "100000", "--no-compile-cache"]) == 1
    assert "--max-model-len 100000" in capsys.readouterr().err


def test_batched_admission_equals_generate_and_leaves_other_rows_alone(lm):
    """Three prompts admitted in one program (a 4-row batch, one padding row) into scattered slots, one of them
    holding a former request's longer prompt: their first tokens and greedy continuations equal model.generate's,
    and the row admitted alone before them decodes as it would have."""
    eng = Engine(lm.config, lm.params, slots=8, max_model_len=MAX_LEN, vocab_limit=TOK_VOCAB, chunk=4)
    eng.warm_up()
    assert eng.admit_rows[16] == [4, 8] and eng.admit_rows[32] == [4, 8] and eng.batch_limit(20) == 8
    compiled = eng.compiles

    def row(n):
        r = jax.tree.map(lambda x: x[0].copy(), R.empty_rows(1, lm.config.vocab_size))
        r["max_new"] = np.int32(n)
        return r

    prompts = [list(range(3, 3 + n)) for n in (5, 9, 2)]
    alone, news = list(range(40, 52)), (6, 9, 4)
    want = lm.generate([*prompts, alone], max_new_tokens=max(news), stop_token_ids=[]).token_ids
    eng.admit(6, list(range(3, 33)), row(4))  # a former request's 30-token prompt in slot 6
    got = {5: [int(eng.admit(5, alone, row(8))["tokens"][0])]}
    firsts = eng.admit_many([6, 1, 4], prompts, [row(n) for n in news])
    got |= {slot: [int(f["tokens"][0])] for slot, f in zip((6, 1, 4), firsts)}
    made = {slot: 1 for slot in got}
    force_done = np.array([slot not in got for slot in range(8)])
    for _ in range(10):  # bounded: every row is done after at most 3 chunks of 4
        out, now = eng.decode(force_done)
        for slot in got:
            got[slot] += out["tokens"][slot, : now[slot] - made[slot]].tolist()
            made[slot] = int(now[slot])
        if all(made[s] >= n for s, n in zip((6, 1, 4, 5), (*news, 8))):
            break
    assert [got[s] for s in (6, 1, 4, 5)] == [w[:n] for w, n in zip(want, (*news, 8))]
    assert eng.compiles == compiled
