"""Log-likelihood scoring of (context, continuation) token pairs, packed so that XLA compiles a handful of shapes.

What lm-eval's `hf` backend does per request (one padded row per request, logits over every position), we do per
*prefix*: requests are left-truncated to the model's max length exactly as lm-eval does
(`(context + continuation)[-(max_length + 1):][:-1]`), requests that share the same truncated context become one
tree -- the context once, then each distinct continuation as a branch that sees the context and itself only -- and
several trees share a row of a fixed length bucket, kept apart by a block-diagonal mask. Positions restart at 0 in
each tree and continue from the context in each branch, so every scored token sees exactly the tokens, at exactly
the positions, it would see alone. The output layer runs only at the scored positions (K per row), not at all T.

Shapes: B rows, T tokens per row (a power-of-two bucket), K scored positions per row (a power-of-two bucket), D
hidden, V vocab. One compile per (B, T, K).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, model_from_params
from neox_jax.model.reductions import sum_exp

MIN_BUCKET = 16
HEAD_ROWS = 128  # scored positions per output-layer chunk, all rows together: [HEAD_ROWS, V] float32 logits at a time.
# Small chunks run far from the matmul peak and large chunks' logits stop fitting in cache (docs/performance.md).


def bucket(n: int, lo: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class Segment:
    """One context and some of its continuations (branches): tokens = prefix + b1[:-1] + b2[:-1] + ...

    scored: (position in the segment whose logits predict the token, target token, branch index) triples."""

    tokens: list[int]
    positions: list[int]
    branch_ids: list[int]  # 0: context, k >= 1: the k-th branch
    scored: list[tuple[int, int, int]]
    branch_keys: list[int]  # global branch ids, one per branch (k - 1 -> key)


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """lm-eval's left truncation: the model input is (context + continuation)[-(max_length + 1):][:-1]; returns the
    (possibly shortened) context and the continuation, whose concatenation minus its last token is that input."""
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"continuation of {len(continuation)} tokens exceeds the model's max length {max_length}")
    if not context:
        raise ValueError("empty context: lm-eval passes the prefix token (BOS/EOS) as context")
    seq = (list(context) + list(continuation))[-(max_length + 1) :]
    return seq[: len(seq) - len(continuation)], list(continuation)


def build_segments(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int):
    """requests: (context tokens, continuation tokens) pairs. Returns the segments and, per request, its branch key
    (identical requests share one)."""
    groups: dict[tuple, dict[tuple, int]] = defaultdict(dict)  # context -> {continuation: branch key}
    keys: list[int] = []
    n_branches = 0
    for ctx, cont in requests:
        ctx, cont = truncate(ctx, cont, max_length)
        branches = groups[tuple(ctx)]
        if tuple(cont) not in branches:
            branches[tuple(cont)] = n_branches
            n_branches += 1
        keys.append(branches[tuple(cont)])
    segments: list[Segment] = []
    for ctx, branches in groups.items():
        seg = None
        for cont, key in sorted(branches.items(), key=lambda kv: -len(kv[0])):
            extra = len(cont) - 1  # input tokens this branch adds; it scores len(cont) tokens
            if seg is None or len(seg.tokens) + extra > max_length or len(seg.scored) + len(cont) > max_length:
                seg = Segment(list(ctx), list(range(len(ctx))), [0] * len(ctx), [], [])
                segments.append(seg)
            k = len(seg.branch_keys) + 1
            seg.branch_keys.append(key)
            start = len(seg.tokens)
            for j, tok in enumerate(cont):
                seg.scored.append((len(ctx) - 1 if j == 0 else start + j - 1, tok, k))
            seg.tokens += cont[:-1]
            seg.positions += list(range(len(ctx), len(ctx) + extra))
            seg.branch_ids += [k] * extra
    return segments, keys


@dataclasses.dataclass
class Row:
    length: int  # T
    segments: list[Segment] = dataclasses.field(default_factory=list)
    used: int = 0
    n_scored: int = 0


def pack_rows(segments: Sequence[Segment], min_length: int, max_length: int) -> list[Row]:
    """First-fit decreasing: each segment goes into the first row with room for its tokens and scored positions;
    a new row gets the bucket of its first segment (at least min_length, at most the bucket of max_length)."""
    rows: list[Row] = []
    for seg in sorted(segments, key=lambda s: -max(len(s.tokens), len(s.scored))):
        need, scored = len(seg.tokens), len(seg.scored)
        row = next((r for r in rows if r.used + need <= r.length and r.n_scored + scored <= r.length), None)
        if row is None:
            row = Row(min(bucket(max(need, scored, min_length)), bucket(max_length)))
            rows.append(row)
        row.segments.append(seg)
        row.used += need
        row.n_scored += scored
    return rows


def row_arrays(rows: Sequence[Row], n_rows: int, length: int, k: int):
    """Numpy inputs for one batch (rows beyond len(rows) are empty padding rows)."""
    ids = np.zeros((n_rows, length), np.int32)
    pos = np.zeros((n_rows, length), np.int32)
    doc = np.full((n_rows, length), -1, np.int32)  # -1: padding slot
    branch = np.zeros((n_rows, length), np.int32)
    idx = np.zeros((n_rows, k), np.int32)
    tgt = np.zeros((n_rows, k), np.int32)
    where: list[list[tuple[int, int]]] = []  # per row: (global branch key, slot in K) for each scored token
    for r, row in enumerate(rows):
        off, s, w = 0, 0, []
        for d, seg in enumerate(row.segments):
            n = len(seg.tokens)
            ids[r, off : off + n] = seg.tokens
            pos[r, off : off + n] = seg.positions
            doc[r, off : off + n] = d
            branch[r, off : off + n] = seg.branch_ids
            for p, t, bk in seg.scored:
                idx[r, s], tgt[r, s] = off + p, t
                w.append((seg.branch_keys[bk - 1], s))
                s += 1
            off += n
        where.append(w)
    return (ids, pos, doc, branch, idx, tgt), where


def tree_mask(doc, branch):
    """doc, branch [B, T] -> mask [B, T, S]: same tree, causal, and a branch sees the context and itself only."""
    t = doc.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, S]
    same_doc = doc[:, :, None] == doc[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return same_doc & visible & causal[None]


def hidden_states(cfg: NeoXConfig, params: Params, ids, positions, mask, rows=None, attention=None):
    """The model's final-layernormed hidden states [B, T, D] under an arbitrary [B, T, T] attention mask; with rows
    [B, K], those tokens' only, [B, K, D] (the last layer then runs for them alone). attention: None (per backend)
    or "plain" / "xla" / "cudnn" (neox_jax/model/attention.py)."""
    model = model_from_params(cfg, params, attention=attention)
    valid = jnp.ones(ids.shape, bool)  # unused under an explicit mask
    return model.hidden_states(ids, positions, valid, attn_mask=mask, rows=rows)[0], model


def logprob_and_greedy(logits, targets):
    """logits [..., V] float32, targets [...] int -> (log_softmax(logits)[target], argmax(logits) == target).

    The argmax test as the hf backend makes it (the first maximum wins a tie), without argmax's value-and-index
    reduction, which XLA CPU ran slower than the max and the sum here together: the target holds the maximum and no
    earlier token does."""
    top = logits.max(-1)
    lse = top + jnp.log(sum_exp(logits, top[..., None]))  # in chunks: see reductions.py
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    tie_before = jnp.any((jnp.arange(logits.shape[-1]) < targets[..., None]) & (logits == top[..., None]), axis=-1)
    return target - lse, (target == top) & ~tie_before


@functools.partial(jax.jit, static_argnums=0, static_argnames=("attention", "logprob_rows"))
def score_rows(
    cfg: NeoXConfig, params: Params, ids, positions, doc, branch, idx, targets, attention=None, logprob_rows=None
):
    """-> log p(target) [B, K] float32 and whether target is the argmax [B, K], over the full, padded vocabulary as
    lm-eval's hf backend does (logprob_rows None), or over its first logprob_rows rows (the tokenizer's ids)."""
    picked, model = hidden_states(cfg, params, ids, positions, tree_mask(doc, branch), idx, attention)  # [B, K, D]
    b, k, d = picked.shape
    chunk = min(k, 1 << max(0, (HEAD_ROWS // b).bit_length() - 1))  # a power of two, as k is: it divides k
    chunks = picked.reshape(b, k // chunk, chunk, d).swapaxes(0, 1)  # [K/c, B, c, D]
    tchunks = targets.reshape(b, k // chunk, chunk).swapaxes(0, 1)  # [K/c, B, c]

    def head(args):
        h, t = args
        logits = model.logits(h)  # [B, c, V] float32
        if logprob_rows is not None:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < logprob_rows, logits, -jnp.inf)
        return logprob_and_greedy(logits, t)

    lp, greedy = jax.lax.map(head, (chunks, tchunks))
    return lp.swapaxes(0, 1).reshape(b, k), greedy.swapaxes(0, 1).reshape(b, k)


def batch_shape_rows(n: int, batch_rows: int, row_multiple: int = 1) -> int:
    """Rows for a batch holding n rows: batch_rows, or for a final short batch the smallest power of two >= n (and a
    multiple of row_multiple, the mesh's data axis), so a few leftover rows are not computed as a full batch."""
    rows = bucket(max(n, row_multiple), lo=1)
    return rows if rows < batch_rows and rows % row_multiple == 0 else batch_rows


def score_requests(
    cfg: NeoXConfig,
    params: Params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_rows: int,
    pack_length: int = 512,
    row_multiple: int = 1,
    place=None,
    progress=None,
    attention=None,
    logprob_rows=None,
):
    """(context, continuation) token pairs -> [(sum log p(continuation | context), continuation is greedy)] in order.

    batch_rows: rows per forward call (B); pack_length: the shortest row bucket (short requests share rows of this
    length); row_multiple: every batch's rows are a multiple of it (the mesh's data axis); place: optional function
    applied to each numpy input (e.g. jax.device_put onto a mesh's data axis); progress: optional callable(n) called
    with the number of requests finished after each batch; attention: see hidden_states; logprob_rows: see
    score_rows."""
    if not requests:
        return []
    segments, keys = build_segments(requests, max_length)
    rows = pack_rows(segments, min(pack_length, max_length), max_length)
    n_branch = max(keys) + 1
    logp = np.zeros(n_branch, np.float64)
    greedy = np.ones(n_branch, bool)
    by_length: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        by_length[row.length].append(row)
    branch_requests = np.bincount(np.asarray(keys), minlength=n_branch)
    place = place or (lambda x: x)
    for length in sorted(by_length, reverse=True):
        todo = sorted(by_length[length], key=lambda r: -r.n_scored)
        for start in range(0, len(todo), batch_rows):
            batch = todo[start : start + batch_rows]
            k = min(bucket(max(r.n_scored for r in batch)), length)
            arrays, where = row_arrays(batch, batch_shape_rows(len(batch), batch_rows, row_multiple), length, k)
            lp, gr = score_rows(
                cfg, params, *(place(a) for a in arrays), attention=attention, logprob_rows=logprob_rows
            )
            lp, gr = np.asarray(lp, np.float64), np.asarray(gr)
            done = set()
            for r, w in enumerate(where):
                for key, s in w:
                    logp[key] += lp[r, s]
                    greedy[key] &= gr[r, s]
                    done.add(key)
            if progress is not None:
                progress(int(sum(branch_requests[key] for key in done)))
    return [(float(logp[key]), bool(greedy[key])) for key in keys]
