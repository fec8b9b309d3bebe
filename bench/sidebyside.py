"""What the side-by-side benchmarks share: the transformers + peft reference encoder, and interleaved timing.

The reference is what a user would pick instead of this project: transformers' BertForSequenceClassification
(or RoBERTa's) on the same checkpoint, with peft's LoRA of the same rank on the same targets (lora_alpha = r,
no dropout) and the head trained (peft's modules_to_save), or every weight trained for --init full.
transformers and peft are test-only requirements (requirements-test.txt): a benchmark that needs them says so.
"""
import statistics
import time

import torch

from models.checkpoint import resolve_model


def require_references():
    """(transformers, peft), or an error that says how to install them."""
    try:
        import peft
        import transformers
    except ImportError as e:
        raise ImportError(f"this benchmark times transformers + peft beside this project, and {e.name!r} is not "
                          "installed: pip install -r requirements-test.txt") from None
    return transformers, peft


def reference_encoder(model_name, num_labels, init, rank, targets, device):
    """transformers' *ForSequenceClassification on `model_name` with peft LoRA (or all weights for 'full')."""
    transformers, peft = require_references()
    path, _ = resolve_model(model_name)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    if init != "full":
        head = ["pooler"] if ref.config.model_type == "bert" else []  # the classifier: task_type SEQ_CLS adds it
        ref = peft.get_peft_model(ref, peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                       target_modules=list(targets), modules_to_save=head))
    return ref.to(device)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def interleaved(fns, repeats, warmup=1, device=None):
    """{name: median seconds} of each fn(), run in alternation (warmup untimed rounds first), so that drifts
    in the machine's load hit them alike; `device` cuda: synchronised before each clock reading."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
