"""The lm-evaluation-harness (0.4.x) adapter: `--model neox-jax`.

    lm_eval --model neox-jax --model_args pretrained=ckpt/pythia-1b,dtype=bfloat16,batch_size=8 --tasks piqa
    (through `neox-jax-lm-eval`, which registers the model first), or `neox-jax evaluate ...`.

Model args: pretrained (or checkpoint): a neox-jax checkpoint directory; dtype (float32 / float16 / bfloat16);
batch_size (rows per forward call); mesh ('data=2,model=4'); finetuned (a fine-tuning run directory); adapter (a PEFT
LoRA adapter directory); quantize (int8 | llm.int8); max_length
(default: the model's max_position_embeddings, as lm-eval's hf backend); max_gen_toks (default 256, as hf);
pack_length (shortest packed row, default 512); tokenizer (a tokenizer.json when the checkpoint has none).

Every request is tokenized, truncated and scored exactly as lm-eval's `hf` backend does it (TemplateLM._encode_pair,
left truncation at max_length, rolling windows from lm_eval.utils, stop strings cut by lm-eval's own
postprocess_generated_text); only the batching differs (neox_jax/evaluation/scoring.py packs requests into a few
shapes).
lm-eval is an optional dependency: `pip install 'neox-jax[eval]'`.
"""

from __future__ import annotations

import sys

import jax
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own backends before ours: get_model needs them)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover
    raise ImportError(
        f"neox_jax.evaluation.harness needs lm-evaluation-harness ({e}); install it with: pip install 'neox-jax[eval]'"
    ) from None

import neox_jax
from neox_jax.evaluation.scoring import score_requests
from neox_jax.parallel import sharding
from neox_jax.store.tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 8


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    n = int(value)
    if n < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return n


def load_model(path, dtype=None, mesh=None, finetuned=None, quantize=None, adapter=None):
    """neox_jax.load, onto a mesh given as a Mesh or a spec string ('data=2,model=4')."""
    if isinstance(mesh, str):
        mesh = sharding.make_mesh(mesh)
    return neox_jax.load(path, dtype, mesh=mesh, finetuned=finetuned, adapter=adapter, quantize=quantize), mesh


@register_model("neox-jax", "neox_jax")
class NeoXLM(TemplateLM):
    def __init__(
        self,
        pretrained=None,
        checkpoint=None,
        dtype=None,
        batch_size=None,
        mesh=None,
        finetuned=None,
        quantize=None,
        max_length=None,
        max_gen_toks=256,
        pack_length=512,
        tokenizer=None,
        model=None,
        adapter=None,
        logprob_vocab="all",
        **kwargs,
    ):
        super().__init__()
        # lm-eval's command line passes device / max_batch_size to every backend: JAX places arrays itself
        unknown = {k for k in kwargs if k not in ("device", "max_batch_size", "trust_remote_code")}
        if unknown:
            raise ValueError(
                f"neox-jax: unknown model args {sorted(unknown)}; known: pretrained, dtype, batch_size, "
                f"mesh, finetuned, adapter, quantize, max_length, max_gen_toks, pack_length, tokenizer, logprob_vocab"
            )
        if model is None:
            path = pretrained or checkpoint
            if path is None:
                raise ValueError("neox-jax: pass pretrained=<neox-jax checkpoint directory>")
            model, mesh = load_model(
                path, None if dtype in (None, "auto") else dtype, mesh, finetuned, quantize, adapter
            )
        elif isinstance(mesh, str):
            mesh = sharding.make_mesh(mesh)
        self.model, self.mesh = model, mesh
        if tokenizer:
            model.tokenizer = Tokenizer.from_file(tokenizer)  # generation decodes with it too
        self.tok: Tokenizer = model.tokenizer
        if self.tok is None:
            raise ValueError(f"{model.path}: the checkpoint has no tokenizer.json; pass tokenizer=<tokenizer.json>")
        self.batch_rows = _batch_size(batch_size)
        if mesh is not None:
            sharding.check_divisible(model.config, mesh, self.batch_rows)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.pack_length = int(pack_length)
        # log-probabilities over every output row (lm-eval's hf backend, vLLM, `neox-jax serve`'s default) or over
        # the tokenizer's ids only (`neox-jax serve --logprob-vocab tokenizer`)
        if logprob_vocab not in ("all", "tokenizer"):
            raise ValueError(f"neox-jax: logprob_vocab={logprob_vocab!r}; expected all or tokenizer")
        rows = min(model.config.vocab_size, self.tok.vocab_size)
        self.logprob_rows = None if logprob_vocab == "all" or rows == model.config.vocab_size else rows

    # ---- what lm-eval asks of a model ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:  # the 20B tokenizer's BOS is its EOS, <|endoftext|>
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tok.source.replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": self.model.config.num_params,
            "model_dtype": str(self.model.dtype),
            "model_path": self.model.path,
        }

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)  # the 20B tokenizer adds no BOS, with or without special tokens
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _place(self, x):
        return x if self.mesh is None else jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

    # ---- log-likelihoods -----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) strings, context tokens, continuation tokens) -> (logprob, is_greedy)."""
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="neox-jax loglikelihood")
        res = score_requests(
            self.model.config,
            self.model.params,
            [(c, k) for _, c, k in requests],
            max_length=self.max_length,
            batch_rows=self.batch_rows,
            pack_length=self.pack_length,
            row_multiple=sharding.data_size(self.mesh),
            place=self._place,
            progress=bar.update,
            logprob_rows=self.logprob_rows,
        )
        bar.close()
        for (strings, _, _), answer in zip(requests, res):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Rolling windows at max_length (lm_eval.utils.get_rolling_token_windows, context_len=1, disjoint), all
        windows of all documents scored in one packed pass."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string, EOS or max_gen_toks, batched like lm-eval's hf backend (grouped by
        generation kwargs, longest prompts first, contexts left-truncated to max_length - max_gen_toks)."""
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="neox-jax generate_until")
        order = Collator(
            [r.args for r in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for chunk in order.get_batched(n=self.batch_rows):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) > 0.0:
                raise ValueError(f"neox-jax evaluates greedily; this task asks for sampling: {all_kwargs[0]}")
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a context in max_length {self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]
            for context, gen_kwargs, toks in zip(contexts, all_kwargs, self._generate(prompts, max_gen, until)):
                text = postprocess_generated_text(self.tok_decode(toks), until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(res)

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy continuations (token ids, cut before EOS) of a batch of prompts, through NeoX.generate (KV cache,
        compiled prefill and decode loop). The stop strings only end generation early: generate_until cuts the text
        at them itself, as lm-eval does, so the result does not depend on where generation stopped."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        stops = [u for u in until if u and u != eos_text]
        out = self.model.generate(
            prompts, max_new_tokens=max_new, temperature=0.0, stop=stops or None, stop_token_ids=[self.eot_token_id]
        )
        return [ids[: ids.index(self.eot_token_id)] if self.eot_token_id in ids else ids for ids in out.token_ids]


def cli() -> None:
    """`neox-jax-lm-eval ...`: lm-eval's own command line with `--model neox-jax` registered."""
    import os

    from lm_eval.__main__ import cli_evaluate

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap forks; forking a JAX process can hang
    sys.argv[0] = "lm-eval"
    cli_evaluate()
