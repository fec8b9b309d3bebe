"""Memory before you start: what a training run will hold, from the model's config.json alone.

The model is built on the meta device (no weight is read or downloaded), the adapters are put on it as
inilora.inject would, and every term is counted from that model (trainable = what mark_trainable marks):

    parameters  = sum over tensors numel * itemsize    frozen weights and R in --dtype; A, B, the head and the
                                                       A0, B0 buffers in float32 (inilora.LoRALinear, train.py)
    gradients   = 4 * trainable                        float32, trainable parameters only
    optimizer   = 2 * 4 * trainable                    AdamW's exp_avg and exp_avg_sq (its `step` is a scalar)
    activations = the most bytes of tensors alive at once in one forward + loss + backward of a B x T
                  micro-batch beyond weights and gradients (what autograd saves, temporaries, gradients of
                  activations), counted by running the real model on fake tensors: shapes only, no memory
    checkpointed  (decoders, --grad-checkpointing) the same with models/decoder.py recomputing each block: L block
                  inputs (B, T, C) kept, one block's activations at a time in backward
The fake run takes the CPU code paths: for CUDA, SDPA's CPU flash kernel saves what the CUDA one does, while
an encoder's written-out CPU attention (dropout on the probabilities) counts more than CUDA's fused kernel.

    CUDA peak (torch.cuda.max_memory_allocated) = parameters + gradients + optimizer + activations
    CPU tensor peak (TensorPeak below)           = the same sum
    CPU peak  (the process's ru_maxrss)         = runtime + data + mapped + parameters
                                                  + max(loading, gradients + optimizer + activations)

On the CPU `runtime` is this very process's resident set (Python, torch, the project's modules, torch's
meta-device machinery; resource.getrusage at the estimate), `data` what the tokenizer and prepared splits
hold once loaded (the growth of the resident set while this process loads them), `mapped` a GGUF file's
pages (its reader maps the file for the whole run), and `loading` what reading the checkpoint holds beside
the model for a moment: an encoder's state dict, or one float32 GGUF tensor dequantised, then copied.
glibc's malloc raises its mmap threshold (up to 32 MiB) after the first large free, so freed activations
then stay in its heap, cut up by batches of other lengths: a whole CPU run's ru_maxrss exceeded these totals
by 40-140% (MiniLM, SmolLM2) while its tensor peak (TensorPeak below) matched the tensor terms within 3%; with
the threshold fixed (MALLOC_MMAP_THRESHOLD_=65536: each large block mapped, and returned when freed) ru_maxrss
matched the total within 6%, at the price of fresh pages for every activation (a MiniLM epoch: 1.7x as long).

    python -m tools.memory --model smollm2 --task arithmetic --batch-size 8 --max-length 128 --init lora --rank 8
    python -m tools.memory --model path/to/Llama-2-7b/config.json --batch-size 1 --max-length 512 --dtype bfloat16
"""
import argparse
import contextlib
import copy
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from data.prepare import TASKS, load_split
from inilora import LoRAConfig, LoRALinear, init_names, mark_trainable
from lib.common import TRAIN_DTYPES, parse_dtype, run_cli
from lib.runs import peak_resident
from models import DEFAULT_TARGETS, decoder, encoder, parse_targets, target_linears
from models.checkpoint import HUB_ID, PACKAGED, hub_unreachable, read_json, resolve_model
from models.gguf_file import gguf_config, open_gguf
from models.tokenizer import ChatTokenizer, Tokenizer

# Shapes in comments: B batch, T tokens, C hidden size, V vocabulary, N loss tokens, L layers.

MiB, GiB = 2**20, 2**30
FLOAT32 = 4  # bytes: gradients and AdamW's moments are float32 whatever --dtype is

# -----------------------------------------------------------------------------
# the configuration: a packaged name, a config.json, a directory holding one, or a Hub id (config.json only)


def read_config(name: str) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) without reading any weight."""
    path = Path(name).expanduser()
    if name in PACKAGED:
        where, _ = resolve_model(name)
        if where.suffix == ".gguf":  # the packaged SmolLM2: its metadata, as decoder.load_causal_lm reads it
            reader, meta = open_gguf(where)
            return gguf_config(reader, meta, str(where)), str(where)
        return read_json(where / "config.json"), str(where / "config.json")
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        if path.suffix == ".gguf":
            reader, meta = open_gguf(path)
            return gguf_config(reader, meta, str(path)), str(path)
        return read_json(path), str(path)
    if path.exists() or not HUB_ID.fullmatch(name):  # as checkpoint.resolve_model: no network for a bad path
        resolve_model(name)  # raises the sentence train.py's loading would
    path = Path(hub_config(name))
    return read_json(path), str(path)


def hub_config(repo_id: str) -> str:
    """The local path of a Hub model's config.json: that one file is fetched, never the weights."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "config.json", local_files_only=True)  # the cache first: works offline
    except Exception:  # not in the cache
        pass
    try:
        if why := hub_unreachable():  # at once, rather than after huggingface_hub's retries
            raise ConnectionError(why)
        return hf_hub_download(repo_id, "config.json")
    except Exception as e:  # offline, unknown repo, gated model: all end in the same remedy
        raise OSError(f"could not fetch config.json of {repo_id!r} from the Hugging Face Hub ({type(e).__name__}). "
                      "Pass a local config.json instead: --model path/to/config.json (or its directory).") from None


def model_kind(raw: dict, source: str) -> str:
    kind = raw.get("model_type")
    if kind in decoder.FAMILIES:
        return "decoder"
    if kind in encoder.SUPPORTED_ARCHS:
        return "encoder"
    raise ValueError(f"{source!r} has model_type={kind!r}; the estimate knows the decoders {sorted(decoder.FAMILIES)} "
                     f"and the encoders {list(encoder.SUPPORTED_ARCHS)}. Pass a config.json of one of those.")


def meta_model(raw: dict, source: str, num_labels: int = 2) -> nn.Module:
    """The model of a config.json on the meta device: shapes and dtypes, no storage."""
    if model_kind(raw, source) == "decoder":
        config = decoder.config_from_json(raw, source)
        with torch.device("meta"):
            return decoder.DecoderLM(config)
    path = Path(source)  # model.load_config reads a directory's config.json
    config = encoder.load_config(path.parent if path.name == "config.json" else path)
    config.num_labels = num_labels
    with torch.device("meta"):
        return encoder.SequenceClassifier(config)


def add_adapters(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype) -> nn.Module:
    """What inilora.inject + mark_trainable make of `model`, on the meta device: each target nn.Linear
    W0 (d_out, d_in) becomes R (d_out, d_in) frozen, A (r, d_in) and B (d_out, r) trained, A0, B0 buffers."""
    model = model.to(dtype)
    if not cfg.full_finetuning:
        for name, linear in target_linears(model, cfg.targets).items():
            d_out, d_in = linear.weight.shape
            A0 = torch.empty(cfg.rank, d_in, device="meta")  # (r, d_in)
            B0 = torch.empty(d_out, cfg.rank, device="meta")  # (d_out, r)
            model.set_submodule(name, LoRALinear(linear.weight, linear.bias, A0, B0, cfg.scale, cfg.dropout))
    mark_trainable(model, cfg, verbose=False)
    for p in model.parameters():  # what trains is float32 whatever --dtype is (train.build)
        if p.requires_grad:
            p.data = p.data.float()
    return model


# -----------------------------------------------------------------------------
# activations: what autograd saves, counted on fake tensors


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors every op creates while they live (fake tensors: no memory is taken),
    and their peak: the allocator's view of forward + backward, temporaries and gradients included.
    Storages in `ignore` (the weights) and views of a storage already counted are not counted again."""
    def __init__(self, ignore):
        super().__init__()
        self.live, self.ignore, self.now, self.peak = {}, ignore, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = StorageWeakRef(t.untyped_storage())
                if key not in self.live and key not in self.ignore:
                    self.live[key] = t.untyped_storage().nbytes()
                    self.now += self.live[key]
        if self.now > self.peak:  # `now` still counts what was freed since the last look: drop that first
            for key in [k for k in self.live if k.expired()]:
                self.now -= self.live.pop(key)
            self.peak = max(self.peak, self.now)
        return out


def activations(model: nn.Module, B: int, T: int, loss_tokens: int, autocast: torch.dtype | None,
                checkpointing: bool = False) -> dict:
    """Bytes of one training forward + loss + backward of a B x T batch, the model run on fake CPU tensors
    (real code paths, shapes only, no memory, no compute):
        saved      what autograd saves for backward (tensors sharing a storage count once; parameters and
                   buffers, which F.linear and friends save, are not activations)
        per_block  `saved` inside each block
        peak       the most bytes of tensors alive at once in forward + backward beyond the weights
                   (saved tensors, temporaries, gradients of activations and parameters)
    `loss_tokens` N: the decoder's lm_head and cross-entropy see N positions (train.sft_loss).
    checkpointing: models/decoder.py recomputes each block in backward (saved then holds block inputs only)."""
    model = copy.deepcopy(model)  # still on the meta device
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu").train()  # fake storage: nothing allocated
        if isinstance(model, decoder.DecoderLM):
            model.tie_weights()
            model.gradient_checkpointing = checkpointing
        weights = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
        blocks = model.layers if isinstance(model, decoder.DecoderLM) else model.encoder.layers
        saved, where, current = {}, {}, [None]
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
            block.register_forward_hook(lambda m, a, out: current.__setitem__(0, None))

        def pack(t):
            key = StorageWeakRef(t.untyped_storage())
            if key not in weights and key not in saved:
                saved[key], where[key] = t.untyped_storage().nbytes(), current[0]
            return t

        ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
        with LiveBytes(weights) as tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            if isinstance(model, decoder.DecoderLM):
                h = model.hidden_states(ids)  # (B, T, C)
                C = h.shape[-1]
                logits = model.lm_head(h[:, :-1].reshape(-1, C)[:loss_tokens])  # (N, C) -> (N, V)
                loss = F.cross_entropy(logits.float(), torch.zeros(logits.shape[0], dtype=torch.long))
            else:
                mask = torch.ones(B, T, dtype=torch.long)  # padding present: the masked path
                logits = model(ids, mask, torch.zeros_like(ids))  # (B, K)
                loss = F.cross_entropy(logits.float(), torch.zeros(B, dtype=torch.long))
            h = logits = None  # as in train.py: only the graph keeps them
            loss.backward()
    per_block = [sum(n for k, n in saved.items() if where[k] == i) for i in range(len(blocks))]
    return {"saved": sum(saved.values()), "per_block": per_block, "peak": tracker.peak}


# -----------------------------------------------------------------------------
# the estimate


@dataclass
class Estimate:
    """Bytes of each term of a training run's peak memory (see the module docstring)."""
    model: str
    source: str
    kind: str  # "encoder" or "decoder"
    batch: tuple  # (B, T, N loss tokens)
    device_type: str
    total_params: int
    trainable_params: int
    parameters: dict  # dtype name -> bytes of parameters and buffers
    gradients: int
    optimizer: int
    activations: int  # the peak of live tensors in forward + backward (saved ones, temporaries, gradients)
    saved: int  # of which autograd saved for backward at the end of the forward
    activations_checkpointed: int | None  # decoders only
    runtime: int = 0  # CPU: this process's resident set
    loading: int = 0  # CPU: held beside the model while its checkpoint is read
    data: int = 0  # CPU: the tokenizer and the prepared splits in memory
    mapped: int = 0  # CPU: checkpoint file pages mapped for the whole run (a GGUF file)
    loading_what: str = ""

    def training(self, checkpointing: bool = False) -> int:
        """Gradients + optimizer + activations: what a training step adds to the weights."""
        acts = self.activations_checkpointed if checkpointing and self.activations_checkpointed else self.activations
        return self.gradients + self.optimizer + acts

    def tensors(self, checkpointing: bool = False) -> int:
        """The peak of tensor memory: the CUDA total; on the CPU what TensorPeak below measures."""
        return sum(self.parameters.values()) + self.training(checkpointing)

    def total(self, checkpointing: bool = False) -> int:
        if self.device_type == "cuda":
            return self.tensors(checkpointing)
        resident = self.runtime + self.data + self.mapped + sum(self.parameters.values())
        return resident + max(self.loading, self.training(checkpointing))


def loading_bytes(raw: dict, source: str, model: nn.Module) -> tuple[int, int, str]:
    """(bytes held beside the model while its checkpoint is read, bytes of checkpoint file kept mapped for the
    whole run, what they are) on the CPU."""
    path = Path(source)
    if path.suffix == ".gguf":  # the largest tensor dequantised, then copied (float32); the reader keeps the map
        largest = max(p.numel() for p in model.parameters())
        return 2 * FLOAT32 * largest, path.stat().st_size, "the largest GGUF tensor dequantised, then copied"
    if model_kind(raw, source) == "encoder":  # encoder.load_model reads the whole state dict first
        files = [*path.parent.glob("*.safetensors"), *path.parent.glob("pytorch_model.bin")]
        size = sum(f.stat().st_size for f in files) or sum(p.numel() * p.element_size() for p in model.parameters())
        return size, 0, "the checkpoint's state dict, read whole"
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # safetensors: one tensor at a time
    return largest, 0, "the largest checkpoint tensor, read one at a time"


def estimate(model_name: str, init: str = "lora", rank: int = 8, targets=None, batch_size: int = 8,
             max_length: int = 128, dtype: str = "float32", device_type: str = "cpu", loss_tokens: int | None = None,
             data_bytes: int = 0, num_labels: int = 2, runtime: int | None = None) -> Estimate:
    """The memory of training `model_name` on micro-batches of batch_size x max_length tokens (max_length: the
    longest batch), `loss_tokens` of them predicted per micro-batch (decoders; None: all B (T - 1)).
    runtime: the CPU runtime term in bytes; None: runtime_now()."""
    if device_type not in ("cpu", "cuda", "mps"):  # mps: runs.peak_memory measures the resident set, as on the CPU
        raise ValueError(f"device_type={device_type!r} is not 'cpu', 'cuda' or 'mps'; pass e.g. --device cpu.")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size={batch_size}, max_length={max_length}: expected at least 1 and 2.")
    runtime = runtime_now() if runtime is None else runtime  # before a GGUF's metadata is read
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(TRAIN_DTYPES)}, the dtypes train.py trains in; "
                         "pass --dtype float32 or bfloat16.")
    torch_dtype = parse_dtype(dtype)
    raw, source = read_config(model_name)
    kind = model_kind(raw, source)
    default_targets = DEFAULT_TARGETS[kind]
    cfg = LoRAConfig(init=init, rank=rank, targets=tuple(targets or default_targets)).validate()
    model = add_adapters(meta_model(raw, source, num_labels), cfg, torch_dtype)
    parameters = {}  # dtype name -> bytes, a tied matrix once
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        parameters[str(t.dtype)[6:]] = parameters.get(str(t.dtype)[6:], 0) + t.numel() * t.element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    B, T = batch_size, max_length
    N = B if kind == "encoder" else B * (T - 1) if loss_tokens is None else min(loss_tokens, B * (T - 1))
    autocast = torch_dtype if torch_dtype != torch.float32 else None
    loading, mapped, loading_what = loading_bytes(raw, source, model)
    acts = activations(model, B, T, N, autocast)
    checkpointed = activations(model, B, T, N, autocast, checkpointing=True) if kind == "decoder" else None
    gradients = FLOAT32 * trainable  # alive at the end of backward, so inside the peaks: counted once, here
    e = Estimate(model_name, source, kind, (B, T, N), device_type, total_params, trainable, parameters,
                 gradients=gradients, optimizer=2 * FLOAT32 * trainable, activations=acts["peak"] - gradients,
                 saved=acts["saved"], activations_checkpointed=checkpointed and checkpointed["peak"] - gradients)
    if device_type != "cuda":
        e.runtime, e.loading, e.mapped, e.data, e.loading_what = runtime, loading, mapped, data_bytes, loading_what
    return e


def runtime_now() -> int:
    """The runtime term: this process's resident set once torch's meta-device machinery is loaded (the run
    builds its model on the meta device too; the first nn.Embedding there loads ~70 MB of it)."""
    with torch.device("meta"):
        nn.Embedding(2, 2), nn.LayerNorm(2), nn.Linear(2, 2)
    return peak_resident()


def resident_now() -> int:
    """Bytes: this process's resident set now (Linux: /proc/self/statm; elsewhere the peak so far)."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * resource.getpagesize() if statm.exists() else peak_resident()


# -----------------------------------------------------------------------------
# the printout


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def estimate_lines(e: Estimate) -> list[str]:
    """The estimate as printable lines, one per term, with and without gradient checkpointing."""
    B, T, N = e.batch
    params = ", ".join(f"{size(n)} {name}" for name, n in sorted(e.parameters.items()))
    acts = f"B={B} x T={T} tokens" + (f", lm_head + cross-entropy on N={N} tokens" if e.kind == "decoder" else "")
    lines = [f"memory estimate for {e.model} ({e.kind}, {e.source}) on {e.device_type}",
             f"  parameters       {e.total_params:,} ({e.trainable_params:,} trainable, "
             f"{100 * e.trainable_params / e.total_params:.3f}%)",
             f"  weights          {params} (parameters and buffers)",
             f"  gradients        {size(e.gradients)} (float32, trainable only)",
             f"  optimizer        {size(e.optimizer)} (AdamW exp_avg + exp_avg_sq, float32)",
             f"  activations      {size(e.activations)} (the most alive at once in forward + backward, {acts}; "
             f"{size(e.saved)} of it saved for backward)"]
    if e.activations_checkpointed is not None:
        lines.append(f"    checkpointed   {size(e.activations_checkpointed)} (--grad-checkpointing: block inputs + "
                     "one block recomputed at a time)")
    if e.device_type != "cuda":
        lines += [f"  runtime          {size(e.runtime)} (this process's resident set: Python, torch, modules, a "
                  "meta-device build; measured by resource.getrusage now)",
                  f"  loading          {size(e.loading)} ({e.loading_what}; "
                  "the peak counts it or training, whichever is larger)",
                  *([f"  mapped           {size(e.mapped)} (the GGUF file's pages, mapped while its reader lives)"]
                    if e.mapped else []),
                  f"  data             {size(e.data)} (tokenizer and prepared splits: what this process's "
                  "resident set grew by, loading them)" if e.data else
                  "  data             not sized (pass --task with a model whose tokenizer is local)"]
    measure = "peak resident set, ru_maxrss" if e.device_type != "cuda" else "torch.cuda.max_memory_allocated"
    lines.append(f"  total            {size(e.total())} ({measure})")
    if e.device_type != "cuda":
        lines += [f"  tensors          {size(e.tensors())} (weights + gradients + optimizer + activations: the peak "
                  "of tensor memory, measured in the step of the longest example by TensorPeak below)",
                  "  (glibc's malloc keeps freed activations for reuse: a whole run's ru_maxrss has measured 1.4-2.4x "
                  "the total, unless its mmap threshold is fixed, e.g. MALLOC_MMAP_THRESHOLD_=65536)"]
    if e.activations_checkpointed is not None:
        lines.append(f"  total, --grad-checkpointing  {size(e.total(True))}")
    return lines


# -----------------------------------------------------------------------------
# the data: the longest batch and the most loss tokens, from the prepared split (data.prepare's cache)


def local_tokenizer(model_name: str):
    """The tokenizer of a packaged name or a local model directory / .gguf, else None (a bare config.json or a
    Hub id: the data then cannot be sized without downloading more)."""
    path = Path(model_name).expanduser()
    if model_name in PACKAGED:
        path, _ = resolve_model(model_name)
    if path.suffix == ".gguf" and path.is_file():
        reader, meta = open_gguf(path)
        return ChatTokenizer.from_gguf(reader, meta, path)
    if not (path / "tokenizer.json").is_file():
        return None
    if read_json(path / "config.json").get("model_type") in decoder.FAMILIES:
        return ChatTokenizer.from_dir(path)
    return Tokenizer(path / "tokenizer.json")


def data_shape(model_name: str, task: str, batch_size: int, max_length: int, data_dir=None):
    """(T, N) of the task's prepared data: T the longest training sequence (the longest batch pads to it),
    N the most loss tokens one micro-batch can hold (the batch_size largest counts; a generation task's
    response tokens). None if it cannot be sized (no local tokenizer, or no training sequence)."""
    tokenizer = local_tokenizer(model_name)
    if tokenizer is None:
        return None
    splits = [load_split(task, s, tokenizer, max_length, data_dir) for s in ("train", "dev") if s in TASKS[task].splits]
    train = splits[0]
    if not train["input_ids"]:  # nothing to train on (every response truncated away): train.py says so
        return None
    T = max(len(ids) for ids in train["input_ids"])
    if TASKS[task].generates:  # token_type_ids 1 = a loss token; position 0 predicts nothing
        counts = sorted((int(types[1:].sum()) for types in train["token_type_ids"]), reverse=True)
        N = sum(counts[:batch_size])
    else:
        N = batch_size
    return T, N


def dry_run_lines(*args, **kwargs) -> list[str]:
    """What train.py --dry-run prints (dry_run's lines)."""
    return dry_run(*args, **kwargs)[0]


def dry_run(model_name: str, task: str | None, init: str = "lora", rank: int = 8, targets=None,
            batch_size: int = 8, max_length: int = 128, dtype: str = "float32",
            grad_checkpointing: bool = False, device_type: str = "cpu", data_dir=None,
            runtime: int | None = None) -> tuple[list[str], int, int]:
    """(lines, this run's estimated peak, the peak of its tensors alone; bytes): the estimate for these flags,
    the data sized when the task is given and the model's tokenizer is local (else the batch is B x max_length
    tokens, all of them loss tokens). runtime: bytes, runtime_now() as a run measured it at its start (at its
    end it holds more)."""
    runtime, before = runtime or runtime_now(), resident_now()  # before the data is read
    T, N, nbytes, num_labels = max_length, None, 0, 2
    sized = "batches of --max-length tokens, every position a loss token (an upper bound)"
    if task is not None:

        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}; pass one of those, or leave --task out.")
        num_labels = TASKS[task].num_labels  # an encoder's head (a decoder has none)
        if shape := data_shape(model_name, task, batch_size, max_length, data_dir):
            T, N = shape
            nbytes = resident_now() - before  # what the tokenizer and the splits hold (their transients are gone)
            sized = f"the prepared {task} data: longest sequence {T} tokens, at most {N} loss tokens a micro-batch"
    e = estimate(model_name, init, rank, targets, batch_size, T, dtype, device_type, N, nbytes, num_labels, runtime)
    how = "with" if grad_checkpointing and e.activations_checkpointed else "without"
    total = e.total(grad_checkpointing)
    lines = estimate_lines(e) + [f"  sized from {sized}", f"  this run: {size(total)} ({how} gradient checkpointing)"]
    return lines, total, e.tensors(grad_checkpointing)


# -----------------------------------------------------------------------------
# measuring on the CPU what the estimate counts (tests/test_memory.py checks the estimate against it)


class TensorPeak:
    """The CPU's counterpart of torch.cuda.max_memory_allocated, measured over the training step that holds
    `example` (tests/test_memory.py passes the longest: the step the estimate sizes):

        peak = bytes of the model's parameters and buffers and the optimizer's state when the step starts
               + the most bytes of the tensors allocated during the step alive at once

    The second term comes from c10's CPU allocator itself: torch.profiler with profile_memory reports each
    allocation and each free of a block allocated while it records ("[memory]" events, +/- bytes), so their
    running sum is what the step holds beyond what it started with. It leaves out what glibc's malloc keeps
    after a free, which the resident set (peak_memory) includes. One step is recorded; the others run as
    usual. On CUDA peak_memory is already this measure; off the CPU nothing is recorded."""

    def __init__(self, example: int, device):
        self.example, self.on = example, device.type == "cpu"
        self.bytes = self.step = None  # once measured

    def watching(self, examples, model, opt, step):
        """A context for the step's work (its batches, forward, backward, optimizer step): records it when
        the step holds the example and nothing was measured yet, else does nothing."""
        if not self.on or self.bytes is not None or self.example not in examples:
            return contextlib.nullcontext()
        return self.record(model, opt, step)

    @contextlib.contextmanager
    def record(self, model, opt, step):
        from torch.profiler import ProfilerActivity, profile

        alive = [*model.parameters(), *model.buffers(),
                 *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
        start = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with quiet_stderr():  # kineto prints a line when recording starts and one when it stops
            prof.start()
        try:
            yield
        finally:
            with quiet_stderr():
                prof.stop()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        now = most = 0
        for _, nbytes in sorted(events, key=lambda e: e[0]):  # stable: same-instant events keep their order
            now += nbytes
            most = max(most, now)
        self.bytes, self.step = start + most, step


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 goes to /dev/null inside (what C++ libraries print there), back after."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm", help="minilm or smollm2 (packaged), a config.json, a directory "
                   "holding one, or a Hub id (its config.json alone is fetched)")
    p.add_argument("--task", default=None, help="size the batches from this task's prepared data (train.py's "
                   "--task); None: B x --max-length tokens, all of them loss tokens")
    p.add_argument("--data-dir", "--glue-dir", dest="data_dir", default=None, help="as train.py's --data-dir "
                   "(--glue-dir is its old name)")
    p.add_argument("--init", default="lora", help=f"one of {init_names()} (full: every weight trains)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--targets", default=None, help="comma-separated adapted layers; None: the family's "
                   f"({','.join(DEFAULT_TARGETS['encoder'])} or {','.join(DEFAULT_TARGETS['decoder'])})")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example at most")
    p.add_argument("--dtype", default="float32", help=f"one of {list(TRAIN_DTYPES)}: frozen weights in it, "
                   "adapters and optimizer state in float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="decoders: the run recomputes blocks")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="cpu, mps: peak resident set; cuda: "
                   "torch.cuda.max_memory_allocated")
    args = p.parse_args(argv)
    targets = parse_targets(args.targets) if args.targets else None
    print("\n".join(dry_run_lines(args.model, args.task, args.init, args.rank, targets, args.batch_size,
                                  args.max_length, args.dtype, args.grad_checkpointing, args.device, args.data_dir)))


if __name__ == "__main__":
    run_cli(main)
