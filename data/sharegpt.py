"""sharegpt: multi-turn conversations (ShareGPT, the paper's training set for MMLU, Section 4.2.2), read
from a JSON list or JSON-lines file of records

    {"id": "...", "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}

with "from" one of "human", "gpt", "system" (user, assistant, system in the chat template's terms). Each
conversation becomes one sequence, the model's chat template rendered over all its turns, with the loss
on every assistant turn and nothing else:

    x = render(turns),   m_t = 1 on the tokens of each assistant reply and the end token that closes it

    L = sum_t m_t * CE(logits_{t-1}, x_t) / sum_t m_t          (data/sft.py's loss, over several spans)

The spans come from rendering the conversation turn by turn: the template's text for turns 1..i must
start with its text for turns 1..i-1 (checked), the generation prompt of an assistant turn (e.g.
'<|im_start|>assistant\\n') carries no loss, the reply up to and including the end token
(tokenizer.eos_token, '<|im_end|>') does. The whole text is tokenized at once, as the model reads it, and a
token carries the loss when its first character lies in a reply (the tokenizer's character offsets), so
the sequence is the same for byte-level BPE and for SentencePiece-style tokenizers that mark word starts.
A tokenizer without a chat template gets Vicuna's text (FastChat's v1.1, what ShareGPT models such as
Vicuna trained on): '{system} USER: {human} ASSISTANT: {gpt}{eos}USER: ...'.

A leading gpt turn (a reply to nothing) is skipped, as FastChat does. A sequence longer than --max-length
is cut there, never silently: the conversations cut, the assistant turns cut in the middle and the ones
cut away whole are counted and printed; tokens after the last loss token are dropped (nothing is learnt
from them); a conversation with no assistant token left (or none at all) is dropped, counted.
Train split only: the paper scores the adapter on MMLU (evaluate.py RUN --task mmlu --data-dir DIR).

    python data/prepare.py --task sharegpt --model smollm2 --data-dir sharegpt.json --max-length 2048
"""
from pathlib import Path

from data.sft import Sequences, prompt_format as chat_prompt_format
from data.task import Examples, Task, read_json_records, split_file

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ShareGPT's "from" -> the template's role
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
NAMES = ("sharegpt.json", "ShareGPT_V3_unfiltered_cleaned_split.json", "train.json", "train.jsonl")  # in --data-dir
LAYOUT = ('ShareGPT JSON: a list (or JSON lines) of {"conversations": [{"from": "human" | "gpt" | "system", '
          '"value": "..."}, ...]} records')


def source(split, data_dir=None) -> Path:
    """The file: data_dir itself, or one of NAMES inside it."""
    return split_file("sharegpt", split, data_dir, NAMES, LAYOUT)


def read_conversations(path) -> list[tuple[str, list[dict]]]:
    """(where, messages) per record, messages as [{"role", "content"}], every field checked."""
    conversations = []
    for where, record in read_json_records(path, (), LAYOUT):
        turns = record.get("conversations")
        if not isinstance(turns, list):
            problem = "has no" if "conversations" not in record else f"has a {type(turns).__name__} as its"
            raise ValueError(f"{path}, {where}: the record {problem} 'conversations' field (it has "
                             f"{sorted(record)}); expected {LAYOUT}.")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                found = turn if not isinstance(turn, dict) else {k: turn.get(k) for k in ("from", "value")}
                field = ("turn" if not isinstance(turn, dict) else "from" if turn.get("from") not in ROLES
                         else "value")
                raise ValueError(f"{path}, {where}, conversations[{j}], field {field!r}: found {str(found)[:80]!r}; "
                                 f"expected 'from' one of {sorted(ROLES)} and a string 'value' ({LAYOUT}).")
            messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
        conversations.append((where, messages))
    return conversations


def read(split, data_dir=None) -> Examples:
    """The conversations as Examples: texts the first human turns, pairs None, labels the first replies."""
    firsts = []
    for _, messages in read_conversations(source(split, data_dir)):
        first = lambda role: next((m["content"] for m in messages if m["role"] == role), "")  # noqa: E731
        firsts.append((first("user"), first("assistant")))
    return Examples([q for q, _ in firsts], None, [a for _, a in firsts])


# -----------------------------------------------------------------------------
# rendering: the conversation as pieces of text, each with or without loss


def pieces(tokenizer, messages, where="") -> list[tuple[str, bool]]:
    """(text, carries the loss) pieces whose concatenation is the rendered conversation; the loss is on each
    assistant reply up to and including the end token that closes it."""
    if not getattr(tokenizer, "chat_template", None):
        return vicuna_pieces(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    out, done = [], ""  # done: the text of the turns so far

    def grown(text, what):  # the template must render a conversation as a growing prefix
        if not text.startswith(done):
            raise ValueError(f"{where}: the chat template renders {what} as a text that does not start with the "
                             "turns before it, so the assistant spans cannot be found; use a model whose template "
                             "renders turn by turn (ChatML, LLaMA-3, Gemma ...), or drop this conversation.")
        return text[len(done):]

    for i, message in enumerate(messages):
        if message["role"] == "assistant":  # the generation prompt, no loss
            head = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            out.append((grown(head, f"the prompt of turn {i}"), False))
            done = head
        text = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        piece = grown(text, f"turn {i}")
        if message["role"] == "assistant":  # the reply and its end token carry the loss, what follows does not
            cut = piece.find(eos) + len(eos) if eos and eos in piece else len(piece)
            out += [(piece[:cut], True), (piece[cut:], False)]
        else:
            out.append((piece, False))
        done = text
    return [(text, loss) for text, loss in out if text]


def vicuna_pieces(tokenizer, messages) -> list[tuple[str, bool]]:
    """FastChat's Vicuna v1.1 text, for a tokenizer without a chat template."""
    system = " ".join(m["content"] for m in messages if m["role"] == "system") or VICUNA_SYSTEM
    out, text = [], system + " "
    for message in messages:
        if message["role"] == "user":
            text += f"USER: {message['content']} "
        elif message["role"] == "assistant":
            out += [(text + "ASSISTANT:", False), (f" {message['content']}{tokenizer.eos_token or ''}", True)]
            text = ""
    return out + ([(text, False)] if text else [])


def token_mask(offsets, replies) -> tuple[list[int], list[tuple[int, int]]]:
    """(m, spans): m_t = 1 when token t starts inside a reply (an added token, offsets (0, 0), never does);
    spans[k] = (first token, last token + 1) of reply k. One pass: offsets and replies both run left to right."""
    m, spans, k = [], {}, 0
    for t, (start, end) in enumerate(offsets):
        while k < len(replies) and start >= replies[k][1]:
            k += 1
        inside = end > start and k < len(replies) and replies[k][0] <= start
        m.append(int(inside))
        if inside:
            spans[k] = (spans.get(k, (t, t))[0], t + 1)
    return m, list(spans.values())


def tokenize(tokenizer, split, data_dir, max_length, shots=None) -> Sequences:
    """Each conversation's tokens with the loss on its assistant turns, cut at max_length, and the counts."""
    path = source(split, data_dir)
    conversations = read_conversations(path)
    with_template = bool(getattr(tokenizer, "chat_template", None))
    ids, type_ids, kept, names = [], [], [], []
    counts = dict(truncated=0, dropped=0, long_prompts=0, replies=0, replies_cut=0, replies_lost=0, leading=0)
    for i, (where, messages) in enumerate(conversations):
        names.append(where)
        if messages and messages[0]["role"] == "assistant":  # a reply to nothing (FastChat skips it too)
            messages = messages[1:]
            counts["leading"] += 1
        text, replies = "", []  # the whole text, the (start, end) characters of each reply
        for piece, loss in pieces(tokenizer, messages, f"{path}, {where}"):
            if loss:
                replies.append((len(text), len(text) + len(piece)))
            text += piece
        # the template's text holds its own special tokens; Vicuna's text gets the tokenizer's BOS, if any
        x, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=not with_template)
        m, spans = token_mask(offsets, replies)
        counts["replies"] += len(replies)
        counts["replies_cut"] += sum(start < max_length < end for start, end in spans)
        counts["replies_lost"] += sum(start >= max_length for start, end in spans)
        counts["truncated"] += len(x) > max_length
        x, m = x[:max_length], m[:max_length]
        if 1 not in m[1:]:  # no loss token (position 0 predicts nothing): nothing to learn
            counts["dropped"] += 1
            counts["long_prompts"] += bool(spans)  # it had replies, all past max_length
            continue
        last = len(m) - m[::-1].index(1)  # tokens after the last loss token teach nothing
        ids.append(x[:last])
        type_ids.append(m[:last])
        kept.append(i)
    stats = {"num_truncated": counts["truncated"], "num_dropped": counts["dropped"],
             "num_long_prompts": counts["long_prompts"],
             "note": (f"assistant turns: {counts['replies']} in all, {counts['replies_cut']} cut at max_length "
                      f"{max_length}, {counts['replies_lost']} cut away whole; {counts['leading']} leading gpt "
                      "turns skipped")}
    prompts = [[] for _ in conversations]  # nothing to score: the paper scores MMLU
    return Sequences(prompts, ids, type_ids, kept, stats, names, [""] * len(conversations), {})


def prompt_format(tokenizer, shots=None) -> str:
    """The model's chat template (its hash), or Vicuna v1.1 without one."""
    return chat_prompt_format(tokenizer) if getattr(tokenizer, "chat_template", None) else "vicuna-v1.1"


# metrics: MMLU's, by which the paper scores its adapters (the task itself has no split to score)
SHAREGPT = Task("sharegpt", "conversation", ("accuracy", "macro_accuracy"), None, ("train",), source=source, read=read,
                tokenize=tokenize, prompt_format=prompt_format, split_rule="the file's conversations, in file order",
                withheld={s: "ShareGPT is a training set; score the adapter on MMLU: evaluate.py RUN --task mmlu "
                             "--split test --data-dir DIR" for s in ("dev", "test")})
