"""Converters: the only place in neox-jax that reads PyTorch files. Run `python -m convert --help`."""
