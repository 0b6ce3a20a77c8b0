"""Speculative decoding (neox_jax/inference/speculative.py): greedy output with any draft is the target's own, token for
token (drafts: the target itself, a noisy copy with more embedding rows, an unrelated model; k = 1, 2, 4, 8; ragged
batches; stop ids and strings; exact max_new_tokens; streaming; bf16 / int8 targets; a mesh); sampled output follows the
target's distribution (chi-square, which a wrong acceptance rule fails); drafts that cannot work are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from neox_jax.api import NeoX
from neox_jax.errors import NeoXError
from neox_jax.inference import speculative as spec
from neox_jax.inference.speculative_driver import SpeculativeGenerator
from neox_jax.model.config import preset
from neox_jax.model.neox import init_params
from neox_jax.store.tokenizer import Tokenizer

VOCAB, TOK_VOCAB = 320, 300  # the target's rows, the tokenizer's ids (conftest.BPE_VOCAB)
PROMPTS = [[5, 17, 99, 200, 42, 7, 8], [61, 3], [250, 251, 252, 9, 10, 11, 12, 13, 14, 15, 16, 18]]
ALPHA = 1e-3  # chi-square significance: the draws are seeded (deterministic), and a wrong rule gives p < 1e-20


def _model(vocab=VOCAB, layers=2, seed=0, logit_scale=1.0, tokenizer=None) -> NeoX:
    cfg = dataclasses.replace(preset("tiny"), vocab_size=vocab, num_hidden_layers=layers)
    params = init_params(cfg, seed=seed)
    params["embed_out"]["kernel"] = params["embed_out"]["kernel"] * logit_scale  # peakier distributions
    return NeoX(cfg, params, tokenizer)


def _noisy_copy(model: NeoX, rows: int, noise: float, seed=1) -> NeoX:
    """The model's weights plus noise (each leaf's std times `noise`), the embedding grown to `rows` rows: a draft
    that agrees with the target often but not always."""
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + noise * (jnp.std(x) + 1e-3) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, noisy)
    extra = rows - model.config.vocab_size
    params["embed_in"]["embedding"] = jnp.pad(params["embed_in"]["embedding"], ((0, extra), (0, 0)))
    params["embed_out"]["kernel"] = jnp.pad(params["embed_out"]["kernel"], ((0, 0), (0, extra)))
    return NeoX(dataclasses.replace(model.config, vocab_size=rows), params, model.tokenizer)


@pytest.fixture(scope="module")
def pair(bpe_tokenizer):
    tok = Tokenizer.from_file(bpe_tokenizer)
    target = _model(logit_scale=20.0, tokenizer=tok)
    return target, _noisy_copy(target, rows=352, noise=0.15)


def test_greedy_is_the_targets_output_for_every_k(pair):
    target, draft = pair
    want = target.generate(PROMPTS, max_new_tokens=23, stop_token_ids=[])
    rates = []
    for k in (1, 2, 4, 8):  # (each k is one more compile, ~6 s on 2 loaded cores; 3 is the other tests')
        got = target.generate(PROMPTS, max_new_tokens=23, stop_token_ids=[], draft=draft, draft_tokens=k)
        assert got.token_ids == want.token_ids, f"k={k}"
        assert all(len(t) == 23 for t in got.token_ids) and got.finish_reasons == ["length"] * 3
        s = got.speculative
        assert s["draft_tokens"] == k and s["proposed"] == k * s["target_steps"]
        assert 1.0 <= s["tokens_per_target_step"] <= k + 1
        rates.append(s["acceptance_rate"])
    assert 0.1 < min(rates) and max(rates) < 0.95  # the draft is partly right: accept and reject paths both ran


@pytest.mark.parametrize("which", ["itself", "unrelated"])
def test_greedy_with_perfect_and_useless_drafts(pair, which):
    target = pair[0]
    # unrelated: another init and more rows than the target (the noisy copy's shapes: its compiled programs are reused)
    draft = target if which == "itself" else _model(vocab=352, seed=5, tokenizer=target.tokenizer)
    want = target.generate(PROMPTS, max_new_tokens=17, stop_token_ids=[])
    got = target.generate(PROMPTS, max_new_tokens=17, stop_token_ids=[], draft=draft, draft_tokens=4)
    assert got.token_ids == want.token_ids
    s = got.speculative
    if which == "itself":  # every draft accepted, k+1 tokens a step until max_new_tokens cuts the last one short
        assert s["acceptance_rate"] == 1.0 and s["target_steps"] == 3 * 4  # 16 = 5 + 5 + 5 + 1
    else:
        assert s["acceptance_rate"] < 0.2


def test_stops_and_stream_agree_with_the_target(pair):
    target, draft = pair
    prompts = ["The quick brown", "Einstein was", "Hello, world! 1 2"]
    free = target.generate(prompts, max_new_tokens=20, stop_token_ids=[])
    stop_id = free.token_ids[0][6]  # a token the first row makes: it ends there, the others maybe
    stop_text = free.texts[1][3:6]  # a piece of the second row's text
    kw = dict(max_new_tokens=20, stop=[stop_text], stop_token_ids=[stop_id])
    want = target.generate(prompts, **kw)
    got = target.generate(prompts, draft=draft, draft_tokens=4, **kw)
    assert (got.token_ids, got.texts, got.finish_reasons, got.stopped_by) == (
        want.token_ids,
        want.texts,
        want.finish_reasons,
        want.stopped_by,
    )
    assert want.stopped_by[0] == stop_id and want.stopped_by[1] == stop_text
    stream = target.generate_stream(prompts, draft=draft, draft_tokens=4, **kw)
    events = list(stream)
    assert len(events) > 2
    assert ["".join(e.texts[i] for e in events) for i in range(3)] == want.texts
    assert [sum((e.token_ids[i] for e in events), []) for i in range(3)] == want.token_ids
    assert stream.result.token_ids == want.token_ids


def test_bf16_and_int8_targets(pair):
    from neox_jax.api import _quantize

    target, draft = pair
    for variant in ("bfloat16", "int8"):
        if variant == "bfloat16":
            params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), target.params)
        else:
            params = _quantize(jax.tree.map(jnp.copy, target.params), target.config, "int8")
        t = NeoX(target.config, params, target.tokenizer)
        want = t.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        got = t.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[], draft=draft, draft_tokens=4)
        assert got.token_ids == want.token_ids, variant


def test_sharded_target_and_draft(pair):
    from neox_jax.parallel import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    target, draft = pair
    mesh = sharding.make_mesh("data=2,model=4")
    t = NeoX(target.config, sharding.shard_params(target.params, target.config, mesh), target.tokenizer, mesh=mesh)
    d = NeoX(draft.config, sharding.shard_params(draft.params, draft.config, mesh), draft.tokenizer, mesh=mesh)
    want = target.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])
    assert (
        t.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[], draft=d, draft_tokens=3).token_ids == want.token_ids
    )


# ---- sampling: the target's distribution ---------------------------------------------------------------------------
SMALL_VOCAB, ROWS = 8, 2048  # a vocabulary small enough to count; rows: independent samples in one call


def _chi2_pvalue(samples, probs) -> float:
    """samples [N] ids, probs [V] -> the chi-square p-value (cells with expected count < 5 pooled)."""
    n = len(samples)
    probs = np.asarray(probs, np.float64)
    expected = probs / probs.sum() * n
    observed = np.bincount(samples, minlength=len(probs)).astype(float)
    if observed[expected == 0].any():  # an id the distribution cannot produce
        return 0.0
    big = expected >= 5
    e = np.append(expected[big], expected[~big].sum())
    o = np.append(observed[big], observed[~big].sum())
    keep = e > 0
    return float(stats.chisquare(o[keep], e[keep]).pvalue)


def _exact_marginals(model: NeoX, prompt, temperature: float, top_k: int, top_p: float):
    """The model's exact distributions [3, V] of generated tokens 1..3 (each a marginal over the earlier choices):
    one forward over every continuation prompt + t1 + t2."""
    from neox_jax.inference import sampling
    from neox_jax.inference.sampling import SamplingParams

    v, n = SMALL_VOCAB, len(prompt)
    sp = SamplingParams(temperature, top_k, top_p)
    pairs = np.array([(a, b) for a in range(v) for b in range(v)])  # [V*V, 2]
    logits = model.logits(np.concatenate([np.tile(prompt, (v * v, 1)), pairs], axis=1))[:, n - 1 :, :v]
    probs = np.asarray(jax.nn.softmax(sampling.processed_logits(sp.static(v), sp.values(), jnp.asarray(logits)), -1))
    p1 = probs[0, 0]  # [V]
    p2 = probs[::v, 1]  # [V (t1), V]
    p12 = p1[:, None] * p2  # [V (t1), V (t2)]
    p3 = probs[:, 2].reshape(v, v, v)  # [t1, t2, V]
    return [p1, p12.sum(0), (p12[..., None] * p3).sum((0, 1))]


@pytest.fixture(scope="module")
def small_pair():
    target = _model(vocab=SMALL_VOCAB, logit_scale=10.0, seed=3)
    return target, _noisy_copy(target, rows=SMALL_VOCAB + 4, noise=0.5, seed=4)


def _sample(target, draft, k):
    gen = SpeculativeGenerator(target.generator(), draft.generator(), k)
    r = gen.generate([[1, 2, 3]] * ROWS, max_new_tokens=3, stop_token_ids=[], **SETTINGS)
    return np.array(r.token_ids), r.speculative


SETTINGS = dict(temperature=0.7, top_k=6, top_p=0.95)  # every step of the processed distribution


def test_sampled_tokens_follow_the_targets_distribution(small_pair):
    target, draft = small_pair
    exact = _exact_marginals(target, [1, 2, 3], **SETTINGS)
    toks, s = _sample(target, draft, 2)
    assert 0.2 < s["acceptance_rate"] < 0.9  # both rejection and acceptance happen
    for i in range(3):
        assert _chi2_pvalue(toks[:, i], exact[i]) > ALPHA, f"token {i}"
    drafted = _exact_marginals(draft, [1, 2, 3], **SETTINGS)  # the test can tell the two apart
    assert _chi2_pvalue(toks[:, 1], drafted[1]) < ALPHA


def test_accepting_every_draft_fails_the_test(small_pair, monkeypatch):
    """The chi-square test has power: a rule that keeps every draft token (the draft's distribution) fails it."""
    target, draft = small_pair
    real = spec.accept

    def keep_all(static, values, drafts, draft_logits, target_logits, key):
        emitted, _ = real(static, values, drafts, draft_logits, target_logits, key)
        k = drafts.shape[1]
        return jnp.concatenate([drafts, emitted[:, k:]], axis=1), jnp.full(drafts.shape[:1], k, jnp.int32)

    monkeypatch.setattr(spec, "accept", keep_all)

    def rounds(*args, mesh=None):  # a new function: jit would reuse the trace it made of spec.rounds
        return spec.rounds(*args, mesh=mesh)

    monkeypatch.setattr(spec, "rounds_jit", jax.jit(rounds, static_argnums=range(6), static_argnames="mesh"))
    fresh = NeoX(target.config, target.params)  # its own program cache: nothing compiled with the real rule
    toks, _ = _sample(fresh, draft, 2)
    exact = _exact_marginals(target, [1, 2, 3], **SETTINGS)
    assert _chi2_pvalue(toks[:, 1], exact[1]) < 1e-6


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_refuses_another_tokenizer_and_bad_settings(pair, tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    target, draft = pair
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["other words entirely"] * 5, trainers.BpeTrainer(vocab_size=280, show_progress=False))
    hf.save(str(tmp_path / "other.json"))
    other = NeoX(draft.config, draft.params, Tokenizer.from_file(tmp_path / "other.json"))
    with pytest.raises(NeoXError, match=r"other\.json.*not the target's.*tokenizer\.json"):
        target.generate("Hello", draft=other)
    small = _model(vocab=256, layers=1)
    with pytest.raises(NeoXError, match="256 rows, fewer than the 300 ids"):
        target.generate("Hello", draft=small)
    with pytest.raises(NeoXError, match="draft_tokens must be in"):
        target.generate("Hello", draft=draft, draft_tokens=0)
    with pytest.raises(NeoXError, match="repetition_penalty is not supported"):
        target.generate("Hello", draft=draft, repetition_penalty=1.3)


def test_cli_draft_flags(pair, bpe_tokenizer, tmp_path, capsys):
    """`neox-jax generate --draft CKPT --draft-tokens K --json`: the target's tokens, and the statistics."""
    import json

    from neox_jax.cli import main
    from neox_jax.store.checkpoint import save_params

    target, draft = pair
    for name, m in (("target", target), ("draft", draft)):
        save_params(tmp_path / name, m.config, m.params, tokenizer_file=bpe_tokenizer)
    argv = ["generate", "--checkpoint", str(tmp_path / "target"), "--prompt", "Hello", "--max-new-tokens", "9"]
    argv += ["--ignore-eos", "--json", "--no-compile-cache", "--draft", str(tmp_path / "draft"), "--draft-tokens", "4"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    want = target.generate(["Hello"], max_new_tokens=9, stop_token_ids=[])
    assert out["completions"][0]["token_ids"] == want.token_ids[0]
    assert out["speculative"]["draft_tokens"] == 4 and out["speculative"]["target_steps"] >= 2
