"""Qwen3: GQA with per-head q/k RMSNorm (`q_norm`, `k_norm` of size head_dim)."""

from .base import Layout
from .dense import qwen_sliding_config, qwen_sliding_window


class Qwen3(Layout):
    name = "qwen3"
    architecture = "Qwen3ForCausalLM"
    llama_cpp = "qwen3"
    qkv_bias = "with_o"
    qk_norms = ("head",)
    sliding_window = True

    def read_sliding_window(self, cfg):
        return qwen_sliding_window(cfg, self.name)

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias or arch.o_bias, **qwen_sliding_config(arch)}


LAYOUT = Qwen3()
