"""Recipes: named surgeries in `recipes/*.toml` (read with the standard library's tomllib).

    # moesurgery upcycle mistralai/Mixtral-8x7B-v0.1 out/mixtral-ds64 --recipe mixtral-8x7b-deepseek
    command = "upcycle"
    description = "..."
    [options]
    granularity = 8
    to = "deepseek"

Flags given on the command line override the recipe's options.
"""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import UsageError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []


def load_recipe(name_or_file: str, command: str) -> dict:
    """The recipe's options for `command` (an error if the recipe is for another command)."""
    path = Path(name_or_file)
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_file}.toml"
    if not path.is_file():
        have = ", ".join(recipe_names()) or "none"
        raise UsageError(f"--recipe: no recipe file or name {name_or_file!r} (built in: {have})")
    try:
        recipe = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--recipe: {path.name} is not valid TOML ({e})") from None
    if recipe.get("command") != command:
        raise UsageError(f"--recipe: {path.name} is a `{recipe.get('command')}` recipe, not `{command}`")
    options = recipe.get("options", {})
    if not isinstance(options, dict):
        raise UsageError(f"--recipe: {path.name}: [options] must be a table")
    return {k.replace("-", "_"): v for k, v in options.items()}


def load_model_config(name_or_file: str) -> dict:
    """The recipe's [model_config]: the model it was written for (checked against the source)."""
    path = Path(name_or_file)
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_file}.toml"
    model = tomllib.loads(path.read_text()).get("model_config", {})
    return model if isinstance(model, dict) else {}


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a string or a list of strings"}


def _check_type(name: str, value, kind: type) -> None:
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), bool: isinstance(value, bool),
          list: isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))}[kind]
    if not ok:
        raise UsageError(f"--recipe: option {name} must be {_KINDS[kind]}, not {value!r}")


def merge(recipe: dict, flags: dict, defaults: dict, types: dict | None = None) -> dict:
    """flags (not None) > recipe > defaults; unknown recipe keys and values of the wrong type
    (`types`, else the default's type) are errors."""
    unknown = sorted(set(recipe) - set(defaults))
    if unknown:
        raise UsageError(f"--recipe: unknown option {unknown[0]!r}")
    for name, value in recipe.items():
        kind = (types or {}).get(name) or (type(defaults[name]) if defaults[name] is not None else None)
        if kind is not None:
            _check_type(name, value, kind)
    out = dict(defaults)
    out.update({k: v for k, v in recipe.items()})
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def load_donors(name_or_file: str) -> tuple[list[str], list[str]]:
    """A recipe's [[donors]] (each `source` and its `prompts`: a list of strings or a file): (sources, prompt texts)."""
    path = Path(name_or_file)
    if not path.is_file():
        path = RECIPE_DIR / f"{name_or_file}.toml"
    donors = tomllib.loads(path.read_text()).get("donors", [])
    sources, prompts = [], []
    for i, d in enumerate(donors):
        if not isinstance(d, dict) or not isinstance(d.get("source"), str):
            raise UsageError(f"--recipe: {path.name}: donor {i + 1} needs a `source`")
        sources.append(d["source"])
        p = d.get("prompts")
        if isinstance(p, list):
            prompts.append("\n".join(str(x) for x in p))
        elif isinstance(p, str):
            f = Path(p) if Path(p).is_absolute() else path.parent / p
            if not f.is_file():
                raise UsageError(f"--recipe: {path.name}: donor {d['source']}: no prompts file {p}")
            prompts.append(f.read_text(errors="replace"))
    if prompts and len(prompts) != len(sources):
        raise UsageError(f"--recipe: {path.name}: give prompts for every donor or for none")
    return sources, prompts
