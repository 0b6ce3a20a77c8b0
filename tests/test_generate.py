"""Generation: greedy equals transformers, decode equals the full forward, sampling, stops, streaming, errors, no
recompiles, and the scripts/generate.py CLI. One tiny model (vocab 320) with a byte-level BPE tokenizer (300 ids)
trained here, so the padded embedding rows exist and must never be emitted."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neox_jax
from conftest import BPE_VOCAB, convert_hf, make_hf_model, run_cli
from neox_jax.inference.cache import init_cache
from neox_jax.inference.decode import Layout
from neox_jax.inference.generate import Generator
from neox_jax.inference.sampling import SamplingParams, choose
from neox_jax.inference.textstops import RowTracker
from neox_jax.model.neox import forward, model_from_params, positions_from_mask, stack_layers

MODEL_VOCAB, TOK_VOCAB = 320, BPE_VOCAB


@pytest.fixture(scope="session")
def tok_ckpt(tmp_path_factory, bpe_tokenizer):
    """(hf model, checkpoint dir with tokenizer.json)."""
    model = make_hf_model(seed=7, vocab_size=MODEL_VOCAB)
    src = tmp_path_factory.mktemp("hf_tok")
    model.save_pretrained(src)
    shutil.copyfile(bpe_tokenizer, src / "tokenizer.json")
    out = tmp_path_factory.mktemp("ckpt_tok") / "tiny"
    convert_hf(src, out)
    return model, out


@pytest.fixture(scope="session")
def lm(tok_ckpt):
    return neox_jax.load(tok_ckpt[1])


PROMPTS = [[5, 17, 99, 200, 42, 7, 8], [61, 3], [250, 251, 252, 9, 10, 11, 12, 13, 14, 15, 16, 18]]


@pytest.fixture(scope="module")
def hf_greedy(tok_ckpt):
    import torch

    model, _ = tok_ckpt
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[1] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=1
        )[:, width:].tolist()


@pytest.mark.parametrize("variant", ["backend-layout", "stored-layout", "stacked-layers"])
def test_greedy_matches_transformers(lm, hf_greedy, variant):
    params = stack_layers(lm.params) if variant == "stacked-layers" else lm.params
    layout = Layout(False, "float32") if variant == "stored-layout" else None  # None: decode.layout_for the backend
    gen = Generator(lm.config, params, layout=layout)  # no tokenizer: the model's whole vocabulary, as for HF
    ours = gen.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    assert ours.token_ids == hf_greedy
    assert ours.finish_reasons == ["length"] * 3


def test_bfloat16_decode_agrees_with_bfloat16_forward(tok_ckpt):
    half = neox_jax.load(tok_ckpt[1], dtype="bfloat16")
    r = half.generate(["The quick"], max_new_tokens=8, stop_token_ids=[])  # on CPU: the [O, I] reduce form
    gen, prompt = r.token_ids[0], r.prompt_ids[0]
    assert len(gen) == 8 and max(gen) < TOK_VOCAB
    want = half.logits([prompt + gen])[0, len(prompt) - 1 : -1, :TOK_VOCAB].argmax(-1).tolist()
    assert sum(a == b for a, b in zip(gen, want)) >= 6  # bf16 rounding may flip a near tie


def test_prefill_then_decode_equals_full_forward(lm):
    cfg, params = lm.config, lm.params
    prompt = np.array([[1, 1, 1, 5, 6, 7], [9, 8, 7, 6, 5, 4]])  # row 0 left-padded
    pmask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6])
    cont = np.random.RandomState(0).randint(0, MODEL_VOCAB, (2, 5))
    full_ids, full_mask = np.concatenate([prompt, cont], 1), np.concatenate([pmask, np.ones_like(cont)], 1)
    ref = np.asarray(
        forward(
            cfg,
            params,
            jnp.asarray(full_ids),
            positions_from_mask(jnp.asarray(full_mask)),
            jnp.asarray(full_mask, bool),
        )[0]
    )

    def run(params, ids, positions, valid, cache, index):
        model = model_from_params(cfg, params)
        hidden, cache = model.hidden_states(ids, positions, valid, cache, index)
        return model.logits(hidden), cache

    prefill = jax.jit(lambda *a: run(*a, 0))  # the static index 0, as decode.prefill has it
    run = jax.jit(run)  # a traced index, as in the decode loop

    s = 16  # cache longer than needed: the empty slots must not matter
    pos = positions_from_mask(jnp.asarray(pmask))
    valid = np.zeros((2, s), bool)
    valid[:, :6] = pmask
    logits, cache = prefill(params, jnp.asarray(prompt), pos, jnp.asarray(valid), init_cache(cfg, 2, s))
    got = [np.asarray(logits)]
    nxt = np.asarray(pos[:, -1]) + 1
    for t in range(cont.shape[1]):
        valid[:, 6 + t] = True
        logits, cache = run(
            params, jnp.asarray(cont[:, t : t + 1]), jnp.asarray(nxt[:, None] + t), jnp.asarray(valid), cache, 6 + t
        )
        got.append(np.asarray(logits))
    got = np.concatenate(got, 1)
    real = full_mask == 1
    assert np.abs(got[real] - ref[real]).max() <= 1e-4


def test_blocked_causal_attention_equals_full(monkeypatch):
    from neox_jax.model import neox as model_lib
    from neox_jax.model.config import preset

    cfg = preset("tiny")
    params = model_lib.init_params(cfg, seed=3)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 256)))
    mask = np.ones((2, 256), bool)
    mask[1, :37] = False  # left padding in row 1
    args = (ids, positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    blocked = np.asarray(forward(cfg, params, *args)[0])  # 256 >= 2 * CAUSAL_BLOCK: query blocks of 128
    monkeypatch.setattr(model_lib, "CAUSAL_BLOCK", 10**6)
    full = np.asarray(forward(cfg, params, *args)[0])
    assert np.abs(blocked - full)[mask].max() <= 1e-5


def test_decode_loop_agrees_with_forward(lm):
    """Each greedy token is the argmax of the full forward over the prompt plus the tokens before it."""
    r = lm.generate([[3, 4, 5], [6]], max_new_tokens=10, stop_token_ids=[])
    for prompt, gen in zip(r.prompt_ids, r.token_ids):
        seq = np.array([prompt + gen])
        logits = lm.logits(seq)[0, len(prompt) - 1 : -1, :TOK_VOCAB]
        assert logits.argmax(-1).tolist() == gen


def test_padded_vocab_rows_never_emitted(lm):
    params = lm.params
    kernel = np.array(params["embed_out"]["kernel"])
    kernel[:, TOK_VOCAB:] = 1.0  # with every final hidden feature shifted up, the padded rows win every argmax
    norm = {**params["final_layer_norm"], "bias": params["final_layer_norm"]["bias"] + 10.0}
    changed = {**params, "embed_out": {"kernel": jnp.asarray(kernel)}, "final_layer_norm": norm}
    tilted = neox_jax.NeoX(lm.config, changed, lm.tokenizer)  # a model of its own: the shared `lm` is never changed
    assert tilted.logits([[3, 4]])[0, -1].argmax() >= TOK_VOCAB
    ids = tilted.generate(["Hello", "fox"], max_new_tokens=6, stop_token_ids=[]).token_ids
    assert max(max(row) for row in ids) < TOK_VOCAB
    logits = jnp.zeros((2, MODEL_VOCAB)).at[:, TOK_VOCAB:].set(100.0)
    static = SamplingParams(temperature=1.0).static(TOK_VOCAB)
    picks = choose(static, SamplingParams(temperature=1.0).values(), logits, jax.random.key(0))
    assert (np.asarray(picks) < TOK_VOCAB).all()


def test_top_k_1_equals_greedy(lm):
    greedy = lm.generate(["The quick", "Hello"], max_new_tokens=8, stop_token_ids=[])
    k1 = lm.generate(["The quick", "Hello"], max_new_tokens=8, stop_token_ids=[], temperature=1.3, top_k=1, seed=5)
    assert k1.token_ids == greedy.token_ids


SAMPLE = dict(temperature=1.0, top_k=40, top_p=0.95)  # one sampling mode for every test: one compile


def test_seed_reproducible_and_different(lm):
    kw = dict(max_new_tokens=12, stop_token_ids=[], **SAMPLE)
    a = lm.generate(["The quick", "fox"], seed=1, **kw).token_ids
    assert lm.generate(["The quick", "fox"], seed=1, **kw).token_ids == a
    b = lm.generate(["The quick", "fox"], seed=2, **kw).token_ids
    assert b[0] != a[0] and b[1] != a[1]


def test_stop_token_ids_end_at_first_occurrence(lm):
    full = lm.generate(["Einstein was", "x"], max_new_tokens=12, stop_token_ids=[]).token_ids[0]
    stop_id = full[4]
    r = lm.generate(["Einstein was", "x"], max_new_tokens=12, stop_token_ids=[stop_id])
    cut = full.index(stop_id) + 1
    assert r.token_ids[0] == full[:cut]
    assert r.finish_reasons[0] == "stop" and r.stopped_by[0] == stop_id
    assert r.texts[0] == lm.tokenizer.decode(full[: cut - 1])


def test_stop_strings_end_at_right_place(lm):
    base = lm.generate(["Hello", "The quick"], max_new_tokens=16, stop_token_ids=[])
    text = base.texts[0]
    stop = text[5:7]
    assert stop and stop not in text[:5]
    r = lm.generate(["Hello", "The quick"], max_new_tokens=16, stop_token_ids=[], stop=[stop, "\x00never"])
    assert r.texts[0] == text[: text.index(stop)]
    assert r.finish_reasons[0] == "stop" and r.stopped_by[0] == stop
    ids = r.token_ids[0]  # the fewest ids whose text holds the stop string
    assert stop in lm.tokenizer.decode(ids) and stop not in lm.tokenizer.decode(ids[:-1])
    other = base.texts[1]  # the other row ends at its own first occurrence (or runs to the length limit)
    assert r.texts[1] == (other[: other.index(stop)] if stop in other else other)


def test_stream_pieces_add_up(lm):
    kw = dict(max_new_tokens=24, seed=3, stop_token_ids=[], **SAMPLE)
    stream = lm.generate_stream(["Über naïve", "東京"], **kw)
    pieces = [[], []]
    for event in stream:
        for i, piece in enumerate(event.texts):
            pieces[i].append(piece)
    result = stream.result
    assert len(pieces[0]) > 2  # it streamed in several steps
    assert ["".join(p) for p in pieces] == result.texts  # nothing streamed was taken back
    assert result.token_ids == lm.generate(["Über naïve", "東京"], **kw).token_ids  # streaming samples the same


def test_stream_text_waits_for_whole_characters_and_stop_strings(lm):
    tok = lm.tokenizer
    text = "Zürich 東京 stop here"
    byte_ids = [
        i for w in tok._tok.pre_tokenizer.pre_tokenize_str(text) for i in [tok._tok.token_to_id(c) for c in w[0]]
    ]  # one token per byte: characters span tokens
    assert None not in byte_ids and tok.decode(byte_ids) == text
    row = RowTracker(tok, [], ["stop here", "東京X"], max_new=100)
    shown, want = "", "Zürich 東京 "
    for t in byte_ids:
        ids, piece = row.push([t])
        shown += piece
        assert want.startswith(shown)  # whole characters only, nothing taken back
        assert "東京" not in shown or "東京 " in shown  # "東京" waits until "東京X" is ruled out
    assert shown == want and row.text == want
    assert row.finish_reason == "stop" and row.stopped_by == "stop here"


def test_no_recompile_for_same_bucket_and_batch(lm):
    gen = lm.generator()
    kw = dict(max_new_tokens=8, stop_token_ids=[], **SAMPLE)
    gen.generate(["a b c", "Hello there"], **kw)
    before = gen.compiles
    compiles = []

    def listen(name, secs, **_):
        if "backend_compile" in name:
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:  # same buckets, other lengths and sampling values
        gen.generate(
            ["The quick brown", "x"], **{**kw, "temperature": 0.7, "top_p": 0.5, "stop_token_ids": [5]}, seed=9
        )
        assert compiles == []
        jax.jit(lambda x: x * 3.25 + 1)(np.float32(2))  # the listener does see a compile
        assert len(compiles) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert gen.compiles == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[""]), "empty"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1] * 200]), "max_position_embeddings"),
        (dict(prompts=["hi"], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=["hi"], temperature=-1.0), "temperature"),
        (dict(prompts=["hi"], temperature=float("nan")), "temperature"),
        (dict(prompts=["hi"], top_k=0), "top_k"),
        (dict(prompts=["hi"], top_k=TOK_VOCAB + 1, temperature=1.0), "top_k"),
        (dict(prompts=["hi"], top_p=1.5), "top_p"),
        (dict(prompts=["hi"], top_p=0.0), "top_p"),
        (dict(prompts=["hi"], repetition_penalty=0.0), "repetition_penalty"),
        (dict(prompts=[[MODEL_VOCAB]]), "outside"),
        (dict(prompts=["hi"], stop=[""]), "stop"),
    ],
)
def test_bad_inputs_give_clear_errors(lm, kwargs, match):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=match):
        lm.generate(prompts, **kwargs)


def test_repetition_penalty_changes_output(lm):
    kw = dict(max_new_tokens=16, stop_token_ids=[])
    plain = lm.generate(["1 2 3", "x"], **kw).token_ids[0]
    pen = lm.generate(["1 2 3", "x"], repetition_penalty=10.0, **kw).token_ids[0]
    assert len(set(pen)) >= len(set(plain)) and pen != plain


def test_cli_json_and_stream(tok_ckpt, lm, tmp_path):
    _, ckpt = tok_ckpt
    env = {"NEOX_JAX_COMPILE_CACHE": str(tmp_path / "jaxcache")}
    prompts = ["Hello", "Über"]
    r = run_cli(
        "scripts/generate.py",
        "--checkpoint",
        ckpt,
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--stream",
        env=env,
    )
    out = json.loads(r.stdout)  # with --json the stream goes to stderr
    assert [c["prompt"] for c in out["completions"]] == prompts
    assert all(len(c["token_ids"]) == 6 and c["finish_reason"] == "length" for c in out["completions"])
    assert {"prefill_s", "decode_tokens_per_s", "compile_s"} <= set(out["timing"])
    want = lm.generate(prompts, max_new_tokens=6, stop_token_ids=[])
    for i, (prompt, c) in enumerate(zip(prompts, out["completions"])):
        assert c["token_ids"] == want.token_ids[i] and c["text"] == want.texts[i]
        assert prompt + c["text"] in r.stderr
    assert any((tmp_path / "jaxcache").iterdir())  # the persistent compilation cache was written


def test_sharded_params_generate_the_same(lm):
    from neox_jax.parallel import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = sharding.make_mesh("data=2,model=4")
    sharded = sharding.shard_params(lm.params, lm.config, mesh)  # NamedSharding params go in unchanged
    got = Generator(lm.config, sharded).generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])
    want = Generator(lm.config, lm.params).generate(PROMPTS, max_new_tokens=6, stop_token_ids=[])
    assert got.token_ids == want.token_ids


def test_cli_quantize_flag(tok_ckpt, capsys):
    """--quantize int8 on `neox-jax generate` gives what neox_jax.load(quantize="int8") generates."""
    from neox_jax.cli import main

    _, ckpt = tok_ckpt
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(ckpt),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "5",
                "--ignore-eos",
                "--quantize",
                "int8",
                "--json",
                "--no-compile-cache",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)["completions"][0]["token_ids"]
    want = neox_jax.load(ckpt, quantize="int8").generate(["Hello"], max_new_tokens=5, stop_token_ids=[])
    assert got == want.token_ids[0]


def test_generate_stream_yields_one_event_per_token(lm):
    stream = lm.generate_stream([[5, 17, 99]], max_new_tokens=16, stop_token_ids=[])
    events = [e for e in stream if e.token_ids[0]]
    assert [len(e.token_ids[0]) for e in events] == [1] * 16
    assert sum((e.token_ids[0] for e in events), []) == stream.result.token_ids[0]
    assert lm.generate([[5, 17, 99]], max_new_tokens=16, stop_token_ids=[]).token_ids == stream.result.token_ids


def test_one_sampler():
    """generate, the server and speculative decoding share sampling.choose: the top-p cut is written once."""
    root = Path(__file__).resolve().parents[1] / "neox_jax"
    cuts = [p.relative_to(root).as_posix() for p in root.rglob("*.py") if "jnp.cumsum(probs" in p.read_text()]
    assert cuts == ["inference/sampling.py"]


@pytest.mark.parametrize("vocab", [1, 7, 320, 1024, 1030, 50304])
def test_greedy_argmax_equals_jnp_argmax(vocab):
    """sampling.argmax (pairwise halving) picks what jnp.argmax picks: the first of equal maxima, the first NaN,
    the first id of an all -inf row, at even, odd, small and Pythia-sized vocabularies."""
    from neox_jax.inference.sampling import argmax

    rng = np.random.default_rng(vocab)
    x = rng.normal(size=(9, vocab)).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2] = 0.0  # all tied
    x[3] = -np.inf
    x[4, rng.integers(vocab, size=3)] = np.nan
    x[5, -1] = x[5].max() + 1  # the last id wins
    x[6, rng.integers(vocab, size=2)] = np.inf
    got = jax.jit(argmax)(jnp.asarray(x))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    bf = jnp.asarray(x, jnp.bfloat16)  # more ties after rounding
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(bf)), np.asarray(jnp.argmax(bf, axis=-1)))


@pytest.mark.parametrize("uniform", [True, False])
def test_extend_and_rollback_are_a_verify_step(lm, uniform):
    """The decode core's speculative primitives: extend k+1 draft positions, roll a row back to its accepted length,
    extend again; the logits equal those of the plain forward over the accepted tokens."""
    from neox_jax.inference import core
    from neox_jax.inference.sampling import SamplingParams

    cfg, layout = lm.config, Layout(False, "float32")
    prompts, draft, wrong = [[5, 17, 99, 200], [61, 3, 8, 9]], [[42, 7, 8, 11], [4, 4, 6, 2]], [[50, 51], [52, 53]]
    static = SamplingParams().static(MODEL_VOCAB)
    settings = {
        "temperature": np.ones(2, np.float32),
        "top_p": np.ones(2, np.float32),
        "repetition_penalty": np.ones(2, np.float32),
        "stop_mask": np.zeros((2, MODEL_VOCAB), bool),
        "max_new": np.full(2, 8, np.int32),
    }

    @jax.jit
    def run(params):
        state = core.empty_state(cfg, layout, 2, 16, settings, False, False, jax.random.key(0))
        ids = jnp.asarray(prompts, jnp.int32)
        state = core.prefill_into(cfg, static, layout, params, state, 0, ids, jnp.ones_like(ids))[0]
        mixed = jnp.asarray([d[:1] + w for d, w in zip(draft, wrong)], jnp.int32)  # one good draft, two bad
        state, _ = core.extend(cfg, layout, params, state, mixed, uniform)
        state = core.rollback(state, state.lengths - 2)  # keep the good one
        _, logits = core.extend(cfg, layout, params, state, jnp.asarray([d[1:] for d in draft], jnp.int32), uniform)
        return logits  # [2, 3, V]: after prompt + draft[:2], [:3], [:4]

    full = [p + d for p, d in zip(prompts, draft)]
    ref = forward(cfg, lm.params, jnp.asarray(full), positions_from_mask(jnp.ones((2, 8))), jnp.ones((2, 8), bool))[0]
    np.testing.assert_allclose(np.asarray(run(lm.params)), np.asarray(ref[:, 5:]), atol=2e-5)
