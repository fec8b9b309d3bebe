"""Adapters to and from Hugging Face PEFT: export a run or an adapter as a PEFT LoRA directory, import one.

A PEFT LoRA layer computes y = x W0^T + b + (lora_alpha / r) (x lora_A^T) lora_B^T on the untouched base
weight W0. Ours computes y = x R^T + b + s (x A^T) B^T with R = W0 - s B0 A0 (inilora.py), so the change
a trained adapter makes to the base model is (docs/method.md "Checkpoints and the rank-2r conversion")

    ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]

Export: an adapter whose B0 = 0 (lora, gaussian, eva, an imported one) is a PEFT LoRA of rank r as it is:
lora_A = A, lora_B = B, its lora_alpha. Every other initialiser (inilora, alpha, beta-*, pissa, milora,
orthogonal, olora, lora-ga) goes through inilora.rank2r, a LoRA of rank 2r: lora_A = [A ; A0],
lora_B = [B | -B0], lora_alpha = 2r s, so PEFT's scale lora_alpha / r' is our s. A --rslora adapter is
exported with use_rslora = true (PEFT's scale lora_alpha / sqrt(r'); lora_alpha = sqrt(2r) s after rank2r). The task head (BERT: pooler + classifier,
RoBERTa: classifier.dense + out_proj) goes in modules_to_save; decoders have none (task_type CAUSAL_LM).
Import: a PEFT LoRA (rank r, any lora_alpha) becomes our adapter with init "lora", A = lora_A,
B = lora_B, s = lora_alpha / r (use_rslora: --rslora, s = lora_alpha / sqrt(r)), and A0 = lora_A, B0 = 0, so that R = W0 exactly (B0 A0 = 0) and the
imported adapter computes PEFT's function; training it further starts from PEFT's adapter.
Module names come from the models' own checkpoint name maps (model.checkpoint_name_map for BERT/RoBERTa,
decoder.hf_name_map for LLaMA-family decoders), read backwards: encoder.layers.0.attn.query <->
bert.encoder.layer.0.attention.self.query, as AutoModelForSequenceClassification / ForCausalLM name it.

Serving (vLLM): a server's --max-lora-rank must be one of VLLM_RANKS (8, 16, ..., 512; default 16) and at
least the adapter's r, and vLLM refuses modules_to_save. A decoder's export has no modules_to_save, its
target_modules as the base model names its layers (q_proj, v_proj), and its rank r' padded up to the next of
VLLM_RANKS with zero rows of lora_A and zero columns of lora_B, lora_alpha'' = r'' s. The padding is exact:
[B' | 0] [A' ; 0] = B' A' and the scale is s still. The export prints the --max-lora-rank to serve it with.
An encoder's export keeps its rank and its task head in modules_to_save (PEFT serves it, vLLM does not).
Smaller exports: --rank K (or an energy fraction e in (0, 1)) compresses ΔW to rank K by truncated SVD
(tools/compress.py), and reports each layer's relative error and the largest logit change on a fixed batch
(compression.json). Every export writes README.md beside adapter_config.json, a model card as PEFT writes
one (library_name: peft, the base model, the initialiser, the task and the run's dev/test scores).

    python -m tools.peft_io export runs/minilm-rotten-tomatoes-inilora-r8-seed0 peft/inilora
    python -m tools.peft_io export runs/minilm-rotten-tomatoes-inilora-r8-seed0 peft/inilora-r4 --rank 4
    python -m tools.peft_io import peft/inilora imported.safetensors --model minilm
"""
import argparse
import math
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import inilora
import models
from data.prepare import TASKS, load_split, training_batch
from evaluate import find_adapter
from lib.artifacts import check_tensors
from lib.common import run_cli, write_atomic, write_json
from lib.runs import adapter_settings, best_dev, config_file
from models import decoder, encoder, target_linears
from models.checkpoint import MINILM, SMOLLM2, read_json, resolve_model
from models.gguf_file import gguf_config, open_gguf
from tools import compress

# Shapes: r the rank, d_in / d_out a target layer's sizes, K the number of labels, B batch, T tokens, V vocabulary.

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a PEFT adapter directory
CARD, REPORT = "README.md", "compression.json"  # the model card; what --rank cost (tools/compress.py)
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values (its LoRAConfig)
LOGIT_EXAMPLES = 8  # the fixed batch a compressed export is measured on: the first 8 dev examples
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the transformers model)
HUB_IDS = {MINILM: "sentence-transformers/all-MiniLM-L6-v2", SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
SEQ_CLS_HEADS = ("classifier", "score")  # PeftModelForSequenceClassification adds these to modules_to_save
# adapter_config.json keys our layer cannot represent -> (is the feature used?, what it is)
UNSUPPORTED = {
    "use_dora": (bool, "DoRA (use_dora)"),
    "rank_pattern": (bool, "per-module ranks (rank_pattern)"),
    "alpha_pattern": (bool, "per-module lora_alpha (alpha_pattern)"),
    "bias": (lambda v: v not in (None, "none"), "trained biases (bias != 'none')"),
    "lora_bias": (bool, "a bias on lora_B (lora_bias)"),
    "fan_in_fan_out": (bool, "transposed Conv1D weights (fan_in_fan_out)"),
    "layers_to_transform": (lambda v: v is not None, "adapters on some layers only (layers_to_transform)"),
    "layer_replication": (bool, "layer replication (layer_replication)"),
    "trainable_token_indices": (bool, "trainable token embeddings (trainable_token_indices)"),
    "target_parameters": (bool, "LoRA on parameters instead of modules (target_parameters)"),
    "use_qalora": (bool, "QA-LoRA (use_qalora)"),
}

# -----------------------------------------------------------------------------
# module names: ours <-> Hugging Face's, read from each model family's checkpoint name map


def read_config(model_id):
    """The model's configuration (encoder.ModelConfig or decoder.DecoderConfig) without loading weights."""
    path, _ = resolve_model(model_id)
    if path.suffix == ".gguf":
        reader, meta = open_gguf(path)  # models/gguf_file.py describes a GGUF as a Hugging Face config.json
        return decoder.config_from_json(gguf_config(reader, meta, str(path)), str(path))
    raw = read_json(path / "config.json")
    if raw.get("model_type") in encoder.SUPPORTED_ARCHS:
        return encoder.load_config(path)
    return decoder.config_from_json(raw, str(path / "config.json"))


def hf_modules(config):
    """{our module name: Hugging Face module name} for every module the checkpoint name map loads, with the
    names of AutoModelForSequenceClassification ("bert."/"roberta." prefix) or AutoModelForCausalLM."""
    if isinstance(config, decoder.DecoderConfig):
        forward = decoder.hf_name_map(config)  # GGUF tensors load under these names too (models/gguf_file.py)
    else:
        forward = encoder.checkpoint_name_map(config, f"{config.arch}.")
    return {ours.removesuffix(".weight"): hf.removesuffix(".weight") for hf, ours in forward.items()
            if hf.endswith(".weight")}


def is_head(ours):
    return ours.startswith("head.")  # everything task-specific lives in model.head (models/encoder.py)


# -----------------------------------------------------------------------------
# export: our adapter -> adapter_config.json + adapter_model.safetensors


@torch.no_grad()
def peft_adapter(path):
    """(PEFT tensors, adapter_config.json content) for our adapter file `path`."""
    tensors, meta = inilora.read_adapter(path)
    cfg = inilora.LoRAConfig.from_dict(meta["config"])
    if cfg.full_finetuning:
        raise ValueError(f"{str(path)!r} is a full fine-tuning checkpoint (init 'full'): every weight changed, so it "
                         "is not a low-rank adapter and PEFT's LoRA cannot hold it. Export a run trained with a LoRA "
                         "initialiser, e.g. --init inilora.")
    if any(t.any() for k, t in tensors.items() if k.endswith(".B0")):
        # ΔW = s (B A - B0 A0) = s [B | -B0] [A ; A0]: a plain LoRA of rank 2r (inilora.rank2r)
        tensors, cfg = inilora.rank2r(tensors, cfg)  # rank 2r, the same s
    config = read_config(meta["model_id"])
    names = hf_modules(config)
    out = {}
    for key, t in sorted(tensors.items()):
        module, leaf = key.rsplit(".", 1)
        if leaf in ("A0", "B0"):  # B0 = 0 here, so R = W0: the base model PEFT loads
            continue
        if module not in names:
            raise ValueError(f"adapter tensor {key!r} of {str(path)!r} belongs to a module that the name map of "
                             f"{meta['model_id']!r} does not load, so it has no Hugging Face name; its targets "
                             f"{list(cfg.targets)} cannot be exported (lm_head tied to the embeddings, for example).")
        lora = {"A": "lora_A.weight", "B": "lora_B.weight"}.get(leaf, leaf)  # A (r, d_in), B (d_out, r)
        out[f"{PREFIX}{names[module]}.{lora}"] = t.contiguous()
    return out, peft_config(cfg, names, tensors, meta["model_id"], config)


def peft_config(cfg, names, tensors, model_id, config):
    """adapter_config.json: r and lora_alpha of `cfg` (PEFT's scale lora_alpha / r, or / sqrt(r) with use_rslora,
    is our s), the targets, the task head in modules_to_save, and the base model's Hub id where it has one."""
    adapted = sorted({names[k.rsplit(".", 1)[0]] for k in tensors if k.endswith(".A")})
    leaves = sorted({hf.rsplit(".", 1)[-1] for hf in adapted})
    same_leaf = sorted(hf for hf in names.values() if hf.rsplit(".", 1)[-1] in leaves)
    # leaf names ("query", "q_proj") where they select exactly the adapted modules, else full module paths
    targets = leaves if same_leaf == adapted else adapted
    head = sorted({names[k.rsplit(".", 1)[0]] for k in tensors if is_head(k)})
    # a head part under classifier/score is saved whole by PEFT's SEQ_CLS model: name the whole module
    head = sorted({next((h for h in SEQ_CLS_HEADS if n == h or n.startswith(h + ".")), n) for n in head})
    alpha = cfg.rank if cfg.lora_alpha is None else cfg.lora_alpha
    task = "CAUSAL_LM" if isinstance(config, decoder.DecoderConfig) else "SEQ_CLS"
    return {"peft_type": "LORA", "task_type": task,
            "base_model_name_or_path": HUB_IDS.get(model_id, model_id), "r": cfg.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": cfg.dropout,
            "target_modules": targets, "modules_to_save": head or None, "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "use_rslora": cfg.rslora, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True, "inference_mode": True}


def plain(x):
    return int(x) if float(x).is_integer() else x  # lora_alpha 16, not 16.0, as PEFT's own configs write it




def serving_rank(rank):
    """The smallest of VLLM_RANKS that is at least `rank` (`rank` itself above 512: vLLM cannot serve it)."""
    return next((v for v in VLLM_RANKS if v >= rank), rank)


@torch.no_grad()
def pad_rank(tensors, config, rank):
    """(tensors, adapter_config.json) of the PEFT LoRA `tensors` / `config` with its rank r' raised to `rank`
    by zeros, which changes nothing: lora_A'' = [lora_A ; 0], lora_B'' = [lora_B | 0], so B'' A'' = B' A',
    and lora_alpha'' = rank s (use_rslora: sqrt(rank) s), so PEFT's scale is s still."""
    extra = rank - config["r"]
    out = {}
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            t = torch.cat([t, t.new_zeros(extra, t.shape[1])], dim=0)  # (r', d_in) ; (extra, d_in) -> (rank, d_in)
        elif key.endswith(".lora_B.weight"):
            t = torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)  # (d_out, r') | (d_out, extra) -> (d_out, rank)
        out[key] = t
    alpha = compress.peft_scale(config) * (math.sqrt(rank) if config.get("use_rslora") else rank)
    return out, config | {"r": rank, "lora_alpha": plain(alpha)}


def export(source, out_dir, checkpoint=None, rank=None):
    """Writes `source` (a run directory, its best/ adapter or, with checkpoint="last", its latest; or an
    adapter file) as the PEFT adapter directory `out_dir`, atomically: filled beside it, then renamed.
    `rank` (--rank): None for the exact update, else a rank K or an energy fraction e, compressed by
    tools/compress.py and measured (compression.json). A decoder's rank is padded up to vLLM's next
    supported rank, exactly. Returns (adapter file, adapter_config.json, the compression report or None)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{str(out_dir)!r} already exists; the export never overwrites. Choose a new "
                              "output directory, or delete that one first.")
    adapter, run = find_adapter(source, checkpoint)
    tensors, config = peft_adapter(adapter)
    report = None
    if rank is not None:  # ΔW_K = U_K S_K V_K^T per layer (tools/compress.py)
        tensors, config, report = compress.compress(tensors, config, rank)
    if config["task_type"] == "CAUSAL_LM":  # what vLLM serves: a rank it accepts as --max-lora-rank
        tensors, config = pad_rank(tensors, config, serving_rank(config["r"]))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is as readable as any directory
        write_atomic(tmp / WEIGHTS, safetensors_save(tensors, metadata={"format": "pt"}))
        write_json(tmp / CONFIG, config)
        if report is not None:  # what the compression costs, measured on what was just written
            report |= {"rank_written": config["r"], **logit_change(adapter, run, tmp)}
            write_json(tmp / REPORT, report)
        write_atomic(tmp / CARD, model_card(adapter, run, checkpoint, config, report).encode())
        if out_dir.exists():  # made by someone else meanwhile: rename would replace an empty one
            raise FileExistsError(f"{str(out_dir)!r} appeared while exporting; choose a new output directory.")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return adapter, config, report


@torch.no_grad()
def logit_change(adapter, run, peft_dir):
    """{"batch": which, "max_abs_logit_change": max |z - z'|, "max_abs_logit": max |z|}: z the logits of the base model with our adapter
    (inilora.load_adapter, the exact update), z' with the PEFT adapter `peft_dir` (load_peft), on a fixed
    batch: the first LOGIT_EXAMPLES dev examples of the adapter's task, or seeded token ids if it records none."""
    _, meta = inilora.read_adapter(adapter)
    family = models.family_of(meta["model_id"])
    exact, tokenizer, model_id, _, _ = models.load(meta["model_id"], family, meta.get("num_labels", 2))
    inilora.load_adapter(exact, adapter, model_id)
    other = models.load(meta["model_id"], family, meta.get("num_labels", 2)).model
    load_peft(other, peft_dir, model_id)
    settings = adapter_settings(adapter, run) if recorded_task(meta, run) else None  # task, max_length, data_dir
    task = TASKS.get(settings["task"]) if settings else None
    if task is not None and "dev" in task.splits:
        dev = load_split(task.name, "dev", tokenizer, settings["max_length"], settings["data_dir"])
        n = min(LOGIT_EXAMPLES, len(dev["input_ids"]))
        # an encoder's (ids, mask, types, labels), a decoder's (ids, mask, labels): each (B, T)
        batch = training_batch(task, dev, list(range(n)), tokenizer.pad_id, "cpu")
        ids, mask, types = batch[0], batch[1], None if task.generates else batch[2]
        what = f"the first {n} examples of {task.name}/dev"
    else:
        ids, mask, types = fixed_ids(exact.config.vocab_size), None, None
        what = "token ids (4, 16) drawn uniformly from the vocabulary, seed 0"
    if family == "decoder":  # logits (B, T, V), compared on the real tokens: (N, V)
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        z, z2 = exact(ids, mask)[real], other(ids, mask)[real]
    else:  # logits (B, K)
        z, z2 = exact(ids, mask, types), other(ids, mask, types)
    return {"batch": what, "max_abs_logit_change": float((z - z2).abs().max()), "max_abs_logit": float(z.abs().max())}


def fixed_ids(vocab_size):
    """The batch an adapter without a task is measured on: (4, 16) token ids, uniform over the vocabulary, seed 0."""
    return torch.randint(0, vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))  # (B, T)


def recorded_task(meta, run):
    """The task the adapter was trained on: its sidecar's, else its run's config.json; None if neither says."""
    train = read_json(config_file(run)).get("train", {}) if run else {}
    return meta.get("task", train.get("task"))


def run_scores(run, checkpoint, task):
    """{split: metrics} a run directory holds for the exported checkpoint: evaluate.py's eval-CHECKPOINT-SPLIT.json
    for dev and test, else for best/ the best epoch's dev record in metrics.jsonl."""
    if run is None or task not in TASKS:
        return {}
    name, scores = checkpoint or "best", {}
    for split in ("dev", "test"):
        if (run / f"eval-{name}-{split}.json").is_file():
            scores[split] = read_json(run / f"eval-{name}-{split}.json")["metrics"]
        elif split == "dev" and name == "best" and (dev := best_dev(run, TASKS[task].metrics[0])):
            scores[split] = {k: dev[k] for k in TASKS[task].metrics if k in dev}
    return scores


def model_card(adapter, run, checkpoint, config, report):
    """README.md as PEFT writes beside an adapter: YAML front matter (library_name: peft, base_model), then
    what the adapter is, how it was trained and scored, how to serve it, and what a compression cost."""
    _, meta = inilora.read_adapter(adapter)
    cfg = inilora.LoRAConfig.from_dict(meta["config"])
    task = recorded_task(meta, run)
    base = config["base_model_name_or_path"]
    lines = ["---", "library_name: peft", f"base_model: {json.dumps(base)}", "tags:", "- lora", f"- {cfg.init}",
             "---", "", f"# {cfg.init} adapter of {base}" + (f" for {task}" if task else ""), "",
             f"A PEFT LoRA exported by `python -m tools.peft_io export` from `{adapter}`.", "",
             f"- base model: `{base}`",
             f"- initialiser: `{cfg.init}`, rank r = {cfg.rank}, lora_alpha = {cfg.rank * cfg.scale:g} (s = {cfg.scale:g}), "
             f"targets {', '.join(cfg.targets)}",
             f"- task: {task or 'not recorded'}"]
    for split, metrics in run_scores(run, checkpoint, task).items():
        lines.append(f"- {split} score: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    what = ("the exact update ΔW = s (B A - B0 A0)" if report is None else
            f"ΔW compressed by truncated SVD from rank {report['from_rank']} to {report['rank']}")
    lines.append(f"- this export: PEFT r = {config['r']}, lora_alpha = {config['lora_alpha']}, {what}")
    if config["task_type"] == "CAUSAL_LM":
        lines.append(f"- vLLM: `vllm serve {base} --enable-lora --lora-modules NAME=DIR --max-lora-rank "
                     f"{config['r']}` (r is one of vLLM's ranks, padded with zeros where needed, which is exact)")
    else:
        lines.append("- the task head is in modules_to_save: PEFT loads it, vLLM does not serve it")
    if report is not None:
        errors = [layer["relative_error"] for layer in report["layers"]]
        lines += ["", "## Compression", "",
                  f"Relative Frobenius error of ΔW per layer {min(errors):.4f} .. {max(errors):.4f}; largest logit "
                  f"change {report['max_abs_logit_change']:.4g} (logits up to {report['max_abs_logit']:.4g} in size) on "
                  f"{report['batch']} ({REPORT} has every layer).", "",
                  "| module | relative error |", "|---|---|"]
        lines += [f"| {layer['module']} | {layer['relative_error']:.4f} |" for layer in report["layers"]]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# import: a PEFT LoRA directory -> LoRALinear layers on our model (and our adapter format)


def read_peft(peft_dir):
    """(adapter_config.json content, tensors) of a PEFT LoRA directory, refusing what our layer cannot hold."""
    peft_dir = Path(peft_dir)
    if not (peft_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{str(peft_dir / CONFIG)!r} does not exist: a PEFT adapter directory holds {CONFIG} "
                                f"and {WEIGHTS} (PeftModel.save_pretrained writes both). Pass such a directory.")
    cfg = read_json(peft_dir / CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{str(peft_dir / CONFIG)!r} has peft_type={cfg.get('peft_type')!r}; only 'LORA' adapters "
                         "can be imported. Pass a LoRA adapter.")
    if used := [what for key, (on, what) in UNSUPPORTED.items() if on(cfg.get(key))]:
        raise ValueError(f"{str(peft_dir)!r} uses {', '.join(used)}, which the layer y = x R^T + b + s (x A^T) B^T "
                         "cannot represent. Import an adapter trained without these, or merge it into the base "
                         "model with PEFT's merge_and_unload and use that model as --model.")
    weights = peft_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} does not exist (only safetensors adapters are read, never a pickle); "
                                "save the adapter with PeftModel.save_pretrained(dir, safe_serialization=True).")
    try:
        tensors = safetensors_load(weights.read_bytes())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file ({e}); save the adapter again.") from None
    if bad := sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()):
        raise ValueError(f"{str(weights)!r} holds inf or nan values in {bad[:3]}; the adapter diverged. Use an "
                         "earlier checkpoint of it.")
    return cfg, tensors


@torch.no_grad()
def load_peft(model, peft_dir, model_id=None):
    """Puts the PEFT LoRA adapter `peft_dir` on the original base `model` (in place), for evaluation or as the
    start of further training: init "lora" with A = lora_A, B = lora_B, A0 = lora_A, B0 = 0 (so R = W0), and
    the task head from modules_to_save. Everything is checked before the model changes.
    Returns (LoRAConfig, fingerprint of the base target weights), what inilora.save_adapter needs."""
    cfg, tensors = read_peft(peft_dir)
    to_ours = {hf: ours for ours, hf in hf_modules(model.config).items()}
    given, lacking = {}, []  # {our name: tensor}, PEFT keys with no place in the model
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        lora = next((part for part in (".lora_A.weight", ".lora_B.weight") if name.endswith(part)), None)
        module, leaf = (name.removesuffix(lora), "AB"[lora == ".lora_B.weight"]) if lora else name.rsplit(".", 1)
        ours = to_ours.get(module) if key.startswith(PREFIX) else None
        if ours is None or (lora is None and not is_head(ours)):
            lacking.append(key)
        else:
            given[f"{ours}.{leaf}"] = t
    base = cfg.get("base_model_name_or_path")
    if lacking:
        raise ValueError(f"{str(peft_dir)!r} holds {sorted(lacking)[:3]}{' ...' if len(lacking) > 3 else ''}, which "
                         f"name no LoRA target or task head of this model{f' ({model_id})' if model_id else ''}; the "
                         f"adapter was made for another base ({base!r}), or adapts modules this project cannot adapt "
                         "(embeddings, lm_head). Load it on its own base model.")
    targets = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in given if not is_head(k)})
    lora_cfg = inilora.LoRAConfig(init="lora", rank=cfg.get("r"), lora_alpha=float(cfg.get("lora_alpha", cfg.get("r"))),
                                  rslora=bool(cfg.get("use_rslora")), targets=tuple(targets),
                                  dropout=float(cfg.get("lora_dropout") or 0.0)).validate()
    linears = target_linears(model, lora_cfg.targets)
    # lora_A (r, d_in), lora_B (d_out, r) per target; the head as the model has it
    expected = {}
    for name, linear in linears.items():
        d_out, d_in = linear.weight.shape
        expected |= {f"{name}.A": (lora_cfg.rank, d_in), f"{name}.B": (d_out, lora_cfg.rank)}
    params = dict(model.named_parameters())
    expected |= {k: tuple(params[k].shape) for k in given if is_head(k) and k in params}
    check_tensors(given, {k: expected[k] for k in given}, peft_dir, f"Its r={lora_cfg.rank} or its layers "
                  f"do not fit this model: it was made for another base model ({base!r}) or another number of labels. "
                  "Load it on its own base model.")
    if skipped := sorted(k.rsplit(".", 1)[0] for k in expected.keys() - given.keys()):
        raise ValueError(f"{str(peft_dir)!r} adapts only some of the {len(linears)} layers named {targets}, not "
                         f"{skipped[:2]}...: it was made for another base model ({base!r}) with fewer layers, or for "
                         "some layers only. Adapters here cover every layer of a target name: load it on its own "
                         f"base model, or make it with target_modules={targets} on all layers.")
    fingerprint = inilora.inject(model, lora_cfg, model_id)  # init "lora": R = W0 - s 0 A0 = W0
    for name in linears:
        layer = model.get_submodule(name)
        A, B = given[f"{name}.A"], given[f"{name}.B"]
        # A = A0 = lora_A, B = lora_B, B0 = 0: the update s B A is PEFT's scaling * lora_B lora_A
        layer.A.copy_(A)
        layer.A0.copy_(A)
        layer.B.copy_(B)
        layer.B0.zero_()
    for k, t in given.items():
        if is_head(k):
            params[k].copy_(t)
    head = sorted({k.rsplit(".", 1)[0] for k in given if is_head(k)})
    print(f"loaded PEFT LoRA {peft_dir}: r={lora_cfg.rank}, s={lora_cfg.scale:g}, {len(linears)} layers {list(targets)}"
          + (f"; {', '.join(head)} from its modules_to_save, replacing the head reported above" if head else ""))
    return lora_cfg, fingerprint


def num_labels_of(peft_dir, config):
    """K of the PEFT head: the rows of its last layer (classifier / out_proj), else 2."""
    _, tensors = read_peft(peft_dir)
    names = hf_modules(config)
    last = [names[m] for m in names if is_head(m)][-1:]  # the head's output layer comes last in the map
    return next((t.shape[0] for k, t in tensors.items() if last and k == f"{PREFIX}{last[0]}.weight"), 2)


def import_peft(peft_dir, out, model_name, num_labels=None, task=None, max_length=512):
    """Writes the PEFT adapter `peft_dir` as our adapter `out` (.safetensors + sidecar) for `model_name`;
    with `task` (a data.prepare.TASKS name) the sidecar records it, so that evaluate.py can evaluate `out`."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}; pass one of those, or leave --task out.")
    extra = {} if task is None else {"task": task, "max_length": max_length}
    config = read_config(model_name)
    if isinstance(config, decoder.DecoderConfig):
        model, _, model_id = decoder.load_causal_lm(model_name)
    else:
        num_labels = num_labels or (TASKS[task].num_labels if task else num_labels_of(peft_dir, config))
        model, _, model_id = encoder.load_model(model_name, num_labels=num_labels)
        extra["num_labels"] = num_labels
    lora_cfg, fingerprint = load_peft(model, peft_dir, model_id)
    extra["imported_from"] = {"peft_dir": str(Path(peft_dir).resolve()), "config": read_json(Path(peft_dir) / CONFIG)}
    return inilora.save_adapter(model, out, lora_cfg, model_id, fingerprint, extra), lora_cfg


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="our run or adapter -> a PEFT adapter directory",
                        description="Writes a PEFT LoRA directory with a model card (README.md). A decoder's rank is "
                                    "padded with zeros up to a rank vLLM accepts (8, 16, 32, 64, 128, 256, 320, 512), "
                                    "which is exact: the update and the logits do not change.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("source", help="a run directory (train.py's --out) or an adapter .safetensors")
    ex.add_argument("out_dir", help="the PEFT adapter directory to write; must not exist")
    ex.add_argument("--checkpoint", choices=("best", "last"), default=None,
                    help="in a run directory: best/ (None means best) or the latest checkpoint named in last.json")
    ex.add_argument("--rank", default=None,
                    help="compress ΔW by truncated SVD to rank K (an integer from 1 to the exact rank r'), or to the "
                         "smallest rank keeping an energy fraction e in (0, 1) of every layer; None: the exact "
                         "update. A decoder's K is then padded with zeros to vLLM's next rank, which is exact")
    im = sub.add_parser("import", help="a PEFT LoRA directory -> our adapter .safetensors",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    im.add_argument("peft_dir", help="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    im.add_argument("out", help="our adapter file to write (.safetensors, with a .json sidecar)")
    im.add_argument("--model", default=MINILM, help="the base model: 'minilm', 'smollm2', a directory or a Hub id")
    im.add_argument("--num-labels", type=int, default=None,
                    help="outputs of the head; None: the task's, else the rows of the adapter's classifier")
    im.add_argument("--task", default=None, help="the task it was trained on, recorded so evaluate.py can evaluate it")
    im.add_argument("--max-length", type=int, default=512, help="with --task: the truncation evaluate.py uses")
    args = p.parse_args(argv)
    if args.command == "export":
        adapter, config, report = export(args.source, args.out_dir, args.checkpoint, args.rank)
        if report is not None:
            compress.print_table(report)
            print(f"largest logit change {report['max_abs_logit_change']:.4g} (logits up to "
                  f"{report['max_abs_logit']:.4g} in size) on {report['batch']}")
        print(f"exported {adapter} -> {args.out_dir}: PEFT LoRA r={config['r']}, lora_alpha={config['lora_alpha']}, "
              f"targets {config['target_modules'][:4]}, modules_to_save {config['modules_to_save']}, "
              f"base {config['base_model_name_or_path']}, model card {CARD}")
        if config["task_type"] == "CAUSAL_LM":
            served = ("; above 512 vLLM cannot serve it: compress it with --rank" if config["r"] > VLLM_RANKS[-1]
                      else " (its rank, padded with zeros where needed: exact)")
            print(f"vLLM: --enable-lora --max-lora-rank {config['r']}{served}")
    else:
        if Path(args.out).suffix != ".safetensors":
            raise ValueError(f"out={args.out!r} must end in .safetensors (a .json sidecar is written beside it).")
        path, lora_cfg = import_peft(args.peft_dir, args.out, args.model, args.num_labels, args.task, args.max_length)
        print(f"wrote {path} (init {lora_cfg.init!r}, A0 = lora_A, B0 = 0)")


if __name__ == "__main__":
    run_cli(main)
