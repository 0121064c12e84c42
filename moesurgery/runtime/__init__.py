"""Reference runtime: a pure-torch forward for every layout, from the canonical form."""

from .model import Runtime, ffn_forward, load_ffn, load_layer

__all__ = ["Runtime", "ffn_forward", "load_ffn", "load_layer"]
