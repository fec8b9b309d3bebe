"""Tests of inilora.py: every claim of the initialiser table (docs/method.md) and the layer's invariants.

- the distribution of A0, B0 for each initialiser, on large samples;
- R = W0 bit for bit where B0 = 0, and the model's outputs unchanged at step 0 for every initialiser;
- R bit-identical after an optimizer step, only A, B and the head trainable;
- merged == unmerged, merge idempotent, .train()/.eval() change no weight;
- save -> load gives the same outputs; the rank-2r conversion on the original base gives the
  outputs of the trained adapted model;
- adapters cannot be misread: an edited sidecar (rank, lora_alpha), tensors whose shapes the
  configuration does not describe and non-finite tensors are refused, and a refused adapter
  leaves the model untouched; new layers take the training mode of their model;
- a bfloat16 base: R rounded once from float32, adapters float32, the output in x's dtype; the step-0
  weight error is measured, 0 for lora, and reported as losing the function for alpha;
- the command line: one flag per declared option, defaults in --help, targets defaulting per family;
- bad input: rank, unknown initialiser or target, adapters twice, adapter for another base,
  damaged files, head of another size.
"""
import argparse
import copy
import json
import math
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_save
from torch.testing import assert_close

import datainit
import inilora
import models
from inilora import INITIALISERS, LoRAConfig, LoRALinear, init_names
from lib import artifacts as common
from models import DEFAULT_TARGETS


class Block(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(C, C) for _ in range(4))

    def forward(self, h):
        return h + self.out(torch.tanh(self.query(h)) * self.value(h) + self.key(h))


class Toy(nn.Module):
    """A small stand-in with the layer names of models/encoder.py: query/key/value linears and a `head`."""

    def __init__(self, C=24, num_labels=3):
        super().__init__()
        self.embed = nn.Linear(16, C)
        self.layers = nn.ModuleList([Block(C) for _ in range(2)])
        self.head = nn.Linear(C, num_labels)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h.mean(1))


def toy(seed=0, **kw):
    torch.manual_seed(seed)
    return Toy(**kw).eval()


@pytest.fixture
def x():
    return torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))


def config(init, **kw):
    # IniLoRA: a short approximation keeps the test fast; its correctness is tested in test_approximate
    return LoRAConfig(init=init, **{"rank": 4, "approx_steps": 50, **kw}).validate()


def toy_loss(model, x):
    out = model(x)  # (B, K): one forward, so each layer sees each batch once
    return out.pow(2).mean() - out[:, 0].mean()


def toy_data(seed=2, batches=2, tokens=None):
    """What a data-driven initialiser reads on the toy: `batches` inputs (4, 5, 16), the toy loss, and the
    positions whose inputs count (`tokens`, (4, 5) bool; None: all)."""
    g = torch.Generator().manual_seed(seed)
    return datainit.InitData([torch.randn(4, 5, 16, generator=g) for _ in range(batches)], toy_loss,
                             lambda x: tokens)


def adapted(init, tmp_path, seed=0, **kw):
    model = toy(seed)
    cfg = config(init, **kw)
    stats = datainit.collect(model, cfg, toy_data())[0] if init in inilora.DATA_DRIVEN else None
    fp = inilora.inject(model, cfg, "toy", cache_dir=tmp_path / "cache", stats=stats)
    inilora.mark_trainable(model, cfg, verbose=False)
    return model, cfg, fp


def train_steps(model, x, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = toy_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- the distributions of the initialiser table


def draw(init, d_out=512, d_in=2048, rank=64, seed=0, **kw):
    cfg = LoRAConfig(init=init, rank=rank, **kw).validate()
    W0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 100))
    return INITIALISERS[init](W0, cfg, torch.Generator().manual_seed(seed), None), W0, cfg


def test_lora_is_kaiming_uniform_a_sqrt5_and_zero_B():
    (A0, B0), _, _ = draw("lora")
    bound = 1 / math.sqrt(2048)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / d_in)
    assert A0.abs().max() <= bound and A0.abs().max() > 0.99 * bound
    assert_close(A0.std().item(), bound / math.sqrt(3), rtol=0.01, atol=0)
    assert torch.count_nonzero(B0) == 0


def test_gaussian_has_std_one_over_r_and_zero_B():
    (A0, B0), _, _ = draw("gaussian")
    assert_close(A0.std().item(), 1 / 64, rtol=0.01, atol=0)
    assert abs(A0.mean().item()) < 1e-3 / 64 * 10
    assert torch.count_nonzero(B0) == 0


@pytest.mark.parametrize("std", [0.5, 0.2])
def test_alpha_is_gaussian_with_alpha_std(std):
    (A0, B0), _, _ = draw("alpha", alpha_std=std)
    for M in (A0, B0):
        assert_close(M.std().item(), std, rtol=0.01, atol=0)
        assert abs(M.mean().item()) < 0.01 * std


def test_beta_kaiming_normal_uses_fan_in_d_in_for_A_and_r_for_B():
    (A0, B0), _, _ = draw("beta-kaiming-normal")
    assert_close(A0.std().item(), math.sqrt(2 / 2048), rtol=0.01, atol=0)
    assert_close(B0.std().item(), math.sqrt(2 / 64), rtol=0.01, atol=0)


def test_beta_kaiming_uniform_has_bounds_sqrt6_over_fan_in():
    (A0, B0), _, _ = draw("beta-kaiming-uniform")
    for M, fan_in in ((A0, 2048), (B0, 64)):
        bound = math.sqrt(6 / fan_in)
        assert M.abs().max() <= bound and M.abs().max() > 0.99 * bound
        assert_close(M.std().item(), bound / math.sqrt(3), rtol=0.01, atol=0)


@pytest.mark.parametrize("init,top", [("pissa", True), ("milora", False)])
@pytest.mark.parametrize("lora_alpha", [None, 16.0])
def test_svd_initialisers_take_the_top_or_bottom_singular_triplets(init, top, lora_alpha):
    (A0, B0), W0, cfg = draw(init, d_out=64, d_in=96, rank=8, lora_alpha=lora_alpha)
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    keep = slice(0, 8) if top else slice(56, 64)
    expected = U[:, keep] @ torch.diag(S[keep]) @ Vh[keep]
    assert_close((cfg.scale * B0.double() @ A0.double()), expected, atol=1e-5, rtol=1e-5)
    # A0 and B0 carry sqrt(S) each: their rows / columns have the same norms
    assert_close(A0.norm(dim=1), B0.norm(dim=0), atol=1e-5, rtol=1e-5)
    # the residual keeps the other singular values
    rest = torch.linalg.svdvals(W0.double() - expected)[:56]
    assert_close(rest, S[8:] if top else S[:56], atol=1e-5, rtol=1e-5)


def test_inilora_divides_the_cached_factors_by_sqrt_s():
    cfg = LoRAConfig(init="inilora", rank=4, lora_alpha=16.0).validate()  # s = 4
    A, B = torch.randn(4, 10), torch.randn(6, 4)
    A0, B0 = INITIALISERS["inilora"](torch.zeros(6, 10), cfg, None, (A, B))
    assert_close(A0, A / 2)
    assert_close(B0, B / 2)
    assert_close(cfg.scale * B0 @ A0, B @ A)


def test_random_initialisers_are_reproducible_from_the_seed(tmp_path):
    a, _, _ = adapted("beta-kaiming-uniform", tmp_path, seed=0)
    b, _, _ = adapted("beta-kaiming-uniform", tmp_path, seed=0)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    d = toy(0)
    inilora.inject(d, config("beta-kaiming-uniform", seed=1), "toy")
    assert not torch.equal(d.layers[0].query.A, a.layers[0].query.A)


# --- the method's invariants


@pytest.mark.parametrize("init", sorted(INITIALISERS))
def test_outputs_unchanged_at_step_0(init, x, tmp_path):
    reference = toy()(x)
    model, cfg, _ = adapted(init, tmp_path)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4
    assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["lora", "gaussian"])
def test_residual_is_W0_bit_for_bit_when_B0_is_zero(init, tmp_path):
    base = toy()
    model, _, _ = adapted(init, tmp_path)
    assert torch.equal(model.layers[1].value.R, base.layers[1].value.weight)


@pytest.mark.parametrize("init", ["inilora", "pissa", "beta-kaiming-uniform"])
def test_residual_is_W0_minus_s_B0_A0(init, tmp_path):
    base = toy()
    model, cfg, _ = adapted(init, tmp_path, lora_alpha=8.0)
    layer = model.layers[0].query
    assert cfg.scale == 2.0
    assert_close(layer.R + cfg.scale * layer.B0 @ layer.A0, base.layers[0].query.weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("init", ["alpha", "pissa", "lora"])
def test_only_A_B_and_head_train_and_R_stays_bit_identical(init, x, tmp_path):
    model, cfg, _ = adapted(init, tmp_path)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.endswith((".A", ".B")) or n.startswith("head.") for n in trainable)
    assert len(trainable) == 4 * 2 + 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    A_before = model.layers[0].value.A.detach().clone()
    train_steps(model, x)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.layers[0].value.A, A_before)


def test_full_fine_tuning_has_no_adapter_and_trains_everything(tmp_path):
    model, cfg, fp = adapted("full", tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert fp == inilora.base_fingerprint(toy(), cfg.targets)


def test_merged_equals_unmerged_and_merge_is_idempotent(x, tmp_path):
    model, _, _ = adapted("pissa", tmp_path)
    train_steps(model, x)
    with torch.no_grad():
        expected = model(x)
        layer = model.layers[0].query
        assert torch.equal(layer.merge().weight, layer.merge().weight)
        inilora.merge(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        once = {n: p.clone() for n, p in model.state_dict().items()}
        inilora.merge(model)
        assert all(torch.equal(once[n], p) for n, p in model.state_dict().items())


def test_train_and_eval_change_no_weight_and_dropout_acts_only_in_training(x, tmp_path):
    model, _, _ = adapted("alpha", tmp_path, dropout=0.5)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    model.eval()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.equal(a, b) and torch.equal(c, d)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


# --- adapter checkpoints and the rank-2r conversion


@pytest.mark.parametrize("init", ["inilora", "beta-kaiming-normal", "lora", "full"])
def test_save_then_load_on_the_base_gives_the_same_outputs(init, x, tmp_path):
    model, cfg, fp = adapted(init, tmp_path, lora_alpha=8.0)
    train_steps(model, x)
    with torch.no_grad():
        expected = model(x)
    path = inilora.save_adapter(model, tmp_path / "run" / "adapter.safetensors", cfg, "toy", fp, {"epoch": 3})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model_id"] == "toy" and meta["base_fingerprint"] == fp and meta["epoch"] == 3
    assert meta["config"]["init"] == init and meta["version"] == inilora.ADAPTER_VERSION
    fresh = toy()
    loaded_cfg, _ = inilora.load_adapter(fresh, path)
    assert loaded_cfg == cfg
    with torch.no_grad():
        assert_close(fresh(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init", sorted(INITIALISERS))
def test_a_loaded_adapter_has_the_layout_and_gradients_of_the_injected_one(init, x, tmp_path):
    # train.py --resume rebuilds the layers from a checkpoint; the run it continues injected them. A layout that
    # differs (PiSSA's SVD factors were column-major views) takes another GEMM path: other last bits, so a
    # resumed run drifted from the uninterrupted one
    model, cfg, fp = adapted(init, tmp_path)
    path = inilora.save_adapter(model, tmp_path / "adapter.safetensors", cfg, "toy", fp)
    loaded = toy()
    inilora.load_adapter(loaded, path)
    inilora.mark_trainable(loaded, cfg, verbose=False)
    tensors = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in (model, loaded)]
    assert {n: t.stride() for n, t in tensors[0].items()} == {n: t.stride() for n, t in tensors[1].items()}
    for m in (model, loaded):
        (m(x).pow(2).mean() - m(x)[:, 0].mean()).backward()
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def as_rank2r(src, dst):
    """The adapter file `src` written as its rank-2r plain LoRA (inilora.rank2r), so load_adapter can read it."""
    tensors, meta = inilora.read_adapter(src)
    out, cfg = inilora.rank2r(tensors, LoRAConfig.from_dict(meta["config"]))
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")} | {"config": asdict(cfg)}
    return common.save_artifact(dst, out, meta, inilora.ADAPTER_FORMAT, inilora.ADAPTER_VERSION)


@pytest.mark.parametrize("init", ["pissa", "alpha", "inilora"])
def test_rank_2r_conversion_on_the_original_base_reproduces_the_trained_model(init, x, tmp_path):
    model, cfg, fp = adapted(init, tmp_path, lora_alpha=8.0)
    train_steps(model, x)
    with torch.no_grad():
        expected = model(x)
    src = inilora.save_adapter(model, tmp_path / "adapter.safetensors", cfg, "toy", fp)
    dst = as_rank2r(src, tmp_path / "plain.safetensors")
    base = toy()
    W0 = base.layers[0].query.weight.detach().clone()
    plain_cfg, meta = inilora.load_adapter(base, dst)
    assert plain_cfg.rank == 2 * cfg.rank and plain_cfg.scale == cfg.scale
    layer = base.layers[0].query
    assert torch.equal(layer.R, W0)  # a plain LoRA: the base weight is untouched
    assert layer.A.shape == (2 * cfg.rank, 24) and layer.B.shape == (24, 2 * cfg.rank)
    with torch.no_grad():
        assert_close(base(x), expected, atol=1e-5, rtol=1e-5)


# --- bad input


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_is_refused(rank):
    with pytest.raises(ValueError, match=f"rank={rank} must be an integer >= 1"):
        LoRAConfig(rank=rank).validate()


def test_rank_above_the_matrix_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"rank=25 is larger than min\(d_out, d_in\)=24 of layers.0.query"):
        inilora.inject(toy(), LoRAConfig(rank=25), "toy")


# A rank that is too large is told the largest allowed: the smallest target's min(d_out, d_in),
# wherever that target sits; a rank below 1 is told to pass a rank >= 1, not a smaller one.
def test_rank_advice_fits_the_value():
    with pytest.raises(ValueError, match=r"rank=4 .* of head \(3, 24\); choose a rank between 1 and 3\."):
        inilora.inject(toy(), LoRAConfig(rank=4, targets=("query", "head")), "toy")
    with pytest.raises(ValueError, match=r"rank=0 must be an integer >= 1") as e:
        LoRAConfig(rank=0).validate()
    assert "--rank 8" in str(e.value) and "smaller" not in str(e.value)


def test_unknown_initialiser_names_the_allowed_set():
    with pytest.raises(ValueError, match=r"'kaiming' is not one of \['alpha', 'beta-kaiming-normal'"):
        LoRAConfig(init="kaiming").validate()
    assert "full" in init_names()


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="q_proj"):
        inilora.inject(toy(), LoRAConfig(targets=("q_proj",)), "toy")


def test_injecting_twice_is_refused(tmp_path):
    model, cfg, _ = adapted("lora", tmp_path)
    with pytest.raises(ValueError, match="already has adapters"):
        inilora.inject(model, cfg, "toy")


def test_adapter_for_another_base_model_is_refused(tmp_path):
    model, cfg, fp = adapted("lora", tmp_path)
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp)
    with pytest.raises(ValueError, match="was saved for base model 'toy'"):
        inilora.load_adapter(toy(seed=1), path, model_id="other")


def test_damaged_adapter_files_are_refused(tmp_path):
    model, cfg, fp = adapted("lora", tmp_path)
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.*train again"):
        inilora.load_adapter(toy(), path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*train again"):
        inilora.load_adapter(toy(), path)
    path.with_suffix(".json").unlink()
    # common.read_artifact: a missing half is an ArtifactError (a ValueError) naming the file
    with pytest.raises(ValueError, match="a.json' does not exist.*train again"):
        inilora.load_adapter(toy(), path)


def test_head_of_another_size_is_refused(tmp_path):
    model, cfg, fp = adapted("lora", tmp_path)
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp)
    torch.manual_seed(0)
    other = Toy(num_labels=2).eval()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"'head\.(weight|bias)'.*num_labels"):
        inilora.load_adapter(other, path)
    assert_untouched(other, before)
    # train.py records num_labels in the sidecar: the remedy then names it
    path = inilora.save_adapter(model, tmp_path / "b.safetensors", cfg, "toy", fp, {"num_labels": 3})
    with pytest.raises(ValueError, match=r"num_labels \(3\)"):
        inilora.load_adapter(other, path)


# --- adapters that cannot be misread: each refusal leaves the model exactly as it was


def snapshot(model):
    return {n: t.clone() for n, t in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, before):
    state, types = snapshot(model)
    assert types == before[1]  # no LoRALinear was put in
    assert state.keys() == before[0].keys() and all(torch.equal(state[n], before[0][n]) for n in state)


def saved(tmp_path, init="lora", **kw):
    model, cfg, fp = adapted(init, tmp_path, **kw)
    return inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp, {"num_labels": 3})


# The checksum covers the sidecar's configuration: editing rank or lora_alpha (which would move the
# logits) is refused with the remedy, and the model is not changed.
@pytest.mark.parametrize("key,value", [("rank", 2), ("rank", 8), ("lora_alpha", 8.0), ("lora_alpha", 32.0)])
def test_an_edited_rank_or_lora_alpha_in_the_sidecar_is_refused(key, value, tmp_path):
    path = saved(tmp_path, lora_alpha=16.0)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"][key] = value
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    model = toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match="sidecar do not match the checksum.*edited.*train again"):
        inilora.load_adapter(model, path)
    assert_untouched(model, before)


def rewrite(path, tensors=None, config=None):
    # an adapter whose sidecar and tensors were changed consistently: the checksum is recomputed
    tensors_, meta = inilora.read_adapter(path)
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}
    meta["config"] |= config or {}
    common.save_artifact(path, tensors if tensors is not None else tensors_, meta,
                         inilora.ADAPTER_FORMAT, inilora.ADAPTER_VERSION)
    return tensors_


# Every tensor's shape is checked against the rank and targets the configuration names, before the
# model changes: a sidecar that does not describe its tensors is refused even with a valid checksum
# (edited targets already fail the fingerprint of the base's target weights).
@pytest.mark.parametrize("edit,expected", [
    ("rank", r"'layers.0.query.A' .* shape \(4, 24\), but its configuration means \(8, 24\).*rank 8"),
    ("targets", r"saved for base model 'toy' .*Load it on 'toy'"),  # other targets: other target weights
    ("drop", r"lacks \['layers.1.value.B0'\].*rank 4"),
    ("transpose", r"'layers.0.query.A' .* shape \(24, 4\), but its configuration means \(4, 24\)"),
])
def test_tensors_the_configuration_does_not_describe_are_refused_before_the_model_changes(edit, expected, tmp_path):
    path = saved(tmp_path)
    tensors, _ = inilora.read_adapter(path)
    if edit == "rank":
        rewrite(path, config={"rank": 8})
    elif edit == "targets":
        rewrite(path, config={"targets": ["query", "value", "key"]})
    elif edit == "drop":
        rewrite(path, {k: v for k, v in tensors.items() if k != "layers.1.value.B0"})
    else:
        rewrite(path, tensors | {"layers.0.query.A": tensors["layers.0.query.A"].T.contiguous()})
    model = toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match=expected):
        inilora.load_adapter(model, path)
    assert_untouched(model, before)


# Non-finite tensors are refused even when the checksum was recomputed over them (save_artifact
# itself refuses to write them, so the file is written by hand here), and the model is not changed.
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_adapter_tensor_is_refused(value, tmp_path):
    path = saved(tmp_path, init="pissa")
    tensors, meta = inilora.read_adapter(path)
    tensors["layers.1.query.B"][2, 1] = value
    data = safetensors_save(tensors)
    meta["sha256"] = common._checksum(data, meta)
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(meta))
    model = toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'layers.1.query.B' .* holds inf or nan values.*train again"):
        inilora.load_adapter(model, path)
    assert_untouched(model, before)


# Layers made by inject take the training mode of their model: with dropout, an eval-mode model gives
# the same output twice and is unchanged at step 0; a training-mode model gets training-mode layers.
@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_injected_layers_take_the_training_mode_of_their_model(init, x, tmp_path):
    reference = toy()(x)
    model, _, _ = adapted(init, tmp_path, dropout=0.1)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and not any(m.training or m.dropout.training for m in layers)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    training = toy().train()
    inilora.inject(training, config(init, dropout=0.1), "toy")
    assert all(m.training and m.dropout.training for m in training.modules() if isinstance(m, LoRALinear))


# Layers made by load_adapter take the training mode of the model they are loaded into.
def test_loaded_layers_take_the_training_mode_of_their_model(x, tmp_path):
    model, cfg, fp = adapted("alpha", tmp_path, dropout=0.1)
    train_steps(model, x)
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp)
    evaluating, training = toy(), toy().train()
    inilora.load_adapter(evaluating, path)
    inilora.load_adapter(training, path)
    assert not any(m.training for m in evaluating.modules() if isinstance(m, LoRALinear))
    assert all(m.training for m in training.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        assert torch.equal(evaluating(x), evaluating(x))
        assert not torch.equal(training(x), training(x))  # dropout 0.1 acts in training mode


# --- the command line: every option is declared once, as a LoRAConfig field


def parse(argv, default_targets=DEFAULT_TARGETS["encoder"], seed=0):
    parser = argparse.ArgumentParser()
    inilora.add_lora_args(parser)
    return inilora.lora_config_from_args(parser.parse_args(argv), seed, default_targets)


# The flags are derived from the fields: each flagged field has its flag, its value reaches its field,
# and leaving every flag out gives the dataclass's defaults.
def test_flags_are_derived_from_the_config_fields():
    parser = argparse.ArgumentParser()
    inilora.add_lora_args(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h"}
    assert flags == {"--init", "--rank", "--lora-alpha", "--rslora", "--targets", "--lora-dropout", "--alpha-std",
                     "--init-batches", "--approx-steps", "--approx-lr", "--approx-seed", "--cache-dir"}
    assert parse([]) == LoRAConfig()
    cfg = parse(["--init", "alpha", "--rank", "4", "--lora-alpha", "16", "--rslora", "--targets", "query, key",
                 "--lora-dropout", "0.1", "--alpha-std", "0.2", "--init-batches", "3", "--approx-steps", "7",
                 "--approx-lr", "1e-3", "--approx-seed", "5"], seed=3)
    assert cfg == LoRAConfig(init="alpha", rank=4, lora_alpha=16.0, rslora=True, targets=("query", "key"),
                             dropout=0.1, alpha_std=0.2, seed=3, init_batches=3, approx_steps=7, approx_lr=1e-3,
                             approx_seed=5)


# --targets left out means the model family's default targets; given, it wins.
def test_targets_default_per_model_family():
    assert parse([]).targets == ("query", "value")
    assert parse([], default_targets=("q_proj", "v_proj")).targets == ("q_proj", "v_proj")
    assert parse(["--targets", "key"], default_targets=("q_proj", "v_proj")).targets == ("key",)


# Each bad value is refused by the check declared with its field, naming the value and what to pass.
@pytest.mark.parametrize("argv,named,advice", [
    (["--init", "kaiming"], "'kaiming' is not one of", "--init inilora"),
    (["--rank", "0"], "rank=0", "--rank 8"),
    (["--lora-alpha", "-1"], "lora_alpha=-1.0", "None for lora_alpha = r"),
    (["--lora-alpha", "nan"], "lora_alpha=nan", "finite number > 0"),
    (["--targets", " , "], "targets=()", "--targets query,value"),
    (["--lora-dropout", "1"], "dropout=1.0", "[0, 1)"),
    (["--alpha-std", "0"], "alpha_std=0.0", "> 0"),
    (["--approx-steps", "-1"], "approx_steps=-1", "0 (the N(0, σ̄²) start) or more"),
    (["--approx-lr", "0"], "approx_lr=0.0", "5e-4"),
    (["--init-batches", "0"], "init_batches=0", "--init-batches 8"),
    (["--init", "orthogonal", "--rank", "3"], "rank=3", "--rank 4"),
])
def test_bad_flag_values_name_the_value_and_the_remedy(argv, named, advice):
    with pytest.raises(ValueError) as e:
        parse(argv)
    assert named in str(e.value) and advice in str(e.value)


# --help shows every default, and the step-0 check of `python inilora.py` holds with dropout: the
# packaged model is in eval mode, so its outputs are unchanged.
def test_command_line_shows_defaults_and_keeps_the_outputs_with_dropout(capsys):
    with pytest.raises(SystemExit):
        inilora.main(["--help"])
    help_text = capsys.readouterr().out
    assert "(default: 8)" in help_text and "(default: 20000)" in help_text
    inilora.main(["--init", "pissa", "--lora-dropout", "0.1"])
    difference = float(capsys.readouterr().out.rsplit("max |difference| at step 0:", 1)[1])
    assert difference < 1e-5


# invariant: in a low-precision base, R = W0 - s B0 A0 is computed in float32 and rounded once to W0's dtype,
# the adapters stay float32, and the layer's output keeps x's dtype
def test_a_bfloat16_base_keeps_R_in_bfloat16_and_the_adapters_in_float32():
    g = torch.Generator().manual_seed(0)
    W0 = (0.02 * torch.randn(64, 48, generator=g)).to(torch.bfloat16)
    A0, B0 = torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g)
    layer = LoRALinear(W0, None, A0, B0, s=2.0)
    assert layer.R.dtype == torch.bfloat16 and layer.A.dtype == layer.B.dtype == layer.A0.dtype == torch.float32
    assert torch.equal(layer.R, (W0.float() - 2.0 * B0 @ A0).to(torch.bfloat16))  # rounded once, from float32
    x = torch.randn(3, 48, generator=g).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


# invariant: the step-0 weight error is 0 when B0 = 0 (R = W0 exactly), and a start with s B0 A0 >> W0 (alpha)
# is reported, with its figure, as unable to keep the function in bfloat16
def test_rounding_R_is_measured_and_a_start_that_loses_W0_is_reported(capsys):
    model = toy().to(torch.bfloat16)
    for init, warned in (("lora", False), ("pissa", False), ("alpha", True)):
        inilora.inject(copy.deepcopy(model), config(init), "toy")
        out = capsys.readouterr().out
        figure = float(re.search(r"off W0 by ([0-9.e+-]+)", out).group(1))
        assert (figure == 0) == (init == "lora")
        assert ("cannot keep the base model's function at step 0 in bfloat16" in out) == warned
        assert (figure > torch.finfo(torch.bfloat16).eps) == warned


# --- one adapter equation


# invariant: every adapted layer, in both model families, computes its output through LoRALinear.forward, the
# project's one adapter equation y = x R^T + b + s (x A^T) B^T: replacing it changes the packaged MiniLM's
# logits and a decoder's (no model computes the adapter's arithmetic on its own)
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_lora_linear_forward_is_what_both_model_families_run(family, tiny_decoder, monkeypatch, tmp_path):
    if family == "encoder":
        model, tok, model_id, _, targets = models.load("minilm")
        ids, types = tok.encode(["a gripping, beautifully shot film"], ["dull and far too long"])
        batch = (torch.tensor(ids), None, torch.tensor(types))
    else:
        model, tok, model_id, _, targets = models.load(str(tiny_decoder("LlamaForCausalLM")))
        batch = (torch.tensor([[1, 5, 9, 12, 3]]),)
    cfg = LoRAConfig(init="alpha", rank=2, targets=targets).validate()
    inilora.inject(model, cfg, model_id, tmp_path)
    adapted = sum(isinstance(m, LoRALinear) for m in model.modules())
    real, calls = LoRALinear.forward, []
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: calls.append(self) or real(self, x))
    with torch.no_grad():
        before = model(*batch)
    assert len(calls) == adapted > 0  # each adapted layer once per forward
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: 2 * real(self, x))
    with torch.no_grad():
        after = model(*batch)
    assert (after - before).abs().max() > 1e-3


# invariant: update_sizes is ||s (B A - B0 A0)||_F / ||W0||_F of each adapted layer: 0 at step 0 for every
# initialiser, and the ratio computed from the original weight once A and B have moved
@pytest.mark.parametrize("init", ["lora", "alpha", "pissa"])
def test_update_sizes_is_the_relative_weight_change(init):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("query", nn.Linear(12, 10))
    W0 = net.query.weight.detach().clone()
    inilora.inject(net, LoRAConfig(init=init, rank=2, targets=("query",)), "toy")
    assert inilora.update_sizes(net) == {"query": 0.0}
    layer = net.query
    with torch.no_grad():
        layer.A.add_(0.1 * torch.randn_like(layer.A))
        layer.B.add_(0.1 * torch.randn_like(layer.B))
    expected = (layer.s * (layer.B @ layer.A - layer.B0 @ layer.A0)).norm() / W0.norm()
    assert inilora.update_sizes(net)["query"] == pytest.approx(expected.item(), rel=1e-5)
    assert inilora.update_sizes(nn.Linear(3, 3)) == {}  # no adapter (full fine-tuning): nothing to report
