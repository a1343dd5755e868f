"""LaCTConfig and the tiny preset; defaults are the released LaCT-760M (``760M_lact_swiglu_nh4_fwlow_rank_momentum``).

Field names follow the upstream LaCT config (``num_attn_heads``, ``num_lact_heads``,
``lact_chunk_size``, ``w0_w2_low_rank``, ...), so a released ``config.json`` loads
with only ``model_type`` changed. Options the released model does not use and we
do not implement (``use_muon``, ``ttt_prenorm``, ``lr_dim != 1``, other losses or
lr parameterisations) are accepted here but rejected when the model is built.
``base_lr`` is new: upstream hard-codes 1e-3.
"""
from __future__ import annotations

from typing import Optional

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class LaCTConfig(PreTrainedConfig):
    """HF config of LaCT (model_type 'lact'); fields as the upstream LaCT config (see the module
    docstring). ``head_dim`` / ``fw_head_dim``: attention / fast-weight head sizes."""

    model_type = "lact"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1536,
        num_hidden_layers: int = 24,
        num_attn_heads: int = 24,
        num_lact_heads: int = 4,
        inter_multi: float = 1.0,
        window_size: Optional[int] = 2048,
        lact_chunk_size: int = 2048,
        qkv_bias: bool = False,
        attn_qk_norm: bool = True,
        qkv_silu: bool = True,
        no_v_silu: bool = False,
        lr_dim: int = 1,
        lr_parameterization: str = "mamba",
        base_lr: float = 1e-3,
        learnable_ttt_scale: bool = True,
        use_muon: bool = False,
        use_momentum: bool = True,
        ttt_prenorm: bool = False,
        ttt_nope: bool = False,
        ttt_loss_type: str = "dot_product",
        w0_w2_low_rank: int = 32,
        fw_init_gain: float = 0.5,
        rope_theta: float = 1e6,
        max_position_embeddings: int = 32768,
        hidden_ratio: Optional[int] = 4,
        intermediate_size: Optional[int] = 4096,
        hidden_act: str = "swish",
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        bos_token_id: Optional[int] = 1,
        eos_token_id: Optional[int] = 2,
        pad_token_id: Optional[int] = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attn_heads = num_attn_heads
        self.num_lact_heads = num_lact_heads
        self.inter_multi = inter_multi
        self.window_size = window_size
        self.lact_chunk_size = lact_chunk_size
        self.qkv_bias = qkv_bias
        self.attn_qk_norm = attn_qk_norm
        self.qkv_silu = qkv_silu
        self.no_v_silu = no_v_silu
        self.lr_dim = lr_dim
        self.lr_parameterization = lr_parameterization
        self.base_lr = base_lr
        self.learnable_ttt_scale = learnable_ttt_scale
        self.use_muon = use_muon
        self.use_momentum = use_momentum
        self.ttt_prenorm = ttt_prenorm
        self.ttt_nope = ttt_nope
        self.ttt_loss_type = ttt_loss_type
        self.w0_w2_low_rank = w0_w2_low_rank
        self.fw_init_gain = fw_init_gain
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        """Attention head size: hidden_size // num_attn_heads."""
        return self.hidden_size // self.num_attn_heads

    @property
    def fw_head_dim(self) -> int:
        """Fast-weight head size: hidden_size // num_lact_heads."""
        return self.hidden_size // self.num_lact_heads


def tiny_lact_config(vocab_size: int, **overrides) -> LaCTConfig:
    """Tiny LaCT preset, seconds on a CPU: hidden 64, 2 layers, 4 attention heads, 2 fast-weight
    heads, chunk 16, window 16, low rank 4, momentum, MLP 128. ``num_heads`` is accepted as
    an alias of ``num_attn_heads`` (what ``model.num_heads`` in the experiment config means)."""
    if "num_heads" in overrides:
        overrides.setdefault("num_attn_heads", overrides.pop("num_heads"))
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attn_heads=4,
        num_lact_heads=2, inter_multi=1.0, window_size=16, lact_chunk_size=16,
        w0_w2_low_rank=4, use_momentum=True, intermediate_size=128,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kw.update(overrides)
    return LaCTConfig(**kw)
