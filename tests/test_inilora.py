"""Tests of inilora.py: every claim of the initialiser table (SPEC) and the layer's invariants.

- the distribution of A0, B0 for each initialiser, on large samples;
- R = W0 bit for bit where B0 = 0, and the model's outputs unchanged at step 0 for every initialiser;
- R bit-identical after an optimizer step, only A, B and the head trainable;
- merged == unmerged, merge idempotent, .train()/.eval() change no weight;
- save -> load gives the same outputs; the rank-2r conversion on the original base gives the
  outputs of the trained adapted model;
- bad input: rank, unknown initialiser or target, adapters twice, adapter for another base,
  damaged files, head of another size.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import inilora
from inilora import INITIALISERS, INIT_NAMES, LoRAConfig, LoRALinear


class Block(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(C, C) for _ in range(4))

    def forward(self, h):
        return h + self.out(torch.tanh(self.query(h)) * self.value(h) + self.key(h))


class Toy(nn.Module):
    """A small stand-in with the layer names of model.py: query/key/value linears and a `head`."""

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
    return LoRAConfig(init=init, rank=4, approx_steps=kw.pop("approx_steps", 50), **kw).validate()


def adapted(init, tmp_path, seed=0, **kw):
    model = toy(seed)
    cfg = config(init, **kw)
    fp = inilora.inject(model, cfg, "toy", cache_dir=tmp_path / "cache")
    inilora.mark_trainable(model, cfg, verbose=False)
    return model, cfg, fp


def train_steps(model, x, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(x).pow(2).mean() - model(x)[:, 0].mean()
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


@pytest.mark.parametrize("init", ["pissa", "alpha", "inilora"])
def test_rank_2r_conversion_on_the_original_base_reproduces_the_trained_model(init, x, tmp_path):
    model, cfg, fp = adapted(init, tmp_path, lora_alpha=8.0)
    train_steps(model, x)
    with torch.no_grad():
        expected = model(x)
    src = inilora.save_adapter(model, tmp_path / "adapter.safetensors", cfg, "toy", fp)
    dst = inilora.convert_to_lora(src, tmp_path / "plain.safetensors")
    base = toy()
    W0 = base.layers[0].query.weight.detach().clone()
    plain_cfg, meta = inilora.load_adapter(base, dst)
    assert plain_cfg.rank == 2 * cfg.rank and plain_cfg.scale == cfg.scale
    assert meta["converted_from"]["config"]["init"] == init
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


def test_unknown_initialiser_names_the_allowed_set():
    with pytest.raises(ValueError, match=r"'kaiming' is not one of \['alpha', 'beta-kaiming-normal'"):
        LoRAConfig(init="kaiming").validate()
    assert "full" in INIT_NAMES


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
    with pytest.raises(ValueError, match="truncated, damaged"):
        inilora.load_adapter(toy(), path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        inilora.load_adapter(toy(), path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inilora.load_adapter(toy(), path)


def test_head_of_another_size_is_refused(tmp_path):
    model, cfg, fp = adapted("lora", tmp_path)
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp)
    torch.manual_seed(0)
    other = Toy(num_labels=2).eval()
    with pytest.raises(ValueError, match="head.weight.*num_labels"):
        inilora.load_adapter(other, path)
