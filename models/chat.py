"""One greedy chat turn with a decoder (models/decoder.py: load_causal_lm, generate with its KV cache).

    python -m models.chat --model smollm2 --prompt "What is 12 + 30?"

Its own module: `python -m models.decoder` would import models/decoder.py twice (once through the models
package, once as __main__), which Python warns about.
"""
import argparse

from lib.common import parse_dtype, run_cli
from models.checkpoint import SMOLLM2
from models.decoder import generate, load_causal_lm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help="smollm2, a .gguf file, a model directory or a Hub id")
    p.add_argument("--prompt", default="What is 12 + 30?", help="the user's message")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generate at most this many tokens")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    args = p.parse_args(argv)
    model, tokenizer, _ = load_causal_lm(args.model, parse_dtype(args.dtype))
    prompt = tokenizer.chat_prompt(args.prompt)
    [ids] = tokenizer.encode([prompt], add_special_tokens=False)
    [out] = generate(model, [ids], args.max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id)
    print(tokenizer.decode(out))


if __name__ == "__main__":
    run_cli(main)
