"""The model substrate, which knows nothing of IniLoRA: BERT/RoBERTa encoders (encoder.py), LLaMA-family
decoders (decoder.py), finding and reading checkpoints (checkpoint.py, gguf_file.py) and tokenizers
(tokenizer.py). This file is the one switch between the two families:

    load(name, ...) -> Loaded(model, tokenizer, model_id, family, targets)

`family` is "encoder" (a sequence classifier with a task head) or "decoder" (a causal LM), `targets` the
family's default LoRA targets (docs/method.md "Default targets"), and `target_linears` the one place that
decides which nn.Linear layers a target name means.

    python -m models.decoder --model smollm2 --prompt "What is 12 + 30?"   (one greedy chat turn)
"""
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from models import decoder, encoder
from models.checkpoint import read_json, resolve_model

# the layers IniLoRA adapts by default (docs/method.md "Default targets"): the attention query and value
# projections, as BERT/RoBERTa and the LLaMA family name them (paper Section 4.2: W_q and W_v)
DEFAULT_TARGETS = {"encoder": ("query", "value"), "decoder": ("q_proj", "v_proj")}
FAMILIES = tuple(DEFAULT_TARGETS)


class Loaded(NamedTuple):
    model: nn.Module  # in eval mode
    tokenizer: object  # models.tokenizer.Tokenizer (encoders) or ChatTokenizer (decoders)
    model_id: str  # names the base model in sidecars
    family: str  # "encoder" or "decoder"
    targets: tuple[str, ...]  # the family's default LoRA targets


def family_of(name: str) -> str:
    """"decoder" when --model names a causal LM (a .gguf file, or a config.json of a decoder family), else
    "encoder"."""
    path, _ = resolve_model(name)
    causal = path.suffix == ".gguf" or read_json(path / "config.json").get("model_type") in decoder.FAMILIES
    return "decoder" if causal else "encoder"


def load(name: str, family: str | None = None, num_labels: int = 2, head_seed: int = 0,
         dtype=torch.float32) -> Loaded:
    """The model named `name` ("minilm", "smollm2", a directory, a .gguf file or a Hub id) as a Loaded tuple.
    `family` None: found from the checkpoint (family_of); an encoder gets a task head of `num_labels` outputs,
    fresh from `head_seed` where the checkpoint has none."""
    family = family or family_of(name)
    if family == "decoder":
        model, tokenizer, model_id = decoder.load_causal_lm(name, dtype)
    else:
        model, tokenizer, model_id = encoder.load_model(name, num_labels=num_labels, head_seed=head_seed, dtype=dtype)
    return Loaded(model, tokenizer, model_id, family, DEFAULT_TARGETS[family])


# target layers: the single place that decides what a LoRA / approximation target is


def parse_targets(text: str) -> tuple[str, ...]:
    """--targets "query, value" -> ("query", "value"): the one parser of the flag (an empty list is refused
    where the targets are used, by target_linears)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def target_linears(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear (or subclass) whose last name component is in `targets`, by full module name,
    e.g. {"encoder.layers.0.attn.query": Linear, ...} for targets ("query", "value")."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets={targets!r} must be a non-empty list of layer names, e.g. ['query', 'value'].")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    available = sorted({name.rsplit(".", 1)[-1] for name in linears})
    if unknown := [t for t in targets if t not in available]:
        raise ValueError(f"target {unknown[0]!r} matches no nn.Linear in the model; the available Linear names are "
                         f"{available}. Pick targets from those (BERT/RoBERTa attention: query, key, value; "
                         "decoders: q_proj, k_proj, v_proj, o_proj).")
    return {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets}
