"""The README.md model card written beside a PEFT output: what it was made from and how."""

from __future__ import annotations

import json

from . import __version__
from .adapter import Adapter


def model_card_text(adapter: Adapter) -> str:
    """A Hugging Face model card: YAML front matter (base model, library, tags) and how the adapter was made,
    read from the ``lora_lego`` provenance (and ``lora_lego_recipe``) metadata when present."""
    provenance = _json(adapter.metadata.get("lora_lego"))
    recipe = adapter.metadata.get("lora_lego_recipe")
    lines = ["---"]
    if adapter.base_model:
        lines.append(f"base_model: {json.dumps(adapter.base_model)}")
    lines += ["library_name: peft", "tags:", "- lora", "- lora-lego"]
    if provenance:
        lines.append("- merge")
    lines += ["---", ""]
    title = "Merged LoRA adapter" if provenance and len(provenance.get("inputs", [])) > 1 else "LoRA adapter"
    lines += [f"# {title}", ""]
    ranks = sorted({s.rank for s in adapter.modules.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    if provenance:
        tool = provenance.get("tool", f"lora-lego {__version__}")
        lines += [f"Made with {tool} by the `{provenance.get('method')}` "
                  f"method: {len(adapter.modules)} modules, rank {rank_text}, scale folded into lora_B "
                  "(lora_alpha = r).", ""]
        lines += ["| input | weight |", "|---|---|"]
        for path, weight in zip(provenance.get("inputs", []), provenance.get("weights", [])):
            lines.append(f"| `{path}` | {weight:g} |")
        lines.append("")
        lines.append(f"- rank: {provenance.get('rank') if provenance.get('rank') is not None else 'largest input rank per module'}")
        lines.append(f"- seed: {provenance.get('seed')}")
        for key, value in sorted((provenance.get("options") or {}).items()):
            lines.append(f"- {key}: {value}")
        if provenance.get("modules_from_some_inputs"):
            lines.append(f"- modules present in only some inputs: {len(provenance['modules_from_some_inputs'])}")
        lines.append("")
    else:
        lines += [f"Written by lora-lego {__version__}: {len(adapter.modules)} modules, rank {rank_text}.", ""]
    if recipe:
        lines += ["## Recipe", "", "```yaml", recipe.rstrip("\n"), "```", ""]
    base = json.dumps(adapter.base_model or "BASE_MODEL")
    if adapter.config.get("task_type") == "CAUSAL_LM":
        load = ["from transformers import AutoModelForCausalLM", "", f"base = AutoModelForCausalLM.from_pretrained({base})"]
    else:
        load = ["", f"base = ...  # the model {base} that the inputs were trained on"]
    lines += ["## Use", "", "```python", "from peft import PeftModel", *load,
              'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")', "```", ""]
    return "\n".join(lines)


def _json(text):
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
