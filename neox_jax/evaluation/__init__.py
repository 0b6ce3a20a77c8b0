"""Evaluation: the lm-evaluation-harness backend, the packed scorer, local task data."""
