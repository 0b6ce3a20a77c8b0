"""neox-jax: GPT-NeoX (20B and the Pythia suite) in pure JAX."""

from neox_jax.api import NeoX, load
from neox_jax.model.config import PRESETS, NeoXConfig, preset

__all__ = ["NeoX", "NeoXConfig", "PRESETS", "load", "preset"]
__version__ = "0.1.0"
