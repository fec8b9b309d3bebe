"""A model's tokenizer: Hugging Face `tokenizer.json` read with the `tokenizers` library.

Tokenizer (encoders): texts (and optional second texts of a pair) become token ids and token
type ids, with the model's own special tokens and longest-first truncation.
ChatTokenizer (decoders): byte-level BPE from tokenizer.json or rebuilt from a GGUF file's
metadata (vocabulary, merges, token types, as llama.cpp stores them), and the model's chat
template, a Jinja string rendered in a sandbox. No padding here: batches are padded when they
are built (data/prepare.py `pad_batch`).

    python -m models.decoder --model smollm2 --prompt "What is 12 + 30?"   (chat template + generation)
"""
import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from models.gguf_file import gguf_list


class Tokenizer:
    """Reads a model's `tokenizer.json` with the `tokenizers` library.

    Texts (and optional second texts of a pair) become token ids and token type ids,
    with the model's own special tokens ([CLS] a [SEP] b [SEP] for BERT,
    <s> a </s></s> b </s> for RoBERTa) and longest-first truncation to `max_length`.
    No padding here: batches are padded dynamically when they are built.
    """

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist. "
                "Expected a Hugging Face `tokenizer.json` in the model directory."
            )
        data = path.read_bytes()
        try:
            self._tok = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ValueError(
                f"{str(path)!r} is not a readable tokenizer.json ({e}). "
                "Re-download the model or pass a directory with an intact tokenizer.json."
            ) from None
        self._tok.no_padding()
        self.path = path
        # sha256 of the file: prepared datasets are keyed by it
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self.pad_id = next(
            (i for t in ("[PAD]", "<pad>") if (i := self._tok.token_to_id(t)) is not None), 0
        )

    def encode(self, texts, pairs=None, max_length=512):
        """Returns (ids, type_ids): two lists with one list of ints per text."""
        if max_length < 2:
            raise ValueError(f"max_length={max_length} is too small: it must be at least 2.")
        self._tok.enable_truncation(max_length, strategy="longest_first")
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        encodings = self._tok.encode_batch(inputs)
        return [e.ids for e in encodings], [e.type_ids for e in encodings]

    def decode(self, ids):
        return self._tok.decode(ids)


# -----------------------------------------------------------------------------
# decoders: byte-level BPE and a chat template, from tokenizer.json or from GGUF metadata

# how llama.cpp names a byte-level BPE vocabulary's pre-tokenizer (tokenizer.ggml.pre) -> the split regex
# its merges were learned on (None: GPT-2's, built into ByteLevel)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": LLAMA3_SPLIT,
                       "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types of special tokens and of added plain tokens


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters, in which BPE vocabularies are spelled."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


class ChatTokenizer:
    """A decoder's tokenizer: text <-> ids with byte-level BPE, plus the model's chat template (Jinja)
    rendered in a sandbox. Built from a model directory (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) or from a GGUF file's metadata."""

    def __init__(self, tok: HFTokenizer, *, eos_ids, pad_id, bos_token, eos_token, chat_template, fingerprint):
        self._tok, self.fingerprint, self.chat_template = tok, fingerprint, chat_template
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id if pad_id is not None else self.eos_ids[0]  # padding is never attended to
        self.bos_token, self.eos_token = bos_token, eos_token
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @classmethod
    def from_gguf(cls, reader, meta: dict, path):
        """Byte-level BPE from tokenizer.ggml.tokens / merges / token_type, as llama.cpp reads it."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{str(path)!r} has tokenizer.ggml.model={kind!r} with pre-tokenizer {pre!r}; only "
                             f"byte-level BPE ('gpt2') with pre-tokenizers {sorted(GGUF_PRE_TOKENIZERS)} is "
                             "supported. Use a model directory with its tokenizer.json instead.")
        tokens, types = gguf_list(reader, "tokenizer.ggml.tokens"), gguf_list(reader, "tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in gguf_list(reader, "tokenizer.ggml.merges")]
        spell = byte_level_alphabet()
        alphabet = set(spell.values())
        vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=GGUF_PRE_TOKENIZERS[pre] is None)
        split = GGUF_PRE_TOKENIZERS[pre]
        tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet])
        tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
        token = lambda key: None if (i := meta.get(f"tokenizer.ggml.{key}")) is None else tokens[i]  # noqa: E731
        bos, eos = token("bos_token_id"), token("eos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        digest = hashlib.sha256("\n".join(tokens + [" ".join(m) for m in merges]).encode()).hexdigest()[:16]
        return cls(tok, eos_ids=[meta["tokenizer.ggml.eos_token_id"]], pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   bos_token=bos, eos_token=eos, chat_template=meta.get("tokenizer.chat_template"), fingerprint=digest)

    @classmethod
    def from_dir(cls, model_dir):
        """tokenizer.json, with the special tokens and chat template of tokenizer_config.json
        (or chat_template.jinja, where transformers 5 writes it)."""
        model_dir = Path(model_dir)
        base = Tokenizer(model_dir / "tokenizer.json")
        config_path, template_path = model_dir / "tokenizer_config.json", model_dir / "chat_template.jinja"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else config.get("chat_template")
        content = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
        bos, eos, pad = (content(config.get(f"{k}_token")) for k in ("bos", "eos", "pad"))
        eos_id = base._tok.token_to_id(eos) if eos else None
        if eos_id is None:
            raise ValueError(f"{str(config_path)!r} names no eos_token found in tokenizer.json (eos_token={eos!r}): "
                             "generation would never stop. Re-download the model's tokenizer files.")
        return cls(base._tok, eos_ids=[eos_id], pad_id=base._tok.token_to_id(pad) if pad else None,
                   bos_token=bos, eos_token=eos, chat_template=template, fingerprint=base.fingerprint)

    def encode(self, texts, add_special_tokens=True):
        """One list of ids per text; special tokens written in the text (<|im_start|>) stay whole.
        A chat prompt already holds its special tokens: pass add_special_tokens=False."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text, add_special_tokens=True):
        """(ids, offsets) of one text: offsets[t] = (start, end), the characters of `text` token t covers
        ((0, 0) for a token the tokenizer adds, such as BOS)."""
        encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        """The model's chat template (Jinja) rendered in a sandbox, as transformers renders it."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; build the prompt yourself (e.g. the "
                             "Alpaca template) or use a chat model such as --model smollm2.")
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.apply_chat_template(messages)
