"""Tensor names as data: the forms a family's checkpoints name their tensors in, mapped to the
transformers (in-memory) names the layouts read.

A `KeyForm` is a table of (disk, layout) name templates, `{L}` a layer and `{E}` an expert number:

    KeyForm("deepseek", (("embed.weight", "model.embed_tokens.weight"),
                         ("layers.{L}.attn.wq_a.weight", "model.layers.{L}.self_attn.q_a_proj.weight"), ...))

`view(reader)` presents a checkpoint in that form under the layout names; `to_disk(planned)` names
a planned output back in the form (a model is written in the form it was read in). A name the table
does not know is kept as it is (carried through: e.g. multi-token-prediction layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NUMBERED = re.compile(r"(?<=layers\.)\d+|(?<=experts\.)\d+")


def generic(name: str) -> tuple[str, list[str]]:
    """('layers.{}.experts.{}.w1.weight', ['3', '7']): a name's shape and its numbers."""
    return _NUMBERED.sub("{}", name), _NUMBERED.findall(name)


def table(pairs, a: int, b: int) -> dict[str, str]:
    """{generic name in column a: generic name in column b} of (x, y) template pairs."""
    def g(t: str) -> str:
        return t.replace("{L}", "{}").replace("{E}", "{}")

    return {g(p[a]): g(p[b]) for p in pairs}


def rename(name: str, names: dict[str, str]) -> str | None:
    shape, numbers = generic(name)
    target = names.get(shape)
    return target.format(*numbers) if target is not None else None


@dataclass(eq=False)
class KeyForm:
    name: str
    pairs: tuple  # (disk template, layout template)
    marker: str = ""  # a tensor only this form has: how a checkpoint is recognised as in it
    scale_name: str = "weight_scale_inv"  # what a quantized X.weight's scale is called on disk (DeepSeek's: X.scale)
    to_layout: dict = field(init=False, repr=False)
    to_disk_names: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.to_layout, self.to_disk_names = table(self.pairs, 0, 1), table(self.pairs, 1, 0)

    def matches(self, keys) -> bool:
        return self.marker in keys

    def layout_name(self, disk: str) -> str:
        return rename(disk, self.to_layout) or disk

    def disk_name(self, name: str) -> str:
        if name.endswith(".weight_scale_inv"):  # a quantized weight's scale: beside its weight's disk name
            return self.disk_name(name[: -len("_scale_inv")])[: -len("weight")] + self.scale_name
        return rename(name, self.to_disk_names) or name

    def view(self, reader) -> "RenamedView":
        return RenamedView(reader, {self.layout_name(k): k for k in reader.keys()}, self.disk_name)

    def to_disk(self, planned: list) -> list:
        from .writer import PlannedTensor

        return [PlannedTensor(self.disk_name(t.name), t.tensor) for t in planned]


class RenamedView:
    """A reader under other names: {layout name: disk name}."""

    def __init__(self, reader, names: dict[str, str], disk_name=None):
        self.reader, self._names = reader, names
        self._disk_name = disk_name  # the disk name of a layout name the checkpoint lacks (what an error names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def keys(self) -> list[str]:
        return list(self._names)

    def disk(self, name: str) -> str:
        if name in self._names:
            return self._names[name]
        return self._disk_name(name) if self._disk_name is not None else name

    def info(self, name: str):
        return self.reader.info(self.disk(name))

    def lazy(self, name: str):
        return self.reader.lazy(self.disk(name))

    def __getattr__(self, attr):  # files, dtypes, stored tensors...: the reader's
        return getattr(self.reader, attr)


def prefixed(pairs, prefix: str, unprefixed: dict[str, str]) -> tuple:
    """The same templates with `prefix` on the disk side, except the disk names `unprefixed` gives instead."""
    return tuple((unprefixed.get(d, prefix + d), l) for d, l in pairs)
