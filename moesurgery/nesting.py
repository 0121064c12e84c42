"""Language models nested in multimodal wrappers (Mistral 3 / Small 4, Kimi K2.5, Llama 4, Qwen3.5...).

A wrapper's config.json holds the language model's config under `text_config` and its own fields
around it; its checkpoint holds the language model under a prefix and everything else (vision tower,
projector, anything we do not understand) beside it:

    model.language_model.{embed_tokens, layers.N..., norm}  + lm_head.weight              (transformers 5)
    language_model.model.{embed_tokens, layers.N..., norm}  + language_model.lm_head.weight   (older exports)

`open_text` presents the language model to the layouts under the plain names (`model.layers.N...`,
`lm_head.weight`) through a renaming view of the reader, and keeps every other stored tensor as a
byte-identical pass-through; `nest` writes the new language model back inside the same wrapper: the
wrapper's config with the new `text_config`, the text tensors under the same prefix, the rest as read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .errors import BadInputError
from .keyforms import RenamedView
from .lazy import Lazy

# (prefix of the text model's `model.` tensors, name of its lm_head) on disk, newest first
PREFIXES = (("model.language_model.", "lm_head.weight"), ("language_model.model.", "language_model.lm_head.weight"))
# wrappers whose config class fixes the language model's type (a text_config of another model_type is read as this one)
FIXED_TEXT_MODEL = {"qwen3_5_moe": "qwen3_5_moe_text", "qwen3_5": "qwen3_5_text", "llama4": "llama4_text"}
# sibling wrappers around the same vision tower: a new language model of the other kind moves to the other wrapper
SIBLING_WRAPPERS = {"qwen3_5_text": ("qwen3_5", "Qwen3_5ForConditionalGeneration"),
                    "qwen3_5_moe_text": ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")}
MOVED_FROM_TOP = ("quantization_config", "torch_dtype", "dtype")  # wrapper fields the text model is read with


@dataclass
class Wrapper:
    config: dict | None  # the wrapper's config.json as read; None: a text-only checkpoint saved under a wrapper's prefix
    prefix: str  # disk prefix of the text model's `model.` tensors
    head: str  # disk name of the text model's lm_head.weight
    passthrough: dict[str, Lazy] = field(default_factory=dict)  # every other stored tensor, as stored
    moved: tuple = ()  # top-level fields copied into the text config for reading (not written back there)

    @property
    def multimodal(self) -> bool:
        return self.config is not None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or [self.model_type])[0]

    def disk_name(self, name: str) -> str:
        """The on-disk name of a text-model tensor named as a top-level causal LM names it."""
        if name == "lm_head.weight":
            return self.head
        if name.startswith("model."):
            return self.prefix + name[len("model."):]
        return self.prefix + name  # nothing else is produced by the layouts; kept under the prefix

    def nest(self, text_config: dict, tied: bool) -> dict:
        """The wrapper config around a new text config (tying is decided at the top level)."""
        if self.config is None:  # text-only under a prefix: the text config is the config
            return {**text_config, "tie_word_embeddings": tied}
        fixed = FIXED_TEXT_MODEL.get(self.model_type)
        out = copy.deepcopy(self.config)
        sibling = SIBLING_WRAPPERS.get(text_config.get("model_type"))
        if fixed and sibling and fixed != text_config.get("model_type") and self.model_type in {w for w, _ in SIBLING_WRAPPERS.values()}:
            out["model_type"], out["architectures"] = sibling[0], [sibling[1]]  # e.g. dense Qwen3.5 upcycled: the MoE wrapper
        elif fixed and text_config.get("model_type") != fixed:
            raise BadInputError(f"the {self.model_type} wrapper holds only a {fixed} language model, not {text_config.get('model_type')} "
                                f"(its vision tower would have no model to feed): keep --to {fixed}")
        text = dict(text_config)
        old = self.config.get("text_config", {})
        for key in self.moved:
            if key not in old:
                text.pop(key, None)
        if "architectures" not in old:
            text.pop("architectures", None)
        out["text_config"] = text
        out["tie_word_embeddings"] = tied
        text["tie_word_embeddings"] = tied
        return out


def text_config_of(cfg: dict) -> dict | None:
    """The nested language-model config of a wrapper config, or None for a plain causal LM."""
    text = cfg.get("text_config")
    return text if isinstance(text, dict) and text.get("model_type") else None


def unwrap_config(cfg: dict) -> tuple[dict, tuple]:
    """(the text config the layouts read, the top-level fields moved into it)."""
    text = dict(text_config_of(cfg))
    moved = tuple(k for k in MOVED_FROM_TOP if k in cfg and k not in text)
    for key in moved:
        text[key] = cfg[key]
    return text, moved


class TextView(RenamedView):
    """A reader over the language model of a wrapper checkpoint, under the plain names."""

    def __init__(self, reader, prefix: str, head: str):
        self.prefix, self.head = prefix, head
        names: dict[str, str] = {}  # plain name -> disk name
        for key in reader.keys():
            if key == head:
                names["lm_head.weight"] = key
            elif key.startswith(prefix):
                names["model." + key[len(prefix):]] = key
        super().__init__(reader, names)


def open_prefixed(reader) -> tuple[TextView, Wrapper] | None:
    """A text-only checkpoint whose tensors sit under a wrapper's prefix (Qwen3.5's text model saves as
    `model.language_model.*`), or None when its tensors have the plain names."""
    keys = reader.keys()
    if "model.embed_tokens.weight" in keys:
        return None
    for prefix, head in PREFIXES:
        if prefix + "embed_tokens.weight" in keys:
            return _split(reader, None, prefix, head, ())
    return None


def _split(reader, cfg, prefix: str, head: str, moved: tuple) -> tuple[TextView, Wrapper]:
    view = TextView(reader, prefix, head)
    text_disk = set(view._names.values())
    passthrough = {k: reader.stored(k) for k in reader.stored_keys() if not (k.startswith(prefix) or k == head)
                   and reader.stored_owner(k) not in text_disk}
    return view, Wrapper(cfg, prefix, head, passthrough, moved)


def open_text(reader, cfg: dict, moved: tuple) -> tuple[TextView, Wrapper]:
    """The language model's view and the wrapper (with its pass-through tensors) of a wrapper checkpoint."""
    keys = reader.keys()
    for prefix, head in PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            break
    else:
        raise BadInputError(f"config.json nests a {cfg['text_config'].get('model_type')} language model in {cfg.get('model_type')}, "
                            f"but no tensor is under {' or '.join(p for p, _ in PREFIXES)}")
    return _split(reader, cfg, prefix, head, moved)
