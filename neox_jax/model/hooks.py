"""Hook functions as a jit-static part plus traced arrays, so that a new function of the same code does not recompile.

`jax.jit` caches a compiled program per static argument; a Python closure passed as one is a new object each call (a
lambda made in a loop, a `functools.partial` over another cache's activation), so keying on the object recompiled every
call. Here a hook function is split into

  spec     hashable: its code object, its globals' identity, and its non-array closure / default / partial values
  arrays   the numpy / jax arrays it closes over (cells, defaults, partial arguments): passed to jit as traced inputs

and rebuilt inside the trace from (spec, traced arrays). Two calls with functions of the same code whose closures differ
only in array values share one compiled program; a change of a Python scalar, a string or a non-array object in the
closure is a new spec and compiles again (its value is part of the program). Values read from module globals are baked
in at the first compile: pass them through the closure or a partial argument instead.

Other callables (bound methods, objects with __call__) are static by themselves: hashed by value if hashable, by
identity otherwise, with no arrays pulled out.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


class _ById:
    """A static value compared by identity (unhashable closure values: lists, dicts, modules); keeps it alive."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ById) and other.value is self.value


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _static(x):
    """A hashable stand-in for x: (its type, x) when hashable (so 1 and 1.0 stay different programs), else _ById."""
    try:
        hash(x)
        return _Typed(x)
    except TypeError:
        return _ById(x)


class _Typed(tuple):
    """(type, value): equal only to the same value of the same type."""

    def __new__(cls, value):
        return super().__new__(cls, (type(value), value))

    @property
    def value(self):
        return self[1]


def _split_value(x) -> tuple[tuple, list]:
    """One closure / default / partial value -> (hashable spec, [arrays]). A container is rebuilt (a copy) only when
    it holds arrays; any other value is passed as itself, so a hook can append to a list it closes over."""
    leaves, treedef = jax.tree.flatten(x)
    if not any(_is_array(leaf) for leaf in leaves):
        return ("static", _static(x)), []
    arrays = [leaf for leaf in leaves if _is_array(leaf)]
    statics = tuple(None if _is_array(leaf) else _static(leaf) for leaf in leaves)
    return ("tree", treedef, statics, tuple(_is_array(leaf) for leaf in leaves)), arrays


def _join_value(spec, arrays: list):
    if spec[0] == "static":
        return spec[1].value
    _, treedef, statics, is_array = spec
    it = iter(arrays)
    leaves = [next(it) if a else (s.value) for s, a in zip(statics, is_array)]
    return jax.tree.unflatten(treedef, leaves)


def _split_values(values) -> tuple[tuple, list]:
    """A tuple of values -> (tuple of (spec, number of arrays)), all their arrays)."""
    specs, arrays = [], []
    for x in values:
        spec, arrs = _split_value(x)
        specs.append((spec, len(arrs)))
        arrays += arrs
    return tuple(specs), arrays


def _join_values(specs, arrays: list) -> tuple:
    out, at = [], 0
    for spec, n in specs:
        out.append(_join_value(spec, arrays[at : at + n]))
        at += n
    return tuple(out)


def split(fn: Callable) -> tuple[Any, list]:
    """fn -> (spec, arrays): spec is hashable and equal for functions of the same code and non-array values."""
    if isinstance(fn, functools.partial):
        func_spec, func_arrays = split(fn.func)
        keys = tuple(sorted(fn.keywords))
        args_spec, args_arrays = _split_values(fn.args + tuple(fn.keywords[k] for k in keys))
        return ("partial", func_spec, args_spec, keys, len(func_arrays)), func_arrays + args_arrays
    if isinstance(fn, types.FunctionType):
        cells = tuple(c.cell_contents for c in fn.__closure__ or ())
        values_spec, arrays = _split_values((*cells, fn.__defaults__, fn.__kwdefaults__))
        return ("function", fn.__code__, _ById(fn.__globals__), fn.__name__, values_spec), arrays
    return ("callable", _static(fn)), []


def join(spec, arrays: list) -> Callable:
    """The function of `split`, with `arrays` (tracers inside jit) in place of the arrays it held."""
    kind = spec[0]
    if kind == "partial":
        _, func_spec, args_spec, keys, n_func = spec
        values = _join_values(args_spec, arrays[n_func:])
        args, keywords = values[: len(values) - len(keys)], dict(zip(keys, values[len(values) - len(keys) :]))
        return functools.partial(join(func_spec, arrays[:n_func]), *args, **keywords)
    if kind == "function":
        _, code, globals_, name, values_spec = spec
        *cells, defaults, kwdefaults = _join_values(values_spec, arrays)
        fn = types.FunctionType(code, globals_.value, name, defaults, tuple(types.CellType(c) for c in cells))
        fn.__kwdefaults__ = kwdefaults
        return fn
    return spec[1].value
