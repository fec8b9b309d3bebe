"""LLaMA-family decoder-only causal language models in plain PyTorch: LLaMA 1/2/3, Mistral, Qwen2, Gemma.

One pre-RMSNorm block serves every family; its config switches the variants (FAMILIES):
    n = RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w               Gemma: * (1 + w)
    h = x + o_proj(softmax(q k^T / sqrt(hs) + M) v)              q, k = RoPE(q_proj(n)), RoPE(k_proj(n)); v = v_proj(n)
    y = h + down_proj(act(gate_proj(m)) * up_proj(m)),  m = RMSNorm(h)   act: SiLU (SwiGLU), Gemma tanh-GELU (GeGLU)
    logits = lm_head(RMSNorm(x_L)),  x_0 = embed(ids) (Gemma: * sqrt(C)),  lm_head tied to embed or not
M is causal plus padding (left or right; Mistral also a sliding window). Grouped-query attention: each of
the nkv key/value heads serves nh / nkv query heads. RoPE rotates the pairs (j, j + hs/2) of every head by
the angle p * f_j at position p, f_j = theta^(-2j / hs); LLaMA-3 divides the low frequencies by `factor`
and interpolates between (rope_type "llama3"). Qwen2 adds biases to q/k/v_proj.
IniLoRA adapts q_proj and v_proj, as in the paper's LLM experiments (Section 4.2): models.DEFAULT_TARGETS.

A KVCache preallocates every layer's keys and values for generation; `generate` decodes a batch of
left-padded prompts, greedily (the default) or by sampling (temperature tau, nucleus top_p, one seeded
generator per row), and stops each row at EOS (or when `stop` says so) or after max_new_tokens:
    greedy   x_t = argmax_v z_v
    sampled  x_t ~ p restricted to the nucleus and renormalised,  p = softmax(z / tau),  nucleus = the most
             probable tokens whose mass before them is < top_p (Holtzman et al., 2020)
Checkpoints (a Hugging Face directory, single or sharded safetensors, or a GGUF such as the packaged
SmolLM2, whose names checkpoint.py translates) load through one visible name map, with a shape check per
copy and a final leftover/missing check; `load_causal_lm` is the one entry point. One chat turn from the
command line: models/chat.py.
"""
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.checkpoint import SMOLLM2, iter_checkpoint, load_weights, read_json, resolve_model
from models.gguf_file import gguf_config, iter_gguf_as_hf, open_gguf
from models.tokenizer import ChatTokenizer

# Shapes in comments: B batch, T new tokens, S tokens attended to (cache + new), C hidden size, nh query
# heads, nkv key/value heads, hs head size (nh * hs need not be C: Gemma), I MLP width, V vocabulary.

# -----------------------------------------------------------------------------
# configuration: one dataclass, the family switches in one table


@dataclass(frozen=True)
class Family:
    qkv_bias: bool = False  # Qwen2: q_proj, k_proj and v_proj have biases
    act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    scale_embed: bool = False  # Gemma multiplies the embeddings by sqrt(C)


FAMILIES = {"llama": Family(), "mistral": Family(), "qwen2": Family(qkv_bias=True),
            "gemma": Family(act="gelu_tanh", norm_offset=1.0, scale_embed=True)}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class DecoderConfig:
    family: str  # a key of FAMILIES (config.json's model_type)
    vocab_size: int  # V
    hidden_size: int  # C
    num_layers: int
    num_heads: int  # nh
    num_kv_heads: int  # nkv
    head_dim: int  # hs
    intermediate_size: int  # I
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                             "fix config.json.")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported are {list(ROPE_TYPES)}. "
                             "Use a checkpoint without that RoPE scaling.")

    @property
    def variant(self) -> Family:
        return FAMILIES[self.family]


def config_from_json(raw: dict, path: str) -> DecoderConfig:
    """A DecoderConfig from a Hugging Face config.json (transformers 4's rope_theta/rope_scaling or 5's
    rope_parameters)."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{path!r} has model_type={family!r}; the supported decoder architectures are "
                         f"{sorted(FAMILIES)}. Use a LLaMA, Mistral, Qwen2 or Gemma checkpoint, or --model smollm2.")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "rms_norm_eps", "max_position_embeddings")
    if missing := [k for k in keys if k not in raw]:
        raise ValueError(f"{path!r} lacks the keys {missing}. Re-download the model.")
    act = raw.get("hidden_activation") or raw.get("hidden_act", "silu")
    expected = ("gelu", "gelu_pytorch_tanh") if family == "gemma" else ("silu",)
    if act not in expected or raw.get("mlp_bias") or (family != "qwen2" and raw.get("attention_bias")):
        raise ValueError(f"{path!r} has hidden_act={act!r}, mlp_bias={raw.get('mlp_bias')}, attention_bias="
                         f"{raw.get('attention_bias')}; models/decoder.py implements {family} with act in {list(expected)} "
                         "and no MLP or o_proj biases. Use a standard checkpoint of that family.")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    eos = raw.get("eos_token_id")
    C, nh = raw["hidden_size"], raw["num_attention_heads"]
    window = raw.get("sliding_window") if family == "mistral" else None  # Qwen2's is off (use_sliding_window)
    return DecoderConfig(
        family=family, vocab_size=raw["vocab_size"], hidden_size=C, num_layers=raw["num_hidden_layers"],
        num_heads=nh, num_kv_heads=raw.get("num_key_value_heads") or nh, head_dim=raw.get("head_dim") or C // nh,
        intermediate_size=raw["intermediate_size"], rms_norm_eps=raw["rms_norm_eps"], rope_theta=float(theta),
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=raw.get("tie_word_embeddings", family == "gemma"),
        rope_scaling=None if rope_type == "default" else rope | {"rope_type": rope_type}, sliding_window=window,
        bos_token_id=raw.get("bos_token_id"), pad_token_id=raw.get("pad_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))


# -----------------------------------------------------------------------------
# rotary position embeddings


def rope_frequencies(config: DecoderConfig) -> torch.Tensor:
    """f_j = theta^(-2j / hs), j < hs/2 (float32, (hs/2,)), with the checkpoint's frequency scaling."""
    hs = config.head_dim
    f = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64, device="cpu").float() / hs)  # (hs/2,)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":  # positions divided by factor
        return f / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        # LLaMA 3.1: wavelengths beyond the original context / low_freq_factor are slowed by `factor`,
        # those below it / high_freq_factor kept, those between interpolated smoothly
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / f
        scaled = torch.where(wavelen > old / low, f / factor, f)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return f


def rope_cos_sin(f: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of the angles p * f_j, each (B, 1, T, hs): computed in float32, then cast."""
    angles = positions[..., None].float() * f  # (B, T, 1) * (hs/2,) -> (B, T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hs): pair j is (j, j + hs/2)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotates each pair (x_j, x_{j+hs/2}) of x (B, n, T, hs) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, n, T, hs/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, n, T, hs)


# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((C,), 1.0 - offset))  # w = 1 (LLaMA), 0 (Gemma's 1 + w)
        self.eps, self.offset = eps, offset

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32, whatever the model's dtype
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, C)
        if self.offset:  # Gemma: n * (1 + w) in float32, then cast
            return (n * (self.offset + self.weight.float())).type_as(x)
        return self.weight * n.type_as(x)  # LLaMA: cast, then n * w


class KVCache:
    """Every layer's keys and values, preallocated for T_max tokens: (B, nkv, T_max, hs) each.
    `length` tokens are filled; a forward with a cache appends its T new tokens."""

    def __init__(self, config: DecoderConfig, B: int, T_max: int, dtype, device):
        shape = (B, config.num_kv_heads, T_max, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = 0

    def update(self, layer: int, k, v):
        n, T = self.length, k.shape[2]
        self.k[layer][:, :, n:n + T] = k  # (B, nkv, T, hs) into (B, nkv, T_max, hs)
        self.v[layer][:, :, n:n + T] = v
        return self.k[layer][:, :, :n + T], self.v[layer][:, :, :n + T]  # (B, nkv, S, hs)


class Attention(nn.Module):
    """Grouped-query self-attention; q_proj and v_proj are the layers IniLoRA adapts."""

    def __init__(self, config: DecoderConfig, layer: int):
        super().__init__()
        C, hs, bias = config.hidden_size, config.head_dim, config.variant.qkv_bias
        self.nh, self.nkv, self.hs, self.layer = config.num_heads, config.num_kv_heads, hs, layer
        self.q_proj = nn.Linear(C, self.nh * hs, bias=bias)
        self.k_proj = nn.Linear(C, self.nkv * hs, bias=bias)
        self.v_proj = nn.Linear(C, self.nkv * hs, bias=bias)
        self.o_proj = nn.Linear(self.nh * hs, C, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, T, nkv*hs) -> (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hs)
        # softmax(q k^T / sqrt(hs) + M) v; each key/value head serves nh / nkv query heads
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))  # (B, T, nh*hs) -> (B, T, C)


class MLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): SwiGLU, or GeGLU with tanh-GELU (Gemma)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(C, I, bias=False), nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)
        self.gelu = config.variant.act == "gelu_tanh"

    def forward(self, x):
        g = self.gate_proj(x)  # (B, T, C) -> (B, T, I)
        a = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(a * self.up_proj(x))  # (B, T, I) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int):
        super().__init__()
        eps, offset = config.rms_norm_eps, config.variant.norm_offset
        self.norm_attn, self.attn = RMSNorm(config.hidden_size, eps, offset), Attention(config, layer)
        self.norm_mlp, self.mlp = RMSNorm(config.hidden_size, eps, offset), MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.attn(self.norm_attn(x), cos, sin, mask, cache)  # (B, T, C)
        return h + self.mlp(self.norm_mlp(h))  # (B, T, C)


def build_mask(key_real, T: int, window: int | None):
    """M as booleans (True = may attend), (B, 1, T, S), for the last T of S tokens: causal, padding keys
    masked, at most `window` keys back. A query always sees itself, so a padding row stays finite."""
    S = key_real.shape[1]
    q = torch.arange(S - T, S, device=key_real.device)[:, None]  # (T, 1) query indices
    k = torch.arange(S, device=key_real.device)[None]  # (1, S) key indices
    allowed = k <= q  # (T, S)
    if window is not None:
        allowed = allowed & (q - k < window)
    return (allowed & key_real.bool()[:, None, None, :]) | (k == q)  # (B, 1, T, S)


class DecoderLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.variant.norm_offset)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.f = rope_frequencies(config)  # float32, not a buffer: .to(bfloat16) must not round it
        self.gradient_checkpointing = False  # True: recompute each block in backward (7B training memory)

    def tie_weights(self):
        if self.config.tie_word_embeddings:  # logits = x E^T with the embedding matrix E
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, last_only: bool = False):
        """Logits (B, T, V); last_only: of the last position only, (B, 1, V) (generation needs no more)."""
        h = self.hidden_states(input_ids, attention_mask, cache)  # (B, T, C)
        return self.lm_head(h[:, -1:] if last_only else h)  # (B, T, C) -> (B, T, V)

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """RMSNorm(x_L), (B, T, C): training applies lm_head to the response positions only.
        attention_mask (B, S) marks real tokens (1) among all S = cached + T; None = no padding.
        Positions count real tokens only, so a left-padded row reads like an unpadded one."""
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        window = self.config.sliding_window
        if attention_mask is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)  # (B, T)
            if (start > 0 and T > 1) or (window is not None and start + T > window):  # is_causal cannot say it
                attention_mask = torch.ones(B, start + T, dtype=torch.long, device=input_ids.device)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, S) -> (B, T)
        mask = None if attention_mask is None else build_mask(attention_mask, T, window)  # (B, 1, T, S)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if self.config.variant.scale_embed:  # Gemma: x * sqrt(C), sqrt(C) rounded to the model's dtype
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        if self.f.device != x.device:  # moved once, at the first forward on a new device
            self.f = self.f.to(x.device)
        cos, sin = rope_cos_sin(self.f, positions, x.dtype)  # (B, 1, T, hs) each
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, None, use_reentrant=False)  # (B, T, C), activations freed
            else:
                x = block(x, cos, sin, mask, cache)  # (B, T, C)
        if cache is not None:
            cache.length += T
        return self.norm(x)  # (B, T, C)


# -----------------------------------------------------------------------------
# generation: greedy or sampled


def sample_next(logits, temperature: float, top_p: float, generators: Sequence[torch.Generator]):
    """(B,) tokens drawn from logits (B, V): softmax(logits / temperature) cut to the nucleus top_p, renormalised.
    Row b draws one uniform u_b from generators[b] (a CPU generator), so its draws do not depend on the other
    rows of the batch: the same seed gives the same sample alone or in any batch."""
    # p = softmax(z / tau), in float32 whatever the model's dtype
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    p_sorted, order = p.sort(dim=-1, descending=True)  # (B, V), most probable first
    # nucleus: keep token i when the mass of the tokens before it is < top_p (the first is always kept)
    p_sorted = p_sorted.masked_fill(p_sorted.cumsum(-1) - p_sorted >= top_p, 0.0)  # (B, V)
    # inverse CDF: the first token whose cumulative kept mass exceeds u_b * (kept mass), u_b ~ U[0, 1)
    cdf = p_sorted.cumsum(-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)  # (B,)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return order.gather(-1, pick)[:, 0]  # (B,) token ids


def check_sampling(temperature, top_p, seeds, B):
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature!r}, top_p={top_p!r}: expected temperature >= 0 (0: greedy) and "
                         "0 < top_p <= 1 (1: the whole distribution), e.g. --temperature 0.8 --top-p 0.95.")
    if temperature > 0 and (seeds is None or len(seeds) != B):
        raise ValueError(f"sampling (temperature {temperature}) needs one seed per prompt, got "
                         f"{'none' if seeds is None else len(seeds)} for {B} prompts: pass seeds=[...].")


@torch.no_grad()
def generate(model: DecoderLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Iterable[int],
             pad_id: int, stop: Callable[[list[int]], bool] | None = None, use_cache: bool = True,
             temperature: float = 0.0, top_p: float = 1.0, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Continuations of a batch of prompts (lists of token ids), left-padded into one batch: greedy when
    temperature is 0 (the default), else sampled (sample_next) with row b's generator seeded by seeds[b].
    A row ends after its first EOS (kept in the output), when stop(its new ids) is true, or after
    max_new_tokens. use_cache=False recomputes every position each step (the reference for the cache)."""
    if max_new_tokens < 1 or not prompts or min(map(len, prompts)) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1 and every prompt non-empty "
                         f"(prompt lengths {sorted(map(len, prompts))[:3]}...).")
    check_sampling(temperature, top_p, seeds, len(prompts))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds] if temperature > 0 else None
    device = next(model.parameters()).device
    B, T0 = len(prompts), max(map(len, prompts))
    ids = torch.full((B, T0 + max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, T0 + n)
    mask = torch.zeros_like(ids)  # 1 = real token
    for b, p in enumerate(prompts):
        ids[b, T0 - len(p):T0], mask[b, T0 - len(p):T0] = torch.tensor(list(p)), 1
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    cache = KVCache(model.config, B, T0 + max_new_tokens, model.lm_head.weight.dtype, device) if use_cache else None
    if all(len(p) == T0 for p in prompts):  # no padding: SDPA's own causal mask, none at all when decoding
        mask = None
    logits = model(ids[:, :T0], None if mask is None else mask[:, :T0], cache=cache, last_only=True)  # (B, 1, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    texts = [[] for _ in range(B)] if stop is not None else None
    n = 0
    while True:
        # every row draws each step, finished or not, so a row's n-th draw is the same in any batch
        chosen = logits[:, -1].argmax(-1) if generators is None else sample_next(logits[:, -1], temperature, top_p,
                                                                                  generators)  # (B,)
        nxt = torch.where(done, pad_id, chosen)  # (B,): finished rows get padding
        ids[:, T0 + n] = nxt
        if mask is not None:
            mask[:, T0 + n] = 1
        n += 1
        was_done = done.tolist() if texts is not None else None
        done |= torch.isin(nxt, eos)
        if texts is not None:  # the caller's stop rule, on the host
            for b, token in enumerate(nxt.tolist()):
                if not was_done[b]:
                    texts[b].append(token)
                    done[b] = done[b] or stop(texts[b])
        if n == max_new_tokens or bool(done.all()):  # the one host sync per step
            break
        seen = None if mask is None else mask[:, :T0 + n]  # (B, T0 + n)
        if use_cache:
            logits = model(ids[:, T0 + n - 1:T0 + n], seen, cache=cache, last_only=True)
        else:
            logits = model(ids[:, :T0 + n], seen, last_only=True)
    if texts is not None:
        return texts
    ends, out = set(eos.tolist()), []
    for row in ids[:, T0:T0 + n].tolist():  # up to and with the first EOS
        first = next((i for i, t in enumerate(row) if t in ends), None)
        out.append(row if first is None else row[:first + 1])
    return out


# -----------------------------------------------------------------------------
# loading a checkpoint: one name map, a shape check per copy, nothing left over or unfilled

# inside Hugging Face's model.layers.{i} (Llama/Mistral/Qwen2/GemmaForCausalLM) -> inside our layers.{i}
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj", "input_layernorm": "norm_attn", "post_attention_layernorm": "norm_mlp",
}
# checkpoint tensors deliberately not loaded (pattern -> why); consulted only for names the map lacks
SKIPPED = {r"\.rotary_emb\.inv_freq$": "RoPE frequencies, computed from the config instead"}


def hf_name_map(config: DecoderConfig) -> dict[str, str]:
    """Checkpoint tensor name -> our parameter name, for every tensor that is loaded."""
    modules = {"model.embed_tokens": "embed_tokens", "model.norm": "norm"}
    modules |= {} if config.tie_word_embeddings else {"lm_head": "lm_head"}
    for i in range(config.num_layers):
        modules |= {f"model.layers.{i}.{hf}": f"layers.{i}.{ours}" for hf, ours in HF_LAYER_NAMES.items()}
    biased = ("q_proj", "k_proj", "v_proj") if config.variant.qkv_bias else ()  # Qwen2
    return {f"{hf}.{t}": f"{ours}.{t}" for hf, ours in modules.items()
            for t in ("weight", "bias")[:2 if hf.endswith(biased) else 1]}



def load_causal_lm(name: str = SMOLLM2, dtype=torch.float32, device="cpu") -> tuple[DecoderLM, ChatTokenizer, str]:
    """(model in eval mode, its tokenizer, model_id) for "smollm2", a .gguf file, a directory or a Hub id.
    The weights are allocated on `device` in `dtype` and filled tensor by tensor (a 7B model in bf16
    goes to the GPU without a full copy in host memory)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch.dtype; "
                         "use torch.float32, torch.bfloat16 or torch.float16.")
    path, model_id = resolve_model(name)
    if path.suffix == ".gguf":  # checkpoint.py translates llama.cpp's names and keys to Hugging Face's
        reader, meta = open_gguf(path)
        source = str(path)
        config = config_from_json(gguf_config(reader, meta, source), source)
        tokenizer = ChatTokenizer.from_gguf(reader, meta, path)
        tensors = iter_gguf_as_hf(reader, config.num_heads, config.num_kv_heads)
    else:
        source = str(path / "config.json")
        config = config_from_json(read_json(path / "config.json"), source)
        tokenizer = ChatTokenizer.from_dir(path)
        tensors = iter_checkpoint(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer of {str(path)!r} has {tokenizer.vocab_size} tokens but the model embeds only "
                         f"vocab_size={config.vocab_size}: they are from different models. Re-download the model.")
    # built on the meta device and given memory directly in `dtype`: nothing drawn at random, nothing in
    # float32 that the checkpoint then overwrites; load_weights fills every tensor (casting one at a time)
    with torch.device("meta"):
        model = DecoderLM(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty gives the two tied modules separate tensors
    load_weights(model, tensors, hf_name_map(config), SKIPPED, source, "HF_LAYER_NAMES / SKIPPED in models/decoder.py")
    print(f"loaded {model_id} ({config.family}, {config.num_layers} layers, C={config.hidden_size}, "
          f"{config.num_heads}/{config.num_kv_heads} q/kv heads, {dtype})")
    return model.eval(), tokenizer, model_id
