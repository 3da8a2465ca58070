"""Builders of small adapters for the tests: plain PEFT folders written directly, and real ones made by PEFT
on a tiny random transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def write_peft(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, r: int, alpha: float,
               dtype: torch.dtype = torch.float32, **config) -> Path:
    """A PEFT adapter folder with the given raw lora_A/lora_B per module."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
           "base_model_name_or_path": "tiny-test-model", "task_type": "CAUSAL_LM"}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


SHAPES = {  # module -> (d_out, d_in)
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.self_attn.v_proj": (12, 16),
    "model.layers.1.mlp.down_proj": (16, 20),
}


def random_modules(rank: int, seed: int, shapes=SHAPES, ranks: dict[str, int] | None = None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in shapes.items():
        r = (ranks or {}).get(name, rank)
        out[name] = (torch.randn(r, d_in, generator=g) / d_in**0.5, torch.randn(d_out, r, generator=g) / r**0.5)
    return out


def random_adapter(path: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0, **config) -> Path:
    return write_peft(path, random_modules(rank, seed), r=rank, alpha=alpha, **config)


def permute_units(modules, seed: int):
    """The same LoRA with its rank units in another order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (A, B) in modules.items():
        p = torch.randperm(A.shape[0], generator=g)
        out[name] = (A[p], B[:, p])
    return out


def tiny_llama(path: Path | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if path is not None:
        model.save_pretrained(path)
    return model


def peft_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A real PEFT adapter with random (non-zero) A and B on the tiny model saved at ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    kwargs.update(lora_kwargs)
    pm = get_peft_model(model, LoraConfig(**kwargs))
    pm.save_pretrained(out)
    return out


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT itself computes it: W after merge_and_unload minus W before."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out = {}
    for k, v in merged.state_dict().items():
        if k.endswith(".weight") and k in before and not torch.equal(v, before[k]):
            out[k[: -len(".weight")]] = (v - before[k]).float()
    return out
