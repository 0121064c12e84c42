"""Dense Qwen3.5 (`qwen3_5_text`, the language model of the `qwen3_5` vision-language wrapper; `--to qwen3_5`
names it too): Qwen3.5-MoE's hybrid attention (flat Gated DeltaNet projections, gated attention, zero-centred
norms) with a SwiGLU `mlp` in every layer. Upcycled exactly into `qwen3_5_moe_text` (its wrapper follows)."""

from .qwen3_next import HybridAttention


class Qwen35(HybridAttention):
    name = "qwen3_5_text"
    aliases = ("qwen3_5",)
    architecture = "Qwen3_5ForCausalLM"
    linear_attn_form = "flat"  # in_proj_qkv, in_proj_z, in_proj_b, in_proj_a


LAYOUT = Qwen35()
