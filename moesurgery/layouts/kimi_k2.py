"""Kimi K2 / K2-Thinking (`kimi_k2`): DeepSeek-V3 whole, other numbers (384 experts, one dense
layer, no expert groups, 64 heads). Its config names Moonshot's copy of the DeepSeek-V3 code
(`auto_map`); transformers reads it with `DeepseekV3ForCausalLM.from_pretrained`. Written back
with its own model_type and auto_map; `kimi_k2` <-> `deepseek_v3` changes only config.json."""

from .deepseek_v3 import DeepseekV3

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}


class KimiK2(DeepseekV3):
    name = "kimi_k2"
    architecture = "DeepseekV3ForCausalLM"
    needs_remote_code = True  # AutoConfig does not know model_type kimi_k2 (DeepseekV3ForCausalLM loads it)

    def ffn_config(self, model):
        cfg = super().ffn_config(model)
        if model.family != self.name:
            cfg["auto_map"] = dict(AUTO_MAP)
        return cfg


LAYOUT = KimiK2()
