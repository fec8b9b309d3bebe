"""The one artifact format of the project: a `.safetensors` file plus a `.json` sidecar beside it.

The sidecar holds a format name and version, the full configuration that produced the tensors, and a
sha256 that covers the tensor bytes *and* the sidecar's own content:

    sha256 = sha256( sha256(tensor bytes) || canonical JSON of the sidecar without "sha256" )

so editing a rank or a lora_alpha in the JSON is detected exactly like a damaged tensor file. Adapters
(inilora.py), the approximation cache (approximate.py), the data cache (data/prepare.py) and training
checkpoints (lib/runs.py) are all artifacts; reading one also refuses non-finite tensors.
`weights_fingerprint` names a set of weights by their bytes (what an adapter or a cache was made from).
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from lib.common import write_atomic

# -----------------------------------------------------------------------------
# artifacts: safetensors + a JSON sidecar whose checksum covers both


class ArtifactError(ValueError):
    """An artifact is missing, damaged, edited, of another kind or version, or not finite."""


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def _canonical(meta) -> dict:
    # what is hashed is what is read back: tuples become lists, keys are sorted
    return json.loads(json.dumps(meta, allow_nan=False))


def _checksum(data: bytes, meta: dict) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(hashlib.sha256(data).digest() + body.encode()).hexdigest()


def save_artifact(path, tensors: dict, meta: dict, kind: str, version: int) -> Path:
    """Writes `path` (.safetensors) and its .json sidecar {format, version, **meta, sha256}.

    Each file is written atomically; the sidecar goes last, so a half-written pair never
    passes read_artifact. Tensors must be finite: nothing is written otherwise.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(f"tensor {name!r} holds inf or nan values; {str(path)!r} was not written.")
    data = safetensors_save(tensors)
    meta = _canonical({"format": kind, "version": version, **meta})
    meta["sha256"] = _checksum(data, meta)
    write_atomic(path, data)
    write_atomic(sidecar_path(path), json.dumps(meta, indent=1, allow_nan=False).encode())
    return Path(path)


def read_artifact(path, kind: str, version: int, remedy: str) -> tuple[dict, dict]:
    """(tensors, sidecar) of an artifact written by save_artifact, after checking that both files
    exist, the format and version are `kind`/`version`, the checksum covers both files as they are,
    and every floating-point tensor is finite. Raises ArtifactError naming what is wrong + `remedy`."""
    path, sidecar = Path(path), sidecar_path(path)
    for p in (path, sidecar):
        if not p.is_file():
            raise ArtifactError(f"{str(p)!r} does not exist: a {kind} is a .safetensors file with a "
                                f".json sidecar beside it. {remedy}")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(sidecar)!r} is not valid JSON ({e}). {remedy}") from None
    found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
    if found != (kind, version):
        raise ArtifactError(f"{str(sidecar)!r} has format={found[0]!r}, version={found[1]!r}; expected a {kind} "
                            f"of version {version}. {remedy}")
    data = path.read_bytes()
    if _checksum(data, meta) != meta.get("sha256"):
        raise ArtifactError(f"{str(path)!r} and its sidecar do not match the checksum the sidecar holds: one "
                            f"was edited, truncated or comes from another save. {remedy}")
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{str(path)!r} is not a readable safetensors file ({e}). {remedy}") from None
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"tensor {name!r} in {str(path)!r} holds inf or nan values. {remedy}")
    return tensors, meta


def check_tensors(tensors: dict, expected: dict, path, remedy: str):
    """Raises ArtifactError unless `tensors` has exactly the names of `expected` ({name: shape})
    and every tensor has its expected shape."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ArtifactError(f"{str(path)!r} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''} and has "
                            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}. {remedy}")
    for name in sorted(expected):
        if tuple(tensors[name].shape) != tuple(expected[name]):
            raise ArtifactError(f"tensor {name!r} in {str(path)!r} has shape {tuple(tensors[name].shape)}, but "
                                f"its configuration means {tuple(expected[name])}. {remedy}")

def weights_fingerprint(weights):
    """Short sha256 over the sorted names, shapes and float32 bytes of the weights."""
    h = hashlib.sha256()
    for name in sorted(weights):
        W = weights[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(W.shape)};".encode())
        h.update(W.numpy())
    return h.hexdigest()[:16]
