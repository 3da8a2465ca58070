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


def tiny_unet(seed: int = 0):
    """A tiny random diffusers UNet2DConditionModel (SD 1.x layout): linear attention, 1x1 and 3x3 convs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)


UNET_TARGETS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
                "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
                "mid_block.resnets.0.conv1",  # 3x3 conv
                "up_blocks.1.resnets.0.time_emb_proj")


def unet_lora(unet, rank: int, seed: int, targets=UNET_TARGETS):
    """Random LoRA factors for ``targets`` of ``unet``: {dotted name: (down, up)} in kohya's stored shapes."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(unet.named_modules())
    out = {}
    for name in targets:
        w = mods[name].weight
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
        out[name] = (down, up)
    return out


def write_kohya(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float | None,
                prefix: str = "lora_unet", metadata: dict[str, str] | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """A kohya .safetensors file: ``<prefix>_<name with _>.lora_down.weight`` etc. ``alpha`` None: no alpha keys."""
    tensors = {}
    for name, (down, up) in modules.items():
        k = f"{prefix}_{name.replace('.', '_')}"
        tensors[f"{k}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{k}.lora_up.weight"] = up.to(dtype).contiguous()
        if alpha is not None:
            tensors[f"{k}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def flat_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW = up @ down with conv factors flattened, reshaped to the weight's shape."""
    d = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return d.reshape(up.shape[0], *down.shape[1:])


def merged_unet_deltas(unet_factory, load) -> dict[str, torch.Tensor]:
    """ΔW per module as diffusers applies it: ``load(unet)`` loads a LoRA, every LoRA layer is merged into its
    base weight, and the weights before are subtracted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = unet_factory()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    load(unet)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            w = module.get_base_layer().weight.detach()
            out[name] = (w - before[f"{name}.weight"]).float()
    return out
