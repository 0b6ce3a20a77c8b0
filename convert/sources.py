"""Reading tensors one at a time from Hugging Face checkpoint files (safetensors or PyTorch .bin), as numpy.

The only module (with convert/neox.py) that touches torch. PyTorch files are opened with weights_only=True and mmap:
a pickle that would run code is refused, and nothing is read before it is asked for.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from neox_jax.errors import NeoXError


class ConvertError(NeoXError):
    """Bad input to a converter: the message names the file and the tensor."""


def torch_to_numpy(t, where: str) -> np.ndarray:
    import torch

    if not t.is_floating_point():
        raise ConvertError(f"{where}: dtype {t.dtype} is not a floating-point weight")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly, the caller casts to the target dtype
        t = t.float()
    return t.detach().cpu().numpy()


def torch_load(path: Path) -> dict:
    """torch.load with weights_only=True (never a fallback that runs pickled code) and mmap (read lazily; legacy
    pre-1.6 files, which cannot be mapped, are read whole)."""
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (pre-1.6, not zip) file cannot be mmapped: read it whole, still safely
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph suggesting weights_only=False; keep only what the file asked for
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln or "Unsupported" in ln]
        first = re.sub(r"\x1b\[[0-9;]*m", "", (lines or str(e).strip().splitlines() or [type(e).__name__])[0])
        first = first.replace("WeightsUnpickler error: ", "").split(". Please use")[0]
        raise ConvertError(
            f"{path}: refused to load: the file is not plain weights (weights_only=True: {first}); "
            f"loading it would run code stored in it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.is_file() and not zipfile.is_zipfile(path):  # torch >= 1.6 files are zip archives, indexed at the end
            first = "the zip index at the end of the file is missing"
        raise ConvertError(f"{path}: cannot read PyTorch file (truncated or corrupt?): {first}") from None


class HFTensors:
    """The tensors of a `save_pretrained` directory: model.safetensors, sharded safetensors with
    model.safetensors.index.json, pytorch_model.bin, or sharded .bin with pytorch_model.bin.index.json."""

    def __init__(self, src: str | os.PathLike):
        self.src = Path(src)
        self.file_of: dict[str, Path] = {}
        self._bins: dict[Path, dict] = {}
        st_index, bin_index = self.src / "model.safetensors.index.json", self.src / "pytorch_model.bin.index.json"
        if st_index.is_file() or (self.src / "model.safetensors").is_file():
            self.kind, index, single = "safetensors", st_index, self.src / "model.safetensors"
        elif bin_index.is_file() or (self.src / "pytorch_model.bin").is_file():
            self.kind, index, single = "bin", bin_index, self.src / "pytorch_model.bin"
        else:
            raise ConvertError(f"{self.src}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
        if not index.is_file():
            self.file_of = {name: single for name in self._names_in(single)}
            return
        weight_map = self._weight_map(index)
        for f in sorted(set(weight_map.values())):
            for name in self._names_in(f):
                if name in self.file_of:  # else the later file's values would silently win
                    raise ConvertError(
                        f"{index}: tensor {name} is stored in two shards, {self.file_of[name].name} and {f.name}"
                    )
                if weight_map.get(name) != f:
                    said = f"names {weight_map[name].name} for it" if name in weight_map else "does not list it"
                    raise ConvertError(f"{f}: holds tensor {name}, but {index.name} {said}")
                self.file_of[name] = f
        unheld = sorted(set(weight_map) - set(self.file_of))
        if unheld:
            raise ConvertError(
                f"{index}: lists {len(unheld)} tensor(s) that no shard holds: {unheld[:5]}"
                + (" ..." if len(unheld) > 5 else "")
                + f" (e.g. {unheld[0]} in "
                f"{weight_map[unheld[0]].name})"
            )

    def _weight_map(self, index: Path) -> dict[str, Path]:
        """The index's tensor -> shard file map (every shard it names must exist)."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of tensor name -> file name")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: not a valid checkpoint index ({e})") from None
        out = {name: self.src / f for name, f in weight_map.items()}
        for f in sorted(set(out.values())):
            if not f.is_file():
                raise ConvertError(f"{index}: names shard {f.name}, which does not exist")
        return out

    def _names_in(self, f: Path) -> list[str]:
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(f, framework="pt") as h:
                    return list(h.keys())
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise ConvertError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        self._bins[f] = torch_load(f)
        return list(self._bins[f].keys())

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> np.ndarray:
        f = self.file_of[name]
        where = f"{f}: tensor {name}"
        try:
            if self.kind == "safetensors":
                from safetensors import safe_open

                with safe_open(f, framework="pt") as h:
                    t = h.get_tensor(name)
            else:
                t = self._bins[f][name]
            return torch_to_numpy(t, where)
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(f"{where}: cannot read (truncated or corrupt file?): {e}") from None
