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
