"""Benchmarks, each run as `python -m bench.NAME` from the repository root, timing this project side by side
with its reference (the paper's algorithm, or transformers + PEFT) in one process."""
