"""Recipes: a YAML file that says what to merge and how, equivalent to the same command-line flags.

    method: lego                # default lego
    rank: 16                    # default: the largest input rank of each module
    seed: 0
    device: cpu
    format: kohya               # default: the inputs' format
    options: {param_reweight: joint, n_init: 10}
    adapters:
      - path: style-a.safetensors   # relative to this file
        weight: 1.0                 # default: the method's (1, or 1/N)
      - path: style-b.safetensors
        weight: 0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoraLegoError

KEYS = ("method", "rank", "seed", "device", "format", "options", "adapters")


@dataclass
class Recipe:
    path: Path
    method: str | None = None
    rank: int | None = None
    seed: int | None = None
    device: str | None = None
    format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    adapters: list[Path] = field(default_factory=list)
    weights: list[float | None] = field(default_factory=list)
    written_paths: list[str] = field(default_factory=list)  # as the recipe wrote them


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; adapter paths are resolved against the recipe's folder."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraLegoError("no such recipe file", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoraLegoError(f"cannot read recipe ({e})", path=path) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise LoraLegoError(f"is not valid YAML{at} ({getattr(e, 'problem', None) or e})", path=path) from None
    if not isinstance(data, dict):
        raise LoraLegoError("a recipe is a YAML mapping (method, rank, adapters, ...)", path=path)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise LoraLegoError(f"unknown recipe key(s) {', '.join(map(str, unknown))}; known: {', '.join(KEYS)}", path=path)
    recipe = Recipe(path=path)

    def check(key, kind, what):
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise LoraLegoError(f"{key} must be {what}, got {value!r}", path=path)
        return value

    recipe.method = check("method", str, "a method name")
    recipe.rank = check("rank", int, "a whole number")
    recipe.seed = check("seed", int, "a whole number")
    recipe.device = check("device", str, "cpu, cuda or auto")
    recipe.format = check("format", str, "peft, kohya or diffusers")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise LoraLegoError(f"options must be a mapping of option names to values, got {options!r}", path=path)
    recipe.options = {str(k).replace("-", "_"): v for k, v in options.items()}
    adapters = data.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        raise LoraLegoError("adapters must be a non-empty list of {path, weight} entries", path=path)
    for i, entry in enumerate(adapters, 1):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise LoraLegoError(f"adapter {i} needs a path", path=path)
        extra = sorted(set(entry) - {"path", "weight"})
        if extra:
            raise LoraLegoError(f"adapter {i} has unknown key(s) {', '.join(map(str, extra))}; known: path, weight",
                                path=path)
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise LoraLegoError(f"adapter {i} weight must be a number, got {weight!r}", path=path)
        p = Path(entry["path"]).expanduser()
        recipe.adapters.append(p if p.is_absolute() else path.parent / p)
        recipe.weights.append(None if weight is None else float(weight))
        recipe.written_paths.append(entry["path"])
    return recipe


def recipe_text(*, method: str, rank: int | None, seed: int, device: str, format: str | None,
                options: dict[str, Any], adapters: list[str], weights: list[float]) -> str:
    """The recipe that was run, flags applied, as YAML: what goes into the output's metadata and model card."""
    import yaml

    data: dict[str, Any] = {"method": method, "rank": rank, "seed": seed, "device": device}
    if format:
        data["format"] = format
    if options:
        data["options"] = dict(sorted(options.items()))
    data["adapters"] = [{"path": p, "weight": w} for p, w in zip(adapters, weights)]
    return yaml.safe_dump(data, sort_keys=False)
