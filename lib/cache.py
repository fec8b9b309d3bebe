"""Keyed caches: a result computed once, and read back only while every field of its key still matches.

A cache entry is an artifact of lib/artifacts.py (a .safetensors file and its .json sidecar, one checksum
over both) whose sidecar holds the key's fields. The IniLoRA approximation (approximate.py) and the
tokenised splits (data/prepare.py) are cached this way. An entry that is missing, damaged, edited,
non-finite, of the wrong shapes or made under another key is never used: `lookup` says in one line why,
and the caller computes the result again and `save_artifact`s it.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

from lib.artifacts import read_artifact, sidecar_path


def cache_root() -> Path:
    """Where the project caches what it computes once (the approximation; the tokenised splits in data/):
    $INILORA_CACHE, else ~/.cache/inilora, never inside the repository."""
    return Path(os.environ.get("INILORA_CACHE") or "~/.cache/inilora").expanduser()


def key_hash(fields: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of `fields`: a file name that changes with the key."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def check_writable(cache_dir: Path, flag: str = "--cache-dir"):
    """Raises ValueError now, before any computation, if the cache could not be written later."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as e:
        raise ValueError(f"the cache directory {str(cache_dir)!r} is not writable ({e.strerror or e}). Pass "
                         f"{flag} (or set INILORA_CACHE) to a writable directory.") from None


def difference(found, expected) -> str:
    """'steps=29 (expected 30)' for the keys of two dicts that differ; else 'found (expected ...)'."""
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
        return ", ".join(f"{k}={found.get(k)!r} (expected {expected.get(k)!r})" for k in keys)
    return f"{found!r} (expected {expected!r})"


def lookup(path, kind: str, version: int, key: dict, remedy: str = "", read=None):
    """(value, None) from the entry at `path` when it is there, intact and made under `key`; else
    (None, a one-line reason starting "cache miss", "cache mismatch" or "cache damaged").
    `read(tensors, sidecar)` makes the value (default: the pair itself); a ValueError or KeyError it raises
    (tensors of the wrong shapes, say) makes the entry count as damaged."""
    path = Path(path)
    if not path.exists() and not sidecar_path(path).exists():
        return None, f"cache miss: nothing cached yet at {path}"
    try:
        tensors, meta = read_artifact(path, kind, version, remedy)
        if changed := [k for k in key if meta.get(k) != key[k]]:
            what = "; ".join(f"{k} {difference(meta.get(k), key[k])}" for k in changed)
            return None, f"cache mismatch: {sidecar_path(path)} has {what}: {', '.join(changed)} changed"
        return ((tensors, meta) if read is None else read(tensors, meta)), None
    except (ValueError, KeyError, OSError) as e:  # ArtifactError is a ValueError: recomputing fixes every one
        return None, f"cache damaged: {path} is damaged or out of date ({str(e).rstrip(' .')})"
