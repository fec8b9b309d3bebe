"""Supervised fine-tuning data for causal LMs: prompts, response-only loss masks, batches, answers.

A generation task (data.task kind "generation") gives, per example, a question, a worked
response and a gold final answer. For training each example becomes one token sequence

    x = prompt(question) ++ response ++ [EOS],   loss mask m_t = 1 on the response and EOS tokens

so the loss covers response tokens only (paper Section 4.2.2: "the loss is on the response"):

    L = sum_t m_t * CE(logits_{t-1}, x_t) / sum_t m_t          (token-mean over response tokens)

The prompt is the model's chat template with the question as the one user message when the
tokenizer has a template, else the Alpaca prompt of the authors' code (ALPACA below, as in
MetaMath's train_math.py, which the IniLoRA scripts reuse); a code task's prompt is its question's
text as it stands (a function's signature and docstring to continue: data.task kind "code"). Prompt and response are tokenized
separately, so the boundary is a token boundary and the evaluation prompt is, token for token,
the prefix the model was trained on. A sequence longer than max_length loses the end of its
response (counted as truncated); an example whose prompt alone fills max_length has no response
token left and is dropped (counted), so no batch gets a loss over zero tokens.

For evaluation every example keeps its full prompt (never dropped) and its gold answer; answers
are compared after extraction: GSM8K-style, the number after '####' (else the last number);
MATH-style, the content of the last \\boxed{...}.

The tokenizer is models.tokenizer.ChatTokenizer (or anything with the same few members):
`encode(texts, add_special_tokens) -> list[list[int]]`, `eos_ids` (the first ends a response),
`pad_id`, `fingerprint`, `chat_template` (str or None) and
`apply_chat_template(messages, add_generation_prompt=True) -> str`.

    python data/prepare.py --task arithmetic --model smollm2    (prepares and prints the counts)
"""
import hashlib
import itertools
import re
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

import torch

# Legend: N examples in a split, K kept training sequences (K <= N), B batch, T tokens,
# S all tokens of the kept sequences, P all prompt tokens

# the prompt of the authors' code when the model has no chat template (MetaMath's "prompt_no_input")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{query}\n\n### Response:")
IGNORE_INDEX = -100  # a label that the cross-entropy skips (torch's and transformers' default)

# -----------------------------------------------------------------------------
# prompts and tokenization


def prompt_format(tokenizer, style="chat") -> str:
    """'chat-template <sha256[:16]>', 'alpaca' or 'text': which prompt a tokenizer gets (part of the cache key)."""
    if style == "text":
        return "text"
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return f"chat-template {hashlib.sha256(template.encode()).hexdigest()[:16]}"
    return "alpaca"


def build_prompts(tokenizer, questions, style="chat") -> list[list[int]]:
    """Token ids of each question's prompt. style "chat": the chat template (its text holds its own special
    tokens) with the question as the user message, else the Alpaca prompt with the tokenizer's own BOS.
    style "text" (code to continue, data.task kind "code"): the question itself, with the tokenizer's own BOS."""
    if style not in ("chat", "text"):
        raise ValueError(f"prompt style {style!r} is not one of ['chat', 'text'].")
    if style == "text":
        return tokenizer.encode(list(questions), add_special_tokens=True)
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                 for q in questions]
        return tokenizer.encode(texts, add_special_tokens=False)
    return tokenizer.encode([ALPACA.format(query=q) for q in questions], add_special_tokens=True)


def eos_id(tokenizer) -> int:
    ids = getattr(tokenizer, "eos_ids", None) or ()
    if not ids:
        raise ValueError(f"the tokenizer {getattr(tokenizer, 'path', tokenizer)!r} has no end-of-sequence token, "
                         "so a fine-tuned model would never learn to stop; use a causal LM's tokenizer "
                         "(e.g. --model smollm2).")
    return int(ids[0])


def tokenize_sft(tokenizer, questions, responses, max_length, style="chat"):
    """Prompt and training sequences of one split, with the truncation counts; `style` is build_prompts'.

    Returns (prompts, ids, type_ids, kept, stats): prompts N lists (full, for generation); ids and
    type_ids K lists (prompt ++ response ++ EOS cut at max_length; type 1 marks the loss tokens);
    kept (K,) the example index of each sequence; stats the counts describe() prints.
    """
    if not hasattr(tokenizer, "apply_chat_template") or not hasattr(tokenizer, "eos_ids"):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'path', tokenizer)!r} is an encoder's tokenizer; "
                         "generation tasks need a causal LM's (models.tokenizer.ChatTokenizer), e.g. --model smollm2.")
    prompts = build_prompts(tokenizer, questions, style)
    eos = eos_id(tokenizer)
    answers = [r + [eos] for r in tokenizer.encode(list(responses), add_special_tokens=False)]
    ids, type_ids, kept = [], [], []
    truncated = dropped = 0
    for i, (p, r) in enumerate(zip(prompts, answers)):
        room = max_length - len(p)  # response tokens that fit after the prompt
        if room <= 0:
            dropped += 1  # no response token left: nothing to learn, and a 0/0 loss
            continue
        truncated += len(r) > room
        ids.append(p + r[:room])
        type_ids.append([0] * len(p) + [1] * len(r[:room]))
        kept.append(i)
    stats = {"num_truncated": truncated, "num_dropped": dropped,
             "num_long_prompts": sum(len(p) >= max_length for p in prompts)}
    return prompts, ids, type_ids, kept, stats


class Sequences(NamedTuple):
    """One split of a causal-LM task, tokenized: what a task's own `tokenize` returns (data.task.Task; the
    multiple-choice and conversation kinds), in the layout tokenize_sft gives generation tasks."""
    prompts: list  # N lists of ids: what the model reads before it answers (scoring), whole
    ids: list  # K lists of ids, the training sequences (at most max_length)
    type_ids: list  # K lists, 1 on a token the loss covers (any number of spans), else 0
    kept: list  # K example indices: the examples with at least one loss token within max_length
    stats: dict  # num_truncated, num_dropped, num_long_prompts (the counts describe_sft prints), and "note":
    #              a sentence of the kind's own counts (shots dropped to fit, assistant turns cut), or None
    questions: list  # N strings naming the examples (in the predictions file)
    answers: list  # N gold answers as strings ("" where there is none)
    fields: dict  # more per-example lists kept with the split (e.g. "subjects", N strings), or {}


def flatten_sft(prompts, ids, type_ids, kept) -> dict:
    """The tensors of the cache: sequences and prompts flattened, offsets[i]..offsets[i+1] is item i."""

    def flat(seqs, dtype):
        return torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=dtype)

    def offsets(seqs):
        lengths = torch.tensor([len(x) for x in seqs], dtype=torch.int64)
        return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])

    return {
        "input_ids": flat(ids, torch.int32),  # (S,)
        "token_type_ids": flat(type_ids, torch.uint8),  # (S,) 1 = loss token
        "offsets": offsets(ids),  # (K+1,)
        "example_index": torch.tensor(kept, dtype=torch.int64),  # (K,)
        "prompt_ids": flat(prompts, torch.int32),  # (P,)
        "prompt_offsets": offsets(prompts),  # (N+1,)
    }


def sft_shapes(meta) -> dict:
    """The shape of every cached tensor, from the counts in the sidecar (checked on reading)."""
    k, n = meta["num_kept"], meta["num_examples"]
    return {"input_ids": (meta["num_tokens"],), "token_type_ids": (meta["num_tokens"],), "offsets": (k + 1,),
            "example_index": (k,), "prompt_ids": (meta["num_prompt_tokens"],), "prompt_offsets": (n + 1,)}


def unflatten_sft(tensors, meta) -> dict:
    """The split as load_split returns it for a generation task (see data.prepare.load_split)."""

    def split(flat, offsets):
        if not (offsets[0] == 0 and offsets[-1] == len(flat) and bool((offsets[1:] >= offsets[:-1]).all())):
            raise ValueError("its offsets do not match its token counts")
        return list(torch.split(flat.long(), (offsets[1:] - offsets[:-1]).tolist()))

    n = meta["num_examples"]
    if len(meta["questions"]) != n or len(meta["answers"]) != n:
        raise ValueError(f"it lists {len(meta['questions'])} questions and {len(meta['answers'])} answers for {n} examples")
    index = tensors["example_index"]
    if len(index) and not (0 <= int(index.min()) and int(index.max()) < n):
        raise ValueError("its example_index points outside the split")
    stats = ("num_examples", "num_kept", "num_truncated", "num_dropped", "num_long_prompts", "prompt_format")
    fields = meta.get("fields", {})  # a task's own per-example lists (multiple choice: "subjects")
    if any(len(v) != n for v in fields.values()):
        raise ValueError(f"its fields {sorted(fields)} do not hold one value per example ({n})")
    return {
        "input_ids": split(tensors["input_ids"], tensors["offsets"]),  # K tensors (T_i,)
        "token_type_ids": split(tensors["token_type_ids"], tensors["offsets"]),  # K tensors, 1 = loss
        "example_index": index,  # (K,) which example each training sequence is
        "prompt_ids": split(tensors["prompt_ids"], tensors["prompt_offsets"]),  # N tensors (T_i,)
        "questions": meta["questions"],  # N str
        "answers": meta["answers"],  # N str, gold final answers
        "stats": {k: meta[k] for k in stats} | {"note": meta.get("note")},
        **fields,
    }


def describe_sft(name, data, max_length, training=True, scored_by="generation") -> str:
    """One line: sizes, truncation and drop counts, token lengths of the sequences (trained on, for the training
    split; an evaluation split is scored from its prompts, by `scored_by`, so it trains on nothing), and the
    task's own counts (stats["note"]) when it has any."""
    s = data["stats"]
    lengths = torch.tensor([len(x) for x in data["input_ids"]] or [0], dtype=torch.float32)
    loss_tokens = sum(int(t.sum()) for t in data["token_type_ids"])
    kept = f"{s['num_kept']} trained on" if training else f"scored by {scored_by} ({s['num_kept']} fit with their response)"
    return (f"{name}: {s['num_examples']} examples, {kept} | prompt {s['prompt_format']} | "
            f"{s['num_truncated']} truncated to max_length {max_length}, {s['num_dropped']} dropped (no response "
            f"token left), {s['num_long_prompts']} prompts reach max_length | tokens mean {lengths.mean():.1f}, "
            f"max {lengths.max():.0f}, {loss_tokens} loss tokens" + (f" | {s['note']}" if s.get("note") else ""))


# -----------------------------------------------------------------------------
# batches


def sft_batch(examples_ids, type_ids, pad_id):
    """A training batch, right-padded: (input_ids, attention_mask, labels), each (B, T).

    labels[b, t] = input_ids[b, t] where the loss covers it (a response or EOS token), else
    IGNORE_INDEX; the model predicts labels[:, 1:] from logits[:, :-1]. A batch with no loss
    token is refused (its token-mean loss would be 0/0 = NaN).
    """
    if len(examples_ids) == 0 or len(examples_ids) != len(type_ids):
        raise ValueError(f"sft_batch got {len(examples_ids)} id sequences and {len(type_ids)} loss masks; "
                         "pass one of each per example, at least one example.")
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad(list(examples_ids), batch_first=True, padding_value=pad_id)  # (B, T)
    loss_mask = pad(list(type_ids), batch_first=True, padding_value=0).bool()  # (B, T)
    lengths = torch.tensor([len(x) for x in examples_ids])  # (B,)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
    if not loss_mask.any():
        raise ValueError(f"this batch of {len(examples_ids)} examples has no response token: all were truncated "
                         "away. Raise --max-length, or drop such examples (load_split does).")
    labels = input_ids.masked_fill(~loss_mask, IGNORE_INDEX)  # (B, T)
    return input_ids, attention_mask, labels


# -----------------------------------------------------------------------------
# answers: extraction and exact match

# a number: thousands groups with commas (1,000,000) or plain digits, optional sign and decimals
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
ANSWER_IS = "The answer is:"  # how MetaMathQA responses end


def normalize_number(text):
    """'1,000' -> '1000', '5.0' -> '5', '-0' -> '0', '2.50' -> '2.5'; None when `text` is not a number."""
    try:
        d = Decimal(text.replace(",", "").strip())
    except (InvalidOperation, AttributeError):
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_gsm8k(text):
    """GSM8K-style final answer: the first number after the first '####', else the last number in the
    text; normalized by normalize_number, or None when the text holds no number."""
    head, mark, tail = text.partition("####")
    found = NUMBER.search(tail) if mark else None
    if found is None:
        numbers = NUMBER.findall(text)
        if not numbers:
            return None
        return normalize_number(numbers[-1])
    return normalize_number(found.group())


def last_boxed(text):
    """The content of the last \\boxed{...} (braces balanced) or \\boxed x; None when there is none."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    rest = text[start + len("\\boxed"):]
    if not rest.startswith("{"):
        found = re.match(r"\s+([^\s$]+)", rest)  # "\boxed 5"
        return found.group(1) if found else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the generation stopped inside the box


def normalize_math(text):
    """A light version of the MATH answer normalization (Hendrycks et al., 2021, `strip_string`):
    no spaces, \\dfrac/\\tfrac -> \\frac, no \\left/\\right/\\!/$/degrees, no trailing '.';
    a plain number is compared as a number ('5.0' == '5')."""
    if text is None:
        return None
    s = text.strip()
    for old, new in (("\\!", ""), ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", ""), ("\\%", ""), (" ", "")):
        s = s.replace(old, new)
    s = s.rstrip(".")
    number = normalize_number(s) if NUMBER.fullmatch(s) else None
    return number if number is not None else s


def extract_math(text):
    """MATH-style final answer: the last \\boxed{...}, else what follows the last 'The answer is:'
    (MetaMathQA's closing line); normalized by normalize_math."""
    boxed = last_boxed(text)
    if boxed is None and ANSWER_IS in text:
        boxed = text.rsplit(ANSWER_IS, 1)[1].strip().split("\n")[0]
    return normalize_math(boxed)


EXTRACTORS = {"gsm8k": extract_gsm8k, "math": extract_math}  # Task.answer_format -> extractor


def exact_match(prediction, gold, answer_format) -> bool:
    """Whether a generation's extracted answer equals the gold answer (both normalized the same way)."""
    if answer_format not in EXTRACTORS:
        raise ValueError(f"answer_format {answer_format!r} is not one of {sorted(EXTRACTORS)}.")
    normalize = normalize_number if answer_format == "gsm8k" else normalize_math
    predicted = EXTRACTORS[answer_format](prediction)
    return predicted is not None and predicted == normalize(gold)
