"""The benchmarks behind `neox-jax benchmark NAME`: one module each (`python -m neox_jax.bench.NAME --help`), each
timing neox-jax and, where torch / transformers are importable, the PyTorch reference side by side in one run."""
