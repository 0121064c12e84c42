"""Qwen2 / Qwen2.5: GQA with q/k/v biases always present."""

from .base import Layout
from .dense import qwen_sliding_config, qwen_sliding_window


class Qwen2(Layout):
    name = "qwen2"
    architecture = "Qwen2ForCausalLM"
    llama_cpp = "qwen2"
    qkv_bias = "always"
    sliding_window = True

    def read_sliding_window(self, cfg):
        return qwen_sliding_window(cfg, self.name)

    def attention_config(self, arch):
        return qwen_sliding_config(arch)


LAYOUT = Qwen2()
