"""Greedy answers from vLLM for ``refine-ray eval`` (``eval.backend=vllm``).

The evaluated model (already built by ``refine_ray.eval.evaluate.build_eval_model``) is saved
as a HF directory in a private temp dir (fla's layout for delta_net / gated_deltanet, served
by this package's vLLM plugin; llama natively) and answered by ``vllm.LLM`` with token-id
prompts (``skip_tokenizer_init=True``). The answers follow the native engine
(:func:`refine_ray.models.generation.generate`) exactly:

  * greedy (temperature 0), at most ``max_new_tokens`` per prompt;
  * stops at the first of the given stop ids, which is dropped from the answer;
  * ``min_new_tokens``: the stop ids are masked for the first tokens (vLLM's ``min_tokens``
    masks them, like the native engine's HF ``min_length`` rule);
  * the model's own EOS stops only when it is among the stop ids (``ignore_eos=True``: the
    caller's list is the whole stop rule, as in the native engine).

Deliberate decisions: weights fp32 (the eval model's; on CPU the plugin's PyTorch core then
matches our forward to ~1e-6 in log-prob); prefix caching off (each prompt is answered once;
without it nothing is seeded or block-aligned, so vLLM's CPU seeded-generator crash cannot
occur); no test-time training (the engine holds a copy of the weights that TTT would not update);
eager on CPU, vLLM's compilation and CUDA graphs on CUDA (``vllm_rollout.enforce_eager``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Optional, Sequence

import torch

from refine_ray.models.registry import VLLM_TYPES
from refine_ray.serving.vllm_rollout import enforce_eager, import_vllm, shutdown_engine


class VLLMGreedy:
    """``answer(prompts, max_new_tokens, eos_token_id, min_new_tokens)`` on a vllm.LLM serving ``model``."""

    def __init__(self, model: torch.nn.Module, max_model_len: int):
        """Save ``model`` (a refine_ray / HF causal LM) and start vLLM on it.

        ``max_model_len``: the longest prompt + answer in tokens. Raises ImportError (one line)
        without vLLM, ValueError (one line) for a model type vLLM does not serve."""
        model_type = getattr(model.config, "model_type", "?")
        if model_type not in VLLM_TYPES:
            raise ValueError(f"eval.backend: vllm serves model types {', '.join(VLLM_TYPES)}, not {model_type!r}; "
                             "use eval.backend=native")
        vllm = import_vllm("eval.backend=vllm")
        self.model_dir = tempfile.mkdtemp(prefix="refine_vllm_eval_")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.model_dir, True)
        model.save_pretrained(self.model_dir, safe_serialization=True)
        dtype = next(model.parameters()).dtype
        self.llm = vllm.LLM(model=self.model_dir, skip_tokenizer_init=True, dtype=dtype, enforce_eager=enforce_eager(),
                            gpu_memory_utilization=float(os.environ.get("REFINE_VLLM_MEM", "0.2")),
                            max_model_len=int(max_model_len), enable_prefix_caching=False, seed=0)
        self._SamplingParams = vllm.SamplingParams

    def answer(self, prompts: Sequence[torch.Tensor], max_new_tokens: Sequence[int], eos_token_id=None,
               progress=None, min_new_tokens: int = 0) -> list[torch.Tensor]:
        """Greedy answers: per prompt (1-D int64 token ids) a 1-D int64 tensor of new tokens,
        the stop token excluded, as :func:`refine_ray.models.generation.generate` returns.

        ``eos_token_id``: an int, a list of ints or None (no stop); ``progress`` gets
        ``update(len(prompts))`` at the end. Raises ValueError if the lengths differ."""
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} generation lengths")
        stop = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        params = [self._SamplingParams(n=1, temperature=0.0, max_tokens=int(n), stop_token_ids=stop,
                                       min_tokens=min(int(min_new_tokens), int(n)) if stop else 0,
                                       ignore_eos=True, detokenize=False)
                  for n in max_new_tokens]
        outs = self.llm.generate([{"prompt_token_ids": [int(t) for t in p.tolist()]} for p in prompts], params,
                                 use_tqdm=False)
        answers = []
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            hits = [j for j, t in enumerate(ids) if t in stop]
            answers.append(torch.tensor(ids[:hits[0]] if hits else ids, dtype=torch.long))
        if progress is not None:
            progress.update(len(prompts))
        return answers

    def close(self) -> None:
        """Shut the engine down and remove the private model dir."""
        if getattr(self, "llm", None) is not None:
            shutdown_engine(self.llm)
            self.llm = None
        self._cleanup()
