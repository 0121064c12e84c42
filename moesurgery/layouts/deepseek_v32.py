"""DeepSeek-V3.2 (`deepseek_v32`): DeepSeek-V3's MoE and MLA plus a lightning indexer per layer
(`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`) that keeps each query's top `index_topk` keys
(DeepSeek Sparse Attention; its rope is half split, the attention's interleaved). Dense/MoE layers
from `mlp_layer_types` (first_k_dense_replace when absent)."""

from .deepseek_v3 import DeepseekV3


class DeepseekV32(DeepseekV3):
    name = "deepseek_v32"
    architecture = "DeepseekV32ForCausalLM"
    llama_cpp = None  # not checked against llama.cpp
    schedule = "layer_types"
    rope_interleave_default = True  # always interleaved; the config has no rope_interleave field
    indexer_interleave = False

    def attention_config(self, arch):
        out = super().attention_config(arch)
        out.pop("rope_interleave", None)
        out["layer_types"] = ["indexed_attention"] * arch.num_layers
        return out


LAYOUT = DeepseekV32()
