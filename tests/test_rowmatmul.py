"""The decode layout's matmul forms (model/rowmatmul.py) and low-precision weights read in the [O, I] layout: every
form against NumPy, weight-only int8 decode through the transposed layout against today's stored-layout int8 path and
against the float model of the dequantized weights, bf16 / f16 decode against their stored layout, and the layout
choice per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neox_jax
from neox_jax.inference.decode import Layout, layout_for, transpose_kernels
from neox_jax.inference.generate import Generator
from neox_jax.model import quantize as Q
from neox_jax.model import rowmatmul
from neox_jax.model.neox import LINEARS, forward, model_from_params, stack_layers

PROMPTS = [[5, 17, 99, 100, 42, 7, 8], [61, 3], [120, 121, 122, 9, 10, 11, 12, 13, 14, 15]]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8])
@pytest.mark.parametrize("m", [1, 2, 5, rowmatmul.FEW_ROWS + 6])
def test_every_form_equals_numpy(dtype, m):
    """kernel [O, I] x rows [M, I] -> [M, O] float32 in each form; float kernels multiply rows rounded to their
    dtype, int8 kernels the rows as given."""
    rs = np.random.RandomState(m)
    o, i = 48, 40
    if dtype == jnp.int8:
        kernel = jnp.asarray(rs.randint(-127, 128, (o, i)), jnp.int8)
    else:
        kernel = jnp.asarray(rs.randn(o, i), dtype)
    rows = jnp.asarray(rs.randn(m, i), jnp.float32)
    lhs = rows if dtype == jnp.int8 else rows.astype(dtype)
    ref = np.asarray(lhs, np.float64) @ np.asarray(kernel, np.float64).T
    for how in (None,) + rowmatmul.FORMS:
        if how == "limbs" and dtype != jnp.int8:
            with pytest.raises(ValueError, match="limbs form multiplies int8 kernels"):
                rowmatmul.matmul_t(kernel, rows, how)
            continue
        y = jax.jit(rowmatmul.matmul_t, static_argnums=2)(kernel, rows, how)
        assert y.shape == (m, o) and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-3 * np.abs(ref).max(), err_msg=str(how))


def test_form_per_dtype_and_rows():
    few = rowmatmul.FEW_ROWS
    for dtype in (jnp.float32, jnp.float16):
        assert rowmatmul.form(dtype, 1) == rowmatmul.form(dtype, 4096) == "dot"
    assert [rowmatmul.form(jnp.bfloat16, m) for m in (1, 2, few, few + 1)] == ["rowwise", "reduce", "reduce", "dot"]
    int8 = [rowmatmul.form(jnp.int8, m, int8_dot=False) for m in (1, 2, few, few + 1)]
    assert int8 == ["rowwise"] * 3 + ["dequant-dot"]
    limbs = rowmatmul.LIMB_ROWS
    int8 = [rowmatmul.form(jnp.int8, m, int8_dot=True) for m in (1, limbs, limbs + 1, few + 1)]
    assert int8 == ["limbs", "limbs", "rowwise", "dequant-dot"]
    assert rowmatmul.form(jnp.int8, 1, int8_dot=True, weights=rowmatmul.LIMB_MIN_WEIGHTS - 1) == "rowwise"
    assert rowmatmul.form(jnp.float32, 1, int8_dot=True) == "dot"


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_limbs_split_rows_exactly_and_sum_nearer_than_float32(scale):
    """The int8 digits of a row give back the row (to 2^-30 of its largest element), and the limbs product of an
    int8 kernel is nearer the exact product than the float32 form's summation, at any scale; a zero row gives zeros,
    a non-finite row non-finite outputs."""
    rs = np.random.RandomState(1)
    kernel = jnp.asarray(rs.randint(-127, 128, (64, 2048)), jnp.int8)
    rows = (rs.randn(3, 2048) * scale).astype(np.float32)
    rows[0, 7] *= 500  # an outlier feature
    rows[2] = 0.0
    digits, e = rowmatmul.limb_digits(jnp.asarray(rows))
    assert digits.shape == (rowmatmul.LIMBS, 3, 2048) and digits.dtype == jnp.int8
    assert int(jnp.abs(digits[0]).max()) <= 64
    weights = 256.0 ** np.arange(rowmatmul.LIMBS - 1, -1, -1)
    back = (
        np.einsum("k,kmi->mi", weights, np.asarray(digits, np.float64))
        * 2.0 ** (np.asarray(e) - rowmatmul.LIMB_BITS)[:, None]
    )
    top = np.abs(rows).max(axis=1, keepdims=True)
    assert np.all(np.abs(back - rows) <= top * 2.0**-30)
    big = np.abs(rows) >= top / 64
    np.testing.assert_array_equal(back[big], rows[big])  # every element past 1/64 of the largest: exact
    exact = rows.astype(np.float64) @ np.asarray(kernel, np.float64).T
    fn = jax.jit(rowmatmul.matmul_t, static_argnums=2)
    limbs, floats = (
        np.asarray(fn(kernel, jnp.asarray(rows), "limbs")),
        np.asarray(fn(kernel, jnp.asarray(rows), "rowwise")),
    )
    assert np.all(limbs[2] == 0)
    err = np.abs(limbs - exact).max(axis=1)[:2]
    assert np.all(err <= np.abs(floats - exact).max(axis=1)[:2]), (err, np.abs(floats - exact).max(axis=1))
    assert np.all(err <= 1e-6 * np.abs(exact).max(axis=1)[:2])
    rows[1, 3] = np.nan
    rows[2, 0] = np.inf
    y = np.asarray(fn(kernel, jnp.asarray(rows), "limbs"))
    assert np.isfinite(y[0]).all() and np.isnan(y[1:]).all()


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return neox_jax.load(tiny_ckpt[1])


def test_layout_per_backend_and_mode(model):
    p = model.params
    w8, llm = Q.quantize_tree(p, "int8"), Q.quantize_tree(p, "llm.int8")
    assert layout_for(w8, "cpu") == Layout(True, "float32")  # int8 read as stored, in [O, I]
    assert layout_for(Q.cast_floats(p, jnp.bfloat16), "cpu") == Layout(True, "float32")
    assert layout_for(llm, "cpu") == Layout(False, "float32")  # the outlier split runs on the stored layout
    assert layout_for(w8, "gpu") == Layout(False, "float32")  # native dots
    t = transpose_kernels(w8)
    qkv = t["layers"][0]["attention"]["query_key_value"]
    assert qkv["kernel"].dtype == jnp.int8 and qkv["kernel"].shape == (4 * 3 * 16, 64) and qkv["scale"].shape == (192,)
    dense = w8["layers"][0]["attention"]["dense"]
    np.testing.assert_array_equal(  # row o of the [O, I] kernel is output channel o, its scale beside it
        np.asarray(t["layers"][0]["attention"]["dense"]["kernel"]), np.asarray(dense["kernel"]).reshape(-1, 64).T
    )
    with pytest.raises(ValueError, match="llm.int8"):
        model_from_params(model.config, transpose_kernels(llm), transposed=True)(
            jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool)
        )


def _dequantized(params):
    """The float32 model whose weights are the int8 kernels times their scales."""

    def one(name, lin):
        if not Q.is_quantized(lin):
            return lin
        kernel = Q.dequantize_weight(lin["kernel"], lin["scale"], LINEARS[name].einsum)
        return {k: v for k, v in lin.items() if k != "scale"} | {"kernel": kernel}

    return Q.map_linears(params, one)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 80])  # 80 tokens: past FEW_ROWS (the prefill's dequant-dot)
def test_transposed_int8_logits_equal_stored_int8_and_dequantized_float(model, stacked, rows):
    cfg = model.config
    w8 = Q.quantize_tree(model.params, "int8", embed_out=True)
    w8 = stack_layers(w8) if stacked else w8
    ids = jnp.asarray(np.random.RandomState(rows).randint(0, cfg.vocab_size, (1, rows)))
    pos, valid = jnp.arange(rows)[None], jnp.ones((1, rows), bool)
    stored = forward(cfg, w8, ids)[0]  # today's int8 path
    fn = jax.jit(lambda p, ids: model_from_params(cfg, p, transposed=True)(ids, pos, valid)[0])
    ours = fn(transpose_kernels(w8), ids)
    deq = forward(cfg, _dequantized(w8), ids)[0]
    scale = float(jnp.abs(stored).max())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(stored), atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(deq), atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("int8_dot", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int8_greedy_decode_equals_todays_int8_path(model, dtype, int8_dot, monkeypatch):
    """Weight-only int8 (the float params in float32 or float16): the default CPU layout ([O, I] int8 read as stored;
    with and without the limbs form of CPUs with int8 dots) generates today's stored-layout tokens, one row and a
    batch."""
    monkeypatch.setattr(rowmatmul, "fast_int8_dot", lambda: int8_dot)
    monkeypatch.setattr(rowmatmul, "LIMB_MIN_WEIGHTS", 0)  # the tiny model's kernels too
    traced = []
    limbs = rowmatmul._limbs
    monkeypatch.setattr(rowmatmul, "_limbs", lambda k, x: traced.append(x.shape) or limbs(k, x))
    jax.clear_caches()  # programs traced under the other setting are not reused
    params = Q.quantize_tree(Q.cast_floats(model.params, jnp.dtype(dtype)), "int8", embed_out=dtype == "float16")
    new = Generator(model.config, params)
    assert new.run_layout().transposed
    today = Generator(model.config, params, layout=Layout(False, "float32"))
    for prompts in (PROMPTS[:1], PROMPTS):
        a = new.generate(prompts, max_new_tokens=10, stop_token_ids=[]).token_ids
        assert a == today.generate(prompts, max_new_tokens=10, stop_token_ids=[]).token_ids
    assert bool(traced) == int8_dot  # the decode steps ran the limbs form (traced once per program)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_decode_logits_track_their_stored_layout(model, dtype):
    """bf16 / f16 in the reduce form: the same products as the stored layout's dots, summed in another order; the
    one-step logits after a prefill agree to the dtype's rounding and the greedy tokens agree."""
    params = Q.cast_floats(model.params, jnp.dtype(dtype))
    ids = jnp.asarray([PROMPTS[0]])
    n = ids.shape[1]
    pos, valid = jnp.arange(n)[None], jnp.ones((1, n), bool)
    ours = model_from_params(model.config, transpose_kernels(params), transposed=True)(ids, pos, valid)[0]
    ref = forward(model.config, params, ids)[0]
    rel = float(jnp.linalg.norm(ours - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel
    new = Generator(model.config, params).generate(PROMPTS, max_new_tokens=6, stop_token_ids=[]).token_ids
    old = Generator(model.config, params, layout=Layout(False, "float32"))
    old = old.generate(PROMPTS, max_new_tokens=6, stop_token_ids=[]).token_ids
    same = sum(a == b for x, y in zip(new, old) for a, b in zip(x, y))
    assert same >= 0.8 * 6 * len(PROMPTS), (new, old)  # half rounding may flip a near tie
