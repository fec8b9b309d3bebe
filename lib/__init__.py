"""Infrastructure that knows nothing of IniLoRA: device and dtype choice, the command-line runner and
atomic writes (common), the artifact format (artifacts), keyed caches (cache), data parallelism
(distributed), the run directory (runs), and running untrusted, model-written programs under limits
(sandbox)."""
