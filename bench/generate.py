"""Benchmark of batched greedy generation: decoder.generate against transformers' generate.

Both run in this one process on identical inputs: the same SmolLM2 weights (ours dequantised from the
packaged GGUF, transformers' through its own GGUF loading), the same left-padded chat prompts, greedy
decoding of exactly --new-tokens tokens (no EOS, so both do the same work), with the KV cache. The two
are timed in alternation, --repeats times each, and the medians are reported as new tokens per second
(batch x new tokens / seconds, prompt processing included) with their ratio. The outputs are checked to
be the same tokens. Not a test: its figures go into the README.

Run: python -m bench.generate --batch-sizes 1 16 --new-tokens 32 --repeats 5
"""
import argparse
import statistics
import time

import torch

from lib.common import run_cli
from models.checkpoint import packaged_path
from models.decoder import generate, load_causal_lm

QUESTIONS = ["What is 12 + 30?", "Name a colour.", "Write a haiku about the sea.", "What is the capital of France?",
             "Explain gravity in one sentence.", "What is 7 times 8?", "Give me a synonym for happy.",
             "How many legs does a spider have?"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and batch size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise ValueError(f"batch sizes {args.batch_sizes}, --new-tokens {args.new_tokens} and --repeats "
                         f"{args.repeats} must all be at least 1.")
    import transformers  # the reference, needed only here

    torch.set_num_threads(args.threads)
    model, tok, _ = load_causal_lm("smollm2")
    gguf = packaged_path("smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # both generate exactly --new-tokens tokens
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    for B in args.batch_sizes:
        prompts = tok.encode([tok.chat_prompt(QUESTIONS[b % len(QUESTIONS)]) for b in range(B)],
                             add_special_tokens=False)
        T0 = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_id] * (T0 - len(r)) + r for r in prompts])  # (B, T0), left-padded
        mask = torch.tensor([[0] * (T0 - len(r)) + [1] * len(r) for r in prompts])

        def ours():
            return generate(model, prompts, args.new_tokens, [], tok.pad_id)

        def theirs():
            with torch.no_grad():
                out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=tok.pad_id)
            return out[:, T0:].tolist()

        assert ours() == theirs(), "the two generations differ"  # also the warm-up of both
        times = {"ours": [], "transformers": []}
        for _ in range(args.repeats):  # alternated, so that drifts in machine load hit both alike
            for name, fn in (("ours", ours), ("transformers", theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        rate = {name: B * args.new_tokens / statistics.median(t) for name, t in times.items()}
        print(f"batch {B:>3}: ours {rate['ours']:8.1f} tokens/s | transformers {rate['transformers']:8.1f} tokens/s "
              f"| ratio {rate['ours'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    run_cli(main)
