"""The GPT-NeoX model: config and presets, the Flax NNX module tree, attention, int8, LoRA adapters, hook points."""
