"""IniLoRA: the adapted linear layer, its initialisers, injection, merge, adapter save/load.

An adapted `nn.Linear` (docs/method.md "Notation"; paper Section 3) computes

    y = x R^T + b + s * (dropout(x) A^T) B^T,      s = lora_alpha / r   (--rslora: s = lora_alpha / sqrt(r))
    R = W0 - s * B0 A0                              (frozen residual)

with trainable A (r, d_in), B (d_out, r) that start at A0, B0. Because R absorbs the
initial product, the model computes the same function at step 0 for every initialiser.
The initialisers (docs/method.md table) differ only in A0, B0: LoRA, Gaussian, IniLoRA (B0 A0 = the
approximation of W0 by approximate.py, eq. 1-3), IniLoRA-α, IniLoRA-β and the baselines PiSSA, MiLoRA,
orthogonal, OLoRA, and the data-driven EVA and LoRA-GA (their statistics: datainit.py). After training,
the total change to the base model is

    ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]    (a plain LoRA of rank 2r)

so an adapter saved with A0, B0 loads exactly on the original, unmodified base model (`rank2r` writes
that rank-2r LoRA; tools/peft_io.py exports it for Hugging Face PEFT).
Adapters are artifacts of lib/artifacts.py: their checksum covers the configuration in the sidecar,
and every tensor's shape is checked against its rank and targets before the model is touched.

Run: python inilora.py --model minilm --init pissa   (or --model smollm2: a decoder's q_proj, v_proj)
(injects the adapters, prints the parameter counts and checks the logits are unchanged)
"""
import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import datainit
import models
from approximate import ApproxConfig, load_or_approximate
from lib.artifacts import check_tensors, read_artifact, save_artifact, weights_fingerprint
from lib.common import run_cli
from models import DEFAULT_TARGETS, target_linears

# Shapes: ... any leading dims (batch, tokens), d_in / d_out the layer's sizes, r the rank.

ADAPTER_FORMAT = "inilora-adapter"
ADAPTER_VERSION = 2  # 2: common's artifact format, whose checksum also covers the configuration
ADAPTER_REMEDY = "Use the adapter and its sidecar exactly as save_adapter / train.py wrote them, or train again."

# -----------------------------------------------------------------------------
# the adapted layer


class LoRALinear(nn.Module):
    """y = x R^T + b + s * (dropout(x) A^T) B^T, with R = W0 - s B0 A0 frozen.
    R keeps W0's dtype (bfloat16 for a bf16 base); A, B, A0, B0 are float32 whatever the base's dtype."""

    def __init__(self, W0, bias, A0, B0, s, dropout=0.0):
        super().__init__()
        dtype = W0.dtype
        # row-major whatever the initialiser returned (an SVD's U, V^T are column-major views): the layout
        # picks the GEMM path, so a layer made from a checkpoint's (row-major) A0, B0 computes the same bits
        W0, A0, B0 = W0.float(), A0.float().contiguous(), B0.float().contiguous()
        # R = W0 - s * B0 A0  (docs/method.md: the frozen residual; in float32, then rounded ONCE to W0's dtype)
        R = W0 - s * (B0 @ A0)  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        self.R = nn.Parameter(R.to(dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.A = nn.Parameter(A0.clone())  # (r, d_in), float32
        self.B = nn.Parameter(B0.clone())  # (d_out, r), float32
        # A0, B0 are kept (not trained) so the adapter converts to a plain LoRA, and reloads exactly
        self.register_buffer("A0", A0.clone())
        self.register_buffer("B0", B0.clone())
        self.s = s
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # y = x R^T + b + s * (dropout(x) A^T) B^T  (docs/method.md "Notation")
        y = F.linear(x, self.R, self.bias)               # (..., d_in) -> (..., d_out)
        return y + self.low_rank(x)

    def low_rank(self, x):
        """s * (dropout(x) A^T) B^T: the trained term alone, computed in A's float32 (autocast may lower it) and
        returned in x's dtype."""
        h = F.linear(self.dropout(x).to(self.A.dtype), self.A)  # (..., d_in) -> (..., r)
        return (self.s * F.linear(h, self.B)).to(x.dtype)       # (..., r) -> (..., d_out)

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
        return f"d_in={self.R.shape[1]}, d_out={self.R.shape[0]}, r={self.A.shape[0]}, s={self.s:g}"


@torch.no_grad()
def update_sizes(model):
    """{name: ||ΔW||_F / ||W0||_F} of every adapted layer, ΔW = s (B A - B0 A0), W0 = R + s B0 A0: how far training
    has moved each weight, relative to its size (train.py logs it; python -m tools.figures weight-change plots it).
    With Adam every entry of A and B moves by about the learning rate a step, so larger A0, B0 (IniLoRA-α) move W
    further at the same rate: this is the quantity that tells a better start from a bigger step."""
    names, ratios = [], []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            B0A0 = m.B0 @ m.A0                                      # (d_out, r) @ (r, d_in) -> (d_out, d_in)
            dW = m.s * (m.B @ m.A - B0A0)                           # ΔW = s (B A - B0 A0)
            W0 = m.R.float() + m.s * B0A0                           # W0 = R + s B0 A0
            names.append(name)
            ratios.append(torch.linalg.matrix_norm(dW) / torch.linalg.matrix_norm(W0))
    return dict(zip(names, torch.stack(ratios).tolist())) if ratios else {}  # one host sync for all layers


def merge(model):
    """Replaces every LoRALinear of `model` by its merged nn.Linear, in place (idempotent)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            model.set_submodule(name, module.merge())
    return model


@torch.no_grad()
def rank2r(tensors, cfg):
    """The adapter `tensors` (of `cfg`) as a plain LoRA of rank 2r for the original base model:

        ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]  =>  B' = [B | -B0], A' = [A ; A0]

    with A0 = A', B0 = 0, so that R = W0 exactly, and lora_alpha' = 2r * s (--rslora: sqrt(2r) * s) keeping
    the same scale s. Returns (tensors, config) of that rank-2r adapter."""
    if cfg.full_finetuning:
        raise ValueError("a full fine-tuning checkpoint has no adapter to convert; train with a LoRA initialiser.")
    out = {k: v for k, v in tensors.items() if k.startswith("head.")}
    for name in [k[: -len(".A0")] for k in tensors if k.endswith(".A0")]:
        A, B, A0, B0 = (tensors[f"{name}.{k}"].float() for k in ("A", "B", "A0", "B0"))
        out[f"{name}.A"] = torch.cat([A, A0], dim=0)      # (r, d_in) ; (r, d_in) -> (2r, d_in)
        out[f"{name}.B"] = torch.cat([B, -B0], dim=1)     # (d_out, r) | (d_out, r) -> (d_out, 2r)
        out[f"{name}.A0"] = out[f"{name}.A"].clone()
        out[f"{name}.B0"] = torch.zeros_like(out[f"{name}.B"])
    # s = lora_alpha' / 2r  (--rslora: lora_alpha' / sqrt(2r)), the scale of the rank-r adapter
    alpha = (math.sqrt(2 * cfg.rank) if cfg.rslora else 2 * cfg.rank) * cfg.scale
    return out, replace(cfg, init="lora", rank=2 * cfg.rank, lora_alpha=alpha)


# -----------------------------------------------------------------------------
# initialisers: each returns (A0 (r, d_in), B0 (d_out, r)) in float32 for one W0 (d_out, d_in).
# Random draws come from the CPU generator `g`, so CPU and CUDA runs start identically.
# `precomputed` is what inject computed for this matrix beforehand: the cached (A, B) of approximate.py
# (inilora), the statistics of training batches of datainit.py (eva, lora-ga); None for the others.


@torch.no_grad()
def init_lora(W0, cfg, g, precomputed):
    """A0: Kaiming-uniform with a=sqrt(5) (nn.Linear's default: bound 1/sqrt(d_in)); B0 = 0."""
    d_out, d_in = W0.shape
    A0 = nn.init.kaiming_uniform_(torch.empty(cfg.rank, d_in), a=math.sqrt(5), generator=g)
    return A0, torch.zeros(d_out, cfg.rank)


@torch.no_grad()
def init_gaussian(W0, cfg, g, precomputed):
    """A0 ~ N(0, (1/r)^2); B0 = 0."""
    d_out, d_in = W0.shape
    A0 = torch.randn(cfg.rank, d_in, generator=g) / cfg.rank
    return A0, torch.zeros(d_out, cfg.rank)


@torch.no_grad()
def init_inilora(W0, cfg, g, precomputed):
    """A0, B0 = the approximation (A, B) with B A ≈ W0 (eq. 1-3), each divided by sqrt(s)."""
    A, B = precomputed
    # s B0 A0 = B A  =>  A0 = A / sqrt(s), B0 = B / sqrt(s)
    return A.float() / math.sqrt(cfg.scale), B.float() / math.sqrt(cfg.scale)


@torch.no_grad()
def init_alpha(W0, cfg, g, precomputed):
    """IniLoRA-α: A0, B0 ~ N(0, σ_α^2), σ_α = cfg.alpha_std (0.5 by default)."""
    d_out, d_in = W0.shape
    A0 = torch.randn(cfg.rank, d_in, generator=g) * cfg.alpha_std
    B0 = torch.randn(d_out, cfg.rank, generator=g) * cfg.alpha_std
    return A0, B0


@torch.no_grad()
def init_beta_kaiming_normal(W0, cfg, g, precomputed):
    """IniLoRA-β K-N: kaiming_normal_ defaults (a=0, fan_in): A0 std sqrt(2/d_in), B0 std sqrt(2/r)."""
    d_out, d_in = W0.shape
    A0 = nn.init.kaiming_normal_(torch.empty(cfg.rank, d_in), generator=g)   # fan_in = d_in
    B0 = nn.init.kaiming_normal_(torch.empty(d_out, cfg.rank), generator=g)  # fan_in = r
    return A0, B0


@torch.no_grad()
def init_beta_kaiming_uniform(W0, cfg, g, precomputed):
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
def init_pissa(W0, cfg, g, precomputed):
    """PiSSA: the top-r singular triplets of W0, so s B0 A0 = U_r S_r V_r^T."""
    return _svd_init(W0, cfg, top=True)


@torch.no_grad()
def init_milora(W0, cfg, g, precomputed):
    """MiLoRA: the bottom-r (minor) singular triplets of W0."""
    return _svd_init(W0, cfg, top=False)


@torch.no_grad()
def init_orthogonal(W0, cfg, g, precomputed):
    """Orthogonal (PEFT's orthogonal_init, after https://datta0.github.io/posts/rethink-lora-init/): one random
    orthogonal Q (r, r) from the QR of an N(0, 1) matrix, its even rows for A0 and its odd rows for B0, so that
    B0 A0 = 0 while neither is zero. The rank must be even (LoRAConfig.validate says so)."""
    d_out, d_in = W0.shape
    r = cfg.rank
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=g))        # (r, r), orthonormal rows
    Q_A, Q_B = Q[0::2], Q[1::2]                                   # (r/2, r) each; Q_B Q_A^T = 0
    # A0 = (G_A Q_A)^T / 10, B0 = G_B^T Q_B / 10 with G_A, G_B ~ N(0, 1); B0 A0 = G_B^T (Q_B Q_A^T) G_A^T / 100 = 0
    A0 = (torch.randn(d_in, r // 2, generator=g) @ Q_A).T / 10.0    # (d_in, r/2) @ (r/2, r) -> (r, d_in)
    B0 = torch.randn(r // 2, d_out, generator=g).T @ Q_B / 10.0     # (d_out, r/2) @ (r/2, r) -> (d_out, r)
    return A0.contiguous(), B0


@torch.no_grad()
def init_olora(W0, cfg, g, precomputed):
    """OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"; PEFT's
    olora_init): W0 = Q U (QR), A0 = the first r rows of U, B0 = the first r columns of Q. As in PEFT the
    factors are not divided by s: the residual takes R = W0 - s B0 A0 whatever s is."""
    Q, U = torch.linalg.qr(W0.float())  # (d_out, k) orthonormal columns, (k, d_in) upper triangular; k = min
    return U[: cfg.rank].contiguous(), Q[:, : cfg.rank].contiguous()  # (r, d_in), (d_out, r)


def _flip_signs(Vh, U=None):
    # a singular (eigen) vector is defined up to its sign: make the largest |entry| of each row of Vh positive
    # (PEFT's IncrementalPCA._svd_flip, u_based_decision=False), flipping the matching column of U with it
    signs = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))   # (k, 1)
    return Vh * signs, None if U is None else U * signs.T


@torch.no_grad()
def init_eva(W0, cfg, g, precomputed):
    """EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
    Adaptation"; PEFT's eva.py): A0 = the top-r principal components of the layer's inputs, i.e. the right
    singular vectors of the centred inputs X - 1 mu^T (the top eigenvectors of their scatter matrix C, read by
    datainit.py over --init-batches training batches); B0 = 0, so R = W0. Every layer keeps rank r and the
    components are not whitened (PEFT's rho = 1, whiten = False); PEFT's incremental PCA, run until the
    components converge, is here the exact PCA of the batches read."""
    C = precomputed                                               # (d_in, d_in), float64, symmetric
    # C = V diag(lambda) V^T, lambda ascending: the right singular vectors of X - 1 mu^T, sigma^2 = lambda
    _, V = torch.linalg.eigh(C)                                   # (d_in, d_in)
    A0, _ = _flip_signs(V[:, -cfg.rank:].flip(1).T)               # the r largest, largest first: (r, d_in)
    return A0.float().contiguous(), torch.zeros(W0.shape[0], cfg.rank)


LORA_GA_GAMMA = 16  # LoRA-GA's stable-scale γ (the paper's and PEFT's default stable_gamma)


@torch.no_grad()
def init_lora_ga(W0, cfg, g, precomputed):
    """LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", Algorithm 1): with
    G = U S V^T the SVD of the full-weight gradient averaged over --init-batches training batches (datainit.py),
    A0 = ζ V[:, :r]^T and B0 = ζ U[:, r:2r], ζ = d_out^(1/4) / sqrt(γ), γ = 16 (the paper's "stable" scale and
    its direction ArB2r, the authors' default); R = W0 - s B0 A0. The first step of (A, B) then moves B A by
    the best rank-2r approximation of the full gradient. PEFT (0.21) also multiplies B0 by S[r:2r] and puts
    ζ on B0 alone; this follows the paper and the authors' code, whose factors have unit-norm columns times ζ."""
    d_out, d_in = W0.shape
    r = cfg.rank
    if 2 * r > min(d_out, d_in):
        raise ValueError(f"lora-ga takes 2r = {2 * r} singular vectors of a ({d_out}, {d_in}) gradient, which has "
                         f"{min(d_out, d_in)}; choose --rank {min(d_out, d_in) // 2} or less.")
    U, S, Vh = torch.linalg.svd(precomputed.double(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    Vh, U = _flip_signs(Vh, U)
    # ζ = d_out^(1/4) / sqrt(γ)
    zeta = d_out ** 0.25 / math.sqrt(LORA_GA_GAMMA)
    A0 = zeta * Vh[:r]                                            # (r, d_in): the top r right singular vectors
    B0 = zeta * U[:, r: 2 * r]                                    # (d_out, r): the next r left singular vectors
    return A0.float().contiguous(), B0.float().contiguous()


# the one table of initialisers: adding one is a function above and a line here; --init, --help, sweeps and
# figures all read it
INITIALISERS = {"lora": init_lora, "gaussian": init_gaussian, "inilora": init_inilora, "alpha": init_alpha,
                "beta-kaiming-normal": init_beta_kaiming_normal, "beta-kaiming-uniform": init_beta_kaiming_uniform,
                "pissa": init_pissa, "milora": init_milora, "orthogonal": init_orthogonal, "olora": init_olora,
                "eva": init_eva, "lora-ga": init_lora_ga}
DATA_DRIVEN = sorted(datainit.STATISTICS)  # the initialisers that read training batches first (datainit.collect)
FULL = "full"  # the full fine-tuning baseline, the one --init without an adapter: every weight trains


def init_names():
    """Every --init: the initialisers of the table as it is now, and "full"."""
    return sorted([*INITIALISERS, FULL])

# -----------------------------------------------------------------------------
# configuration: each LoRA setting is declared once, as a field with its flag and its validity check;
# add_lora_args, lora_config_from_args and validate are derived from the fields (train.py, tools/memory.py and
# inilora.py's own command line share them; approximate.py keeps its own, as it sets its own defaults)


def flag_field(default, help, flag=None, parse=None, problem=None, flag_default=MISSING):
    """A LoRAConfig field: its default, its command-line `flag` (value read by `parse`, shown with
    `help` (a string, or a function giving it when the parser is built), default `flag_default` if it differs
    from the field's), and `problem(value)`: None for a valid value, else the sentence that says what is wrong
    with it and what to pass instead."""
    return field(default=default, metadata=dict(help=help, flag=flag, parse=parse, problem=problem or (lambda v: None),
                                                flag_default=default if flag_default is MISSING else flag_default))


@dataclass
class LoRAConfig:
    init: str = flag_field("lora", lambda: f"initialiser, one of {init_names()}", "--init", str, lambda v: None if v in
                           init_names() else f"init {v!r} is not one of {init_names()}; pass e.g. --init inilora.")
    rank: int = flag_field(8, "LoRA rank r", "--rank", int, lambda v: None if isinstance(v, int) and v >= 1 else
                       f"rank={v!r} must be an integer >= 1 (the paper uses 8); pass e.g. --rank 8.")
    lora_alpha: float | None = flag_field(  # None -> r, so s = 1 as in the paper's experiments
        None, "s = lora_alpha / r; None: lora_alpha = r, so s = 1", "--lora-alpha", float, lambda v: None if v is
        None or 0 < v < math.inf else f"lora_alpha={v!r} must be a finite number > 0, or None for lora_alpha = r.")
    rslora: bool = flag_field(False, "rank-stabilised scale s = lora_alpha / sqrt(r) (Kalajdzievski 2023; PEFT's "
                              "use_rslora) instead of lora_alpha / r", "--rslora", bool, lambda v: None if
                              isinstance(v, bool) else f"rslora={v!r} must be true or false.")
    targets: tuple[str, ...] = flag_field(  # leaf names of the adapted nn.Linear modules
        DEFAULT_TARGETS["encoder"], "comma-separated leaf names of the adapted nn.Linear modules; None: the "
        f"model family's (models.DEFAULT_TARGETS: {DEFAULT_TARGETS})", "--targets",
        models.parse_targets,  # "query, value" -> ("query", "value")
        lambda v: None if isinstance(v, (tuple, list)) and v and all(isinstance(t, str) for t in v) else
        f"targets={v!r} must name at least one module; pass e.g. --targets query,value.", flag_default=None)
    dropout: float = flag_field(0.0, "dropout on the adapter's input (active in training mode only)", "--lora-dropout",
                            float, lambda v: None if 0 <= v < 1 else f"dropout={v!r} must be in [0, 1), e.g. 0.1.")
    alpha_std: float = flag_field(0.5, "σ_α of IniLoRA-α (--init alpha)", "--alpha-std", float, lambda v: None if
                              0 < v < math.inf else f"alpha_std={v!r} must be a finite number > 0 (the paper: 0.5).")
    seed: int = flag_field(0, "draws of the random initialisers (train.py's --seed)")
    init_batches: int = flag_field(8, f"data-driven initialisers ({', '.join(sorted(datainit.STATISTICS))}): the "
                                   "training batches their statistics read, the first of the run's seeded order",
                                   "--init-batches", int, lambda v: None if isinstance(v, int) and v >= 1 else
                                   f"init_batches={v!r} must be an integer >= 1; pass e.g. --init-batches 8.")
    approx_steps: int = flag_field(20000, "IniLoRA: Adam steps of the approximation, eq. 3 (0: the Iter=0 row)",
                               "--approx-steps", int, lambda v: None if v >= 0 else
                               f"approx_steps={v!r} is negative; expected 0 (the N(0, σ̄²) start) or more.")
    approx_lr: float = flag_field(5e-4, "IniLoRA: approximation learning rate", "--approx-lr", float, lambda v: None if
                              0 < v < math.inf else f"approx_lr={v!r} must be a finite number > 0, e.g. 5e-4.")
    approx_seed: int = flag_field(0, "IniLoRA: seed of the approximation's N(0, σ̄²) start", "--approx-seed", int)

    @property
    def full_finetuning(self):
        """init "full": no adapter, every weight trains."""
        return self.init == FULL

    @property
    def label(self):
        """How a run directory names the method: "lora-r8", "lora-r8-rslora", or "full" (no rank)."""
        return FULL if self.full_finetuning else f"{self.init}-r{self.rank}" + ("-rslora" if self.rslora else "")

    @property
    def scale(self):
        alpha = self.rank if self.lora_alpha is None else self.lora_alpha
        # s = lora_alpha / r  (docs/method.md "Notation"); --rslora: s = lora_alpha / sqrt(r)
        return alpha / math.sqrt(self.rank) if self.rslora else alpha / self.rank

    def validate(self):
        for f in fields(self):
            if problem := f.metadata["problem"](getattr(self, f.name)):
                raise ValueError(problem)
        if self.init == "orthogonal" and self.rank % 2:
            raise ValueError(f"init 'orthogonal' splits one orthogonal r x r matrix into A0's and B0's halves, so "
                             f"the rank must be even, not rank={self.rank}; pass --rank {self.rank + 1} "
                             f"or {max(2, self.rank - 1)}.")
        return self

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown LoRA configuration keys {unknown}; expected a subset of {sorted(known)}.")
        if isinstance(d.get("targets"), list):  # JSON has no tuples
            d = dict(d, targets=tuple(d["targets"]))
        return cls(**d).validate()


# -----------------------------------------------------------------------------
# injection and trainable parameters


def base_fingerprint(model, targets):
    """Fingerprint of the target weights W0 of a model that has no adapters yet."""
    if adapted := sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        raise ValueError(f"the model already has adapters at {adapted[:3]}...; load the original base model "
                         "again before injecting or loading an adapter.")
    linears = target_linears(model, targets)
    return weights_fingerprint({n: m.weight.detach() for n, m in linears.items()})


def _adapt(model, name, linear, A0, B0, cfg):
    layer = LoRALinear(linear.weight.detach(), linear.bias, A0.to(linear.weight.device),
                       B0.to(linear.weight.device), cfg.scale, cfg.dropout)
    layer.train(model.training)  # a new module trains by default; it takes the mode of its model
    model.set_submodule(name, layer)
    return layer


def inject(model, cfg, model_id, cache_dir=None, stats=None):
    """Replaces the target nn.Linear modules by LoRALinear, initialised by `cfg.init` ("inilora" reads
    approximate.py's cache, or fills it; the DATA_DRIVEN ones read `stats`, {target: statistics} of
    datainit.collect). Returns the fingerprint of the base model's target weights."""
    cfg.validate()
    fingerprint = base_fingerprint(model, cfg.targets)
    if cfg.full_finetuning:
        return fingerprint
    linears = target_linears(model, cfg.targets)
    name, smallest = min(linears.items(), key=lambda item: min(item[1].weight.shape))
    if cfg.rank > (largest := min(smallest.weight.shape)):
        raise ValueError(f"rank={cfg.rank} is larger than min(d_out, d_in)={largest} of {name} "
                         f"{tuple(smallest.weight.shape)}; choose a rank between 1 and {largest}.")
    factors = {}
    if cfg.init == "inilora":
        weights = {name: linear.weight.detach() for name, linear in linears.items()}
        approx_cfg = ApproxConfig(rank=cfg.rank, steps=cfg.approx_steps, lr=cfg.approx_lr, seed=cfg.approx_seed)
        factors = load_or_approximate(model_id, weights, approx_cfg, cache_dir)
    if cfg.init in DATA_DRIVEN:
        if stats is None or sorted(stats) != sorted(linears):
            given = "none" if stats is None else f"those of {sorted(stats)[:3]}..."
            raise ValueError(f"init {cfg.init!r} is data-driven: it needs the statistics of training batches for "
                             f"every target ({len(linears)} layers, e.g. {sorted(linears)[0]}), and was given {given}. "
                             "Train with `python train.py --init " + cfg.init + "`, which reads them from the first "
                             "--init-batches batches, or pass datainit.collect's statistics as `stats`.")
        factors = stats
    g = torch.Generator().manual_seed(cfg.seed)
    errors = {}
    for name in sorted(linears):  # a fixed order: the same draws on every run
        W0 = linears[name].weight.detach().float()
        A0, B0 = INITIALISERS[cfg.init](W0.cpu(), cfg, g, factors.get(name))
        dtype = linears[name].weight.dtype
        layer = _adapt(model, name, linears[name], A0, B0, cfg)
        if dtype != torch.float32:  # R was rounded: how far from W0 does the model start?
            errors[name] = step0_error(layer, W0)
    if errors:
        report_rounding(cfg.init, dtype, errors)
    return fingerprint


def step0_error(layer, W0):
    """||(R + s B0 A0) - W0||_F / ||W0||_F: how far the weight the layer computes at step 0 is from W0 once R
    is rounded to its dtype (0 up to float32 rounding when R is float32, exactly 0 when B0 = 0)."""
    effective = layer.R.float() + layer.s * (layer.B0 @ layer.A0)  # (d_out, d_in), float32
    return (torch.linalg.matrix_norm(effective - W0) / torch.linalg.matrix_norm(W0)).item()


def report_rounding(init, dtype, errors):
    """Prints the worst step-0 weight error of a low-precision base, and says plainly when it exceeds the
    dtype's own precision (torch.finfo(dtype).eps: 2^-7 for bfloat16, 2^-10 for float16), i.e. when the
    adapted model no longer computes the base model's function at step 0."""
    name = max(errors, key=errors.get)
    eps, dtype = torch.finfo(dtype).eps, str(dtype).removeprefix("torch.")
    print(f"{dtype}: R = W0 - s B0 A0 is rounded to {dtype}; the step-0 weight R + s B0 A0 is off W0 by "
          f"{errors[name]:.2e} (relative, worst of {len(errors)}: {name}); {dtype}'s precision is {eps:.2e}")
    if errors[name] > eps:
        print(f"warning: init {init!r} cannot keep the base model's function at step 0 in {dtype}: its s B0 A0 is "
              f"much larger than W0, so rounding R loses {errors[name]:.2e} of W0 (more than {dtype}'s "
              "precision). Train in --dtype float32 to keep it, or accept a different start.")


def mark_trainable(model, cfg, verbose=True):
    """Only A, B and the task head (`head.*`) train; with init="full", everything does.
    Returns (trainable, total) parameter counts."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_adapter = leaf in ("A", "B") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), LoRALinear)
        p.requires_grad_(cfg.full_finetuning or is_adapter or name.startswith("head."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%), init {cfg.init}")
    return trainable, total


# -----------------------------------------------------------------------------
# adapter checkpoints: a lib/artifacts.py artifact (safetensors + sidecar, one checksum over both)


def adapter_tensors(model, cfg):
    """The tensors an adapter checkpoint holds: A, B, A0, B0 of every LoRALinear and the
    task head; with init="full", every parameter of the model."""
    if cfg.full_finetuning:
        return dict(model.named_parameters())
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for key in ("A", "B", "A0", "B0"):
                tensors[f"{name}.{key}"] = getattr(m, key)
    tensors.update({n: p for n, p in model.named_parameters() if n.startswith("head.")})
    return tensors


def adapter_shapes(model, cfg):
    """{name: shape} that adapter_tensors will hold once `cfg` is put on the base `model`:
    A (r, d_in), B (d_out, r), A0 (r, d_in), B0 (d_out, r) per target, and the head."""
    if cfg.full_finetuning:
        return {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes, r = {}, cfg.rank
    for name, linear in target_linears(model, cfg.targets).items():
        d_out, d_in = linear.weight.shape
        shapes.update({f"{name}.A": (r, d_in), f"{name}.B": (d_out, r),
                       f"{name}.A0": (r, d_in), f"{name}.B0": (d_out, r)})
    return shapes | {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith("head.")}


def _split_head(d):
    # ({everything but the task head}, {the task head "head.*"})
    return tuple({k: v for k, v in d.items() if k.startswith("head.") == in_head} for in_head in (False, True))


def save_adapter(model, path, cfg, model_id, fingerprint, extra=None):
    """Writes the adapter of `model` to `path` (.safetensors) and its `.json` sidecar, which names the base
    model and the fingerprint of its target weights: it only ever loads on the base it was trained from."""
    meta = {"model_id": model_id, "base_fingerprint": fingerprint, "config": asdict(cfg), **(extra or {})}
    return save_artifact(path, adapter_tensors(model, cfg), meta, ADAPTER_FORMAT, ADAPTER_VERSION)


def read_adapter(path):
    """(tensors, meta) of an adapter, after common.read_artifact's checks: both files there, format and
    version, one checksum over the tensors and the sidecar (so its configuration), finite values."""
    return read_artifact(path, ADAPTER_FORMAT, ADAPTER_VERSION, ADAPTER_REMEDY)


@torch.no_grad()
def load_adapter(model, path, model_id=None):
    """Loads an adapter onto the original base `model` (in place): rebuilds R = W0 - s B0 A0 from the saved
    A0, B0, then sets A, B and the task head. Returns (cfg, meta). Everything is checked before the
    model changes, so a refused adapter leaves it untouched."""
    tensors, meta = read_adapter(path)
    cfg = LoRAConfig.from_dict(meta["config"])
    fingerprint = base_fingerprint(model, cfg.targets)
    if fingerprint != meta["base_fingerprint"]:
        raise ValueError(f"adapter {str(path)!r} was saved for base model {meta['model_id']!r} (target weights "
                         f"{meta['base_fingerprint']}), but the model given has target weights {fingerprint}"
                         f"{f' (model {model_id!r})' if model_id else ''}. Load it on {meta['model_id']!r}.")
    (layers, head), (saved_layers, saved_head) = _split_head(adapter_shapes(model, cfg)), _split_head(tensors)
    check_tensors(saved_layers, layers, path, f"Its sidecar says rank {cfg.rank}, targets {list(cfg.targets)} "
                  f"and init {cfg.init!r}, which do not describe its tensors. {ADAPTER_REMEDY}")
    labels = f" ({meta['num_labels']})" if "num_labels" in meta else ""
    check_tensors(saved_head, head, path, f"The task head is for another number of labels: load the model with "
                  f"the adapter's num_labels{labels}.")
    if not cfg.full_finetuning:
        for name, linear in target_linears(model, cfg.targets).items():
            _adapt(model, name, linear, tensors[f"{name}.A0"], tensors[f"{name}.B0"], cfg)
    for key, dst in adapter_tensors(model, cfg).items():
        dst.copy_(tensors[key])
    return cfg, meta


# -----------------------------------------------------------------------------
# command line: the flags train.py shares (derived from LoRAConfig), and a step-0 check


def config_flags():
    """{LoRAConfig field: its command-line flag}, for every field that declares one."""
    return {f.name: f.metadata["flag"] for f in fields(LoRAConfig) if f.metadata["flag"]}


def add_lora_args(parser):
    """One flag per LoRAConfig field that declares one, plus --cache-dir (where, not what)."""
    for f in fields(LoRAConfig):
        if flag := f.metadata["flag"]:
            text = f.metadata["help"]
            text = text() if callable(text) else text
            if f.type is bool:  # a switch: given means True
                parser.add_argument(flag, action="store_true", default=f.metadata["flag_default"], help=text)
            else:
                parser.add_argument(flag, type=f.metadata["parse"], default=f.metadata["flag_default"], help=text)
    parser.add_argument("--cache-dir", default=None,
                        help="approximation cache; None: $INILORA_CACHE, else ~/.cache/inilora")


def lora_config_from_args(args, seed, default_targets=DEFAULT_TARGETS["encoder"]):
    """LoRAConfig from add_lora_args' flags; `default_targets` where --targets was left out."""
    values = {name: getattr(args, flag.lstrip("-").replace("-", "_")) for name, flag in config_flags().items()}
    if values["targets"] is None:
        values["targets"] = tuple(default_targets)
    return LoRAConfig(**values, seed=seed).validate()


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description="Inject adapters into a model and check its outputs are unchanged "
                                "at step 0.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="'minilm' or 'smollm2' (packaged), a directory or a hub id")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisers")
    add_lora_args(p)
    args = p.parse_args(argv)
    model, tok, model_id, family, targets = models.load(args.model)
    cfg = lora_config_from_args(args, args.seed, targets)
    if family == "decoder":  # next-token logits of a chat prompt; the model is in eval mode
        batch = (torch.tensor(tok.encode([tok.chat_prompt("What is 12 + 30?")], add_special_tokens=False)),)
    else:  # class logits of a sentence pair
        ids, type_ids = tok.encode(["a gripping, beautifully shot film"], ["dull and far too long"])
        batch = (torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.bool), torch.tensor(type_ids))
    print(f"config: {asdict(cfg)}")
    before = model(*batch)
    inject(model, cfg, model_id, args.cache_dir)
    mark_trainable(model, cfg)
    difference = (model(*batch) - before).abs().max().item()
    print(f"largest |logit| {before.abs().max().item():.3g}\nmax |difference| at step 0: {difference:.2e}")


if __name__ == "__main__":
    run_cli(main)
