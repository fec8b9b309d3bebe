"""A model's tokenizer: Hugging Face `tokenizer.json` read with the `tokenizers` library.

Texts (and optional second texts of a pair) become token ids and token type ids, with the
model's own special tokens and longest-first truncation. No padding here: batches are padded
when they are built (data/prepare.py `pad_batch`).
"""
import hashlib
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


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
