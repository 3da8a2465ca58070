import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_lego.adapter import Factors
from lora_lego.lowrank import subspace_truncate, truncate_dense, truncate_factors, truncate_sum


def rand_factors(ranks, d_out=13, d_in=11, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [Factors(torch.randn(r, d_in, generator=g, dtype=dtype), torch.randn(d_out, r, generator=g, dtype=dtype))
            for r in ranks]


def svd_truncation(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncated_sum_equals_truncated_svd_of_the_dense_sum_float64(k):
    fs = rand_factors([2, 5, 3])
    w = [0.7, -1.3, 0.4]
    dense = sum(wi * f.delta() for wi, f in zip(w, fs))
    out = truncate_sum(fs, w, k)
    assert out.rank == k
    assert torch.allclose(out.delta(), svd_truncation(dense, k), atol=1e-10)


@pytest.mark.parametrize("k", [2, 4])
def test_truncated_sum_matches_eckart_young_to_float32_precision(k):
    fs = rand_factors([4, 4, 4], d_out=96, d_in=80, seed=3, dtype=torch.float32)
    w = [1.0, 0.5, -0.8]
    dense64 = sum(wi * f.delta().double() for wi, f in zip(w, fs))
    out = truncate_sum(fs, w, k)
    assert out.A.dtype == torch.float32 and out.B.dtype == torch.float32
    ref = svd_truncation(dense64, k)
    assert (out.delta().double() - ref).norm() <= 1e-5 * ref.norm()
    # and the error is the Eckart-Young minimum: the norm of the dropped singular values
    S = torch.linalg.svdvals(dense64)
    err = (dense64 - out.delta().double()).norm()
    assert torch.isclose(err, S[k:].norm(), rtol=1e-4)


def test_canonical_form_orthonormal_a_rows_and_b_columns_ordered():
    out = truncate_sum(rand_factors([3, 3], seed=1), [1.0, 1.0], 4)
    assert torch.allclose(out.A @ out.A.T, torch.eye(4, dtype=out.A.dtype), atol=1e-10)
    norms = out.B.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:])


def test_rank_above_what_exists_is_exact_and_capped():
    fs = rand_factors([2, 3], d_out=7, d_in=20)
    out = truncate_sum(fs, [1.0, 2.0], 50)
    assert out.rank == 5  # Σ r_i
    assert torch.allclose(out.delta(), fs[0].delta() + 2 * fs[1].delta(), atol=1e-10)
    wide = rand_factors([6, 6], d_out=4, d_in=20)
    assert truncate_sum(wide, [1.0, 1.0], 50).rank == 4  # d_out


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any torch operation produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_truncation_from_factors_never_forms_the_dense_update():
    d_out, d_in = 600, 500
    fs = rand_factors([4, 4, 4], d_out=d_out, d_in=d_in, dtype=torch.float32)
    with MaxNumel() as probe:
        truncate_sum(fs, [1.0, 1.0, 1.0], 4)
    assert probe.largest <= d_out * 12  # the stacked B; ΔW would be 300000 entries
    with MaxNumel() as dense_probe:
        truncate_dense(sum(f.delta() for f in fs), 4)
    assert dense_probe.largest >= d_out * d_in  # the probe does see a dense computation


def test_truncate_dense_is_the_truncated_svd():
    g = torch.Generator().manual_seed(4)
    M = torch.randn(30, 18, generator=g)
    out = truncate_dense(M, 5)
    assert out.rank == 5
    assert torch.allclose(out.delta().double(), svd_truncation(M.double(), 5), atol=1e-4)
    assert truncate_dense(M, 40).rank == 18
    assert torch.allclose(truncate_dense(M, 40).delta(), M, atol=1e-5)


def test_truncate_factors_of_a_zero_update_is_zero():
    out = truncate_factors(torch.zeros(3, 8), torch.zeros(9, 3), 2)
    assert out.rank == 2 and torch.count_nonzero(out.delta()) == 0


def sparsified_lora_sum(d_out=240, d_in=200, ranks=(4, 4, 4), seed=0):
    """What the elementwise methods truncate: a sum of LoRA updates with 70% of its entries zeroed, so a
    dominant part of rank Σ r_i over a full-rank remainder."""
    fs = rand_factors(list(ranks), d_out=d_out, d_in=d_in, seed=seed, dtype=torch.float32)
    M = sum(f.delta() for f in fs)
    keep = torch.rand(M.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    return M * keep


@pytest.mark.parametrize("k", [4, 12])
def test_subspace_iteration_converges_to_the_truncated_svd(k):
    M = sparsified_lora_sum()
    out = subspace_truncate(M, k, 12 + 16)
    assert out is not None and out.rank == k
    ref = svd_truncation(M.double(), k)
    assert (out.delta().double() - ref).norm() <= 1e-4 * ref.norm()
    assert torch.allclose(out.A @ out.A.T, torch.eye(k), atol=1e-5)
    again = subspace_truncate(M, k, 12 + 16)
    assert torch.equal(out.A, again.A) and torch.equal(out.B, again.B)
    # truncate_dense takes this path when told the signal rank, and agrees
    via_dense = truncate_dense(M, k, signal_rank=12)
    assert torch.equal(via_dense.B, out.B)


def test_flat_spectrum_does_not_converge_and_falls_back_to_the_full_svd():
    M = torch.randn(200, 200, generator=torch.Generator().manual_seed(1))
    assert subspace_truncate(M, 4, 20) is None
    out = truncate_dense(M, 4)
    ref = svd_truncation(M.double(), 4)
    assert (out.delta().double() - ref).norm() <= 1e-4 * ref.norm()


def test_join_takes_adjacent_slices_of_one_tensor_as_they_are_and_copies_otherwise():
    from lora_lego.lowrank import join

    A, B = torch.randn(10, 7), torch.randn(7, 10)
    rows = [A[0:3], A[3:4], A[4:10]]
    cols = [B[:, 0:2], B[:, 2:9], B[:, 9:10]]
    for parts, dim, whole in ((rows, 0, A), (cols, 1, B)):
        joined = join(parts, dim)
        assert torch.equal(joined, torch.cat(parts, dim)) and torch.equal(joined, whole)
        assert joined.data_ptr() == whole.data_ptr() and joined.stride() == whole.stride()  # no copy
    for parts, dim in (([A[0:3], A[4:10]], 0),  # a gap
                       ([A[3:4], A[0:3]], 0),  # out of order
                       ([A[0:3], torch.randn(2, 7)], 0),  # another tensor
                       ([B[:5, 0:2], B[:, 2:4]], 1)):  # other rows
        if dim == 1 and parts[0].shape[0] != parts[1].shape[0]:
            with pytest.raises(RuntimeError):
                join(parts, dim)
            continue
        joined = join(parts, dim)
        assert torch.equal(joined, torch.cat(parts, dim)) and joined.data_ptr() != A.data_ptr()


@pytest.mark.parametrize("shape", [(40, 6), (6, 6), (4, 9)])
def test_apply_q_is_the_reduced_q_of_the_qr_times_x(shape):
    from lora_lego.lowrank import apply_q

    M = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Q, R = torch.linalg.qr(M)  # reduced: Q is m x min(m, n)
    h, tau = torch.geqrf(M)
    assert torch.allclose(h[:min(shape)].triu(), R, atol=1e-12)
    X = torch.randn(Q.shape[1], 3, dtype=torch.float64)
    assert torch.allclose(apply_q(h, tau, X), Q @ X, atol=1e-12)
