"""Mistral: Llama attention without biases, optional sliding window (4096 when the key is absent)."""

from .base import Layout


class Mistral(Layout):
    name = "mistral"
    architecture = "MistralForCausalLM"
    llama_cpp = "llama"
    sliding_window = True

    def read_sliding_window(self, cfg):
        return cfg.get("sliding_window", 4096) or None

    def attention_config(self, arch):
        return {"sliding_window": arch.sliding_window}


LAYOUT = Mistral()
