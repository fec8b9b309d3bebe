"""Does an initialiser keep the base model's function at step 0 in bfloat16 / float16?

R = W0 - s B0 A0 is computed in float32 and rounded ONCE to the model's dtype (inilora.LoRALinear); the
adapters stay float32. A start whose s B0 A0 is much larger than W0 (IniLoRA-alpha: entries of A0, B0 ~
N(0, sigma^2) with sigma = 0.5) leaves R of the size of s B0 A0, and rounding it loses more of W0 than
rounding W0 itself would. For every initialiser this measures, at step 0, in each dtype,

    change = max |f_adapted(x) - f_base(x)| / max |f_base(x)|

with f_base the base model in that dtype (no adapter) and f_adapted the same model with the adapters
injected, on a fixed input, for:
  MiniLM      the classifier's logits on 8 rotten-tomatoes reviews (head seed 0);
  SmolLM2     the next-token logits of a chat prompt (30 positions);
  7B layer    one LLaMA-7B-shaped linear layer, W0 (4096, 4096) ~ N(0, 0.02^2), x (16, 4096) ~ N(0, 1).
The draws of A0, B0 are those of a float32 run (same seed); IniLoRA's start is read from the approximation
cache for MiniLM and SmolLM2 (`python approximate.py --model minilm` / `--model smollm2` fill it), and on
the 7B layer is its converged value, the top-r SVD split B = U S^1/2, A = S^1/2 V^T (figures.py subspace shows
IniLoRA reaching it at 20000 steps). The float32 row is the floor (float32 rounding alone).

Run: python -m bench.precision                 (about 2 minutes on 2 CPU threads)
     python -m bench.precision --parts 7b-layer --dtypes bfloat16
"""
import argparse
import copy

import torch

import inilora
from data.prepare import load_split, pad_batch
from lib.common import DTYPES, run_cli
from models import DEFAULT_TARGETS, target_linears
from models.decoder import load_causal_lm
from models.encoder import load_model

# the initialisers with an adapter that need no training batches (every --init but "full", eva and lora-ga)
INITS = sorted(set(inilora.INITIALISERS) - set(inilora.DATA_DRIVEN))
PARTS = ("minilm", "smollm2", "7b-layer")


def change(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.no_grad()
def model_changes(part, dtypes, inits, rank):
    """{(init, dtype): change} for a packaged model, and the float32 base's change in each dtype."""
    if part == "minilm":
        base, tokenizer, model_id = load_model("minilm", num_labels=2, head_seed=0)
        split = load_split("rotten-tomatoes", "dev", tokenizer, 64)
        ids, types, mask = pad_batch(split["input_ids"][:8], split["token_type_ids"][:8], tokenizer.pad_id)
        run = lambda m: m(ids, mask, types)  # (8, 2)
    else:
        base, tokenizer, model_id = load_causal_lm("smollm2")
        ids = torch.tensor(tokenizer.encode([tokenizer.chat_prompt("What is 12 + 30? Explain.")],
                                            add_special_tokens=False))
        run = lambda m: m(ids)[0]  # (T, V)
    targets = DEFAULT_TARGETS["encoder" if part == "minilm" else "decoder"]
    out = {}
    for init in inits:
        cfg = inilora.LoRAConfig(init=init, rank=rank, targets=targets).validate()
        start = copy.deepcopy(base)
        inilora.inject(start, cfg, model_id)  # the float32 draws of A0, B0 (and IniLoRA's cache)
        layers = {name: m for name, m in start.named_modules() if isinstance(m, inilora.LoRALinear)}
        for dtype in dtypes:
            low = copy.deepcopy(base).to(DTYPES[dtype])
            linears = target_linears(low, targets)
            for name, layer in layers.items():  # R = W0 - s B0 A0 from the low-precision W0, rounded once
                low.set_submodule(name, inilora.LoRALinear(linears[name].weight, linears[name].bias,
                                                          layer.A0, layer.B0, layer.s))
            reference = copy.deepcopy(base).to(DTYPES[dtype])
            out[init, dtype] = change(run(low), run(reference))
    for dtype in dtypes:
        out["(base in this dtype, against float32)", dtype] = change(run(copy.deepcopy(base).to(DTYPES[dtype])),
                                                                     run(base))
    return out


@torch.no_grad()
def layer_changes(dtypes, inits, rank, d=4096):
    """{(init, dtype): change} for one LLaMA-7B-shaped linear layer."""
    g = torch.Generator().manual_seed(0)
    W0 = 0.02 * torch.randn(d, d, generator=g)  # (d_out, d_in), LLaMA's initialiser std
    x = torch.randn(16, d, generator=g)  # (B, d_in)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    converged = ((S[:rank].sqrt()[:, None] * Vh[:rank]), (U[:, :rank] * S[:rank].sqrt()))  # (A, B): B A = U_r S_r V_r^T
    out = {}
    for init in inits:
        cfg = inilora.LoRAConfig(init=init, rank=rank).validate()
        A0, B0 = inilora.INITIALISERS[init](W0, cfg, torch.Generator().manual_seed(0),
                                            converged if init == "inilora" else None)
        for dtype in dtypes:
            Wd = W0.to(DTYPES[dtype])
            layer = inilora.LoRALinear(Wd, None, A0, B0, cfg.scale)
            out[init, dtype] = change(layer(x.to(Wd.dtype)), x.to(Wd.dtype) @ Wd.T)
    for dtype in dtypes:
        out["(base in this dtype, against float32)", dtype] = change(x.to(DTYPES[dtype]) @ W0.to(DTYPES[dtype]).T,
                                                                     x @ W0.T)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated dtypes")
    p.add_argument("--inits", default=",".join(INITS), help="comma-separated initialisers")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    args = p.parse_args(argv)
    parts, dtypes, inits = (args.parts.split(","), args.dtypes.split(","), args.inits.split(","))
    for name, allowed in (("--parts", PARTS), ("--dtypes", DTYPES), ("--inits", INITS)):
        bad = [v for v in getattr(args, name[2:]).split(",") if v not in allowed]
        if bad:
            raise ValueError(f"{name} {bad} are not among {list(allowed)}; pass a comma-separated subset.")
    results = {part: (layer_changes(dtypes, inits, args.rank) if part == "7b-layer"
                      else model_changes(part, dtypes, inits, args.rank)) for part in parts}
    columns = [(part, dtype) for part in parts for dtype in dtypes]
    print("\nstep-0 change max|f_adapted - f_base| / max|f_base|, rank", args.rank)
    print("| init | " + " | ".join(f"{part} {dtype}" for part, dtype in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for init in [*inits, "(base in this dtype, against float32)"]:
        cells = [results[part].get((init, dtype)) for part, dtype in columns]
        print(f"| {init} | " + " | ".join("-" if v is None or (init.startswith("(") and dtype == "float32")
                                          else f"{v:.1e}" for v, (_, dtype) in zip(cells, columns)) + " |")
    return results


if __name__ == "__main__":
    run_cli(main)
