"""prefill / sample_continuations / generate on the tiny DeltaNet family.

Tolerances (fp32): cached-decode log-probs and hidden states equal a full re-forward's
within 1e-4 absolute (measured ~1e-6); seeded sampling is bit-reproducible.
"""
import pytest
import torch

from refine_ray.models import registry
from refine_ray.models.generation import generate, prefill, sample_continuations

V = 61
ATOL = 1e-4


@pytest.fixture(scope="module", params=["delta_net", "gated_deltanet"])
def model(request):
    return registry.build_model(request.param, vocab_size=V, hidden_size=32, seed=0).eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def test_cached_decode_matches_full_reforward(model):
    prompts = _prompts([9, 9, 9])
    state, last = prefill(model, prompts)
    temp = 0.7
    out = sample_continuations(model, state, last, 6, temperature=temp,
                               generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == out.logprobs.shape == (3, 6) and out.hidden.shape == (3, 6, 32)
    full_ids = torch.cat([torch.stack(prompts), out.tokens], 1)
    with torch.no_grad():
        ref = model.forward_segment(full_ids)
    logp = torch.log_softmax(ref.logits[:, 8:-1].float() / temp, -1)   # positions predicting each sampled token
    ref_lp = logp.gather(-1, out.tokens[..., None])[..., 0]
    assert (out.logprobs - ref_lp).abs().max() < ATOL
    assert (out.hidden - ref.hidden[:, 9:]).abs().max() < ATOL         # hidden where the INPUT is each token
    assert out.state.offset == 15
    for a, b in zip(out.state.layers, ref.state.layers):
        for key in a:
            assert (a[key] - b[key]).abs().max() < ATOL, key


def test_prefill_mixed_lengths_equals_per_row(model):
    prompts = _prompts([5, 11, 5, 8], seed=1)
    state, last = prefill(model, prompts)
    assert state.batch_size == 4 and last.shape == (4, 32)
    for i, p in enumerate(prompts):
        st_i, last_i = prefill(model, [p])
        assert (last[i] - last_i[0]).abs().max() < ATOL
        for a, b in zip(state.index([i]).layers, st_i.layers):
            for key in a:
                assert (a[key] - b[key]).abs().max() < ATOL, key


def test_seeded_sampling_is_reproducible_and_top_p(model):
    state, last = prefill(model, _prompts([7, 7]))
    rep = state.repeat_interleave(4)
    lastr = last.repeat_interleave(4, 0)
    a = sample_continuations(model, rep, lastr, 5, generator=torch.Generator().manual_seed(3))
    b = sample_continuations(model, rep, lastr, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    # a nucleus this small keeps only the most likely token: top-p sampling == greedy decoding
    tiny_p = sample_continuations(model, rep, lastr, 5, top_p=1e-6, generator=torch.Generator().manual_seed(4))
    greedy = sample_continuations(model, rep, lastr, 5, temperature=0.0)
    assert torch.equal(tiny_p.tokens, greedy.tokens)
    # logprobs stay those of the full (untruncated) distribution
    assert torch.allclose(tiny_p.logprobs, greedy.logprobs, atol=1e-6)
    # top-p never samples outside the nucleus
    probs = torch.softmax(model.lm_head(lastr).float(), -1)
    srt, idx = probs.sort(-1, descending=True)
    allowed = idx.masked_fill((srt.cumsum(-1) - srt) >= 0.5, -1)
    draws = [sample_continuations(model, rep, lastr, 1, top_p=0.5, generator=torch.Generator().manual_seed(s))
             for s in range(10)]
    for d in draws:
        assert all(d.tokens[r, 0] in allowed[r] for r in range(rep.batch_size))


def test_generate_greedy_matches_argmax_reforward(model):
    prompt = _prompts([6], seed=2)[0]
    out = generate(model, prompt, max_new_tokens=5)
    assert out.shape == (5,)
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model.forward_segment(seq[None]).logits[0, -1].argmax()[None]])
    assert torch.equal(out, seq[6:])
    # EOS: stop at (and drop) the first EOS; rows of different lengths work as a list
    eos = int(out[2])
    first = next(j for j, t in enumerate(out.tolist()) if t == eos)
    outs = generate(model, [prompt, _prompts([3], seed=9)[0]], max_new_tokens=5, eos_token_id=eos)
    assert torch.equal(outs[0], out[:first]) and len(outs) == 2
