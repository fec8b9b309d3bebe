"""BERT and RoBERTa sequence classifiers in plain PyTorch, loading Hugging Face checkpoints exactly.

Every encoder layer is BERT's post-LayerNorm block (RoBERTa differs only in position ids and head):
    h = LN_attn(x + out(softmax(q k^T / sqrt(hs) + mask) v)),   q, k, v = query(x), key(x), value(x)
    x = LN_mlp(h + proj(GELU(fc(h))))                           exact (erf) GELU; dropout after out, proj
IniLoRA (inilora.py) adapts `query` and `value` of every layer (docs/method.md "Default targets").
Everything task-specific sits in `model.head` (BERT: pooler + classifier, RoBERTa: dense + out_proj):
loaded from a fine-tuned checkpoint, else initialised fresh from `head_seed`. Checkpoints load through
one visible name map, with a shape check per copy and a final leftover/missing check.
A model is "minilm" (the packaged all-MiniLM-L6-v2, the default), a local directory, or a Hub id; finding
and reading its files is checkpoint.py's job.

The fast path changes no output, only the work: a batch without padding gets no mask; the last block
computes position 0 alone (the head reads nothing else); and dropout on the CPU draws its masks 4x cheaper
than torch's (`dropout` below). q, k and v are the layers' own products: when IniLoRA adapts `query` and
`value`, they are inilora.LoRALinear, whose forward is the one adapter equation of the project.

Nothing here runs on its own: `python inilora.py --init inilora` loads a model, injects adapters and
checks that its logits are unchanged.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import MINILM
from models.checkpoint import load_weights as copy_weights  # the strict copy through a name map
from models.checkpoint import read_checkpoint, read_json, resolve_model
from models.tokenizer import Tokenizer

# Shapes in comments: B batch, T tokens, C hidden size, nh heads, hs head size (C = nh * hs),
# I MLP width (intermediate_size), K number of labels.

# -----------------------------------------------------------------------------
# configuration

SUPPORTED_ARCHS = ("bert", "roberta")


@dataclass
class ModelConfig:
    """The encoder's shape, read from a Hugging Face config.json by load_config."""

    arch: str  # "bert" or "roberta" (config.json's model_type)
    vocab_size: int
    hidden_size: int  # C
    num_layers: int
    num_heads: int  # nh
    intermediate_size: int  # I, the MLP width: 4 C in BERT
    max_position_embeddings: int
    type_vocab_size: int  # 2 in BERT (sentence A / B), 1 in RoBERTa
    layer_norm_eps: float
    pad_token_id: int
    hidden_dropout: float  # also used by the head (HF's classifier_dropout is not read)
    attention_dropout: float
    num_labels: int = 2  # size of the classification head; 1 = regression (STS-B)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS or self.hidden_size % self.num_heads != 0:
            raise ValueError(f"arch={self.arch!r} must be one of {list(SUPPORTED_ARCHS)} and hidden_size="
                             f"{self.hidden_size} divisible by num_heads={self.num_heads}; fix config.json.")
        if self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} must be at least 1 (1 = regression, e.g. STS-B).")


# ModelConfig field -> the config.json key it is read from
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}


def load_config(model_dir: Path) -> ModelConfig:
    """Reads `model_dir/config.json` (num_labels is left at its default: load_model sets it)."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"{str(path)!r} has model_type={model_type!r}, expected one of {list(SUPPORTED_ARCHS)}: "
                         "models/encoder.py implements BERT and RoBERTa only. Use e.g. --model minilm or roberta-base.")
    if missing := [key for key in CONFIG_KEYS.values() if key not in raw]:
        raise ValueError(f"{str(path)!r} lacks the keys {missing}. Re-download the model.")
    # what this file implements: exact GELU and absolute (learned) positions
    for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if raw.get(key, supported) != supported:
            raise ValueError(f"{str(path)!r} has {key}={raw[key]!r}, but models/encoder.py implements only "
                             f"{supported!r}. Use a standard BERT or RoBERTa checkpoint.")
    return ModelConfig(arch=model_type, **{field: raw[key] for field, key in CONFIG_KEYS.items()})


# -----------------------------------------------------------------------------
# dropout, with cheaper masks on the CPU

DROP_BITS = 16  # a CPU dropout mask compares 16 random bits per element with a threshold


def dropout(x, p, training):
    """F.dropout(x, p, training) in distribution: each element kept with probability q, then scaled by 1 / q.
    On the CPU, torch draws one Mersenne-Twister number per element for its mask, one thread, and that draw
    costs several times the rest of dropout (10% of a MiniLM step at 32 x 48 tokens, more at longer ones,
    whose attention probabilities grow with T^2). Here one 64-bit draw
    gives the 16 random bits of 4 elements: element kept if bits < q 2^16, q = round((1 - p) 2^16) / 2^16
    (p = 0.1: q = 0.899994, not 0.9). Other devices take F.dropout (their generators are fast)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep = round((1 - p) * 2**DROP_BITS)  # q 2^16
    n = x.numel()
    # 4 uniform int16 in [-2^15, 2^15) per draw, shifted to [0, 2^16) by comparing with keep - 2^15
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None).view(torch.int16)[:n].view(x.shape)
    return x.masked_fill(bits >= keep - 2**(DROP_BITS - 1), 0.0).mul_(2**DROP_BITS / keep)


class Dropout(nn.Module):
    """nn.Dropout through `dropout` above."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


# -----------------------------------------------------------------------------
# the encoder


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, C)
        self.position = nn.Embedding(config.max_position_embeddings, C)
        self.token_type = nn.Embedding(config.type_vocab_size, C)
        self.ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.drop = Dropout(config.hidden_dropout)
        self.arch, self.pad_id = config.arch, config.pad_token_id

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        if self.arch == "roberta":
            # RoBERTa numbers real tokens pad_id+1, pad_id+2, ... and gives pads pad_id
            # (HF's create_position_ids_from_input_ids)
            real = input_ids.ne(self.pad_id).long()  # (B, T)
            positions = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T)
        else:
            positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)  # (B, T, C)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention; `query` and `value` are the layers IniLoRA adapts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.hidden_size
        self.nh = config.num_heads
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.out = nn.Linear(C, C)
        self.dropout_p = config.attention_dropout

    def forward(self, x, key_mask, first_only=False):
        """(B, T, C) -> (B, T, C); first_only: the output at position 0 alone, (B, 1, C), which still
        attends to every position's keys and values."""
        B, T, C = x.shape
        nh, hs = self.nh, C // self.nh
        Tq = 1 if first_only else T  # first_only: one query (position 0), which attends to all T keys
        # the layers' own products; an adapted layer is an inilora.LoRALinear: x R^T + b + s (x A^T) B^T
        q, k, v = self.query(x[:, :Tq]), self.key(x), self.value(x)  # (B, Tq, C), (B, T, C), (B, T, C)
        q = q.view(B, Tq, nh, hs).transpose(1, 2)  # (B, Tq, C) -> (B, nh, Tq, hs)
        k, v = (y.view(B, T, nh, hs).transpose(1, 2) for y in (k, v))  # (B, T, C) -> (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs) + mask) v, padded keys masked out: key_mask is (B, 1, 1, T), True = attend;
        # None when the batch has no padding (SDPA's unmasked path, as transformers does)
        if self.training and self.dropout_p > 0 and x.device.type == "cpu":
            # SDPA's CPU kernels do not fuse dropout (they fall back to these same steps): written out, so
            # that the attention probabilities take the cheaper dropout above
            scores = (q @ k.transpose(-2, -1)) / hs**0.5  # (B, nh, Tq, T)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            y = dropout(scores.softmax(dim=-1), self.dropout_p, True) @ v  # (B, nh, Tq, hs)
        else:
            dropout_p = self.dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).reshape(B, Tq, C)  # (B, nh, Tq, hs) -> (B, Tq, C)
        return self.out(y)  # (B, Tq, C)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C) -> (B, T, I) -> (B, T, C); exact (erf) GELU


class Block(nn.Module):
    """One post-LayerNorm Transformer layer: the residual sum is normalised, not the input."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = Dropout(config.hidden_dropout)

    def forward(self, x, key_mask, first_only=False):
        # first_only: position 0 alone from here on, (B, 1, C) (its attention still reads all T positions)
        residual = x[:, :1] if first_only else x
        x = self.ln_attn(residual + self.drop(self.attn(x, key_mask, first_only)))  # (B, T, C)
        x = self.ln_mlp(x + self.drop(self.mlp(x)))  # (B, T, C)
        return x


class Encoder(nn.Module):
    """Embeddings + post-LN blocks; returns the last hidden state (B, T, C)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        # RoBERTa's positions start after pad_token_id, so it fits pad_token_id + 1 fewer tokens
        offset = config.pad_token_id + 1 if config.arch == "roberta" else 0
        self.max_length = config.max_position_embeddings - offset

    def forward(self, input_ids, attention_mask, token_type_ids=None, first_only=False):
        """The last hidden state (B, T, C); first_only: position 0's alone, (B, 1, C), the last block then
        computing that one position (a classification head reads nothing else)."""
        T = input_ids.shape[1]
        if T > self.max_length:
            raise ValueError(f"the batch has {T} tokens per row but this model takes at most {self.max_length}. "
                             f"Truncate with Tokenizer.encode(..., max_length={self.max_length}).")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        # attention_mask None: no padding, so no mask (data.prepare.pad_batch's None)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embed(input_ids, token_type_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, key_mask, first_only and i == len(self.layers) - 1)  # (B, T, C); the last maybe (B, 1, C)
        return x


# -----------------------------------------------------------------------------
# the task heads: everything task-specific lives in `model.head`


class BertHead(nn.Module):
    """BertForSequenceClassification's head: pooler (dense + tanh on [CLS]), dropout, classifier."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.drop = Dropout(config.hidden_dropout)

    def forward(self, h):
        x = torch.tanh(self.pooler(h[:, 0]))  # (B, T, C) -> first token (B, C) -> (B, C)
        return self.classifier(self.drop(x))  # (B, C) -> (B, K)


class RobertaHead(nn.Module):
    """RobertaClassificationHead: dropout, dense + tanh on <s>, dropout, out_proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.drop = Dropout(config.hidden_dropout)

    def forward(self, h):
        x = torch.tanh(self.dense(self.drop(h[:, 0])))  # (B, T, C) -> first token (B, C) -> (B, C)
        return self.out_proj(self.drop(x))  # (B, C) -> (B, K)


HEADS = {"bert": BertHead, "roberta": RobertaHead}


class SequenceClassifier(nn.Module):
    """Encoder + task head: logits (B, K) for a batch of token ids; K = 1 is regression."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.head = HEADS[config.arch](config)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        # the head reads position 0 ([CLS] / <s>) alone, so the last block computes only that position
        h = self.encoder(input_ids, attention_mask, token_type_ids, first_only=True)  # (B, 1, C)
        return self.head(h)  # (B, 1, C) -> (B, K)


# -----------------------------------------------------------------------------
# loading a checkpoint: one name map, a shape check per copy, nothing left over or unfilled

# HF module name -> ours. Embeddings (after the checkpoint's "bert."/"roberta." prefix, if any):
EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "encoder.embed.word",
    "embeddings.position_embeddings": "encoder.embed.position",
    "embeddings.token_type_embeddings": "encoder.embed.token_type",
    "embeddings.LayerNorm": "encoder.embed.ln",
}
# inside HF's encoder.layer.{i} -> inside our encoder.layers.{i}
LAYER_NAMES = {
    "attention.self.query": "attn.query",
    "attention.self.key": "attn.key",
    "attention.self.value": "attn.value",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "ln_attn",
    "intermediate.dense": "mlp.fc",
    "output.dense": "mlp.proj",
    "output.LayerNorm": "ln_mlp",
}
# the task head ("{p}" is the prefix): in fine-tuned checkpoints (Bert/RobertaForSequenceClassification);
# a pre-trained BERT checkpoint usually brings only the pooler
HEAD_NAMES = {
    "bert": {"{p}pooler.dense": "head.pooler", "classifier": "head.classifier"},
    "roberta": {"classifier.dense": "head.dense", "classifier.out_proj": "head.out_proj"},
}
# checkpoint tensors deliberately not loaded (pattern -> why); consulted only for names the map lacks
SKIPPED = {
    r"^(lm_head|cls)\.": "pre-training heads (masked LM, next sentence prediction)",
    r"(^|\.)embeddings\.position_ids$": "a buffer holding 0..T-1; positions are computed in forward",
    r"^(roberta\.)?pooler\.": "RoBERTa's pooler, which RobertaClassificationHead does not use",
}
# a named transform: TF-era checkpoints (e.g. bert-base-uncased) call LayerNorm's weight gamma, its bias beta
LEGACY_NAMES = {r"LayerNorm\.gamma$": "LayerNorm.weight", r"LayerNorm\.beta$": "LayerNorm.bias"}


def checkpoint_name_map(config: ModelConfig, prefix: str) -> dict[str, str]:
    """Checkpoint tensor name -> our parameter name, for every tensor that is loaded."""
    modules = {prefix + hf: ours for hf, ours in EMBEDDING_NAMES.items()}
    for i in range(config.num_layers):
        modules |= {f"{prefix}encoder.layer.{i}.{hf}": f"encoder.layers.{i}.{ours}"
                    for hf, ours in LAYER_NAMES.items()}
    modules |= {hf.format(p=prefix): ours for hf, ours in HEAD_NAMES[config.arch].items()}
    return {
        f"{hf}.{tensor}": f"{ours}.{tensor}"
        for hf, ours in modules.items()
        for tensor in (("weight",) if hf.endswith("_embeddings") else ("weight", "bias"))
    }


def rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for pattern, new in LEGACY_NAMES.items():
        state = {re.sub(pattern, new, name): t for name, t in state.items()}
    return state


def checkpoint_prefix(state: dict, arch: str) -> str:
    """'bert.'/'roberta.' for checkpoints saved from a task model; '' for a bare encoder (MiniLM)."""
    return f"{arch}." if any(name.startswith(f"{arch}.") for name in state) else ""


@torch.no_grad()
def load_weights(model: SequenceClassifier, state: dict[str, torch.Tensor], head_seed: int,
                 source: str) -> dict[str, str]:
    """Copies `state` into `model` through checkpoint_name_map; head parts the checkpoint lacks start
    fresh from `head_seed`. Returns {head part: "loaded" | "fresh"}."""
    config = model.config
    name_map = checkpoint_name_map(config, checkpoint_prefix(state, config.arch))
    for name, tensor in state.items():  # a fine-tuned classifier must have num_labels outputs
        if name_map.get(name, "").startswith(("head.classifier.", "head.out_proj.")) and \
                tensor.shape[0] != config.num_labels:
            raise ValueError(f"the checkpoint's fine-tuned classifier {name!r} has {tensor.shape[0]} outputs, but "
                             f"num_labels={config.num_labels}. Pass num_labels={tensor.shape[0]} to use this head, "
                             "or start from the pre-trained base model.")
    filled = copy_weights(model, state.items(), name_map, SKIPPED, source,
                          "checkpoint_name_map / SKIPPED in models/encoder.py", may_miss="head.")
    # head parts the checkpoint lacks start as HF initialises them: W ~ N(0, 0.02^2), b = 0,
    # drawn in float32 from `head_seed` so that the head does not depend on the dtype
    generator = torch.Generator().manual_seed(head_seed)
    head_parts = {}
    for part, module in model.head.named_children():
        if not isinstance(module, nn.Linear):
            continue
        names = [f"head.{part}.{n}" for n in ("weight", "bias")]
        if any(n in filled for n in names):
            head_parts[part] = "loaded"
            continue
        module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, 0.02, generator=generator))
        module.bias.zero_()
        filled.update(names)
        head_parts[part] = "fresh"
    if missing := [n for n, _ in model.named_parameters() if n not in filled]:  # e.g. a pooler bias alone
        raise ValueError(f"parameters not in the checkpoint: {', '.join(missing)}. The checkpoint is incomplete or "
                         "does not match its config.json. Re-download the model.")
    return head_parts


def load_model(name: str = MINILM, num_labels: int = 2, head_seed: int = 0,
               dtype=torch.float32) -> tuple[SequenceClassifier, "Tokenizer", str]:
    """(model in eval mode, its tokenizer, model_id) for "minilm", a local directory or a Hub id."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch.dtype; "
                         "use torch.float32, torch.bfloat16 or torch.float16.")
    model_dir, model_id = resolve_model(name)
    if model_dir.suffix == ".gguf":
        raise ValueError(f"--model {name!r} is a causal language model (a GGUF decoder), not a BERT/RoBERTa encoder: "
                         "sequence classification needs an encoder, e.g. --model minilm; load decoders with "
                         "models.decoder.load_causal_lm (or models.load).")
    config = replace(load_config(model_dir), num_labels=num_labels)
    tokenizer = Tokenizer(model_dir / "tokenizer.json")
    if (n_tokens := tokenizer._tok.get_vocab_size()) > config.vocab_size:
        raise ValueError(f"{str(model_dir / 'tokenizer.json')!r} has {n_tokens} tokens but the model embeds only "
                         f"vocab_size={config.vocab_size}: they are from different models. Re-download the model.")
    state = rename_legacy(read_checkpoint(model_dir))
    # built on the meta device: no time spent drawing random values that the checkpoint
    # overwrites; load_weights then fills every tensor, and checks that it did
    with torch.device("meta"):
        model = SequenceClassifier(config)
    model = model.to(dtype).to_empty(device="cpu")
    head_parts = load_weights(model, state, head_seed, str(model_dir))
    fresh = f"initialised fresh (head_seed={head_seed})"
    how = ", ".join(f"{part} {'loaded from the checkpoint' if v == 'loaded' else fresh}"
                    for part, v in head_parts.items())
    print(f"loaded {model_id} ({config.arch}, {config.num_layers} layers, C={config.hidden_size}, {dtype}); "
          f"head: {how}")
    return model.eval(), tokenizer, model_id
