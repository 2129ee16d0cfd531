"""FactoredMatrix against the same operations on the dense product (float64, random factors)."""

import pytest
import torch

from circuits.factored import FactoredMatrix

TOL = dict(rtol=1e-9, atol=1e-9)

# (batch shape, m, r, n): rank 1, one head, batched over heads, and an inner dim wider than m.
SHAPES = [
    ((), 7, 1, 7),
    ((), 9, 3, 9),
    ((4,), 10, 3, 10),
    ((2, 3), 8, 2, 8),
    ((), 4, 6, 4),
    ((3,), 6, 2, 5),
]


def random_factored(batch, m, r, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, r, generator=generator, dtype=torch.float64)
    B = torch.randn(*batch, r, n, generator=generator, dtype=torch.float64)
    return FactoredMatrix(A, B)


def assert_same_complex_sets(actual, expected):
    """Check two batches of complex numbers are equal as multisets, up to order."""
    torch.testing.assert_close(actual.abs().sort(-1).values, expected.abs().sort(-1).values, **TOL)
    torch.testing.assert_close(actual.real.sort(-1).values, expected.real.sort(-1).values, **TOL)
    distance = (actual[..., :, None] - expected[..., None, :]).abs()
    assert torch.all(distance.min(-1).values < 1e-9)
    assert torch.all(distance.min(-2).values < 1e-9)


@pytest.mark.parametrize("batch,m,r,n", SHAPES)
def test_dense_shape_and_transpose(batch, m, r, n):
    fm = random_factored(batch, m, r, n)
    assert fm.shape == torch.Size((*batch, m, n))
    assert fm.mdim == r
    torch.testing.assert_close(fm.dense(), fm.A @ fm.B, **TOL)
    torch.testing.assert_close(fm.T.dense(), fm.dense().transpose(-1, -2), **TOL)
    assert fm.T.shape == torch.Size((*batch, n, m))


@pytest.mark.parametrize("batch,m,r,n", SHAPES)
def test_matmul_with_tensor(batch, m, r, n):
    fm = random_factored(batch, m, r, n)
    right = torch.randn(n, 5, dtype=torch.float64)
    left = torch.randn(5, m, dtype=torch.float64)
    product = fm @ right
    assert isinstance(product, FactoredMatrix)
    assert product.mdim == r
    torch.testing.assert_close(product.dense(), fm.dense() @ right, **TOL)
    torch.testing.assert_close((left @ fm).dense(), left @ fm.dense(), **TOL)


def test_matmul_factored_keeps_smaller_inner_dim():
    wide = random_factored((), 6, 5, 6, seed=1)
    narrow = random_factored((), 6, 2, 6, seed=2)
    expected = wide.dense() @ narrow.dense()
    for product in (wide @ narrow, narrow @ wide):
        assert product.mdim == 2
    torch.testing.assert_close((wide @ narrow).dense(), expected, **TOL)
    torch.testing.assert_close((narrow @ wide).dense(), narrow.dense() @ wide.dense(), **TOL)


def test_matmul_rejects_vector():
    fm = random_factored((), 5, 2, 5)
    with pytest.raises(ValueError, match="matrix"):
        fm @ torch.ones(5, dtype=torch.float64)


def test_scalar_multiple():
    fm = random_factored((3,), 5, 2, 5)
    torch.testing.assert_close((fm * 2.5).dense(), 2.5 * fm.dense(), **TOL)
    torch.testing.assert_close((0.5 * fm).dense(), 0.5 * fm.dense(), **TOL)


@pytest.mark.parametrize("batch,m,r,n", [s for s in SHAPES if s[1] == s[3]])
def test_eigenvalues_match_dense(batch, m, r, n):
    fm = random_factored(batch, m, r, n)
    small = fm.eigenvalues()
    k = min(m, r)
    assert small.shape == torch.Size((*batch, k))
    assert small.is_complex()

    dense = torch.linalg.eigvals(fm.dense())
    # The dense product has m - k extra eigenvalues that are zero up to rounding. Drop the m - k
    # of smallest modulus and compare the rest.
    keep = dense.abs().argsort(dim=-1, descending=True)[..., :k]
    dense_nonzero = dense.gather(-1, keep)
    assert_same_complex_sets(small, dense_nonzero)
    dropped = dense.abs().sort(dim=-1).values[..., : m - k]
    assert torch.all(dropped < 1e-8)


def test_eigenvalues_of_rank_one_product():
    u = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    v = torch.tensor([[4.0, 5.0, 6.0]], dtype=torch.float64)
    eigenvalues = FactoredMatrix(u, v).eigenvalues()
    # The only nonzero eigenvalue of u vᵀ is vᵀ u = 4 + 10 + 18.
    assert eigenvalues.shape == (1,)
    assert eigenvalues[0].real.item() == pytest.approx(32.0)
    assert eigenvalues[0].imag.item() == pytest.approx(0.0)


def test_eigenvalues_reject_rectangular():
    with pytest.raises(ValueError, match="square"):
        random_factored((), 4, 2, 5).eigenvalues()


@pytest.mark.parametrize("batch,m,r,n", SHAPES)
def test_svd_reconstructs_product(batch, m, r, n):
    fm = random_factored(batch, m, r, n)
    U, S, V = fm.svd()
    k = min(m, n, r)
    assert U.shape == torch.Size((*batch, m, k))
    assert S.shape == torch.Size((*batch, k))
    assert V.shape == torch.Size((*batch, n, k))
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), fm.dense(), **TOL)
    identity = torch.eye(k, dtype=torch.float64).expand(*batch, k, k)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, identity, **TOL)
    torch.testing.assert_close(V.transpose(-1, -2) @ V, identity, **TOL)


@pytest.mark.parametrize("batch,m,r,n", SHAPES)
def test_singular_values_match_dense(batch, m, r, n):
    fm = random_factored(batch, m, r, n)
    k = min(m, n, r)
    dense = torch.linalg.svdvals(fm.dense())[..., :k]
    torch.testing.assert_close(fm.singular_values(), dense, **TOL)


@pytest.mark.parametrize("batch,m,r,n", SHAPES)
def test_frobenius_norm_matches_dense(batch, m, r, n):
    fm = random_factored(batch, m, r, n)
    expected = torch.linalg.matrix_norm(fm.dense(), ord="fro")
    torch.testing.assert_close(fm.frobenius_norm(), expected, **TOL)
    from_singular_values = fm.singular_values().pow(2).sum(-1).sqrt()
    torch.testing.assert_close(fm.frobenius_norm(), from_singular_values, **TOL)


def test_batch_broadcasting_and_indexing():
    generator = torch.Generator().manual_seed(3)
    A = torch.randn(4, 6, 2, generator=generator, dtype=torch.float64)
    B = torch.randn(2, 6, generator=generator, dtype=torch.float64)  # shared by all 4 entries
    fm = FactoredMatrix(A, B)
    assert fm.shape == torch.Size((4, 6, 6))
    torch.testing.assert_close(fm[2].dense(), A[2] @ B, **TOL)
    torch.testing.assert_close(fm.singular_values()[2], torch.linalg.svdvals(A[2] @ B)[:2], **TOL)


def test_rows_selects_rows_of_product():
    fm = random_factored((2,), 8, 3, 5)
    index = torch.tensor([6, 0, 3])
    torch.testing.assert_close(fm.rows(index).dense(), fm.dense()[..., index, :], **TOL)
    torch.testing.assert_close(fm.rows(slice(2, 5)).dense(), fm.dense()[..., 2:5, :], **TOL)


def test_invalid_factors_raise():
    with pytest.raises(ValueError, match="inner dimensions"):
        FactoredMatrix(torch.ones(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        FactoredMatrix(torch.ones(3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="broadcast"):
        FactoredMatrix(torch.ones(2, 3, 1), torch.ones(3, 1, 3))
    with pytest.raises(TypeError, match="torch tensors"):
        FactoredMatrix([[1.0]], torch.ones(1, 1))
    with pytest.raises(IndexError, match="batch axes"):
        FactoredMatrix(torch.ones(3, 1), torch.ones(1, 3))[0]


def test_dense_never_built_by_decompositions(monkeypatch):
    fm = random_factored((2,), 50, 3, 40)
    calls = []
    monkeypatch.setattr(FactoredMatrix, "dense", lambda self: calls.append(1))
    fm.singular_values()
    fm.frobenius_norm()
    (fm @ torch.ones(40, 4, dtype=torch.float64)).singular_values()
    random_factored((), 50, 3, 50).eigenvalues()
    assert calls == []
