"""GPT-NeoX YAML configs (`configs/20B.yml`), read the way GPT-NeoX reads them, into a NeoXConfig.

GPT-NeoX loads each file with `yaml.load(..., FullLoader)` and then replaces `-` by `_` in the top-level keys. The
published 20B.yml is a YAML flow mapping with `#` comments, Python-style `True`, trailing commas and both spellings
(`num-layers`, `rotary_pct`). `load_yaml` is a small tolerant reader of that subset of YAML (flow mappings and lists,
plain block mappings, comments, YAML 1.1 scalars), so conversion needs no YAML library.

Keys left unset take GPT-NeoX's defaults (megatron/neox_arguments/neox_args.py): layernorm epsilon 1e-5, rotary base
10000, rotary_pct 1.0, activation gelu, sequential residual, tied input/output embeddings, learned position embeddings
(refused: neox-jax is rotary only).

GELU: GPT-NeoX with `bias-gelu-fusion: true` (20B) runs the fused bias+GELU kernel, which computes the tanh
approximation `0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2)))`; that is HF's `gelu_fast` (the HF 20B config says
`gelu_fast`), so the model is run with the form it was trained with. Without the fusion GPT-NeoX calls `F.gelu`, the
exact erf form (`gelu`); `onnx_safe` is erf too; `openai_gelu` is the tanh form (`gelu_new`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from neox_jax.model.config import NeoXConfig

from .sources import ConvertError

_BOOLS = {**dict.fromkeys(("true", "yes", "on"), True), **dict.fromkeys(("false", "no", "off"), False)}
_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)$")
_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)([eE][-+]?[0-9]+)?$")


def _scalar(text: str):
    s = text.strip()
    if s in ("", "~") or s.lower() == "null" or s == "None":
        return None
    if s.lower() in _BOOLS:
        return _BOOLS[s.lower()]
    if _INT.match(s):
        return int(s.replace("_", ""))
    if _FLOAT.match(s) and any(c.isdigit() for c in s):
        return float(s.replace("_", ""))
    if s.lower() in (".inf", "+.inf", "-.inf", ".nan"):
        return float(s.lower().replace(".", ""))
    return s


def _strip_comment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote and (quote == "'" or line[i - 1] != "\\"):
                quote = None
        elif c in "\"'" and (i == 0 or line[i - 1] in " \t{[,:"):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


class _Flow:
    """Recursive descent over a YAML flow value: {k: v, ...}, [a, b, ...], quoted or plain scalars; trailing commas."""

    def __init__(self, text: str, source: str):
        self.s, self.i, self.source = text, 0, source

    def fail(self, what: str):
        line = self.s.count("\n", 0, self.i) + 1
        raise ConvertError(f"{self.source}: line {line}: {what}")

    def ws(self):
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self, stops: str):
        self.ws()
        c = self.s[self.i] if self.i < len(self.s) else ""
        if c == "{":
            return self.collection("}", mapping=True)
        if c == "[":
            return self.collection("]", mapping=False)
        if c in "\"'":
            return self.quoted(c)
        start = self.i
        while self.i < len(self.s) and self.s[self.i] not in stops:
            if self.s[self.i] == ":" and ":" in stops and self.s[self.i + 1 : self.i + 2] in (" ", "\n", "\t", ""):
                break
            self.i += 1
        return _scalar(self.s[start : self.i])

    def quoted(self, q: str):
        end = self.i + 1
        while end < len(self.s):
            if self.s[end] == "\\" and q == '"':
                end += 2
                continue
            if self.s[end] == q:
                if q == "'" and self.s[end + 1 : end + 2] == "'":  # '' is an escaped quote
                    end += 2
                    continue
                break
            end += 1
        if end >= len(self.s):
            self.fail("unterminated quoted string")
        raw, self.i = self.s[self.i + 1 : end], end + 1
        if q == "'":
            return raw.replace("''", "'")
        try:
            return json.loads(f'"{raw}"')
        except json.JSONDecodeError:
            return raw

    def collection(self, close: str, mapping: bool):
        self.i += 1
        out: dict | list = {} if mapping else []
        while True:
            self.ws()
            if self.i >= len(self.s):
                self.fail(f"missing closing {close!r}")
            if self.s[self.i] == close:
                self.i += 1
                return out
            if mapping:
                key = self.value(":,}")
                self.ws()
                if self.s[self.i : self.i + 1] != ":":
                    self.fail(f"expected ':' after key {key!r}")
                self.i += 1
                if key in out:
                    self.fail(f"duplicate key {key!r}")
                out[key] = self.value(",}")
            else:
                out.append(self.value(",]"))
            self.ws()
            if self.s[self.i : self.i + 1] == ",":
                self.i += 1
            elif self.s[self.i : self.i + 1] != close:
                self.fail(f"expected ',' or {close!r}, found {self.s[self.i : self.i + 20]!r}")


def _block(lines: list[tuple[int, str]], pos: int, indent: int, source: str):
    """A block mapping or `- item` list at `indent`; returns (value, next position)."""
    is_list = lines[pos][1].startswith("- ") or lines[pos][1] == "-"
    out: dict | list = [] if is_list else {}
    while pos < len(lines) and lines[pos][0] == indent:
        text = lines[pos][1]
        if is_list:
            if not (text.startswith("- ") or text == "-"):
                raise ConvertError(f"{source}: expected a '- ' list item, found {text!r}")
            rest = text[1:].strip()
        else:
            key, sep, rest = text.partition(":")
            if not sep:
                raise ConvertError(f"{source}: expected 'key: value', found {text!r}")
            key = _Flow(key, source).value("")
        pos += 1
        rest = rest.strip()
        if not rest and pos < len(lines) and lines[pos][0] > indent:
            value, pos = _block(lines, pos, lines[pos][0], source)
        elif rest[:1] in ("{", "["):
            while rest.count(rest[0]) > rest.count("}]"["{[".index(rest[0])]) and pos < len(lines):
                rest, pos = rest + "\n" + lines[pos][1], pos + 1  # a flow value over several lines
            value = _Flow(rest, source).value("")
        else:
            value = _Flow(rest, source).value("") if rest[:1] in "\"'" and rest else _scalar(rest)
        if is_list:
            out.append(value)
        elif key in out:
            raise ConvertError(f"{source}: duplicate key {key!r}")
        else:
            out[key] = value
    return out, pos


def load_yaml(text: str, source: str = "<yaml>"):
    lines = [(len(ln) - len(ln.lstrip(" ")), ln.strip()) for ln in map(_strip_comment, text.splitlines())]
    lines = [ln for ln in lines if ln[1] and ln[1] not in ("---", "...")]
    if not lines:
        return {}
    if lines[0][1][0] in "{[":
        flow = _Flow("\n".join(" " * i + t for i, t in lines), source)
        value = flow.value("")
        flow.ws()
        if flow.i != len(flow.s):
            flow.fail(f"unexpected text after the document: {flow.s[flow.i : flow.i + 30]!r}")
        return value
    value, pos = _block(lines, 0, lines[0][0], source)
    if pos != len(lines):
        raise ConvertError(f"{source}: cannot parse line {lines[pos][1]!r} (indentation?)")
    return value


def read_neox_args(paths) -> dict:
    """Merges GPT-NeoX YAML files like GPT-NeoX: top-level '-' -> '_', a key in two files (or two spellings) is an
    error."""
    args: dict = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConvertError(f"{path}: no such config file")
        doc = load_yaml(path.read_text(), str(path))
        if not isinstance(doc, dict):
            raise ConvertError(f"{path}: expected a mapping of GPT-NeoX arguments, found {type(doc).__name__}")
        for key, value in doc.items():
            name = str(key).replace("-", "_")
            if name in args:
                raise ConvertError(f"{path}: key {key!r} is set twice (GPT-NeoX treats '-' and '_' alike)")
            args[name] = value
    return args


@dataclasses.dataclass(frozen=True)
class NeoxModelArgs:
    """The GPT-NeoX arguments that shape the weights, with GPT-NeoX's defaults applied."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    rotary_pct: float
    rotary_emb_base: float
    max_position_embeddings: int
    layernorm_epsilon: float
    gpt_j_residual: bool
    hidden_act: str
    tied_embeddings: bool  # not no_weight_tying: the output layer reuses word_embeddings (no layer L+4 file)
    output_layer_parallelism: str  # "column": final_linear split over vocab (dim 0); "row": over hidden (dim 1)
    attention_bias: bool
    model_parallel_size: int | None  # as written in the YAML; the files decide
    vocab_file: str | None

    def config(self, vocab_size: int) -> NeoXConfig:
        return NeoXConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            rotary_pct=self.rotary_pct,
            rotary_emb_base=self.rotary_emb_base,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.layernorm_epsilon,
            use_parallel_residual=self.gpt_j_residual,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
        )


def gelu_form(args: dict) -> str:
    if args.get("bias_gelu_fusion") and not args.get("onnx_safe"):
        return "gelu_fast"  # the fused kernel's tanh approximation (see the module docstring)
    if args.get("openai_gelu"):
        return "gelu_new"
    return "gelu"


def model_args(args: dict, source: str) -> NeoxModelArgs:
    def get(name, default):
        value = args.get(name)
        return default if value is None else value

    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if args.get(k) is None]
    if missing:
        raise ConvertError(f"{source}: missing required GPT-NeoX arguments {[k.replace('_', '-') for k in missing]}")
    unsupported = []
    if get("pos_emb", "learned") != "rotary":
        unsupported.append(f"pos-emb {get('pos_emb', 'learned')!r} (only 'rotary')")
    if get("norm", "layernorm") != "layernorm":
        unsupported.append(f"norm {args['norm']!r} (only 'layernorm')")
    if get("activation", "gelu") not in ("gelu", "relu"):
        unsupported.append(f"activation {args['activation']!r} (only 'gelu' or 'relu')")
    if get("gpt_j_tied", False):
        unsupported.append("gpt_j_tied: true")
    if get("num_kv_heads", args["num_attention_heads"]) != args["num_attention_heads"]:
        unsupported.append(f"num_kv_heads {args['num_kv_heads']} (grouped-query attention)")
    if not get("use_bias_in_norms", True):
        unsupported.append("use_bias_in_norms: false")
    if get("output_layer_parallelism", "column") not in ("column", "row"):
        unsupported.append(f"output_layer_parallelism {args['output_layer_parallelism']!r}")
    if unsupported:
        raise ConvertError(f"{source}: unsupported GPT-NeoX settings: {'; '.join(unsupported)}")
    act = "relu" if get("activation", "gelu") == "relu" else gelu_form(args)
    hidden = int(args["hidden_size"])
    return NeoxModelArgs(
        num_layers=int(args["num_layers"]),
        hidden_size=hidden,
        num_attention_heads=int(args["num_attention_heads"]),
        intermediate_size=int(get("intermediate_size", 4 * hidden)),
        rotary_pct=float(get("rotary_pct", 1.0)),
        rotary_emb_base=float(get("rotary_emb_base", 10000)),
        max_position_embeddings=int(get("max_position_embeddings", get("seq_length", 2048))),
        layernorm_epsilon=float(get("layernorm_epsilon", 1e-5)),
        gpt_j_residual=bool(get("gpt_j_residual", False)),
        hidden_act=act,
        tied_embeddings=not get("no_weight_tying", False),
        output_layer_parallelism=get("output_layer_parallelism", "column"),
        attention_bias=bool(get("use_bias_in_attn_linear", True)),
        model_parallel_size=args.get("model_parallel_size"),
        vocab_file=args.get("vocab_file"),
    )
