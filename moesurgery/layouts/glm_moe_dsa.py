"""GLM-5 (`glm_moe_dsa`): DeepSeek-V3.2's architecture with an interleaved-rope indexer, and
"shared" layers (`indexer_types`) that reuse the previous indexer layer's top-k instead of having
an indexer of their own (derived from index_topk_pattern / index_topk_freq when the list is absent)."""

from ..errors import BadInputError
from .base import get_int
from .deepseek_v32 import DeepseekV32


class GlmMoeDsa(DeepseekV32):
    name = "glm_moe_dsa"
    architecture = "GlmMoeDsaForCausalLM"
    llama_cpp = None  # not checked against llama.cpp
    indexer_interleave = True

    def indexer_types(self, cfg):
        n = get_int(cfg, "num_hidden_layers", 0)
        types = cfg.get("indexer_types")
        if types is None:
            pattern = cfg.get("index_topk_pattern")
            if pattern is not None:
                types = [{"F": "full", "S": "shared"}[c] for c in pattern]
            else:
                freq = max(get_int(cfg, "index_topk_freq", 1) or 1, 1)
                offset = get_int(cfg, "index_skip_topk_offset", 2)
                types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
        if len(types) != n or set(types) - {"full", "shared"} or (types and types[0] != "full"):
            raise BadInputError(f"config.json: indexer_types must list {n} layers of 'full' / 'shared', the first 'full'")
        return list(types)

    def attention_config(self, arch):
        out = super().attention_config(arch)
        out["indexer_types"] = list(arch.indexer["types"])
        return out


LAYOUT = GlmMoeDsa()
