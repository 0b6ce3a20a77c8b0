"""Converters: the only place in neox-jax that reads PyTorch files. Run `neox-jax convert --help`.

Installed as the package `neox_jax_convert` (a name no user file shadows); in a checkout `python -m convert` also
works. Imports inside this folder are relative so both names load the same code."""
