"""What the benchmarks count is what the code runs: the memorization floor's dense products equal the dot products
in the traced forward (a floor that left products out would call a goal unreachable when it is not), and the matmul
survey's forms all compute the same product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.bench._floor import attention_gflop, batch_matmuls
from neox_jax.model.config import preset
from neox_jax.model.neox import abstract_params, forward


def dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs (pjit, scan, remat) included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            a = eqn.invars[0].aval.shape
            contracted = int(np.prod([a[i] for i in lc]))
            total += 2 * contracted * int(np.prod(eqn.outvars[0].aval.shape))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += dot_flops(sub)
    return total


def test_prompt_products_and_attention_equal_the_forward_s_dots():
    cfg = preset("tiny")
    b, k = 3, 8
    params = abstract_params(cfg)
    ids = jax.ShapeDtypeStruct((b, k), jnp.int32)
    traced = dot_flops(jax.make_jaxpr(lambda p, i: forward(cfg, p, i)[0])(params, ids).jaxpr)
    prompt = [p for p in batch_matmuls(cfg, b, k, 1) if p[0] == b * k]  # n = 1: the prompt's products only
    dense = sum(2 * m * i * o * c for m, i, o, c in prompt)
    unembed_all_rows = 2 * b * k * cfg.hidden_size * cfg.vocab_size  # the plain forward scores every position
    # the forward attends over all k keys (masked), the floor over the causal half: t + 1 keys at query t
    attention_full = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * b * k * k
    attention_causal = attention_gflop(cfg, b, k, 1) * 1e9
    assert attention_causal < attention_full
    assert traced == dense + unembed_all_rows + attention_full


def test_decode_steps_are_counted_once_per_generated_token_but_the_last():
    cfg = preset("tiny")
    b, k, n = 2, 4, 5
    products = batch_matmuls(cfg, b, k, n)
    steps = [p for p in products if p[0] == b]
    unembed = [p for p in steps if p[2] == cfg.vocab_size]
    assert sum(c for *_, c in unembed) == 1 + (n - 1)  # the prompt's last position, then n - 1 steps
    body = [p for p in steps if p[2] != cfg.vocab_size]
    assert {c for *_, c in body} == {cfg.num_hidden_layers * (n - 1)}


def test_matmul_survey_forms_compute_the_same_product_and_cover_every_cell():
    from neox_jax.bench.matmul import DECODE_FORM, forms, weight_shapes, worker

    shapes = {k: v for k, v in weight_shapes(preset("tiny")).items() if k in ("dense_4h_to_h", "embed_out")}
    out = worker(shapes, [1, 3], repeats=1)  # raises when a form's product differs from x @ W
    assert set(out) == {f"{n}|{b}|{f}" for n in shapes for b in (1, 3) for f in forms()}
    assert DECODE_FORM in forms() and all(ms > 0 for ms in out.values())
