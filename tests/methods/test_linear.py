import torch
from helpers import random_modules, write_peft

from lora_lego import load_adapter, merge


def truncated(M, k):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def test_linear_and_task_arithmetic_truncate_the_weighted_sum_with_their_default_weights(tmp_path):
    ranks = (4, 2, 6)
    paths = [write_peft(tmp_path / f"a{i}", random_modules(r, i), r=r, alpha=float(r + i)) for i, r in enumerate(ranks)]
    adapters = [load_adapter(p) for p in paths]
    for method, w in (("linear", 1 / 3), ("task_arithmetic", 1.0)):
        merged = merge(adapters, method=method)
        for name in merged.modules:
            dense = sum(w * a.factors(name).delta() for a in adapters)
            assert merged.modules[name].rank == 6  # the largest input rank
            ref = truncated(dense, 6)
            assert (merged.factors(name).delta().double() - ref).norm() <= 1e-5 * ref.norm()
    lam = [1.0, -0.5, 0.25]
    merged = merge(adapters, method="task_arithmetic", rank=3, weights=lam)
    for name in merged.modules:
        ref = truncated(sum(l * a.factors(name).delta() for l, a in zip(lam, adapters)), 3)
        assert merged.modules[name].rank == 3
        assert (merged.factors(name).delta().double() - ref).norm() <= 1e-5 * ref.norm()
