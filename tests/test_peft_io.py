"""Tests of tools/peft_io.py against Hugging Face PEFT and transformers (test-only references).

- export: for every initialiser, after two optimizer steps, PeftModel.from_pretrained on the original
  transformers model gives our logits, and PEFT's merge_and_unload gives our merged model's logits
  (packaged MiniLM, tiny BERT and RoBERTa, tiny LLaMA decoder; also a 3-label and a regression head,
  every linear layer as a target, Qwen2); rank r for B0 = 0, 2r otherwise,
  lora_alpha / r' = s, the head in modules_to_save, the Hub id as base_model_name_or_path;
- import: an adapter made and trained one step with peft's get_peft_model gives PEFT's logits on our
  model (also for targets whose names differ, e.g. attention.output.dense -> attn.out); the command
  line writes our adapter format, and exporting that again gives PEFT's tensors back;
- run directories: best/ by default, the checkpoint last.json names with --checkpoint last;
- --rslora: exported with use_rslora (rank r and rank 2r) and imported from a use_rslora PEFT adapter, PEFT's
  logits both ways, and the import exported back gives PEFT's tensors;
- serving: a decoder's export is what vLLM loads (no modules_to_save, the base model's module names, a rank
  among vLLM's, padded with zeros where 2r is not, which PEFT shows changes nothing); --rank K compresses ΔW
  by truncated SVD with each layer's relative error 0 at K = 2r and the discarded energy
  sqrt(sum_{i>K} σ_i^2 / sum σ_i^2) below it, an energy fraction picks the largest rank a layer needs, PEFT
  loads the compressed adapter and the reported logit change is PEFT's; the model card (README.md) names
  the base model, initialiser, task and the run's scores; a bad --rank is a sentence, before anything is written;
- bad input: an existing export target, full fine-tuning checkpoints, PEFT features our layer cannot
  hold (DoRA, rank patterns, ...), adapters for another base, and nothing left behind by a failed export.
Tolerances: atol = rtol = 1e-5 in float32 (as test_decoder.py); atol 2e-5 on the tiny LLaMA, whose logits
reach 6.7: there plain LoRA differs from PEFT by 4.2e-06 and IniLoRA-α/β by up to 1.3e-05, because their
s B0 A0 is larger than W0, so R = W0 - s B0 A0 and PEFT's W0 + s B' A' round differently in float32.
"""
import json
import shutil

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch.testing import assert_close

import datainit
import inilora
from inilora import LoRAConfig
from models.decoder import load_causal_lm
from models.encoder import load_model
from tools import peft_io

TOL = dict(atol=1e-5, rtol=1e-5)
TOLS = {"minilm": TOL, "bert": TOL, "roberta": TOL, "llama": dict(atol=2e-5, rtol=1e-5)}  # see the docstring
INITS = sorted(inilora.INITIALISERS)  # every initialiser but "full"
MUTATED = {"inilora", "alpha", "beta-kaiming-normal", "beta-kaiming-uniform", "pissa", "milora", "orthogonal",
           "olora", "lora-ga"}  # B0 != 0 (orthogonal: B0 A0 = 0, yet B0 is not 0)


@pytest.fixture(scope="module")
def bases(tiny_checkpoint, minilm_dir, tiny_decoder):
    """name -> (directory, --model name): the models every export and import test runs on."""
    return {"minilm": (minilm_dir, "minilm"), "bert": (tiny_checkpoint("BertModel"),) * 2,
            "roberta": (tiny_checkpoint("RobertaForMaskedLM"),) * 2, "llama": (tiny_decoder("LlamaForCausalLM"),) * 2}


def batch(vocab_size, pad_id, seed=0):
    """ids (3, 9) of ordinary tokens, the second row padded after 6 tokens; mask 1 = real token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_id, 0
    return ids, mask


def ours(name, model_name):
    """(our model in eval mode, model_id, its batch, forward(model) -> logits) for a base of `bases`."""
    if name == "llama":
        model, _, model_id = load_causal_lm(str(model_name))
        ids, _ = batch(model.config.vocab_size, 0)
        return model, model_id, (ids, None), lambda m: m(ids)  # (B, T, V), no padding
    model, _, model_id = load_model(str(model_name), num_labels=2)
    ids, mask = batch(model.config.vocab_size, model.config.pad_token_id)
    return model, model_id, (ids, mask), lambda m: m(ids, mask)  # (B, K)


def hf_model(name, model_dir):
    auto = transformers.AutoModelForCausalLM if name == "llama" else transformers.AutoModelForSequenceClassification
    kwargs = {} if name == "llama" else {"num_labels": 2}
    return auto.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs).eval()


def hf_logits(model, ids, mask):
    return model(input_ids=ids, **({} if mask is None else {"attention_mask": mask})).logits


def train_adapter(name, model_name, init, tmp_path, steps=2, rank=4, extra=None, lora_alpha="2r", rslora=False):
    """Our model with adapters of `init` (rank 4, s = 2, or 2 / sqrt(4) * 4 = 4 with `rslora`; lora_alpha None:
    s = 1) after `steps` AdamW steps, saved as an adapter file (its sidecar holding `extra` besides). The
    data-driven initialisers read the test batch first."""
    torch.manual_seed(0)
    model, model_id, (ids, mask), forward = ours(name, model_name)
    targets = ("q_proj", "v_proj") if name == "llama" else ("query", "value")
    cfg = LoRAConfig(init=init, rank=rank, lora_alpha=2.0 * rank if lora_alpha == "2r" else lora_alpha,
                     rslora=rslora, targets=targets, approx_steps=20)

    def loss_of(m, batch=None):
        logits = forward(m)
        target = ids[:, 1:] if name == "llama" else torch.tensor([0, 1, 1])
        return F.cross_entropy((logits[:, :-1] if name == "llama" else logits).flatten(0, -2), target.flatten())

    stats = None
    if init in inilora.DATA_DRIVEN:  # the batch twice: an encoder's last query sees one token an example, 3 < r + 1
        data = datainit.InitData([(ids, mask)] * 2, loss_of, lambda batch: batch[1])
        stats, _ = datainit.collect(model, cfg, data)
    fingerprint = inilora.inject(model, cfg, model_id, cache_dir=tmp_path / "cache", stats=stats)
    inilora.mark_trainable(model, cfg, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = inilora.save_adapter(model, tmp_path / "adapter.safetensors", cfg, model_id, fingerprint,
                                ({} if name == "llama" else {"num_labels": 2}) | (extra or {}))
    return model, cfg, path, (ids, mask), forward


# -----------------------------------------------------------------------------
# export


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("name", ["minilm", "bert", "roberta", "llama"])
def test_export_gives_our_logits_in_peft(bases, name, init, tmp_path):
    model_dir, model_name = bases[name]
    model, cfg, path, (ids, mask), forward = train_adapter(name, model_name, init, tmp_path)
    with torch.no_grad():
        expected = forward(model)
    peft_io.export(path, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / peft_io.CONFIG).read_text())
    # invariant: rank r where B0 = 0, else the rank-2r conversion, and a decoder's padded to vLLM's 8;
    # PEFT's lora_alpha / r' is our s
    assert config["r"] == (8 if init in MUTATED or name == "llama" else 4)
    assert config["lora_alpha"] / config["r"] == cfg.scale
    assert config["task_type"] == ("CAUSAL_LM" if name == "llama" else "SEQ_CLS")
    assert config["base_model_name_or_path"] == ("sentence-transformers/all-MiniLM-L6-v2" if name == "minilm"
                                                 else str(model_dir.resolve()))
    # invariant: PEFT on the original transformers model computes what our adapted model computes
    hf = peft.PeftModel.from_pretrained(hf_model(name, model_dir), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_close(hf_logits(hf, ids, mask), expected, **TOLS[name])
        # invariant: merged outputs agree (PEFT's merge_and_unload, inilora.merge)
        merged_hf, merged_ours = hf.merge_and_unload(), inilora.merge(model)
        assert_close(hf_logits(merged_hf, ids, mask), forward(merged_ours), **TOLS[name])


OTHER = {  # hf class, config overrides, num_labels, targets: heads, targets and families the tests above lack
    "bert-3-labels-all-linears": ("BertForSequenceClassification", {"num_labels": 3}, 3,
                                  ("query", "key", "value", "out", "fc", "proj")),
    "roberta-regression": ("RobertaForSequenceClassification", {"num_labels": 1}, 1, ("out", "proj")),
    "qwen2-biases-all-linears": ("Qwen2ForCausalLM", {}, None,
                                 ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


@pytest.mark.parametrize("case", sorted(OTHER))
def test_export_other_heads_targets_and_families(tiny_checkpoint, tiny_decoder, case, tmp_path):
    # invariant: PEFT gives our logits also for fine-tuned and regression heads, targets whose Hugging Face
    # leaf name is ambiguous ("dense": target_modules become full module paths) and Qwen2's biased q/k/v
    hf_class, overrides, K, targets = OTHER[case]
    torch.manual_seed(0)
    if K is None:
        model_dir = tiny_decoder(hf_class, **overrides)
        model, _, model_id = load_causal_lm(str(model_dir))
    else:
        model_dir = tiny_checkpoint(hf_class, **overrides)
        model, _, model_id = load_model(str(model_dir), num_labels=K)
    cfg = LoRAConfig(init="milora", rank=3, lora_alpha=5.0, targets=targets)
    fingerprint = inilora.inject(model, cfg, model_id)
    with torch.no_grad():  # a trained adapter and head: A, B and head.* moved away from their start
        for n, p in model.named_parameters():
            if n.endswith((".A", ".B")) or n.startswith("head."):
                p.add_(0.05 * torch.randn_like(p))
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, model_id, fingerprint)
    peft_io.export(path, tmp_path / "peft")
    auto = transformers.AutoModelForCausalLM if K is None else transformers.AutoModelForSequenceClassification
    hf = auto.from_pretrained(str(model_dir), **({} if K is None else {"num_labels": K})).eval()
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    ids, mask = batch(model.config.vocab_size, model.config.pad_token_id or 0)
    mask = None if K is None else mask
    with torch.no_grad():
        assert_close(hf_logits(hf, ids, mask), model(ids) if K is None else model(ids, mask),
                     **(TOLS["llama"] if K is None else TOL))


def test_export_names_heads_and_targets(bases, tmp_path):
    # invariant: the tensors carry PEFT's saved names: base_model.model.<HF path>.lora_A/B.weight, and the
    # modules_to_save head without "modules_to_save.default"; RoBERTa's head is PEFT's whole "classifier"
    model_dir, model_name = bases["roberta"]
    _, _, path, _, _ = train_adapter("roberta", model_name, "lora", tmp_path)
    peft_io.export(path, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / peft_io.CONFIG).read_text())
    keys = set(load_file(tmp_path / "peft" / peft_io.WEIGHTS))
    assert config["modules_to_save"] == ["classifier"] and config["target_modules"] == ["query", "value"]
    assert "base_model.model.roberta.encoder.layer.1.attention.self.value.lora_B.weight" in keys
    assert {"base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.bias"} <= keys
    assert not any("modules_to_save" in k or k.endswith((".A0", ".B0")) for k in keys)


def test_export_picks_best_or_last_of_a_run(bases, tmp_path):
    # invariant: a run directory exports best/ by default and the checkpoint last.json names with "last"
    _, model_name = bases["bert"]
    run = tmp_path / "run"
    for sub, steps in (("best", 1), ("checkpoint-2", 2)):
        _, _, path, _, _ = train_adapter("bert", model_name, "lora", tmp_path / sub, steps=steps)
        (run / sub).mkdir(parents=True)
        for suffix in (".safetensors", ".json"):
            shutil.copy(path.with_suffix(suffix), run / sub / f"adapter{suffix}")
    (run / "config.json").write_text("{}")
    (run / "last.json").write_text(json.dumps({"checkpoint": "checkpoint-2", "step": 2}))
    peft_io.main(["export", str(run), str(tmp_path / "peft-best")])
    peft_io.main(["export", str(run), str(tmp_path / "peft-last"), "--checkpoint", "last"])
    for which, sub in (("best", "best"), ("last", "checkpoint-2")):
        tensors, _ = inilora.read_adapter(run / sub / "adapter.safetensors")
        exported = load_file(tmp_path / f"peft-{which}" / peft_io.WEIGHTS)
        key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
        assert torch.equal(exported[key], tensors["encoder.layers.0.attn.query.B"])


def test_export_refuses_an_existing_target(bases, tmp_path):
    # invariant: an export never overwrites: the existing directory is named and left as it was
    _, model_name = bases["bert"]
    _, _, path, _, _ = train_adapter("bert", model_name, "lora", tmp_path)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="peft.*already exists.*new output directory"):
        peft_io.export(path, tmp_path / "peft")
    assert [p.name for p in (tmp_path / "peft").iterdir()] == ["mine.txt"]


def test_export_refuses_full_fine_tuning_and_leaves_nothing(bases, tmp_path):
    # invariant: a full checkpoint is not a LoRA: a sentence naming 'full', and no output or temporary left
    _, model_name = bases["bert"]
    model, _, model_id = load_model(str(model_name))
    cfg = LoRAConfig(init="full")
    fingerprint = inilora.inject(model, cfg, model_id)
    path = inilora.save_adapter(model, tmp_path / "full.safetensors", cfg, model_id, fingerprint)
    with pytest.raises(ValueError, match="full.*--init inilora"):
        peft_io.export(path, tmp_path / "out" / "peft")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -----------------------------------------------------------------------------
# serving: vLLM's constraints, compression to rank K, the model card


def peft_factors(peft_dir):
    """{PEFT module name: (lora_B (d_out, r'), lora_A (r', d_in))} and the scale lora_alpha / r' of an export."""
    config = json.loads((peft_dir / peft_io.CONFIG).read_text())
    tensors = load_file(peft_dir / peft_io.WEIGHTS)
    names = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
    return {n: (tensors[f"{n}.lora_B.weight"], tensors[f"{n}.lora_A.weight"]) for n in names}, \
        config["lora_alpha"] / config["r"]


def test_decoder_export_is_what_vllm_loads(bases, tmp_path, capsys):
    model_dir, model_name = bases["llama"]
    model, cfg, path, (ids, _), forward = train_adapter("llama", model_name, "inilora", tmp_path, rank=3)
    peft_io.main(["export", str(path), str(tmp_path / "peft")])
    # the command line names the --max-lora-rank a vLLM server needs
    assert "--max-lora-rank 8" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / peft_io.CONFIG).read_text())
    # invariant: vLLM's PEFTHelper refuses modules_to_save and DoRA, and its --max-lora-rank is one of
    # VLLM_RANKS: 2r = 6 is padded to 8, the scale lora_alpha / r' still s
    assert config["modules_to_save"] is None and not config["use_dora"] and not config["use_rslora"]
    assert config["r"] == 8 and config["r"] in peft_io.VLLM_RANKS and config["lora_alpha"] / 8 == cfg.scale
    # invariant: every tensor names a module of the base model as transformers builds it, by a target leaf
    hf = hf_model("llama", model_dir)
    modules = dict(hf.named_modules())
    factors, _ = peft_factors(tmp_path / "peft")
    for name, (B, A) in factors.items():
        module = name.removeprefix(peft_io.PREFIX)
        assert module in modules and module.rsplit(".", 1)[-1] in config["target_modules"]
        # invariant: the padding is zeros: columns 6, 7 of lora_B and rows 6, 7 of lora_A
        assert B.shape[1] == A.shape[0] == 8 and not B[:, 6:].any() and not A[6:].any()
    # invariant: PEFT on the original model computes our adapted model's logits: the padding is exact
    with torch.no_grad():
        expected = forward(model)
        assert_close(hf_logits(peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval(), ids, None),
                     expected, **TOLS["llama"])
    # a compressed decoder export is padded too: K = 3 -> r' 8 with lora_alpha 8 (scale 1), and PEFT loads it
    _, config, report = peft_io.export(path, tmp_path / "peft-k3", rank="3")
    assert (report["rank"], config["r"], config["lora_alpha"]) == (3, 8, 8) and config["modules_to_save"] is None
    # invariant: the reported change is the largest |Δlogit| of the compressed adapter over the exact one, on
    # the fixed token ids (the adapter records no task)
    assert "token ids" in report["batch"]
    fixed = peft_io.fixed_ids(model.config.vocab_size)  # (B, T)
    with torch.no_grad():
        compressed = hf_logits(peft.PeftModel.from_pretrained(hf_model("llama", model_dir),
                                                              str(tmp_path / "peft-k3")).eval(), fixed, None)
        assert_close((compressed - model(fixed)).abs().max().item(), report["max_abs_logit_change"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("init", ["inilora", "lora"])
def test_compressed_error_is_the_discarded_energy(bases, init, tmp_path):
    model_dir, model_name = bases["bert"]
    model, cfg, path, _, _ = train_adapter("bert", model_name, init, tmp_path)
    tensors, _ = inilora.read_adapter(path)
    exact_rank = 8 if init in MUTATED else 4
    # the reference: σ of ΔW = s (B A - B0 A0) per layer, in float64, from our adapter's own tensors, by the
    # layer's Hugging Face name (as the report names it)
    hf_name, sigma = peft_io.hf_modules(model.config), {}
    for name in [k.removesuffix(".A") for k in tensors if k.endswith(".A")]:
        A, B, A0, B0 = (tensors[f"{name}.{k}"].double() for k in ("A", "B", "A0", "B0"))
        sigma[hf_name[name]] = torch.linalg.svdvals(cfg.scale * (B @ A - B0 @ A0))  # (min(d_out, d_in),)
    fixed = peft_io.fixed_ids(model.config.vocab_size)  # (B, T)
    for K in (exact_rank, exact_rank // 2, 1):
        _, config, report = peft_io.export(path, tmp_path / f"k{K}", rank=str(K))
        assert (config["r"], config["lora_alpha"], report["rank"]) == (K, K, K)  # scale 1: σ in the factors
        # invariant: each layer's relative error is sqrt(sum_{i>K} σ_i^2 / sum σ_i^2), 0 at the exact rank
        assert sorted(layer["module"] for layer in report["layers"]) == sorted(sigma)
        for layer in report["layers"]:
            s = sigma[layer["module"]]
            discarded = (s[K:].square().sum() / s.square().sum()).sqrt().item()
            assert_close(layer["relative_error"], discarded, atol=1e-6, rtol=1e-4)
            assert_close(layer["discarded_energy"], discarded, atol=1e-9, rtol=1e-9)
        if K == exact_rank:
            assert max(layer["relative_error"] for layer in report["layers"]) < 1e-6
            assert report["max_abs_logit_change"] < 1e-5
        # invariant: PEFT loads the compressed adapter, and the reported logit change is PEFT's (on the
        # fixed token ids: the adapter records no task)
        hf = peft.PeftModel.from_pretrained(hf_model("bert", model_dir), str(tmp_path / f"k{K}")).eval()
        with torch.no_grad():
            assert_close((hf_logits(hf, fixed, None) - model(fixed, None)).abs().max().item(),
                         report["max_abs_logit_change"], atol=1e-5, rtol=0)
    # invariant: an energy fraction e keeps, in every layer, the largest of the smallest ranks K_l whose
    # kept energy sum_{i<=K_l} σ_i^2 / sum σ_i^2 reaches e
    _, config, report = peft_io.export(path, tmp_path / "e", rank="0.9")
    kept = {n: (s.square().cumsum(0) / s.square().sum()) for n, s in sigma.items()}
    needed = {n: int((k < 0.9).sum()) + 1 for n, k in kept.items()}
    assert config["r"] == report["rank"] == max(needed.values())
    assert {layer["module"]: layer["rank_needed"] for layer in report["layers"]} == needed


@pytest.mark.parametrize("rank", ["0", "-2", "9", "1.0", "1.5", "0.0", "-0.5", "nan", "eight"])
def test_export_refuses_a_bad_rank(bases, rank, tmp_path):
    # invariant: a rank outside 1..2r, or a fraction outside (0, 1), is a sentence naming it and the
    # allowed values, and nothing is written
    _, model_name = bases["bert"]
    _, _, path, _, _ = train_adapter("bert", model_name, "inilora", tmp_path)
    with pytest.raises(ValueError, match=rf"--rank .*{rank}.*1 <= K <= 8.*0 < e < 1"):
        peft_io.export(path, tmp_path / "out" / "peft", rank=rank)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_card_names_base_init_task_and_scores(bases, tmp_path, monkeypatch):
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "cache"))  # the dev split's tokens, cached here
    _, model_name = bases["minilm"]
    _, _, path, _, _ = train_adapter("minilm", model_name, "inilora", tmp_path, lora_alpha=None,
                                     extra={"task": "rotten-tomatoes", "max_length": 64})
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(path.with_suffix(suffix), run / "best" / f"adapter{suffix}")
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"dev": {"accuracy": 0.625}}\n{"dev": {"accuracy": 0.75}}\n')
    (run / "eval-best-test.json").write_text(json.dumps({"split": "test", "metrics": {"accuracy": 0.7}}))
    _, config, report = peft_io.export(run, tmp_path / "peft", rank="2")
    card = (tmp_path / "peft" / peft_io.CARD).read_text()
    # invariant: PEFT's front matter, then the base, initialiser, task, the best dev epoch and the test score
    assert card.startswith("---\nlibrary_name: peft\nbase_model: \"sentence-transformers/all-MiniLM-L6-v2\"\n")
    for text in ("initialiser: `inilora`, rank r = 4, lora_alpha = 4 (s = 1)", "task: rotten-tomatoes", "dev score: accuracy 0.7500",
                 "test score: accuracy 0.7000", "from rank 8 to 2", "modules_to_save"):
        assert text in card, text
    # invariant: the per-layer numbers are stored beside it, measured on the task's dev examples
    stored = json.loads((tmp_path / "peft" / peft_io.REPORT).read_text())
    assert stored == report and report["batch"] == "the first 8 examples of rotten-tomatoes/dev"
    assert len(report["layers"]) == 12 and report["max_abs_logit_change"] > 0  # query, value of 6 layers


# -----------------------------------------------------------------------------
# import


PEFT_MADE = {  # name -> target_modules, modules_to_save of a PEFT-made adapter
    "minilm": (["query", "value"], ["bert.pooler.dense"]),
    "bert": (["query", "key", "attention.output.dense"], ["bert.pooler.dense"]),
    "roberta": (["query", "value", "intermediate.dense"], None),
    "llama": (["q_proj", "v_proj", "down_proj"], None),
}


def peft_made(bases, name, out, **options):
    """A PEFT LoRA adapter (r 4, lora_alpha 6, LoraConfig `options`) made with get_peft_model, trained one step,
    saved to `out`; returns the PeftModel in eval mode."""
    model_dir, _ = bases[name]
    torch.manual_seed(0)
    targets, heads = PEFT_MADE[name]
    task = "CAUSAL_LM" if name == "llama" else "SEQ_CLS"
    hf = peft.get_peft_model(hf_model(name, model_dir), peft.LoraConfig(
        task_type=task, r=4, lora_alpha=6, target_modules=targets, modules_to_save=heads, lora_dropout=0.1,
        **options))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch(hf.config.vocab_size, hf.config.pad_token_id or 0, seed=1)
    hf_logits(hf, ids, mask).square().mean().backward()
    opt.step()
    hf.save_pretrained(str(out))
    return hf.eval()


@pytest.mark.parametrize("name", ["minilm", "bert", "roberta", "llama"])
def test_import_gives_peft_logits(bases, name, tmp_path):
    hf = peft_made(bases, name, tmp_path / "peft")
    model, model_id, (ids, mask), forward = ours(name, bases[name][1])
    cfg, _ = peft_io.load_peft(model, tmp_path / "peft", model_id)
    assert (cfg.rank, cfg.scale, cfg.dropout) == (4, 1.5, 0.1)
    # invariant: the imported adapter on our model computes what PEFT computes
    with torch.no_grad():
        assert_close(forward(model), hf_logits(hf, ids, None if name == "llama" else mask), **TOLS[name])
    # invariant: the import is init "lora" with B0 = 0, so the residual is W0 bit for bit
    layer = next(m for m in model.modules() if isinstance(m, inilora.LoRALinear))
    assert not layer.B0.any() and torch.equal(layer.A0, layer.A)


def test_import_command_round_trip(bases, tmp_path):
    # invariant: PEFT -> our adapter (command line) -> load_adapter gives PEFT's logits, and exporting it
    # again gives PEFT's tensors back at rank r
    hf = peft_made(bases, "bert", tmp_path / "peft")
    peft_io.main(["import", str(tmp_path / "peft"), str(tmp_path / "ours.safetensors"), "--model", str(bases["bert"][1]),
                  "--task", "rotten-tomatoes"])
    _, meta = inilora.read_adapter(tmp_path / "ours.safetensors")  # what evaluate.py reads to evaluate it
    assert (meta["task"], meta["num_labels"], meta["max_length"]) == ("rotten-tomatoes", 2, 512)
    model, model_id, (ids, mask), forward = ours("bert", bases["bert"][1])
    inilora.load_adapter(model, tmp_path / "ours.safetensors", model_id)
    with torch.no_grad():
        assert_close(forward(model), hf_logits(hf, ids, mask), **TOL)
    peft_io.export(tmp_path / "ours.safetensors", tmp_path / "again")
    original, again = load_file(tmp_path / "peft" / peft_io.WEIGHTS), load_file(tmp_path / "again" / peft_io.WEIGHTS)
    assert sorted(original) == sorted(again)
    for key in original:
        assert torch.equal(original[key], again[key]), key


@pytest.mark.parametrize("key, value", [("use_dora", True), ("rank_pattern", {"query": 8}), ("alpha_pattern", {"value": 2}),
                                        ("bias", "all"), ("layers_to_transform", [0]), ("fan_in_fan_out", True)])
def test_import_refuses_features_our_layer_cannot_hold(bases, key, value, tmp_path):
    # invariant: each unsupported feature is refused by name, before the model changes
    peft_made(bases, "bert", tmp_path / "peft")
    path = tmp_path / "peft" / peft_io.CONFIG
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    model, model_id, _, forward = ours("bert", bases["bert"][1])
    with torch.no_grad():
        before = forward(model)
    with pytest.raises(ValueError, match=f"{key}.*merge_and_unload"):
        peft_io.load_peft(model, tmp_path / "peft", model_id)
    with torch.no_grad():
        assert torch.equal(forward(model), before)


def test_import_refuses_an_adapter_for_another_base(bases, tmp_path):
    # invariant: an adapter for another base is a sentence naming that base: shapes that do not fit
    # (tiny BERT's adapter on MiniLM), or module names the model lacks (a RoBERTa adapter on BERT)
    peft_made(bases, "bert", tmp_path / "bert")
    peft_made(bases, "roberta", tmp_path / "roberta")
    minilm, minilm_id, _, _ = ours("minilm", "minilm")
    with pytest.raises(ValueError, match=r"shape.*another base model.*tiny-BertModel"):
        peft_io.load_peft(minilm, tmp_path / "bert", minilm_id)
    bert, bert_id, _, _ = ours("bert", bases["bert"][1])
    with pytest.raises(ValueError, match=r"classifier.*another base.*tiny-RobertaForMaskedLM"):
        peft_io.load_peft(bert, tmp_path / "roberta", bert_id)


def test_import_refuses_a_missing_or_pickled_adapter(bases, tmp_path):
    # invariant: a directory without PEFT's files is named, with the file it lacks and how to write it
    peft_made(bases, "bert", tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="adapter_config.json.*save_pretrained"):
        peft_io.read_peft(tmp_path)
    (tmp_path / "peft" / peft_io.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*safe_serialization=True"):
        peft_io.read_peft(tmp_path / "peft")


# -----------------------------------------------------------------------------
# --rslora: s = lora_alpha / sqrt(r), PEFT's use_rslora


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_rslora_exports_with_use_rslora_and_gives_our_logits_in_peft(bases, init, tmp_path):
    # invariant: an --rslora adapter exports with use_rslora = true and PEFT's scale lora_alpha / sqrt(r') equal
    # to our s, at rank r (B0 = 0) and through the rank-2r conversion (pissa); PEFT and its merge give our logits
    model_dir, model_name = bases["bert"]
    model, cfg, path, (ids, mask), forward = train_adapter("bert", model_name, init, tmp_path, rslora=True)
    assert cfg.scale == 8.0 / 2  # lora_alpha / sqrt(r), r = 4
    with torch.no_grad():
        expected = forward(model)
    peft_io.export(path, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / peft_io.CONFIG).read_text())
    assert config["use_rslora"] is True and config["r"] == (8 if init == "pissa" else 4)
    assert_close(config["lora_alpha"] / config["r"] ** 0.5, cfg.scale, atol=0, rtol=1e-12)
    hf = peft.PeftModel.from_pretrained(hf_model("bert", model_dir), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert_close(hf_logits(hf, ids, mask), expected, **TOL)
        assert_close(hf_logits(hf.merge_and_unload(), ids, mask), forward(inilora.merge(model)), **TOL)


def test_rslora_imports_from_peft_and_exports_back(bases, tmp_path):
    # invariant: a PEFT adapter made with use_rslora=True imports as --rslora (s = 6 / sqrt(4) = 3), computes
    # PEFT's logits on our model, and exports back with use_rslora and PEFT's own tensors
    hf = peft_made(bases, "bert", tmp_path / "peft", use_rslora=True)
    model, model_id, (ids, mask), forward = ours("bert", bases["bert"][1])
    cfg, fingerprint = peft_io.load_peft(model, tmp_path / "peft", model_id)
    assert cfg.rslora and (cfg.rank, cfg.scale) == (4, 3.0)
    with torch.no_grad():
        assert_close(forward(model), hf_logits(hf, ids, mask), **TOL)
    path = inilora.save_adapter(model, tmp_path / "ours.safetensors", cfg, model_id, fingerprint, {"num_labels": 2})
    peft_io.export(path, tmp_path / "again")
    config = json.loads((tmp_path / "again" / peft_io.CONFIG).read_text())
    assert (config["use_rslora"], config["r"], config["lora_alpha"]) == (True, 4, 6)
    original, again = load_file(tmp_path / "peft" / peft_io.WEIGHTS), load_file(tmp_path / "again" / peft_io.WEIGHTS)
    assert sorted(original) == sorted(again) and all(torch.equal(original[k], again[k]) for k in original)
