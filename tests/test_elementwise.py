import weakref
from collections.abc import Sequence

import pytest
import torch

from lora_lego.elementwise import disjoint_mean, elect_sign, magnitude_trim, random_drop, sign_consensus


def test_magnitude_trim_keeps_int_density_times_n_largest():
    d = torch.tensor([[0.1, -5.0, 3.0], [-0.2, 4.0, 0.05]])
    out = magnitude_trim(d, 0.5)  # int(0.5 * 6) = 3 kept
    assert torch.equal(out, torch.tensor([[0.0, -5.0, 3.0], [0.0, 4.0, 0.0]]))
    assert torch.equal(magnitude_trim(d, 0.4), torch.tensor([[0.0, -5.0, 0.0], [0.0, 4.0, 0.0]]))  # int(2.4) = 2
    assert magnitude_trim(d, 1.0) is d


def test_random_drop_keeps_about_density_rescaled_and_is_seeded():
    d = torch.ones(200, 100)
    out = random_drop(d, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert 0.27 < kept.float().mean() < 0.33
    assert torch.allclose(out[kept], torch.tensor(1 / 0.3))
    again = random_drop(d, 0.3, torch.Generator().manual_seed(0))
    other = random_drop(d, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert random_drop(d, 1.0, g) is d and torch.equal(g.get_state(), state)  # draws nothing


def test_sign_election_and_disjoint_mean_by_hand():
    t1 = torch.tensor([2.0, -1.0, 0.0, 3.0])
    t2 = torch.tensor([-1.0, -1.0, 0.0, -4.0])
    t3 = torch.tensor([-0.5, 2.5, 0.0, 0.0])
    assert torch.equal(elect_sign([t1, t2, t3], "total"), torch.tensor([1.0, 1.0, 1.0, -1.0]))
    assert torch.equal(elect_sign([t1, t2, t3], "frequency"), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    w = [1.0, 2.0, 0.5]
    merged = disjoint_mean([t1, t2, t3], w, elect_sign([t1, t2, t3], "total"))
    # entry 0: only t1 agrees (+) -> 2; entry 1: only t3 -> 0.5 * 2.5; entry 2: no one -> 0; entry 3: t2 -> 2 * -4
    assert torch.equal(merged, torch.tensor([2.0, 1.25, 0.0, -8.0]))
    both = sign_consensus([t1, t1], [1.0, 3.0], "total")
    assert torch.equal(both, 2 * t1)  # the mean of agreeing weighted entries
    with pytest.raises(ValueError):
        elect_sign([t1], "majority")


def test_packed_masks_round_trip():
    from lora_lego.elementwise import pack_mask, unpack_mask

    g = torch.Generator().manual_seed(3)
    for shape in [(1,), (7, 3), (8, 8), (5, 13)]:
        m = torch.rand(shape, generator=g) < 0.4
        packed = pack_mask(m)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-m.numel() // 8)
        assert torch.equal(unpack_mask(packed, m.shape), m)


class LiveCounter(Sequence):
    """Dense updates formed on request, counting how many are alive at once."""

    def __init__(self, tensors):
        self.tensors, self.alive, self.peak, self.reads = tensors, 0, 0, 0

    def __len__(self):
        return len(self.tensors)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        t = self.tensors[i].clone()
        self.reads += 1
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._gone)
        return t

    def _gone(self):
        self.alive -= 1


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_and_dare_hold_one_update_at_a_time_and_match_the_stacked_result(sign):
    from lora_lego.methods.dare import dare_linear_delta, dare_ties_delta
    from lora_lego.methods.magnitude_prune import magnitude_prune_delta
    from lora_lego.methods.ties import ties_delta

    g = torch.Generator().manual_seed(5)
    tasks = [torch.randn(30, 20, generator=g) for _ in range(5)]
    w = [1.0, -0.5, 0.25, 2.0, 0.7]
    # the reference: every update trimmed or dropped up front and held in a list
    trimmed = [magnitude_trim(t, 0.3) for t in tasks]
    ref_ties = disjoint_mean(trimmed, w, elect_sign(trimmed, sign))
    dgen = torch.Generator().manual_seed(9)
    drop = [random_drop(t, 0.3, dgen) for t in tasks]
    ref_dare_ties = disjoint_mean(drop, w, elect_sign(drop, sign))
    cases = [
        (lambda s: ties_delta(s, w, 0.3, sign), ref_ties, 2),
        (lambda s: dare_ties_delta(s, w, 0.3, sign, torch.Generator().manual_seed(9)), ref_dare_ties, 2),
        (lambda s: magnitude_prune_delta(s, w, 0.3), sum(wi * t for wi, t in zip(w, trimmed)), 1),
    ]
    for fn, ref, passes in cases:
        seq = LiveCounter(tasks)
        out = fn(seq)
        assert torch.equal(out, ref) if passes == 2 else torch.allclose(out, ref, atol=1e-6)
        assert seq.peak == 1 and seq.reads == passes * len(tasks)
    seq = LiveCounter(tasks)
    dare_linear_delta(seq, w, 0.3, torch.Generator().manual_seed(9))
    assert seq.peak == 1
