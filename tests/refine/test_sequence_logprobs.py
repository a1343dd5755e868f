"""Prefix-shared learning equals re-encoding every prefix: same log-probs, loss and gradients.

Tolerance: float32, rtol 1e-4 / atol 1e-5 on log-probs; gradients within 2e-5 of each
tensor's largest entry
(the two paths sum the same terms in a different order).
"""
import pytest
import torch

from refine_ray.models.registry import build_model
from refine_ray.refine.sequence_logprobs import document_logprobs

MODELS = ["delta_net", "gated_deltanet", "lact", "llama"]


def _loss_and_grads(model, shared, ids, cuts, responses, G):
    model.zero_grad()
    out = document_logprobs(model, ids, cuts, responses, G, temperature=0.7, shared=shared)
    adv = torch.linspace(-1, 1, responses.shape[0])[:, None]
    loss = out.ntp_loss + 0.3 * (out.logprobs * adv).mean()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_shared_equals_reencode(model, ids, cuts, responses, G):
    a, ga = _loss_and_grads(model, True, ids, cuts, responses, G)
    b, gb = _loss_and_grads(model, False, ids, cuts, responses, G)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.ntp_loss, b.ntp_loss, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))
    for name in ga:
        scale = float(gb[name].abs().max())
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=2e-5 * scale + 1e-8, msg=name)


@pytest.mark.parametrize("model_type", MODELS)
def test_shared_trunk_equals_reencode(model_type):
    torch.manual_seed(0)
    model = build_model(model_type, seed=0, vocab_size=97).float()
    L, G, k = 70, 2, 4
    ids = torch.randint(0, 97, (L,))
    cuts = torch.tensor([9, 23, 23, 41, 66])          # a repeated cut and one near the end
    responses = torch.randint(0, 97, (len(cuts) * G, k))
    _assert_shared_equals_reencode(model, ids, cuts, responses, G)


@pytest.mark.parametrize("model_type", ["delta_net", "gated_deltanet"])
def test_shared_trunk_equals_reencode_across_kept_states(model_type):
    """A longer document: cuts on kept states (multiples of 64), between them and before the
    first, so the one-pass trunk's kept states and batched catch-up carry the gradients."""
    model = build_model(model_type, seed=3, vocab_size=97).float()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(5))
    cuts = torch.tensor([30, 64, 100, 128, 129, 250, 250, 292])
    G, k = 2, 5
    responses = torch.randint(0, 97, (len(cuts) * G, k), generator=torch.Generator().manual_seed(6))
    _assert_shared_equals_reencode(model, ids, cuts, responses, G)


def test_response_of_one_token():
    model = build_model("delta_net", seed=1, vocab_size=50)
    ids = torch.randint(0, 50, (40,))
    cuts, resp = torch.tensor([10, 30]), torch.randint(0, 50, (2, 1))
    a = document_logprobs(model, ids, cuts, resp, 1, shared=True, with_ntp=False)
    b = document_logprobs(model, ids, cuts, resp, 1, shared=False, with_ntp=False)
    assert a.ntp_loss is None
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)


def test_answer_nll_counts_answer_tokens_only():
    from refine_ray.refine.sequence_logprobs import answer_nll

    model = build_model("delta_net", seed=2, vocab_size=60)
    prompt, answer = torch.randint(0, 60, (25,)), torch.randint(0, 60, (6,))
    logits = model(torch.cat([prompt, answer])[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[24:30], answer)   # positions predicting the answer
    torch.testing.assert_close(answer_nll(model, prompt, answer), expected, rtol=1e-5, atol=1e-6)


def _module_calls(model, fn) -> list[str]:
    """Names of the parameter-holding modules called (forward and backward recomputes) by fn()."""
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
             for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        fn().backward()
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_module_calls_do_not_depend_on_lengths():
    """ZeRO-3 gathers a module's weights at every call, so ranks with documents of 1100 and
    505 tokens (NTP head chunks agreed at the max) or answers of 1 and 5 tokens must call
    the same modules in the same order."""
    from refine_ray.algo import head_calls
    from refine_ray.refine.sequence_logprobs import answer_nll

    model = build_model("delta_net", seed=4, vocab_size=50)
    gen = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, 50, (n,), generator=gen) for n in (1100, 505)]
    cuts, resp = torch.tensor([100, 300]), torch.randint(0, 50, (4, 3), generator=gen)
    agreed = max(head_calls(len(d) - 1) for d in docs)
    assert agreed == 2
    traces = [_module_calls(model, lambda d=d: document_logprobs(model, d, cuts, resp, 2, ntp_head_calls=agreed)
                            .ntp_loss) for d in docs]
    assert traces[0] == traces[1] and traces[0].count("lm_head") > 2
    # the padded calls change nothing: same NTP loss as without them
    torch.testing.assert_close(document_logprobs(model, docs[1], cuts, resp, 2, ntp_head_calls=agreed).ntp_loss,
                               document_logprobs(model, docs[1], cuts, resp, 2).ntp_loss)
    prompt = torch.randint(0, 50, (30,), generator=gen)
    answers = [torch.randint(0, 50, (n,), generator=gen) for n in (1, 5)]
    traces = [_module_calls(model, lambda a=a: answer_nll(model, prompt, a)) for a in answers]
    assert traces[0] == traces[1]


def test_answer_nll_of_one_token():
    from refine_ray.refine.sequence_logprobs import answer_nll

    model = build_model("delta_net", seed=2, vocab_size=60)
    prompt, answer = torch.randint(0, 60, (25,)), torch.randint(0, 60, (1,))
    logits = model(torch.cat([prompt, answer])[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[24:25], answer)
    torch.testing.assert_close(answer_nll(model, prompt, answer), expected, rtol=1e-5, atol=1e-6)
