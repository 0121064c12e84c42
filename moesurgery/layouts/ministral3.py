"""Ministral 3 (`ministral3`, usually the text model of the `mistral3` wrapper): Mistral's dense
GQA with yarn rope and Llama-4 query scaling (`llama_4_scaling_beta` in rope_parameters)."""

from .mistral import Mistral


class Ministral3(Mistral):
    name = "ministral3"
    architecture = "Ministral3ForCausalLM"
    query_scaling = True
    rope_parameters_style = True

    def read_sliding_window(self, cfg):
        return cfg.get("sliding_window") or None


LAYOUT = Ministral3()
