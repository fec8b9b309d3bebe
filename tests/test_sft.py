"""Tests of supervised fine-tuning of a causal LM (train.py's generation kind) and of its evaluation.

On a tiny random LLaMA with a byte-level tokenizer (conftest.tiny_byte_decoder) and a tiny sum task
("What is 3 + 4?" -> "3 + 4 = 7\\n#### 7", 16 train / 8 dev / 8 test, registered for the test):
- the loss is the token-mean cross-entropy over response tokens, computed by hand;
- --grad-accum 2 x batch 4 gives the adapter of batch 8 after one step (the loss is normalised by the
  response tokens of the whole step);
- resume after a SIGINT equals the uninterrupted run, bit for bit, for a decoder;
- every initialiser trains a step on a decoder, only A and B train, the base weights do not move;
- gradient checkpointing gives the same gradients; bf16 autocast trains on the CPU;
- evaluation writes a predictions JSONL (question, generation, extracted, gold, correct) whose exact
  match is the score, for a run and for the base model (--base), and --compare reads decoder runs;
- the preset and the cosine schedule; a split whose responses were all truncated away is a sentence.
"""
import json
import random
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import data.prepare
import evaluate
import inilora
import train
from data.sft import IGNORE_INDEX
from data.task import Examples, Task
from models.decoder import load_causal_lm

TASK = data.prepare.TASKS["arithmetic"]  # any generation task: training_batch and loss_units read its kind

SIZES = {"train": 16, "dev": 8, "test": 8}


def sums(split):
    rng = random.Random(f"tiny-sum-{split}")
    questions, responses, answers = [], [], []
    for _ in range(SIZES[split]):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        questions.append(f"What is {a} + {b}?")
        responses.append(f"{a} + {b} = {a + b}\n#### {a + b}")
        answers.append(str(a + b))
    return Examples(questions, responses, answers)


@pytest.fixture
def sft(tmp_path, monkeypatch, tiny_byte_decoder):
    """Registers the tiny-sum task; private data and approximation caches. Returns (tmp_path, model dir)."""
    source = tmp_path / "tiny-sum.txt"  # the data are generated: this file keys the cache
    source.write_text("tiny-sum v1")
    task = Task("tiny-sum", "generation", ("exact_match",), None, tuple(SIZES), source=lambda split, d=None: source,
                read=lambda split, d=None: sums(split), split_rule="tiny-sum v1", answer_format="gsm8k")
    monkeypatch.setitem(data.prepare.TASKS, "tiny-sum", task)
    monkeypatch.setattr(data.prepare, "DEFAULT_CACHE_DIR", tmp_path / "data-cache")
    monkeypatch.setenv("INILORA_CACHE", str(tmp_path / "approx-cache"))
    return tmp_path, tiny_byte_decoder


def args(sft, out, *extra):
    tmp_path, model_dir = sft
    return ["--model", str(model_dir), "--task", "tiny-sum", "--batch-size", "8", "--epochs", "1", "--rank", "2",
            "--lr", "1e-2", "--log-every", "1", "--max-length", "64", "--max-new-tokens", "12",
            "--approx-steps", "20", "--out", str(tmp_path / out), *extra]


def adapter(run, name="best"):
    return inilora.read_adapter(run / name / "adapter.safetensors")[0]


def lora_model(model_dir, init="lora", dropout=0.0):
    model, tokenizer, model_id = load_causal_lm(str(model_dir))
    cfg = inilora.LoRAConfig(init=init, rank=2, targets=("q_proj", "v_proj"), dropout=dropout, approx_steps=20)
    inilora.inject(model, cfg, model_id)
    inilora.mark_trainable(model, cfg, verbose=False)
    with torch.no_grad():  # B0 = 0 for lora: move B so that A gets a gradient too
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.train(), tokenizer


def train_batch(model_dir, tokenizer, n=8):
    split = data.prepare.load_split("tiny-sum", "train", tokenizer, 64)
    return split, data.prepare.training_batch(TASK, split, list(range(n)), tokenizer.pad_id, "cpu")


# invariant: the SFT loss is sum over response tokens of -log p(x_t | x_<t), divided by their number
def test_loss_is_the_token_mean_over_response_tokens(sft):
    _, model_dir = sft
    model, tokenizer = lora_model(model_dir)
    split, batch = train_batch(model_dir, tokenizer)
    ids, mask, labels = batch
    loss = train.sft_loss(model, batch, units(batch))
    logp = torch.log_softmax(model(ids, mask).float(), dim=-1)  # (B, T, V)
    terms = []
    for b in range(len(ids)):
        types = split["token_type_ids"][b]  # 1 on the response and its EOS
        for t in range(1, len(types)):
            if types[t] == 1:
                terms.append(-logp[b, t - 1, ids[b, t]])
    assert len(terms) == units(batch) == data.prepare.loss_units(TASK, split, range(8))
    assert units(batch) == sum(int(t.sum()) for t in split["token_type_ids"][:8])  # no response at position 0
    assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)


def units(batch):
    """The response tokens a micro-batch predicts: labels past position 0 that are not IGNORE_INDEX."""
    return int((batch[-1][:, 1:] != IGNORE_INDEX).sum())


def full_logits_loss(model, batch, units):
    """The loss as train.sft_loss computed it before: (B, T, V) logits with the padding mask, shifted labels."""
    ids, mask, labels = batch
    logits = model(ids, mask)  # (B, T, V)
    logits, targets = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()  # t - 1 predicts token t
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / units


# invariant: lm_head on the response positions only, without the mask of a right-padded batch, gives the
# loss and gradients of the full (B, T, V) logits with the mask; a left-padded batch (mask kept) too
@pytest.mark.parametrize("padding", ["right", "left"])
def test_response_only_loss_equals_the_full_logits_loss(sft, padding):
    _, model_dir = sft
    model, tokenizer = lora_model(model_dir)
    _, (ids, mask, labels) = train_batch(model_dir, tokenizer)
    assert not mask.bool().all()  # the batch is padded
    if padding == "left":  # each row rolled right by its padding: the same examples, left-padded
        shift = (mask == 0).sum(1)
        ids, mask, labels = (torch.stack([r.roll(int(k)) for r, k in zip(x, shift)]) for x in (ids, mask, labels))
    batch = ids, mask, labels
    losses, grads = [], []
    for loss_fn in (full_logits_loss, train.sft_loss):
        model.zero_grad()
        loss = loss_fn(model, batch, units(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# invariant: --grad-accum N micro-batches of B equal one batch of N*B (loss normalised over the whole step)
def test_grad_accumulation_equals_one_big_batch(sft):
    tmp_path, _ = sft
    big = train.main(args(sft, "big", "--eval-limit", "1"))  # batch 8
    accum = train.main(args(sft, "accum", "--batch-size", "4", "--grad-accum", "2", "--eval-limit", "1"))
    assert big["step"] == accum["step"] == 2  # 16 examples, 8 a step
    a, b = adapter(tmp_path / "big", "checkpoint-2"), adapter(tmp_path / "accum", "checkpoint-2")
    for key in a:
        assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    logged = [[json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in l] for run in ("big", "accum")]
    assert_close(torch.tensor(logged[0]), torch.tensor(logged[1]), atol=1e-6, rtol=1e-5)


# invariant: a decoder run interrupted by SIGINT and resumed ends bit-identical to the uninterrupted one
def test_resume_after_an_interruption_equals_the_uninterrupted_run(sft, monkeypatch):
    tmp_path, _ = sft
    common = ("--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--init", "alpha", "--lora-dropout", "0.1")
    full = train.main(args(sft, "full", *common))
    real, calls = train.token_loss, {"n": 0}

    def interrupted(logits, labels):  # Ctrl-C during the micro-batches of step 3 (epoch 2)
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return real(logits, labels)

    monkeypatch.setattr(train, "token_loss", interrupted)
    stopped = train.main(args(sft, "resumed", *common))
    assert (stopped["step"], stopped["signal"]) == (3, signal.SIGINT)
    monkeypatch.setattr(train, "token_loss", real)
    assert train.main(["--resume", "--out", str(tmp_path / "resumed")]) == full
    a, b = adapter(tmp_path / "full", "checkpoint-4"), adapter(tmp_path / "resumed", "checkpoint-4")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    logs = [(tmp_path / run / "metrics.jsonl").read_text() for run in ("full", "resumed")]
    assert logs[0] == logs[1] and logs[0].count('"exact_match"') == 2


# invariant: every initialiser trains on a decoder; only A and B change (the LM head and W0 stay frozen)
@pytest.mark.parametrize("init", sorted(inilora.INITIALISERS))
def test_every_initialiser_trains_a_step_on_a_decoder(init, sft):
    tmp_path, model_dir = sft
    state = train.main(args(sft, f"run-{init}", "--init", init, "--batch-size", "16", "--eval-limit", "2"))
    run = tmp_path / f"run-{init}"
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert state["step"] == 1 and torch.isfinite(torch.tensor(record["loss"]))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["dev_subset"] == "dev subset 2 of 8"
    trained, meta = inilora.read_adapter(run / "best" / "adapter.safetensors")
    assert all(k.rsplit(".", 1)[-1] in ("A", "B", "A0", "B0") and ("q_proj" in k or "v_proj" in k) for k in trained)
    model, _, _ = load_causal_lm(str(model_dir))
    A_B = sum(p.numel() for k, p in trained.items() if k.endswith((".A", ".B")))
    assert meta["trainable_params"] == A_B and meta["config"]["targets"] == ["q_proj", "v_proj"]
    assert any(not torch.equal(trained[f"{k[:-2]}.{x}0"], trained[k])  # A or B moved from its start
               for k in trained for x in ("A", "B") if k.endswith(f".{x}"))


# invariant: gradient checkpointing recomputes the same activations, so the gradients are the same
def test_gradient_checkpointing_gives_the_same_gradients(sft):
    _, model_dir = sft
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = lora_model(model_dir, dropout=0.1)
        if checkpointing:
            model.gradient_checkpointing = True  # what train.py sets for --grad-checkpointing
        _, batch = train_batch(model_dir, tokenizer)
        torch.manual_seed(0)  # the same dropout draws
        train.sft_loss(model, batch, units(batch)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8  # A, B of q_proj, v_proj in 2 layers
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-6, msg=name)


# invariant: --dtype bfloat16 (autocast, float32 weights) trains a decoder on the CPU to a finite loss
def test_bfloat16_autocast_trains_on_the_cpu(sft):
    tmp_path, _ = sft
    state = train.main(args(sft, "bf16", "--dtype", "bfloat16", "--grad-checkpointing", "--eval-limit", "2"))
    losses = [json.loads(l)["loss"] for l in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert state["step"] == 2 and all(torch.isfinite(torch.tensor(losses)))


def fake_generate(model, prompts, max_new_tokens, eos_ids, pad_id, stop=None, **sampling):
    """Row b of the batch answers its own sum right when b is even, and 0 (wrong) when it is odd."""
    tokenizer = FAKE["tokenizer"]
    out = []
    for prompt in prompts:
        text = tokenizer.decode(prompt)
        a, b = (int(x) for x in text.split("What is ")[1].split("?")[0].split(" + "))
        answer = a + b if len(out) % 2 == 0 else 0
        out.append(tokenizer.encode([f"{a} + {b} = {answer}\n#### {answer}\n"], add_special_tokens=False)[0])
    return out


FAKE = {}


# invariant: the predictions JSONL holds one record per example, and exact match is the share of correct ones
def test_evaluation_writes_predictions_and_counts_exact_matches(sft, monkeypatch, capsys):
    tmp_path, model_dir = sft
    train.main(args(sft, "run", "--eval-limit", "2"))
    run = tmp_path / "run"
    metrics = evaluate.main([str(run), "--split", "test", "--batch-size", "3", "--max-new-tokens", "12"])
    records = [json.loads(l) for l in (run / "predictions-best-test.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r.keys() == {"question", "generation", "extracted", "gold", "correct"}
                                     for r in records)
    assert metrics["exact_match"] == sum(r["correct"] for r in records) / 8
    assert [r["question"] for r in records] == sums("test").texts and [r["gold"] for r in records] == sums("test").labels
    assert json.loads((run / "eval-best-test.json").read_text())["metrics"] == metrics
    # with known generations: rows 0, 2, 4, 6 right, so 4 of 8
    FAKE["tokenizer"] = load_causal_lm(str(model_dir))[1]
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    out = tmp_path / "base"
    metrics = evaluate.main(["--base", "--model", str(model_dir), "--task", "tiny-sum", "--split", "test",
                             "--out", str(out), "--batch-size", "2"])  # even rows of each batch are even rows
    records = [json.loads(l) for l in (out / "predictions-base-test.jsonl").read_text().splitlines()]
    assert metrics["exact_match"] == 0.5 and [r["correct"] for r in records] == [True, False, True, False, True, False,
                                                                                 True, False]
    assert records[1]["extracted"] == "0" and records[0]["extracted"] == records[0]["gold"]


# invariant: --limit N scores exactly the first N examples, whatever the batch size (a batch size that does not
# divide N once scored the whole last batch: 8 examples at --limit 5 and --batch-size 4)
# and says so on screen, with the count scored beside the score
def test_limit_scores_exactly_the_first_n_examples_at_any_batch_size(sft, monkeypatch, capsys):
    tmp_path, model_dir = sft
    FAKE["tokenizer"] = load_causal_lm(str(model_dir))[1]
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    for batch_size in (1, 2, 3, 4, 8):
        out = tmp_path / f"base-{batch_size}"
        evaluate.main(["--base", "--model", str(model_dir), "--task", "tiny-sum", "--split", "test", "--out", str(out),
                       "--batch-size", str(batch_size), "--limit", "5"])
        records = [json.loads(l) for l in (out / "predictions-base-test.jsonl").read_text().splitlines()]
        assert [r["question"] for r in records] == sums("test").texts[:5], batch_size
        shown = capsys.readouterr().out
        assert f"--limit 5: scoring the first 5 of the {len(sums('test').texts)} examples" in shown
        assert "tiny-sum/test (5 examples): exact_match" in shown


# invariant: --compare reads decoder runs: their best epoch's dev exact match, x100
def test_compare_reads_decoder_runs(sft):
    tmp_path, _ = sft
    for seed in (0, 1):
        train.main(args(sft, f"run-{seed}", "--seed", str(seed), "--eval-limit", "4"))
    task, rows, skipped, _ = evaluate.compare([tmp_path / "run-0", tmp_path / "run-1"])
    assert task.name == "tiny-sum" and not skipped and rows[0]["seeds"] == 2
    best = [json.loads((tmp_path / f"run-{s}" / "final.json").read_text())["best"]["score"] for s in (0, 1)]
    assert_close(rows[0]["exact_match"][0], 100 * sum(best) / 2)


def test_answer_line_ends_generation():
    # a '####' line ends the generation once its newline arrives; MetaMathQA's closing line likewise
    assert not evaluate.answer_line_done("3 + 4 = 7\n#### 7", "gsm8k")
    assert evaluate.answer_line_done("3 + 4 = 7\n#### 7\n", "gsm8k")
    assert not evaluate.answer_line_done("x #### 7\n", "gsm8k")
    assert evaluate.answer_line_done("so\nThe answer is: 5\n", "math")


def test_preset_and_cosine_schedule():
    args_ = train.parse(["--preset", "paper-llm", "--lr", "1e-3", "--task", "arithmetic"])
    cfg, lcfg = train.configs_from_args(args_)
    # the flag given beside the preset wins; the rest is the paper's LLM protocol
    assert (cfg.lr, cfg.schedule, cfg.warmup_ratio, cfg.epochs, cfg.batch_size * cfg.grad_accum) == (1e-3, "cosine", 0.03, 3, 64)
    assert (cfg.max_length, cfg.seed, lcfg.lora_alpha, lcfg.scale, lcfg.dropout) == (512, 11, None, 1.0, 0.0)
    assert (cfg.model, lcfg.targets) == ("smollm2", ("q_proj", "v_proj"))
    # cosine: lr at the end of warmup, lr / 2 halfway through the decay, 0 at the end
    cfg = train.TrainConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine")
    assert [train.lr_at(t, 100, cfg) for t in (5, 10, 55, 100)] == [0.5, 1.0, pytest.approx(0.5), 0.0]


def test_a_split_whose_responses_were_all_truncated_is_a_sentence(sft):
    tmp_path, _ = sft
    with pytest.raises(ValueError, match=r"--max-length 20 leaves no response token.*raise --max-length"):
        train.main(args(sft, "short") + ["--max-length", "20"])
    assert not (tmp_path / "short").exists()


# invariant: a generation adapter is scored on another generation task with --task (the paper trains on
# MetaMathQA and tests on GSM8K): its files are named after that task; a non-generation task is a sentence
def test_an_adapter_is_scored_on_another_generation_task(sft, monkeypatch):
    tmp_path, _ = sft
    train.main(args(sft, "run", "--eval-limit", "2"))
    other = tmp_path / "other-sum.txt"
    other.write_text("other-sum v1")
    monkeypatch.setitem(data.prepare.TASKS, "other-sum", Task(
        "other-sum", "generation", ("exact_match",), None, ("train", "test"), source=lambda split, d=None: other,
        read=lambda split, d=None: sums(split), split_rule="other-sum v1", answer_format="gsm8k"))
    metrics = evaluate.main([str(tmp_path / "run"), "--task", "other-sum", "--split", "test", "--max-new-tokens", "12"])
    records = (tmp_path / "run" / "predictions-best-other-sum-test.jsonl").read_text().splitlines()
    assert len(records) == SIZES["test"] and 0 <= metrics["exact_match"] <= 1
    assert json.loads((tmp_path / "run" / "eval-best-other-sum-test.json").read_text())["task"] == "other-sum"
    with pytest.raises(ValueError, match="'rotten-tomatoes'.*one of .*other-sum.*Leave --task out"):
        evaluate.main([str(tmp_path / "run"), "--task", "rotten-tomatoes", "--split", "test"])


# a run is scored on test as its dev scores were: its own --max-new-tokens unless the command gives one
def test_evaluation_generates_as_many_tokens_as_the_run_did_on_dev(sft, monkeypatch):
    tmp_path, _ = sft
    train.main(args(sft, "run", "--eval-limit", "2", "--max-new-tokens", "5"))
    seen, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda model, prompts, n, *a, **k: seen.append(n) or
                        real(model, prompts, n, *a, **k))
    evaluate.main([str(tmp_path / "run"), "--split", "test"])
    evaluate.main([str(tmp_path / "run"), "--split", "test", "--max-new-tokens", "7"])
    assert set(seen[:1]) == {5} and seen[-1] == 7  # the run's 5 (not 256), then the command's 7
