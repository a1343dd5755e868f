"""``refine-ray generate``: what a model writes after a few prompts, for a quick look at a checkpoint.

    refine-ray generate --model outputs/run/hf --prompt "The capital of France is" [--prompt ...]
                        [--max-new-tokens 32] [--temperature 0] [--top-p 1] [--seed 0]

The model loads as ``refine-ray eval`` loads it (a local HF directory, e.g. an export, or
``tiny:TYPE``; our classes, any family, CPU or GPU) and decodes with our cached-state engine
(:func:`refine_ray.models.generation.generate`: O(1) per token through the recurrent state),
greedy by default. Prompts are tokenised as the corpus is (no special tokens added); decoding
stops at the model's EOS (``generation_config.eos_token_id``) or after ``max_new_tokens``.
The same continuations come from ``AutoModelForCausalLM.from_pretrained(DIR).generate(...)``
after ``import refine_ray.models.auto`` (tests/test_export.py checks greedy token for token).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from refine_ray.config import ExperimentConfig
from refine_ray.eval.evaluate import EvalError, build_eval_model
from refine_ray.models.generation import generate


def generate_text(model_spec: str, prompts: Sequence[str], cfg: ExperimentConfig, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  tokenizer_path: Optional[str] = None) -> list[str]:
    """The decoded continuation of each prompt (special tokens skipped), in prompt order.

    ``temperature`` <= 0: greedy; otherwise sampling (nucleus ``top_p``) from a generator seeded
    with ``seed``. Raises EvalError (one line) for a bad ``model_spec``, an empty prompt list, a
    prompt with no tokens, ``max_new_tokens`` < 1 or ``top_p`` outside (0, 1]; ConfigError as
    :func:`refine_ray.eval.evaluate.build_eval_model`.
    """
    if not prompts:
        raise EvalError("--prompt: give at least one prompt")
    if max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens: expected an integer >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise EvalError(f"--top-p: expected a number in (0, 1], got {top_p}")
    model, tok = build_eval_model(model_spec, cfg, tokenizer_path)
    model.eval()
    device = next(model.parameters()).device
    ids = []
    for i, text in enumerate(prompts):
        row = tok(text, add_special_tokens=False)["input_ids"]
        if not row:
            raise EvalError(f"--prompt {i + 1} ({text!r}): no tokens after tokenisation")
        ids.append(torch.tensor(row, dtype=torch.long, device=device))
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    out = generate(model, ids, max_new_tokens, temperature=temperature, eos_token_id=eos, top_p=top_p,
                   generator=gen)
    return [tok.decode(t.tolist(), skip_special_tokens=True) for t in out]
