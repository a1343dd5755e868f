"""The Llama family: softmax attention with a KV-cache state, the architecture vLLM serves.

A baseline beside the fast-weight families, so the whole system (and the vLLM rollout
backend) can train a model vLLM knows. Registry entry: 'llama'.
"""
from .modeling import LlamaConfig, LlamaForCausalLM, tiny_llama_config

__all__ = ["LlamaConfig", "LlamaForCausalLM", "tiny_llama_config"]
