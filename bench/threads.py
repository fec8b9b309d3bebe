"""Benchmark of CPU thread settings: what a busy neighbour costs the approximation, a training epoch and generation.

Each workload runs in a fresh child process (the OpenMP runtime reads OMP_WAIT_POLICY once, when torch is
imported), under each setting, on an idle machine and beside a busy neighbour: one Python process spinning on
every core, what a second test suite or training run looks like to the scheduler. Settings and conditions take
turns (interleaved), --repeats times, and the table gives the median seconds of the timed part (imports, loading
and one warm-up excluded) and each setting's time as a ratio to torch's default in the same condition.

  default     torch's own choice: one thread per core, OpenMP's default wait policy (threads spin before sleeping)
  1 thread    torch.set_num_threads(1)
  N passive   one thread per core, OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once)
  chosen      what the entry points take: lib.common.choose_threads, one thread per core other programs leave free

Workloads: `approx` 2000 steps of the stacked approximation (eq. 3) of MiniLM's 12 query/value matrices;
`epoch` 12 LoRA training steps of MiniLM on rotten-tomatoes, batch 16; `generate` SmolLM2 greedy generation
of 24 tokens for 4 chat prompts with the KV cache.

Run: python -m bench.threads --repeats 2          (about 10 minutes on 2 cores)
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"default": {}, "1 thread": {"threads": "1"}, "N passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "chosen": {"threads": "chosen"}}
WORKLOADS = ("approx", "epoch", "generate")


def child(workload, threads):
    """Runs one workload in this process and prints the seconds of its timed part."""
    import torch

    from lib.common import choose_threads
    if threads == "chosen":
        print(f"chose {choose_threads()}", file=sys.stderr)
    elif threads:
        torch.set_num_threads(int(threads))
    if workload == "approx":
        from approximate import ApproxConfig, approximate, target_weights
        _, weights, _ = target_weights("minilm")
        cfg = ApproxConfig(steps=2000, optimum=False, device="cpu")
        approximate(weights, ApproxConfig(steps=20, optimum=False, device="cpu"))  # warm-up
        _, report = approximate(weights, cfg)
        return report["seconds_loop"]
    if workload == "epoch":
        import inilora
        import models
        from data.prepare import TASKS, load_split, training_batch
        loaded = models.load("minilm", "encoder", 2, 0)
        model = loaded.model
        inilora.inject(model, inilora.LoRAConfig(init="lora", targets=loaded.targets), loaded.model_id)
        inilora.mark_trainable(model, inilora.LoRAConfig(init="lora", targets=loaded.targets), verbose=False)
        split = load_split("rotten-tomatoes", "train", loaded.tokenizer, 64)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
        task, pad = TASKS["rotten-tomatoes"], loaded.tokenizer.pad_id

        def step(i):
            ids, mask, types, labels = training_batch(task, split, list(range(16 * i, 16 * i + 16)), pad, "cpu")
            loss = torch.nn.functional.cross_entropy(model(ids, mask, types), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step(0)  # warm-up
        start = time.perf_counter()
        for i in range(1, 13):
            step(i)
        return time.perf_counter() - start
    from models.decoder import generate, load_causal_lm
    model, tokenizer, _ = load_causal_lm()
    prompts = tokenizer.encode([tokenizer.chat_prompt(q) for q in ("What is 12 + 30?", "Name a colour.",
                                "Write a haiku about the sea.", "What is 7 times 8?")], add_special_tokens=False)
    generate(model, prompts, 2, [], tokenizer.pad_id)  # warm-up
    start = time.perf_counter()
    generate(model, prompts, 24, [], tokenizer.pad_id)
    return time.perf_counter() - start


def timed(workload, setting):
    env = {**os.environ, **{k: v for k, v in SETTINGS[setting].items() if k != "threads"}}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-m", "bench.threads", "--child", workload,
                          SETTINGS[setting].get("threads", "")], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{workload} under {setting!r} failed:\n{out.stderr[-2000:]}")
    chose = [line for line in out.stderr.splitlines() if line.startswith("chose (")]
    return float(out.stdout.strip().splitlines()[-1]), chose[0][7:].split(",")[0] if chose else ""


def busy_neighbour():
    """One spinning Python process per core."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per workload, setting and condition")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, help="what to time")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(child(*args.child))
        return
    times = {}
    for rep in range(args.repeats):
        for condition in ("idle", "busy"):
            spinners = busy_neighbour() if condition == "busy" else []
            try:
                for workload in args.workloads:
                    for setting in SETTINGS:
                        t, chose = timed(workload, setting)
                        times.setdefault((workload, condition, setting), []).append(t)
                        print(f"repeat {rep + 1} {condition:>4} {workload:>8} {setting:>9}: {t:6.2f} s"
                              + (f" ({chose} threads)" if chose else ""), flush=True)
            finally:
                for s in spinners:
                    s.kill()
                    s.wait()
    print(f"\nmedian seconds (ratio to default in the same condition), {os.cpu_count()} cores, {args.repeats} runs")
    print("| workload | condition | " + " | ".join(SETTINGS) + " |")
    print("|---|---|" + "---:|" * len(SETTINGS))
    for workload in args.workloads:
        for condition in ("idle", "busy"):
            med = {s: statistics.median(times[workload, condition, s]) for s in SETTINGS}
            cells = [f"{med[s]:.2f} ({med[s] / med['default']:.2f})" for s in SETTINGS]
            print(f"| {workload} | {condition} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
