"""Tests of sampled generation in models/decoder.py (generate's temperature, top_p and seeds; sample_next).

- greedy stays the default: temperature 0 gives what generate gave before (the greedy tests of
  tests/test_decoder.py pin that against transformers), and a nucleus so small that it holds one token
  samples the greedy continuation, token for token;
- sampling is reproducible (the same seeds give the same rows), a row's sample does not depend on the
  batch it is in (alone, or beside other prompts, in any position), and other seeds give other samples;
- sample_next draws from softmax(z / T) cut to the nucleus: over 20,000 seeded rows each token's frequency
  is its renormalised probability within 0.015, and a token outside the nucleus is never drawn;
- bad settings (negative temperature, top_p outside (0, 1], a missing seed) are ValueErrors naming them.

    python -m pytest tests/test_sampling.py -q
"""
import pytest
import torch

from models.decoder import generate, load_causal_lm, sample_next


def random_rows(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    model, tok, _ = load_causal_lm(str(tiny_decoder("LlamaForCausalLM")))
    return model, tok


# invariant: temperature 0 is greedy decoding, unchanged; a one-token nucleus is greedy too
def test_greedy_is_the_default_and_a_one_token_nucleus_is_greedy(llama):
    model, tok = llama
    prompts = random_rows(model.config.vocab_size, [3, 7, 5], seed=1)
    greedy = generate(model, prompts, 10, tok.eos_ids, tok.pad_id)
    assert generate(model, prompts, 10, tok.eos_ids, tok.pad_id, temperature=0.0, seeds=[1, 2, 3]) == greedy
    # top_p = 1e-6: the most probable token alone holds that much mass, so every draw is the argmax
    assert generate(model, prompts, 10, tok.eos_ids, tok.pad_id, temperature=1.0, top_p=1e-6, seeds=[4, 5, 6]) == greedy


# invariant: a row's sample depends on its prompt and its seed only: not on the batch, its position, or a rerun
def test_sampling_is_reproducible_and_batch_independent(llama):
    model, tok = llama
    prompts = random_rows(model.config.vocab_size, [3, 7, 5, 4], seed=2)
    seeds = [11, 12, 13, 14]
    rows = generate(model, prompts, 12, [], tok.pad_id, temperature=1.5, top_p=0.95, seeds=seeds)
    assert generate(model, prompts, 12, [], tok.pad_id, temperature=1.5, top_p=0.95, seeds=seeds) == rows
    for b in range(4):  # alone, with the seed it had in the batch
        assert generate(model, [prompts[b]], 12, [], tok.pad_id, temperature=1.5, top_p=0.95, seeds=[seeds[b]]) == [rows[b]]
    reordered = generate(model, prompts[::-1], 12, [], tok.pad_id, temperature=1.5, top_p=0.95, seeds=seeds[::-1])
    assert reordered == rows[::-1]
    # the same prompt under five other seeds: not all five samples equal the first one
    others = generate(model, [prompts[0]] * 5, 12, [], tok.pad_id, temperature=1.5, top_p=0.95, seeds=[21, 22, 23, 24, 25])
    assert any(row != rows[0] for row in others)


# the equation: p = softmax(z / T), kept where the mass before a token is < top_p, renormalised
def test_sample_next_draws_from_the_nucleus_distribution():
    z = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    T, top_p, n = 0.7, 0.8, 20_000
    p = torch.softmax(z / T, dim=-1)  # sorted already: z is descending
    keep = (p.cumsum(0) - p) < top_p
    expected = torch.where(keep, p, torch.zeros_like(p)) / p[keep].sum()
    assert keep.tolist() == [True, True, False, False, False]  # the case is a real cut
    draws = sample_next(z.expand(n, -1), T, top_p, [torch.Generator().manual_seed(s) for s in range(n)])
    freq = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert int(freq[~keep].sum() * n) == 0


def test_bad_sampling_settings_are_sentences(llama):
    model, tok = llama
    prompts = random_rows(model.config.vocab_size, [3], seed=3)
    with pytest.raises(ValueError, match="temperature=-1.0.*temperature >= 0"):
        generate(model, prompts, 4, [], tok.pad_id, temperature=-1.0, seeds=[0])
    with pytest.raises(ValueError, match="top_p=0.*0 < top_p <= 1"):
        generate(model, prompts, 4, [], tok.pad_id, temperature=1.0, top_p=0, seeds=[0])
    with pytest.raises(ValueError, match="one seed per prompt, got none for 1 prompts"):
        generate(model, prompts, 4, [], tok.pad_id, temperature=1.0)
