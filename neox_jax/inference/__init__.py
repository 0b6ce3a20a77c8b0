"""Generation: the KV cache, the compiled prefill / decode programs, sampling, stop strings, the host-side driver."""
