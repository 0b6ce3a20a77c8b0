"""neox-jax: GPT-NeoX (20B and the Pythia suite) in pure JAX."""

from neox_jax.api import NeoX, load
from neox_jax.model.config import PRESETS, NeoXConfig, preset
from neox_jax.store.hub import pythia_model_ids, pythia_steps

__all__ = ["NeoX", "NeoXConfig", "PRESETS", "load", "preset", "pythia_model_ids", "pythia_steps"]
__version__ = "0.1.0"
