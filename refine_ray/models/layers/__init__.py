"""Layers: one file per token mixer, plus the pieces every block shares (fla's ``fla/layers`` tier).

  common.py          RMSNorm, GatedRMSNorm, ShortConvolution, GatedMLP (SwiGLU), PreNormBlock,
                     split_heads, check_right_padding: written once, used by every family
  delta_net.py       the DeltaNet mixer and DeltaRuleMixer, the base it shares with
  gated_deltanet.py  the Gated DeltaNet mixer
  lact.py            LaCT's layer: window attention + SwiGLU fast weights
  attention.py       RoPE, LaCT's sliding-window attention, Llama's KV-cache attention

Layers use :mod:`refine_ray.models.ops` (kernels and their references) and nothing above;
the model families (``models/deltanet``, ``models/lact``, ``models/llama``) build on them.
Submodules are imported where used, so a DeltaNet run never imports transformers' Llama.
"""
