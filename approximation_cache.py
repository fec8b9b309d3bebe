"""Where IniLoRA's approximation is kept: computed once per model, weights and settings, reused after.

`cached_approximation(model_id, weights, cfg)` returns the A, B of approximate.py's eq. 1-3 from
the cache when the model, a fingerprint of its target weights, the target names and every setting
that changes A, B all match; otherwise it runs `approximate.approximate` and stores the result.
The cache is one artifact of lib/artifacts.py per setting:

    <cache_dir>/<model>-r<rank>-<key>.safetensors   A (r, d_in), B (d_out, r) of every target, float32
    <cache_dir>/<model>-r<rank>-<key>.json          the settings and the approximation's report

with <key> a hash of all that matters, in --cache-dir, else $INILORA_CACHE, else ~/.cache/inilora.
A cache that is missing, damaged, edited, non-finite, of the wrong shapes or for other settings is
never used: it is recomputed, and the one-line reason is printed. `python approximate.py` runs it.
"""
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

import approximate
from lib import distributed
from lib.artifacts import ArtifactError, check_tensors, read_artifact, save_artifact, sidecar_path, weights_fingerprint
from lib.distributed import World

ARTIFACT_KIND = "inilora-approximation"  # the cache's format name in its sidecar
ARTIFACT_VERSION = 2  # bump when the cache's layout or meaning changes (1: its own sidecar code)


def default_cache_dir():
    return Path(os.environ.get("INILORA_CACHE") or "~/.cache/inilora").expanduser()


def cache_path(cache_dir, model_id, fingerprint, cfg):
    """The cache for these weights and settings (its sidecar: .json): the name hashes all that matters."""
    keyed = dict(format_version=ARTIFACT_VERSION, model_id=model_id,
                 weights_fingerprint=fingerprint, settings=cfg.settings())
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_id)}-r{cfg.rank}-{key}"
    return Path(cache_dir) / f"{stem}.safetensors"


def check_writable(cache_dir):
    """Raises ValueError now, before any computation, if the cache could not be written later."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as e:
        raise ValueError(f"the cache directory {str(cache_dir)!r} is not writable "
                         f"({e.strerror or e}). Pass --cache-dir (or set INILORA_CACHE) to a "
                         "writable directory.") from None


def _difference(found, expected):
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
        return ", ".join(f"{k}={found.get(k)!r} (expected {expected.get(k)!r})" for k in keys)
    return f"{found!r} (expected {expected!r})"


def read_cache(path, expected, shapes, r):
    """Returns ({name: (A, B)}, report), or (None, a sentence saying why the cache is not used)."""
    if not path.exists() and not sidecar_path(path).exists():
        return None, f"cache miss: nothing cached yet at {path}"
    try:
        tensors, meta = read_artifact(path, ARTIFACT_KIND, ARTIFACT_VERSION, remedy="")
        for key, value in expected.items():
            if meta.get(key) != value:
                return None, (f"cache mismatch: {sidecar_path(path)} has {key} "
                              f"{_difference(meta.get(key), value)}")
        # A (r, d_in) and B (d_out, r) of every target, in float32
        check_tensors(tensors, {f"{name}.{k}": shape for name, (d_out, d_in) in shapes.items()
                                for k, shape in (("A", (r, d_in)), ("B", (d_out, r)))}, path, "")
        wrong = sorted(key for key, T in tensors.items() if T.dtype != torch.float32)
        if wrong:
            raise ArtifactError(f"{str(path)!r} holds {wrong[:4]} in another dtype than float32")
    except (ArtifactError, OSError) as e:
        return None, f"cache damaged: {str(e).rstrip(' .')}"
    return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in shapes}, meta["report"]


def load_or_approximate(model_id, weights, cfg, cache_dir=None):
    """{name: (A, B)} from the cache when model, weights and settings all match; else computed and
    cached. Says which happened and why."""
    return cached_approximation(model_id, weights, cfg, cache_dir)[0]


def cached_approximation(model_id, weights, cfg, cache_dir=None, world=World()):
    """load_or_approximate that also returns the report and the cache file's path. Under torchrun every
    rank calls it: the ranks share the matrices (approximate.approximate) and rank 0 alone writes."""
    names = approximate.validate(weights, cfg)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    check_writable(cache_dir)
    fingerprint = weights_fingerprint(weights)
    path = cache_path(cache_dir, model_id, fingerprint, cfg)
    expected = dict(model_id=model_id, weights_fingerprint=fingerprint, targets=names,
                    settings=cfg.settings())
    shapes = {name: tuple(weights[name].shape) for name in names}
    factors, report = read_cache(path, expected, shapes, cfg.rank)
    if factors is not None:
        print(f"cache hit: {path}")
        return factors, report, path
    print(f"{report}; approximating")
    factors, report = approximate.approximate(weights, cfg, world)
    if world.main:
        save_artifact(path, {f"{name}.{k}": t for name, (A, B) in factors.items()
                             for k, t in (("A", A), ("B", B))},
                      dict(expected, report=report), ARTIFACT_KIND, ARTIFACT_VERSION)
    distributed.barrier(world)  # the file exists for every rank once this returns
    print(f"cached: {path}")
    return factors, report, path
