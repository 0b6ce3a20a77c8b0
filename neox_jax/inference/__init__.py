"""Generation: the compiled programs and their host-side drivers."""
