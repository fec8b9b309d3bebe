"""Adapters on decoders: the method's invariants hold on a LLaMA-family model exactly as on encoders.

For every initialiser (the data-driven ones reading the test batch), on a tiny random LlamaForCausalLM loaded by decoder.load_causal_lm with its
default q_proj, v_proj targets:
- the next-token logits are unchanged at step 0 (R = W0 - s B0 A0 absorbs the initial product);
- after an optimizer step, the merged model (W = R + s B A) computes the unmerged model's logits;
- save -> load on a fresh base gives the trained logits;
- the rank-2r plain LoRA (inilora.rank2r) on a fresh base gives the trained logits.
"""
import pytest
import torch
from test_inilora import as_rank2r
from torch.testing import assert_close

import datainit
import inilora
from models import DEFAULT_TARGETS
from models.decoder import load_causal_lm

INITS = sorted(inilora.INITIALISERS)


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    return tiny_decoder("LlamaForCausalLM")


def base(path):
    model, _, model_id = load_causal_lm(str(path))
    return model, model_id


def batch():
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("init", INITS)
def test_decoder_adapters_keep_every_invariant(init, llama, tmp_path):
    model, model_id = base(llama)
    cfg = inilora.LoRAConfig(init=init, rank=2, targets=DEFAULT_TARGETS["decoder"], seed=1, approx_steps=30)
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, mask)  # (B, T, V)
    stats = None
    if init in inilora.DATA_DRIVEN:  # eva, lora-ga: the statistics of the batch, its real tokens only
        data = datainit.InitData([(ids, mask)], lambda m, b: m(*b)[b[1].bool()].logsumexp(-1).mean(), lambda b: b[1])
        stats, _ = datainit.collect(model, cfg, data)
    fingerprint = inilora.inject(model, cfg, model_id, cache_dir=tmp_path / "approx", stats=stats)
    inilora.mark_trainable(model, cfg, verbose=False)
    assert sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}) == ["A", "B"]
    # invariant: the same function at step 0, for every initialiser (float32 rounding only)
    with torch.no_grad():
        assert_close(model(ids, mask), before, atol=1e-5, rtol=1e-5)

    # one optimizer step moves A and B
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(ids, mask)[mask.bool()].logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids, mask)
    assert (trained - before).abs().max() > 1e-4

    # invariant: save -> load on the original base reproduces the trained model
    path = inilora.save_adapter(model, tmp_path / "adapter.safetensors", cfg, model_id, fingerprint)
    fresh, _ = base(llama)
    inilora.load_adapter(fresh, path, model_id)
    with torch.no_grad():
        assert_close(fresh(ids, mask), trained, atol=1e-5, rtol=1e-5)

    # invariant: the rank-2r plain LoRA, dW = s [B | -B0] [A ; A0], on the untouched base is the same model
    plain = as_rank2r(path, tmp_path / "plain.safetensors")
    fresh, _ = base(llama)
    plain_cfg, _ = inilora.load_adapter(fresh, plain, model_id)
    assert plain_cfg.rank == 4 and plain_cfg.init == "lora"
    with torch.no_grad():
        assert_close(fresh(ids, mask), trained, atol=2e-5, rtol=1e-5)

    # invariant: merged (W = R + s B A) == unmerged, and merging again changes nothing
    inilora.merge(model)
    assert not any(isinstance(m, inilora.LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert_close(model(ids, mask), trained, atol=1e-5, rtol=1e-5)
        inilora.merge(model)
        assert_close(model(ids, mask), trained, atol=1e-5, rtol=1e-5)
