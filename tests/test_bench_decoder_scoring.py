"""The decoder track's fast scoring (shared prefix run once, right-padded suffixes, LM head on the last
position's label rows) gives the plain forward's last-position label logits, and the same gradients."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers missing")


def _decoder():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.quality import decoder
    finally:
        sys.path.remove(str(ROOT))
    return decoder


def _plain(model, prefix, suffixes, labels):
    """Each sequence alone, unpadded, the full LM head: the definition."""
    return torch.stack([model(input_ids=torch.tensor([prefix + s])).logits[0, -1, labels] for s in suffixes])


def test_fast_label_logits_equal_the_plain_forward_and_its_gradients():
    decoder = _decoder()
    label_logits = decoder.label_logits
    model = tiny_llama(seed=3).float()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(64, (7,), generator=g).tolist()
    suffixes = [torch.randint(64, (n,), generator=g).tolist() for n in (1, 5, 3, 9)]  # uneven: padding matters
    labels = torch.tensor([5, 17, 40])
    weight = model.model.layers[0].self_attn.q_proj.weight
    fast = label_logits(model, prefix, suffixes, labels)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), weight)
    plain = _plain(model, prefix, suffixes, labels)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), weight)
    assert fast.shape == (4, 3)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-4, atol=1e-6)
    # a precomputed prefix cache gives the same, and is not consumed by use
    with torch.no_grad():
        kv = decoder.prefix_kv(model, prefix)
        a = label_logits(model, prefix, suffixes, labels, kv)
        b = label_logits(model, prefix, suffixes[:2], labels, kv)
    torch.testing.assert_close(a, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, plain.detach()[:2], rtol=1e-5, atol=1e-5)
