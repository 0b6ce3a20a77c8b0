"""Model internals: run_with_cache / run_with_hooks with TransformerLens hook names (run.py), and the first tools of a
study built on them (tools.py: logit lens, direct logit attribution, attention-pattern plots)."""

from neox_jax.interp.run import hook_names, run_with_cache, run_with_hooks

__all__ = ["hook_names", "run_with_cache", "run_with_hooks"]
