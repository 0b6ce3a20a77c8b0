"""Files on disk: Orbax checkpoints, checksums, staged outputs, the Hub, small records, the tokenizer, PEFT adapters,
the compile cache, and the one seam to the converters (convert/)."""
