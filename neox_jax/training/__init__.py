"""Fine-tuning: the jitted step, the run driver, the text data."""
