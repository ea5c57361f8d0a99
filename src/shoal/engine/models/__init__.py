"""Model files, one per architecture family."""

from shoal.engine.models.llama import KVCache, LlamaForCausalLM

__all__ = ["KVCache", "LlamaForCausalLM"]
