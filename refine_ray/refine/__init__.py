"""The single-process REFINE pipeline: tensors in, tensors out (no Ray, no DeepSpeed).

One training step of REFINE (next-sequence RL on top of next-token training) for one
document ``ids [L]``, each concern written once and shared by the Ray roles (which only
convert to and from the transport batches of refine_ray.transport.batches), the DeepSpeed
learner, the single-process step of test-time training and the benchmarks:

1. ``scoring.score_document(model, ids, cfg, generator, with_states) -> DocumentScore``:
   one no-grad pass, per-token entropy, ``n`` cuts, the true next ``k`` tokens and their
   hidden states, and (prefix sharing) the recurrent state at every cut
   (``cut_states``: kept every ``state_stride`` tokens, then caught up).
2. ``sampling.sample_at_cuts(model, states, cut_hidden, k, G, temperature, top_p, seeds)
   -> Continuations``: G continuations of k tokens per cut with behaviour log-probs and the
   policy's hidden states; ``sampling.FastWeightRollout`` (the rollout role's engine) wraps it
   per document. Seeds: ``seeding.sample_seed(run_seed, step, doc_id, cut_index,
   sample_index)`` for every backend; cuts: ``seeding.cut_seed(run_seed, step, doc_id)``.
3. ``rewarding.SequenceRewarder(kind, source)(responses, true_ids, response_hidden,
   true_hidden) -> Rewards``: cosine on policy hidden states (the paper), a frozen sentence
   encoder, exact match, or hybrid.
4. GRPO advantages over the G samples of each cut (``refine_ray.algo.grpo_advantages``).
5. ``loss.document_loss(model, ids, cuts, responses, old_logprobs, advantages, cfg)
   -> (loss, metrics)``: NTP + PPO-clip (+ KL) of the document, through
   ``sequence_logprobs.document_logprobs`` (shared trunk or re-encode, same numbers).

``local_step.LocalRefineStep`` runs 1-5 plus one optimizer step on a plain torch model;
``policy.build_policy`` builds the (seeded) policy from the ``model`` config section;
``cut_states`` holds the state bookkeeping for prefix sharing. Log-probs everywhere (sampler
and learner) come from one function, ``refine_ray.algo.logprobs_from_logits``.
"""
