"""Tests of the initialisers taken from PEFT (orthogonal, olora, eva, lora-ga) and of --rslora.

- orthogonal: B0 A0 = 0 with both non-zero, PEFT's orthogonal_init draw for draw from the same seed, an odd
  rank refused;
- olora: A0, B0 and R = W0 - s B0 A0 exactly PEFT's olora_init on the same weights;
- eva: A0 = the top-r principal components of the layer's inputs (the real tokens only), as PEFT's
  IncrementalPCA computes them from the same inputs; B0 = 0 and R = W0 bit for bit;
- lora-ga: A0, B0 from the SVD of the gradient autograd gives directly, averaged over the batches; the
  directions PEFT's lora_ga takes from the same batches (PEFT scales B0 otherwise: docs/method.md);
- data-driven initialisers without statistics, or with too few tokens, are refused by a sentence;
- --rslora: s = lora_alpha / sqrt(r) in the residual, the merge and the rank-2r conversion;
- train.py --init eva / lora-ga: the statistics pass's cost in final.json, --init-batches in config.json, and
  a resumed lora-ga run equals the uninterrupted one (A0, B0 come back from the checkpoint).
The step-0 function of every initialiser is tested with the others: test_inilora.py (toy), test_decoder_adapters.py
(tiny LLaMA), test_peft_io.py (MiniLM, BERT, RoBERTa, LLaMA, exported to PEFT), test_train.py (every --init).
"""
import json
import math
import re
import signal

import peft
import pytest
import test_train
import torch
from peft.utils.incremental_pca import IncrementalPCA
from test_inilora import adapted, toy, toy_data, toy_loss
from torch.testing import assert_close

import datainit
import inilora
import train
from inilora import INITIALISERS, LoRAConfig, LoRALinear
from lib import runs
from lib.artifacts import read_artifact

args, setup = test_train.args, test_train.setup  # train.py on a tiny BERT and a tiny SST-2; setup is a fixture
TARGETS = ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]  # the toy's, sorted


def draw(init, d_out=40, d_in=56, rank=8, seed=0, precomputed=None, **kw):
    cfg = LoRAConfig(init=init, rank=rank, **kw).validate()
    W0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 100))
    return INITIALISERS[init](W0, cfg, torch.Generator().manual_seed(seed), precomputed), W0, cfg


def peft_toy(init_lora_weights, rank=4, lora_alpha=8, **options):
    """A toy model with PEFT's LoRA of `init_lora_weights` on query and value (get_peft_model)."""
    config = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["query", "value"],
                             init_lora_weights=init_lora_weights, **options)
    return peft.get_peft_model(toy(), config), config


def peft_layer(model, name):
    return model.base_model.model.get_submodule(name)


# --- orthogonal


def test_orthogonal_factors_are_non_zero_with_a_zero_product():
    (A0, B0), _, _ = draw("orthogonal")
    assert A0.shape == (8, 56) and B0.shape == (40, 8)
    assert A0.norm() > 0.5 and B0.norm() > 0.5  # both non-zero: entries of std sqrt((r/2) / r) / 10 ≈ 0.07
    # invariant: B0 A0 = G_B^T (Q_B Q_A^T) G_A^T / 100 = 0 up to float32 rounding, so R = W0 (to rounding)
    assert (B0 @ A0).abs().max() < 1e-6 * B0.norm() * A0.norm()
    # A0's rows span r/2 directions of d_in, B0's columns r/2 of d_out: rank r/2 each
    assert torch.linalg.matrix_rank(A0) == 4 and torch.linalg.matrix_rank(B0) == 4


def test_orthogonal_is_peft_orthogonal_init_draw_for_draw():
    # PEFT draws from torch's global generator; ours from the generator `g`: seeded alike, the draws are equal
    model, _ = peft_toy("orthogonal")
    layer = peft_layer(model, "layers.1.value")
    torch.manual_seed(7)
    layer.orthogonal_init("default")
    W0 = layer.base_layer.weight.detach()
    cfg = LoRAConfig(init="orthogonal", rank=4).validate()
    A0, B0 = INITIALISERS["orthogonal"](W0, cfg, torch.Generator().manual_seed(7), None)
    assert_close(A0, layer.lora_A["default"].weight.detach(), atol=0, rtol=0)
    assert_close(B0, layer.lora_B["default"].weight.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_an_odd_rank_is_refused_for_orthogonal(rank):
    with pytest.raises(ValueError, match=f"rank must be even, not rank={rank}; pass --rank {rank + 1}"):
        LoRAConfig(init="orthogonal", rank=rank).validate()


# --- olora


def test_olora_is_peft_olora_init_on_the_same_weights(tmp_path):
    # invariant: A0 = U[:r], B0 = Q[:, :r] of W0 = Q U, undivided by s, and R = W0 - s B0 A0: PEFT's lora_A,
    # lora_B and modified base weight, on every target of the same model (s = 2)
    model, cfg, _ = adapted("olora", tmp_path, lora_alpha=8.0)
    ref, _ = peft_toy("olora", rank=4, lora_alpha=8)
    assert cfg.scale == 2.0
    for name in TARGETS:
        ours, theirs = model.get_submodule(name), peft_layer(ref, name)
        assert_close(ours.A0, theirs.lora_A["default"].weight, atol=1e-6, rtol=1e-6)
        assert_close(ours.B0, theirs.lora_B["default"].weight, atol=1e-6, rtol=1e-6)
        assert_close(ours.R, theirs.base_layer.weight, atol=1e-6, rtol=1e-6)
    # B0 has orthonormal columns (Q's), A0 is the upper-triangular U's first r rows
    layer = model.layers[0].query
    assert_close(layer.B0.T @ layer.B0, torch.eye(4), atol=1e-5, rtol=0)
    assert torch.equal(torch.triu(layer.A0), layer.A0)


# --- eva


def layer_inputs(model, data):
    """{target: every input vector (n, d_in) it sees over `data`'s batches, at the positions data.tokens keeps}."""
    seen, handles = {}, []
    for name in TARGETS:
        def keep(module, inputs, name=name):
            x, mask = inputs[0], data.tokens(None)
            seen.setdefault(name, []).append(x[mask] if mask is not None else x.reshape(-1, x.shape[-1]))
        handles.append(model.get_submodule(name).register_forward_pre_hook(keep))
    with torch.no_grad():
        for x in data.batches:
            model(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def test_eva_takes_the_principal_components_of_the_real_tokens_as_peft_does(tmp_path):
    tokens = torch.ones(4, 5, dtype=torch.bool)
    tokens[1, 3:] = tokens[3, 1:] = False  # padding: these positions' inputs must not count
    data = toy_data(batches=3, tokens=tokens)
    cfg = LoRAConfig(init="eva", rank=4).validate()
    model = toy()
    stats, cost = datainit.collect(model, cfg, data)
    assert cost["batches"] == 3 and cost["seconds"] > 0 and cost["peak_memory_mib"] > 0
    inputs = layer_inputs(toy(), data)
    inilora.inject(model, cfg, "toy", stats=stats)
    for name in TARGETS:
        X = inputs[name].double()                                    # (n, d_in), n = 3 * 14 real tokens
        assert X.shape[0] == 42
        # PEFT's EVA: IncrementalPCA (centred, svd_flip signs); one partial_fit with every input is exact PCA
        pca = IncrementalPCA(n_components=4).partial_fit(X.clone())
        layer = model.get_submodule(name)
        assert_close(layer.A0, pca.components_.float(), atol=1e-5, rtol=1e-5)
        # the same as the top right singular vectors of X - 1 mu^T, up to sign
        _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
        assert_close((layer.A0.double() @ Vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        # invariant: B0 = 0, so R = W0 bit for bit
        assert not layer.B0.any() and torch.equal(layer.R, toy().get_submodule(name).weight)


def test_eva_with_fewer_tokens_than_the_rank_is_refused():
    tokens = torch.zeros(4, 5, dtype=torch.bool)
    tokens[0, :2] = True  # 2 tokens a batch
    with pytest.raises(ValueError, match=r"top r = 4 .* only 2 tokens; raise --init-batches"):
        datainit.collect(toy(), LoRAConfig(init="eva", rank=4), toy_data(batches=1, tokens=tokens))


# --- lora-ga


def direct_gradients(data):
    """{target: (1/N) sum_b dL_b/dW0} by autograd on a fresh toy, every parameter requiring a gradient."""
    model = toy()
    grads = {name: 0 for name in TARGETS}
    for x in data.batches:
        weights = [model.get_submodule(name).weight for name in TARGETS]
        for name, grad in zip(TARGETS, torch.autograd.grad(toy_loss(model, x), weights)):
            grads[name] = grads[name] + grad
    return {name: grad / len(data.batches) for name, grad in grads.items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_ga_is_the_svd_of_the_averaged_gradient(rslora, x, tmp_path):
    model, cfg, _ = adapted("lora-ga", tmp_path, lora_alpha=8.0, rslora=rslora)
    zeta = 24 ** 0.25 / 4  # d_out^(1/4) / sqrt(γ), γ = 16
    for name, G in direct_gradients(toy_data()).items():
        U, S, Vh = torch.linalg.svd(G.double())
        layer = model.get_submodule(name)
        # A0 = ζ V[:, :r]^T and B0 = ζ U[:, r:2r], each vector up to its sign
        signs_A = torch.sign((layer.A0.double() * Vh[:4]).sum(1, keepdim=True))      # (r, 1)
        signs_B = torch.sign((layer.B0.double() * U[:, 4:8]).sum(0, keepdim=True))   # (1, r)
        assert_close(layer.A0.double(), zeta * Vh[:4] * signs_A, atol=1e-5, rtol=1e-5)
        assert_close(layer.B0.double(), zeta * U[:, 4:8] * signs_B, atol=1e-5, rtol=1e-5)
        # invariant: R = W0 - s B0 A0 with the run's s
        W0 = toy().get_submodule(name).weight.detach()
        assert_close(layer.R + cfg.scale * layer.B0 @ layer.A0, W0, atol=1e-6, rtol=1e-5)
    # invariant: the same function at step 0
    assert_close(model(x), toy()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # PEFT's counting hook, on the toy's first layer
def test_lora_ga_takes_the_directions_peft_lora_ga_takes(tmp_path):
    # PEFT estimates the same averaged gradient from the same batches and takes the same singular vectors
    # (direction ArB2r); it multiplies B0 by S[r:2r] where the paper does not (docs/method.md), so B0's columns
    # are compared as unit vectors. r = 6: PEFT's svd_lowrank keeps q = min(4r, 24) = 24, the whole spectrum
    data = toy_data()
    model, _, _ = adapted("lora-ga", tmp_path, rank=6)
    ref = toy()
    config = peft.LoraConfig(r=6, lora_alpha=6, target_modules=["query", "value"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(direction="ArB2r", scale="unit"))

    def train_step():
        for x in data.batches:
            toy_loss(ref, x).backward()

    torch.manual_seed(0)
    peft.preprocess_loraga(ref, config, train_step)
    ref = peft.get_peft_model(ref, config)
    zeta = 24 ** 0.25 / 4
    for name in TARGETS:
        ours, theirs = model.get_submodule(name), peft_layer(ref, name)
        A, B = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        B = B / B.norm(dim=0, keepdim=True)  # U[:, r:2r] diag(S[r:2r]) -> U[:, r:2r]
        assert_close((ours.A0 / zeta * A).sum(1).abs(), torch.ones(6), atol=1e-4, rtol=0)  # the same rows, up to sign
        assert_close((ours.B0 / zeta * B).sum(0).abs(), torch.ones(6), atol=1e-4, rtol=0)


def test_lora_ga_needs_2r_singular_vectors():
    with pytest.raises(ValueError, match=r"2r = 26 singular vectors.*--rank 12 or less"):
        datainit.collect(toy(), LoRAConfig(init="lora-ga", rank=13), toy_data())
    with pytest.raises(ValueError, match=r"2r = 26 .* \(40, 24\).*--rank 12 or less"):
        draw("lora-ga", d_in=24, rank=13, precomputed=torch.randn(40, 24))


# --- what every data-driven initialiser shares


@pytest.mark.parametrize("init", inilora.DATA_DRIVEN)
def test_a_data_driven_initialiser_without_statistics_is_refused(init):
    model = toy()
    with pytest.raises(ValueError, match=f"init '{init}' is data-driven.*python train.py --init {init}"):
        inilora.inject(model, LoRAConfig(init=init, rank=4), "toy")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_the_statistics_pass_leaves_the_model_as_it_was():
    # eval mode during the pass, requires_grad and the training mode restored, no gradient left behind
    model = toy().train()
    model.layers[0].key.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for init in inilora.DATA_DRIVEN:
        datainit.collect(model, LoRAConfig(init=init, rank=4), toy_data())
        assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert all(p.grad is None for p in model.parameters()) and not any(m._forward_pre_hooks for m in model.modules())
        assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_unknown_initialiser_lists_the_new_ones():
    with pytest.raises(ValueError, match=r"'qr' is not one of .*'eva'.*'lora-ga'.*'olora'.*'orthogonal'"):
        LoRAConfig(init="qr").validate()


# --- --rslora


@pytest.fixture
def x():
    return torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))


def test_rslora_scale_reaches_the_residual_merge_and_rank_2r(x, tmp_path):
    # s = lora_alpha / sqrt(r): 16 / 2 = 8 at r = 4 (16 / 4 = 4 without --rslora)
    assert LoRAConfig(rank=4, lora_alpha=16.0).scale == 4.0
    model, cfg, fp = adapted("pissa", tmp_path, lora_alpha=16.0, rslora=True)
    assert cfg.scale == 8.0 and cfg.label == "pissa-r4-rslora"
    layer = model.layers[0].query
    assert layer.s == 8.0
    assert_close(layer.R + 8.0 * layer.B0 @ layer.A0, toy().layers[0].query.weight, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert_close(model(x), toy()(x), atol=1e-5, rtol=1e-5)  # the same function at step 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    toy_loss(model, x).backward()
    opt.step()
    path = inilora.save_adapter(model, tmp_path / "a.safetensors", cfg, "toy", fp)
    tensors, meta = inilora.read_adapter(path)
    plain_tensors, plain = inilora.rank2r(tensors, LoRAConfig.from_dict(meta["config"]))
    assert plain.rslora and plain.rank == 8 and math.isclose(plain.scale, 8.0, rel_tol=1e-12)
    with torch.no_grad():
        trained = model(x)
        merged = inilora.merge(model)  # W = R + s B A
        assert_close(merged(x), trained, atol=1e-5, rtol=1e-5)


# --- train.py


def test_train_records_the_statistics_pass_and_init_batches(setup, capsys):
    tmp_path, _ = setup
    state = train.main(args(setup, "eva", "--init", "eva", "--init-batches", "2"))
    out = capsys.readouterr().out
    assert re.search(r"init eva: statistics of 2 training batches, \d[\d,]* tokens a layer at least for 4 layers "
                     r"in [0-9.]+ s; peak memory [\d,]+ MiB", out)
    assert re.search(r"init eva: A0, B0 from the statistics and R = W0 - s B0 A0 in [0-9.]+ s", out)
    config = json.loads((tmp_path / "eva" / "config.json").read_text())
    assert config["lora"]["init_batches"] == 2 and config["lora"]["rslora"] is False
    final = json.loads((tmp_path / "eva" / "final.json").read_text())
    assert final["init_cost"] == state["init_cost"] and final["init_cost"]["batches"] == 2
    assert final["init_cost"]["seconds"] > 0 and final["init_cost"]["peak_memory_mib"] > 0
    assert final["init_cost"]["inject_seconds"] > 0


def test_a_resumed_lora_ga_run_equals_the_uninterrupted_one(setup, monkeypatch):
    # the resumed run reads no batch again: A0, B0 and the residual come back from the checkpoint
    tmp_path, _ = setup
    common = ("--epochs", "2", "--init", "lora-ga", "--init-batches", "2", "--save-every", "2")
    full = train.main(args(setup, "full", *common))
    calls, real_loss = {"n": 0}, train.loss_fn

    def interrupted_loss(logits, labels):  # the statistics pass's 2 losses, then Ctrl-C during step 4
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signal.SIGINT)
        return real_loss(logits, labels)

    monkeypatch.setattr(train, "loss_fn", interrupted_loss)
    assert train.main(args(setup, "resumed", *common))["step"] == 4
    monkeypatch.setattr(train, "loss_fn", real_loss)
    read = []
    monkeypatch.setattr(datainit, "collect", lambda *a: read.append(a))
    resumed = train.main(args(setup, "resumed", *common, "--resume"))
    assert read == []
    # the same run; init_cost is the statistics pass of each run's own first segment (its seconds differ)
    assert {k: v for k, v in resumed.items() if k != "init_cost"} == {k: v for k, v in full.items() if k != "init_cost"}
    assert resumed["init_cost"]["batches"] == full["init_cost"]["batches"] == 2
    for name in ("adapter.safetensors", "state.safetensors"):
        fmt = (inilora.ADAPTER_FORMAT, inilora.ADAPTER_VERSION) if name.startswith("adapter") else (
            runs.STATE_FORMAT, runs.STATE_VERSION)
        a, b = (read_artifact(tmp_path / run / "checkpoint-6" / name, *fmt, "")[0] for run in ("full", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
