"""Llama (and SmolLM): GQA, rotate-half RoPE; `attention_bias` puts a bias on q, k, v and o."""

from ..errors import BadInputError
from .base import Layout


class Llama(Layout):
    name = "llama"
    architecture = "LlamaForCausalLM"
    llama_cpp = "llama"
    qkv_bias = "with_o"

    def read_arch(self, cfg):
        if cfg.get("mlp_bias"):
            raise BadInputError("config.json: mlp_bias=true (biased FFN) is not supported")
        return super().read_arch(cfg)

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias or arch.o_bias, "mlp_bias": False, "pretraining_tp": 1}


LAYOUT = Llama()
