"""Tools around the method, each run as `python -m tools.NAME` from the repository root: memory (the memory
estimate of a training run, `--dry-run`), peft_io (adapters to and from Hugging Face PEFT), compress (peft_io's
--rank K: an export cut to rank K by truncated SVD), figures (the paper's figures from runs and caches) and sweep
(grids of training runs)."""
