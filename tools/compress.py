"""Compressing an exported adapter to rank K by truncated SVD, for servers that limit the rank.

An exported adapter (tools/peft_io.py) changes each target weight of the base model by

    ΔW = s (B A - B0 A0) = s B' A',    B' = [B | -B0] (d_out, 2r),  A' = [A ; A0] (2r, d_in)

which has rank up to 2r (docs/method.md "Checkpoints and the rank-2r conversion"). Its best rank-K
approximation in the Frobenius norm is the truncated SVD (Eckart-Young), itself a plain LoRA of rank K:

    ΔW = U S V^T,   ΔW_K = U_K S_K V_K^T = lora_B lora_A,   lora_B = U_K S_K^(1/2),  lora_A = S_K^(1/2) V_K^T

with lora_alpha = K, so that PEFT's scale lora_alpha / K is 1 (the singular values sit in the factors).
What it gives up is the discarded energy, the relative error of each layer:

    ||ΔW - ΔW_K||_F / ||ΔW||_F = sqrt(sum_{i>K} σ_i^2 / sum_i σ_i^2)

`--rank K` (an integer, 1 <= K <= r', r' the exact export's rank) keeps K components in every layer.
`--rank e` (a fraction, 0 < e < 1) finds in each layer l the smallest K_l whose kept energy
sum_{i<=K_l} σ_i^2 / sum_i σ_i^2 is at least e; PEFT holds one rank per adapter unless its rank_pattern
names each layer's, and this export keeps to one (every reader of PEFT adapters reads r): the adapter keeps
K = max_l K_l components in every layer, so the other layers keep more than the fraction e. The head in
modules_to_save (encoders) is copied unchanged. PEFT's convert_to_lora offers the same idea for other adapter types.

    python -m tools.peft_io export runs/minilm-rotten-tomatoes-inilora-r8-seed0 peft/inilora-r8 --rank 8
"""
import math

import torch

# Shapes: d_in / d_out a target layer's sizes, r' the exact export's rank (r, or 2r when B0 != 0), K the kept rank.

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # PEFT's names of A' (r', d_in) and B' (d_out, r')


def peft_scale(config):
    """PEFT's scale of an adapter_config.json: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def parse_rank(text, exact_rank):
    """--rank as (K, None) for an integer or (None, e) for a fraction; anything else is a ValueError."""
    remedy = (f"Pass an integer K with 1 <= K <= {exact_rank} (the exact export's rank), or an energy "
              "fraction e with 0 < e < 1 (e.g. 0.99), or leave --rank out for the exact export.")
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--rank {text!r} is not a number. {remedy}") from None
    if number.is_integer() and not any(c in str(text) for c in ".eE"):  # "8", "0", "-3": a rank
        K = int(number)
        if not 1 <= K <= exact_rank:
            why = "a rank below 1 keeps nothing" if K < 1 else f"the exact export has rank {exact_rank} already"
            raise ValueError(f"--rank {K} is outside 1..{exact_rank}: {why}. {remedy}")
        return K, None
    if not 0 < number < 1:  # "0.99": a fraction of the energy; "1.0", "-0.5", "1.5" are neither
        raise ValueError(f"--rank {text!r} is neither an integer rank nor an energy fraction in (0, 1). {remedy}")
    return None, number


def layer_names(tensors):
    """The PEFT module names that carry a LoRA pair, in layer order (layer 2 before layer 10)."""
    names = [k.removesuffix(LORA_A) for k in tensors if k.endswith(LORA_A)]
    return sorted(names, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")])


@torch.no_grad()
def delta_w(tensors, scale, name):
    """ΔW = s B' A' of one layer, (d_out, d_in) in float64: (d_out, r') @ (r', d_in) -> (d_out, d_in)."""
    return scale * (tensors[name + LORA_B].double() @ tensors[name + LORA_A].double())


def kept_rank(S, e):
    """The smallest K_l whose kept energy sum_{i<=K_l} σ_i^2 / sum_i σ_i^2 >= e; 0 for ΔW = 0."""
    energy = S.square()  # σ_i^2, (r',)
    total = energy.sum()
    if total == 0:
        return 0
    kept = energy.cumsum(0) / total  # kept fraction after 1, 2, ... components, (r',)
    return min(int((kept < e).sum()) + 1, len(S))


@torch.no_grad()
def compress(tensors, config, text):
    """(tensors, adapter_config.json, report) of the PEFT adapter `tensors` / `config` compressed to the rank
    that --rank `text` asks for; the report holds K and each layer's relative error and discarded energy."""
    exact_rank, scale = config["r"], peft_scale(config)
    K, e = parse_rank(text, exact_rank)
    names = layer_names(tensors)
    # ΔW = U S V^T per layer (float64); U (d_out, r'), S (r',), Vh (r', d_in) after dropping the null space
    svds = {}
    for name in names:
        U, S, Vh = torch.linalg.svd(delta_w(tensors, scale, name), full_matrices=False)
        svds[name] = (U[:, :exact_rank], S[:exact_rank], Vh[:exact_rank])
    needed = {name: kept_rank(S, e) for name, (_, S, _) in svds.items()} if e is not None else {}
    if e is not None:
        K = max(1, *needed.values())  # one rank per adapter: the largest any layer needs
    out = {k: t for k, t in tensors.items() if not k.endswith((LORA_A, LORA_B))}  # the head, unchanged
    layers = []
    for name, (U, S, Vh) in svds.items():
        # ΔW_K = U_K S_K V_K^T = lora_B lora_A, with lora_B = U_K S_K^(1/2), lora_A = S_K^(1/2) V_K^T
        root = S[:K].sqrt()                                      # (K,)
        out[name + LORA_B] = (U[:, :K] * root).float().contiguous()          # (d_out, K)
        out[name + LORA_A] = (root[:, None] * Vh[:K]).float().contiguous()   # (K, d_in)
        # the relative error of what is written (float32 factors, scale 1), and the discarded energy
        # sqrt(sum_{i>K} σ_i^2 / sum_i σ_i^2) that Eckart-Young says it equals
        dW = delta_w(tensors, scale, name)
        norm = dW.norm()
        error = (dW - delta_w(out, 1.0, name)).norm() / norm if norm > 0 else torch.zeros(())
        discarded = (S[K:].square().sum() / S.square().sum()).sqrt() if norm > 0 else torch.zeros(())
        layers.append({"module": name.removeprefix("base_model.model."), "relative_error": float(error),
                       "discarded_energy": float(discarded), **({"rank_needed": needed[name]} if needed else {})})
    report = {"rank": K, "from_rank": exact_rank, "requested": str(text), "energy_fraction": e, "layers": layers}
    # PEFT's scale lora_alpha / r = K / K = 1 (a plain scale, use_rslora off): the singular values are in the factors
    return out, config | {"r": K, "lora_alpha": K, "use_rslora": False}, report


def print_table(report):
    """One line per layer: its relative error (and, for an energy fraction, the rank it needed)."""
    fraction = report["energy_fraction"] is not None
    print(f"{'module':<56} {'rel. error':>10}" + (f" {'rank needed':>11}" if fraction else ""))
    for layer in report["layers"]:
        print(f"{layer['module']:<56} {layer['relative_error']:>10.4f}"
              + (f" {layer['rank_needed']:>11}" if fraction else ""))
    errors = [layer["relative_error"] for layer in report["layers"]]
    how = (f"energy fraction {report['energy_fraction']:g}: the largest rank a layer needs" if fraction
           else "as asked")
    print(f"rank {report['from_rank']} -> {report['rank']} ({how}); relative error of ΔW per layer "
          f"{min(errors):.4f} .. {max(errors):.4f}")
