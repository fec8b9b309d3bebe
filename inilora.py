"""IniLoRA: the adapted linear layer, its initialisers, injection, merge, adapter save/load.

An adapted `nn.Linear` (SPEC "Notation"; paper Section 3) computes

    y = x R^T + b + s * (dropout(x) A^T) B^T,      s = lora_alpha / r
    R = W0 - s * B0 A0                              (frozen residual)

with trainable A (r, d_in), B (d_out, r) that start at A0, B0. Because R absorbs the
initial product, the model computes the same function at step 0 for every initialiser.
The initialisers (SPEC table) differ only in A0, B0: LoRA, Gaussian, IniLoRA (B0 A0 = the
approximation of W0 by approximate.py, eq. 1-3), IniLoRA-α, IniLoRA-β and the PiSSA and
MiLoRA baselines. After training, the total change to the base model is

    ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]    (a plain LoRA of rank 2r)

so an adapter saved with A0, B0 loads exactly on the original, unmodified base model.

Run: python inilora.py --model minilm --init pissa
(injects the adapters, prints the parameter counts and checks the logits are unchanged)
"""
import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save

from approximate import ApproxConfig, load_or_approximate, weights_fingerprint
from common import run_cli, write_atomic
from model import target_linears

# Shapes: ... any leading dims (batch, tokens), d_in / d_out the layer's sizes, r the rank.

ADAPTER_FORMAT = "inilora-adapter"
ADAPTER_VERSION = 1


@dataclass
class LoRAConfig:
    init: str = "lora"                        # a name from INITIALISERS, or "full"
    rank: int = 8                             # r
    lora_alpha: float | None = None           # None -> r, so s = 1 as in the paper's experiments
    targets: tuple[str, ...] = ("query", "value")  # leaf names of the adapted nn.Linear modules
    dropout: float = 0.0                      # on the adapter's input only
    alpha_std: float = 0.5                    # σ_α of IniLoRA-α
    seed: int = 0                             # draws of the random initialisers
    approx_steps: int = 20000                 # IniLoRA: Adam steps of the approximation (eq. 3)
    approx_lr: float = 5e-4                   # IniLoRA: its learning rate
    approx_seed: int = 0                      # IniLoRA: seed of its N(0, σ̄²) start

    @property
    def scale(self):
        # s = lora_alpha / r  (SPEC "Notation")
        return (self.rank if self.lora_alpha is None else self.lora_alpha) / self.rank

    def validate(self):
        if self.init not in INIT_NAMES:
            raise ValueError(f"init {self.init!r} is not one of {INIT_NAMES}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1 (the paper uses 8).")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0, or None for lora_alpha = rank.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")
        if not self.alpha_std > 0:
            raise ValueError(f"alpha_std={self.alpha_std!r} must be > 0 (the paper uses 0.5).")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module, e.g. query,value.")
        return self

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRA configuration keys {unknown}; expected a subset of {sorted(known)}.")
        d = dict(d, targets=tuple(d.get("targets", cls.targets)))
        return cls(**d).validate()


# -----------------------------------------------------------------------------
# the adapted layer


class LoRALinear(nn.Module):
    """y = x R^T + b + s * (dropout(x) A^T) B^T, with R = W0 - s B0 A0 frozen."""

    def __init__(self, W0, bias, A0, B0, s, dropout=0.0):
        super().__init__()
        dtype = W0.dtype
        W0, A0, B0 = W0.float(), A0.float(), B0.float()
        # R = W0 - s * B0 A0  (SPEC: the frozen residual; computed in float32)
        R = W0 - s * (B0 @ A0)  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        self.R = nn.Parameter(R.to(dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.A = nn.Parameter(A0.to(dtype).clone())  # (r, d_in)
        self.B = nn.Parameter(B0.to(dtype).clone())  # (d_out, r)
        # A0, B0 are kept (not trained) so the adapter converts to a plain LoRA, and reloads exactly
        self.register_buffer("A0", A0.to(dtype).clone())
        self.register_buffer("B0", B0.to(dtype).clone())
        self.s = s
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # y = x R^T + b + s * (dropout(x) A^T) B^T  (SPEC "Notation")
        y = F.linear(x, self.R, self.bias)               # (..., d_in) -> (..., d_out)
        h = F.linear(self.dropout(x), self.A)            # (..., d_in) -> (..., r)
        return y + self.s * F.linear(h, self.B)          # (..., r) -> (..., d_out)

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear with weight W = R + s B A: the same function, no adapter."""
        d_out, d_in = self.R.shape
        merged = nn.Linear(d_in, d_out, bias=self.bias is not None, device=self.R.device, dtype=self.R.dtype)
        # W = R + s B A  (float32, then the layer's dtype)
        merged.weight.copy_(self.R.float() + self.s * (self.B.float() @ self.A.float()))
        if self.bias is not None:
            merged.bias.copy_(self.bias)
        merged.requires_grad_(False)
        return merged

    def extra_repr(self):
        d_out, d_in = self.R.shape
        return f"d_in={d_in}, d_out={d_out}, r={self.A.shape[0]}, s={self.s:g}"


def merge(model):
    """Replaces every LoRALinear of `model` by its merged nn.Linear, in place.

    Idempotent: a model with no LoRALinear left is returned unchanged.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            model.set_submodule(name, module.merge())
    return model


# -----------------------------------------------------------------------------
# initialisers: each returns (A0 (r, d_in), B0 (d_out, r)) in float32 for one W0 (d_out, d_in).
# Random draws come from the CPU generator `g`, so CPU and CUDA runs start identically.
# `approx` is the cached (A, B) of approximate.py for this matrix (IniLoRA only, else None).


@torch.no_grad()
def init_lora(W0, cfg, g, approx):
    """A0: Kaiming-uniform with a=sqrt(5) (nn.Linear's default: bound 1/sqrt(d_in)); B0 = 0."""
    d_out, d_in = W0.shape
    A0 = nn.init.kaiming_uniform_(torch.empty(cfg.rank, d_in), a=math.sqrt(5), generator=g)
    return A0, torch.zeros(d_out, cfg.rank)


@torch.no_grad()
def init_gaussian(W0, cfg, g, approx):
    """A0 ~ N(0, (1/r)^2); B0 = 0."""
    d_out, d_in = W0.shape
    A0 = torch.randn(cfg.rank, d_in, generator=g) / cfg.rank
    return A0, torch.zeros(d_out, cfg.rank)


@torch.no_grad()
def init_inilora(W0, cfg, g, approx):
    """A0, B0 = the approximation (A, B) with B A ≈ W0 (eq. 1-3), each divided by sqrt(s)."""
    A, B = approx
    # s B0 A0 = B A  =>  A0 = A / sqrt(s), B0 = B / sqrt(s)
    return A.float() / math.sqrt(cfg.scale), B.float() / math.sqrt(cfg.scale)


@torch.no_grad()
def init_alpha(W0, cfg, g, approx):
    """IniLoRA-α: A0, B0 ~ N(0, σ_α^2), σ_α = cfg.alpha_std (0.5 by default)."""
    d_out, d_in = W0.shape
    A0 = torch.randn(cfg.rank, d_in, generator=g) * cfg.alpha_std
    B0 = torch.randn(d_out, cfg.rank, generator=g) * cfg.alpha_std
    return A0, B0


@torch.no_grad()
def init_beta_kaiming_normal(W0, cfg, g, approx):
    """IniLoRA-β K-N: kaiming_normal_ defaults (a=0, fan_in): A0 std sqrt(2/d_in), B0 std sqrt(2/r)."""
    d_out, d_in = W0.shape
    A0 = nn.init.kaiming_normal_(torch.empty(cfg.rank, d_in), generator=g)   # fan_in = d_in
    B0 = nn.init.kaiming_normal_(torch.empty(d_out, cfg.rank), generator=g)  # fan_in = r
    return A0, B0


@torch.no_grad()
def init_beta_kaiming_uniform(W0, cfg, g, approx):
    """IniLoRA-β K-U: kaiming_uniform_ defaults (a=0, fan_in): A0 bound sqrt(6/d_in), B0 bound sqrt(6/r)."""
    d_out, d_in = W0.shape
    A0 = nn.init.kaiming_uniform_(torch.empty(cfg.rank, d_in), generator=g)   # fan_in = d_in
    B0 = nn.init.kaiming_uniform_(torch.empty(d_out, cfg.rank), generator=g)  # fan_in = r
    return A0, B0


def _svd_init(W0, cfg, top):
    # W0 = U S V^T; keep r singular triplets: A0 = sqrt(S_r) V_r^T / sqrt(s), B0 = U_r sqrt(S_r) / sqrt(s)
    U, S, Vh = torch.linalg.svd(W0.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    keep = slice(0, cfg.rank) if top else slice(S.shape[0] - cfg.rank, S.shape[0])
    root = S[keep].sqrt()                                           # (r,)
    A0 = root[:, None] * Vh[keep] / math.sqrt(cfg.scale)            # (r, d_in)
    B0 = U[:, keep] * root[None, :] / math.sqrt(cfg.scale)          # (d_out, r)
    return A0, B0


@torch.no_grad()
def init_pissa(W0, cfg, g, approx):
    """PiSSA: the top-r singular triplets of W0, so s B0 A0 = U_r S_r V_r^T."""
    return _svd_init(W0, cfg, top=True)


@torch.no_grad()
def init_milora(W0, cfg, g, approx):
    """MiLoRA: the bottom-r (minor) singular triplets of W0."""
    return _svd_init(W0, cfg, top=False)


INITIALISERS = {
    "lora": init_lora,
    "gaussian": init_gaussian,
    "inilora": init_inilora,
    "alpha": init_alpha,
    "beta-kaiming-normal": init_beta_kaiming_normal,
    "beta-kaiming-uniform": init_beta_kaiming_uniform,
    "pissa": init_pissa,
    "milora": init_milora,
}
# "full" is the full fine-tuning baseline: no adapter, every weight trains.
INIT_NAMES = sorted([*INITIALISERS, "full"])


# -----------------------------------------------------------------------------
# injection and trainable parameters


def base_fingerprint(model, targets):
    """Fingerprint of the target weights W0 of a model that has no adapters yet."""
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    if adapted:
        raise ValueError(
            f"the model already has adapters at {adapted[:3]}...; load the original base model "
            "again before injecting or loading an adapter."
        )
    linears = target_linears(model, targets)
    return weights_fingerprint({n: m.weight.detach() for n, m in linears.items()})


def _adapt(model, name, linear, A0, B0, cfg):
    layer = LoRALinear(linear.weight.detach(), linear.bias, A0.to(linear.weight.device),
                       B0.to(linear.weight.device), cfg.scale, cfg.dropout)
    model.set_submodule(name, layer)
    return layer


def inject(model, cfg, model_id, cache_dir=None):
    """Replaces the target nn.Linear modules by LoRALinear, initialised by `cfg.init`.

    Returns the fingerprint of the base model's target weights (stored in adapter sidecars).
    `init="inilora"` reads the approximation cache of approximate.py, or computes it.
    """
    cfg.validate()
    fingerprint = base_fingerprint(model, cfg.targets)
    if cfg.init == "full":
        return fingerprint
    linears = target_linears(model, cfg.targets)
    for name, linear in linears.items():
        if cfg.rank > min(linear.weight.shape):
            raise ValueError(
                f"rank={cfg.rank} is larger than min(d_out, d_in)={min(linear.weight.shape)} "
                f"of {name} {tuple(linear.weight.shape)}; choose a rank between 1 and {min(linear.weight.shape)}."
            )
    factors = {}
    if cfg.init == "inilora":
        weights = {name: linear.weight.detach() for name, linear in linears.items()}
        approx_cfg = ApproxConfig(rank=cfg.rank, steps=cfg.approx_steps, lr=cfg.approx_lr, seed=cfg.approx_seed)
        factors = load_or_approximate(model_id, weights, approx_cfg, cache_dir)
    g = torch.Generator().manual_seed(cfg.seed)
    for name in sorted(linears):  # a fixed order: the same draws on every run
        W0 = linears[name].weight.detach().float()
        A0, B0 = INITIALISERS[cfg.init](W0.cpu(), cfg, g, factors.get(name))
        _adapt(model, name, linears[name], A0, B0, cfg)
    return fingerprint


def mark_trainable(model, cfg, verbose=True):
    """Only A, B and the task head (`head.*`) train; with init="full", everything does.

    Returns (trainable, total) parameter counts.
    """
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_adapter = leaf in ("A", "B") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), LoRALinear)
        p.requires_grad_(cfg.init == "full" or is_adapter or name.startswith("head."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%), init {cfg.init}")
    return trainable, total


# -----------------------------------------------------------------------------
# adapter checkpoints: safetensors + JSON sidecar


def adapter_tensors(model, cfg):
    """The tensors an adapter checkpoint holds: A, B, A0, B0 of every LoRALinear and the
    task head; with init="full", every parameter of the model."""
    if cfg.init == "full":
        return dict(model.named_parameters())
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for key in ("A", "B", "A0", "B0"):
                tensors[f"{name}.{key}"] = getattr(m, key)
    tensors.update({n: p for n, p in model.named_parameters() if n.startswith("head.")})
    return tensors


def save_adapter(model, path, cfg, model_id, fingerprint, extra=None):
    """Writes the adapter of `model` to `path` (.safetensors) and its `.json` sidecar.

    The sidecar names the base model and the fingerprint of its target weights, so the
    adapter is only ever loaded on the base model it was trained from.
    """
    meta = {"model_id": model_id, "base_fingerprint": fingerprint, "config": asdict(cfg), **(extra or {})}
    return _write_adapter(path, adapter_tensors(model, cfg), meta)


def _write_adapter(path, tensors, meta):
    # Each file is written atomically (common.write_atomic); the sidecar goes last, and the
    # sha256 in it ties it to the tensors, so a mismatched pair is detected on reading.
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, **meta,
            "tensors_sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(path, data)
    write_atomic(sidecar_path(path), json.dumps(meta, indent=2).encode())
    return Path(path)


def sidecar_path(path):
    return Path(path).with_suffix(".json")


def read_adapter(path):
    """Reads and checks an adapter file and its sidecar; returns (tensors, meta)."""
    path, sidecar = Path(path), sidecar_path(path)
    for p in (path, sidecar):
        if not p.is_file():
            raise FileNotFoundError(
                f"adapter file {str(p)!r} does not exist; an adapter is a .safetensors file "
                "with a .json sidecar beside it, as written by save_adapter / train.py."
            )
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"adapter sidecar {str(sidecar)!r} is not valid JSON ({e}); the file is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or meta.get("version") != ADAPTER_VERSION:
        raise ValueError(
            f"{str(sidecar)!r} is not an IniLoRA adapter sidecar of version {ADAPTER_VERSION} "
            f"(format={meta.get('format') if isinstance(meta, dict) else None!r})."
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
        raise ValueError(
            f"adapter file {str(path)!r} does not match the checksum in its sidecar: it is truncated, "
            "damaged or from another save. Use an intact copy or train again."
        )
    try:
        tensors = load(data)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"adapter file {str(path)!r} is not a readable safetensors file ({e}).") from None
    return tensors, meta


@torch.no_grad()
def load_adapter(model, path, model_id=None):
    """Loads an adapter onto the original base `model` (in place): rebuilds R = W0 - s B0 A0
    from the saved A0, B0, then sets A, B and the task head. Returns (cfg, meta)."""
    tensors, meta = read_adapter(path)
    cfg = LoRAConfig.from_dict(meta["config"])
    fingerprint = base_fingerprint(model, cfg.targets)
    if fingerprint != meta["base_fingerprint"]:
        raise ValueError(
            f"adapter {str(path)!r} was saved for base model {meta['model_id']!r} (target weights "
            f"{meta['base_fingerprint']}), but the model given has target weights {fingerprint}"
            f"{f' (model {model_id!r})' if model_id else ''}. Load it on {meta['model_id']!r}."
        )
    linears = target_linears(model, cfg.targets) if cfg.init != "full" else {}
    for name, linear in linears.items():
        if f"{name}.A0" in tensors:
            _adapt(model, name, linear, tensors[f"{name}.A0"], tensors[f"{name}.B0"], cfg)
    expected = adapter_tensors(model, cfg)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {str(path)!r} does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Was it saved for another architecture or target set?"
        )
    for key, dst in expected.items():
        if tensors[key].shape != dst.shape:
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but the model expects "
                f"{tuple(dst.shape)}; for the task head, load the model with the adapter's num_labels."
            )
        dst.copy_(tensors[key])
    return cfg, meta


@torch.no_grad()
def convert_to_lora(src, dst):
    """Writes the adapter `src` as a plain LoRA of rank 2r for the original base model:

        ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]  =>  B' = [B | -B0], A' = [A ; A0]

    saved as an ordinary adapter of rank 2r with A0 = A', B0 = 0, so that R = W0 exactly
    and lora_alpha' = 2r * s keeps the same scale s.
    """
    tensors, meta = read_adapter(src)
    cfg = LoRAConfig.from_dict(meta["config"])
    if cfg.init == "full":
        raise ValueError(f"{str(src)!r} is a full fine-tuning checkpoint: it has no adapter to convert.")
    out = {k: v for k, v in tensors.items() if k.startswith("head.")}
    for key in [k for k in tensors if k.endswith(".A0")]:
        name = key[: -len(".A0")]
        A, B, A0, B0 = (tensors[f"{name}.{k}"].float() for k in ("A", "B", "A0", "B0"))
        out[f"{name}.A"] = torch.cat([A, A0], dim=0)      # (r, d_in) ; (r, d_in) -> (2r, d_in)
        out[f"{name}.B"] = torch.cat([B, -B0], dim=1)     # (d_out, r) | (d_out, r) -> (d_out, 2r)
        out[f"{name}.A0"] = out[f"{name}.A"].clone()
        out[f"{name}.B0"] = torch.zeros_like(out[f"{name}.B"])
    new_cfg = LoRAConfig(**{**asdict(cfg), "init": "lora", "rank": 2 * cfg.rank,
                            "lora_alpha": 2 * cfg.rank * cfg.scale, "targets": cfg.targets})
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "tensors_sha256")}
    return _write_adapter(dst, out, {**meta, "config": asdict(new_cfg),
                                     "converted_from": {"path": str(src), "config": meta["config"]}})


# -----------------------------------------------------------------------------
# command line: the flags train.py shares, and a step-0 check


def add_lora_args(parser):
    """The LoRA flags, shared by every entry point that builds adapters."""
    d = LoRAConfig()
    parser.add_argument("--init", default=d.init, help=f"initialiser, one of {INIT_NAMES}")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="s = lora_alpha / r; default r (s = 1)")
    parser.add_argument("--targets", default=",".join(d.targets), help="comma-separated leaf names of the adapted linears")
    parser.add_argument("--lora-dropout", type=float, default=d.dropout, help="dropout on the adapter input")
    parser.add_argument("--alpha-std", type=float, default=d.alpha_std, help="σ_α of IniLoRA-α (--init alpha)")
    parser.add_argument("--approx-steps", type=int, default=d.approx_steps, help="IniLoRA: approximation steps (0: the Iter=0 row)")
    parser.add_argument("--approx-lr", type=float, default=d.approx_lr, help="IniLoRA: approximation learning rate")
    parser.add_argument("--approx-seed", type=int, default=d.approx_seed, help="IniLoRA: seed of the approximation's start")
    parser.add_argument("--cache-dir", default=None, help="approximation cache (default ~/.cache/inilora or $INILORA_CACHE)")


def lora_config_from_args(args, seed):
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return LoRAConfig(init=args.init, rank=args.rank, lora_alpha=args.lora_alpha, targets=targets,
                      dropout=args.lora_dropout, alpha_std=args.alpha_std, seed=seed,
                      approx_steps=args.approx_steps, approx_lr=args.approx_lr,
                      approx_seed=args.approx_seed).validate()


@torch.no_grad()
def main(argv=None):
    from model import load_model

    p = argparse.ArgumentParser(description="Inject adapters into a model and check its outputs are unchanged at step 0.")
    p.add_argument("--model", default="minilm", help="local directory, hub id, or 'minilm' (packaged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisers")
    add_lora_args(p)
    args = p.parse_args(argv)
    cfg = lora_config_from_args(args, args.seed)
    print(f"config: {asdict(cfg)}")
    model, tokenizer, model_id = load_model(args.model)
    ids, type_ids = tokenizer.encode(["a gripping, beautifully shot film"], ["dull and far too long"])
    batch = (torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.bool), torch.tensor(type_ids))
    before = model(*batch)
    inject(model, cfg, model_id, args.cache_dir)
    mark_trainable(model, cfg)
    after = model(*batch)
    print(f"logits before {before.tolist()}\nlogits after  {after.tolist()}")
    print(f"max |difference| at step 0: {(after - before).abs().max().item():.2e}")


if __name__ == "__main__":
    run_cli(main)
