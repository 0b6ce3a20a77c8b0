"""Sweeps over checkpoints: revisions x tasks -> results.jsonl, plots and summary."""
