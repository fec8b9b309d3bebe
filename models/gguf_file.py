"""Reading GGUF files (llama.cpp's format) as Hugging Face checkpoints: the packaged SmolLM2 is one.

A GGUF file holds the configuration and the tokenizer as metadata and the weights block-quantised.
`open_gguf` checks every tensor's type before any weight is read; `gguf_config` writes the metadata as
config.json keys; `iter_gguf_as_hf` dequantises each tensor to float32 with the `gguf` library and gives
it its Hugging Face name, undoing llama.cpp's Q/K row permutation, so that models/decoder.py owns one name
map (Hugging Face's names -> ours) for every way a decoder is stored. models/tokenizer.py reads the
tokenizer from the same metadata (`gguf_list`).
"""
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

# -----------------------------------------------------------------------------
# reading GGUF: metadata, and tensors dequantised to float32

# the types the gguf library dequantises: float, llama.cpp's legacy and k-quants, and the i-quants
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS")


def open_gguf(path: Path):
    """(gguf.GGUFReader over the memory-mapped file, its metadata {key: value} without the token lists).
    Every tensor's type is checked here, before any weight is read."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}). "
                         "Re-download it, or reinstall the package that ships it.") from None
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                               "tokenizer.ggml.scores")}
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_TYPES))
    if bad:
        names = [t.name for t in reader.tensors if t.tensor_type.name in bad]
        raise ValueError(f"{str(path)!r} holds tensors quantised as {bad} (e.g. {names[0]!r}), which this project "
                         f"cannot dequantise; supported types are {list(GGUF_TYPES)}. Use a GGUF quantised with one "
                         "of those (e.g. Q4_K_M, Q8_0 or F16), or the model's safetensors.")
    return reader, metadata


def gguf_list(reader, key: str) -> list:
    """A metadata array in full (the token strings, the merges, the token types)."""
    field = reader.fields.get(key)
    return [] if field is None else list(field.contents())


# A LLaMA-architecture GGUF in Hugging Face's terms: its metadata as config.json keys, its tensor
# names as LlamaForCausalLM's, so models/decoder.py needs one name map. Mistral GGUFs say "llama" too.
GGUF_ARCHS = ("llama",)
GGUF_CONFIG = {  # config.json key -> llama.cpp metadata key (after "{arch}.")
    "hidden_size": "embedding_length", "num_hidden_layers": "block_count", "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length", "head_dim": "attention.key_length",
}
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER_NAMES = {  # inside blk.{i} -> inside model.layers.{i}
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def gguf_config(reader, meta: dict, path: str) -> dict:
    """The config.json a GGUF file's metadata describes."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path!r} holds a {arch!r} model; the GGUF architectures supported here are "
                         f"{list(GGUF_ARCHS)}. Use a LLaMA-architecture GGUF, or the model's safetensors directory "
                         "(LLaMA, Mistral, Qwen2 and Gemma load from there).")
    names = {t.name: t for t in reader.tensors}
    if meta.get(f"{arch}.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in names:
        raise ValueError(f"{path!r} uses RoPE frequency scaling, which GGUF loading here does not implement; "
                         "load the model's safetensors directory instead (rope_type llama3 is supported there).")
    config = {key: meta[f"{arch}.{gg}"] for key, gg in GGUF_CONFIG.items() if f"{arch}.{gg}" in meta}
    return config | {
        "model_type": "llama", "vocab_size": int(names["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp writes no copy of a tied head
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}


def unpermute(W: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores each head's rows of W_q and W_k with the RoPE pairs interleaved, (0, hs/2),
    (1, hs/2 + 1), ...; this puts them back in Hugging Face's half-split order (transformers'
    reverse_permute). W: (n_heads * hs, C)."""
    return W.reshape(n_heads, -1, 2, W.shape[-1]).transpose(1, 2).reshape(W.shape)


def gguf_to_hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names stay as they are
    (the loader then reports them as leftovers)."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{kind}" if part in GGUF_LAYER_NAMES else name
    module, _, kind = name.rpartition(".")
    return f"{GGUF_NAMES[module]}.{kind}" if module in GGUF_NAMES else name


def iter_gguf_as_hf(reader, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor, dequantised one at a time. GGUF lists a shape
    fastest dimension first; the dequantised rows come out as PyTorch's (out_features, in_features)."""
    import gguf

    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, (..., in_features)
        shape = tuple(int(n) for n in reversed(t.shape))
        W = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
        if re.search(r"\.attn_[qk]\.weight$", t.name):
            W = unpermute(W, num_heads if ".attn_q." in t.name else num_kv_heads)
        yield gguf_to_hf_name(t.name), W
