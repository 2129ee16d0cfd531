"""Low-rank matrix products kept as their factors.

A head's OV circuit ``W_E W_V W_O W_U`` is a d_vocab x d_vocab matrix of rank at most d_head.
``FactoredMatrix(A, B)`` stands for the product ``A @ B`` with ``A`` [..., m, r] and ``B``
[..., r, n], batched over any leading axes (for example one entry per head). Every method works on
the factors and on r x r matrices, so no m x n matrix is built unless ``dense()`` is called.

The identities used:

- Eigenvalues. For A [m, r] and B [r, m], AB and BA have the same nonzero eigenvalues with the
  same algebraic multiplicities (Sylvester's determinant identity,
  det(I_m - AB / t) = det(I_r - BA / t), shows that the characteristic polynomials differ only by
  a factor t^(m - r)). So the r eigenvalues of the small product BA are the eigenvalues of AB,
  except for the m - r extra zeros of AB.
- SVD. With the reduced QR decompositions A = Q_A R_A and Bᵀ = Q_B R_B, the product is
  AB = Q_A (R_A R_Bᵀ) Q_Bᵀ. An SVD of the small core R_A R_Bᵀ = U' S V'ᵀ gives
  AB = (Q_A U') S (Q_B V')ᵀ, and Q_A U' and Q_B V' still have orthonormal columns.
- Frobenius norm. ‖AB‖_F² = tr(Bᵀ Aᵀ A B) = tr((AᵀA)(BBᵀ)), a trace of r x r Gram matrices,
  which also equals the sum of the squared singular values.
"""

from __future__ import annotations

import numbers

import torch


class FactoredMatrix:
    """The product ``A @ B`` of ``A`` [..., m, r] and ``B`` [..., r, n], stored as its factors.

    Leading (batch) axes of the two factors broadcast against each other. ``r`` is the inner
    dimension, an upper bound on the rank. The SVD is computed once and cached.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            raise TypeError(
                f"FactoredMatrix factors must be torch tensors, got {type(A).__name__} and "
                f"{type(B).__name__}"
            )
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                f"FactoredMatrix factors need at least 2 dimensions, got shapes {tuple(A.shape)} "
                f"and {tuple(B.shape)}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                f"inner dimensions do not match: A is {tuple(A.shape)} and B is {tuple(B.shape)}; "
                "A's last axis must equal B's second-to-last axis"
            )
        try:
            batch_shape = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as error:
            raise ValueError(
                f"batch axes {tuple(A.shape[:-2])} and {tuple(B.shape[:-2])} do not broadcast"
            ) from error
        if A.dtype != B.dtype:
            dtype = torch.promote_types(A.dtype, B.dtype)
            A, B = A.to(dtype), B.to(dtype)
        self.A = A
        self.B = B
        self.batch_shape = batch_shape
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # Shapes and cheap views.

    @property
    def ldim(self) -> int:
        """Number of rows m of the product."""
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        """Number of columns n of the product."""
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        """Inner dimension r, an upper bound on the rank."""
        return self.A.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.batch_shape, self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def T(self) -> "FactoredMatrix":
        """Transpose of the product, (AB)ᵀ = Bᵀ Aᵀ, still factored."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    @property
    def BA(self) -> torch.Tensor:
        """The small product B @ A [..., r, r] (needs a square product)."""
        self._require_square("BA")
        return self.B @ self.A

    def dense(self) -> torch.Tensor:
        """The full product A @ B [..., m, n]; the only method that builds it."""
        return self.A @ self.B

    def __repr__(self) -> str:
        return (
            f"FactoredMatrix(shape={tuple(self.shape)}, inner_dim={self.mdim}, dtype={self.dtype})"
        )

    def __getitem__(self, index) -> "FactoredMatrix":
        """Select along the batch axes only, for example ``circuit[head]``."""
        if not self.batch_shape:
            raise IndexError("this FactoredMatrix has no batch axes to index; use dense() first")
        A = self.A.expand(*self.batch_shape, *self.A.shape[-2:])
        B = self.B.expand(*self.batch_shape, *self.B.shape[-2:])
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > len(self.batch_shape) or any(item is Ellipsis for item in index):
            raise IndexError(
                f"index {index!r} must address only the {len(self.batch_shape)} batch axes"
            )
        return FactoredMatrix(A[index], B[index])

    def rows(self, index) -> "FactoredMatrix":
        """Select the rows ``index`` of the product (a slice, a list or a tensor of row indices)."""
        return FactoredMatrix(self.A[..., index, :], self.B)

    def to(self, dtype: torch.dtype) -> "FactoredMatrix":
        return FactoredMatrix(self.A.to(dtype), self.B.to(dtype))

    # Products.

    def __matmul__(self, other) -> "FactoredMatrix":
        """Multiply on the right by a matrix [..., n, p] or another FactoredMatrix.

        The result stays factored with the smaller of the two inner dimensions.
        """
        if isinstance(other, FactoredMatrix):
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
            return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
        if isinstance(other, torch.Tensor):
            if other.ndim < 2:
                raise ValueError(
                    f"the right operand must be a matrix [..., {self.rdim}, p], got shape "
                    f"{tuple(other.shape)}; for a vector use dense() @ v or other[:, None]"
                )
            return FactoredMatrix(self.A, self.B @ other)
        return NotImplemented

    def __rmatmul__(self, other) -> "FactoredMatrix":
        """Multiply on the left by a matrix [..., p, m]."""
        if isinstance(other, torch.Tensor):
            if other.ndim < 2:
                raise ValueError(
                    f"the left operand must be a matrix [..., p, {self.ldim}], got shape "
                    f"{tuple(other.shape)}"
                )
            return FactoredMatrix(other @ self.A, self.B)
        return NotImplemented

    def __mul__(self, scalar) -> "FactoredMatrix":
        """Multiply the product by a scalar (applied to the left factor)."""
        if isinstance(scalar, numbers.Number) and not isinstance(scalar, bool):
            return FactoredMatrix(self.A * scalar, self.B)
        return NotImplemented

    __rmul__ = __mul__

    # Decompositions.

    def _require_square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise ValueError(f"{what} needs a square product, got shape {tuple(self.shape)}")

    def eigenvalues(self) -> torch.Tensor:
        """Complex eigenvalues [..., min(m, r)] of the square product AB.

        For r <= m these are the eigenvalues of the r x r matrix BA: all nonzero eigenvalues of AB
        with their multiplicities, plus zeros, and AB's remaining m - r eigenvalues are 0 (see the
        module docstring). For r > m the m x m product AB is the smaller one and is used directly.
        Order is the one ``torch.linalg.eigvals`` returns.
        """
        self._require_square("eigenvalues")
        if self.mdim <= self.ldim:
            return torch.linalg.eigvals(self.B @ self.A)
        return torch.linalg.eigvals(self.A @ self.B)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of the product: ``U`` [..., m, k], ``S`` [..., k], ``V`` [..., n, k].

        ``AB = U @ diag(S) @ V.mT`` with k = min(m, n, r), S in descending order, and U and V with
        orthonormal columns. Computed from QR decompositions of the factors (see the module
        docstring) and cached.
        """
        if self._svd is None:
            A = self.A.expand(*self.batch_shape, *self.A.shape[-2:])
            B = self.B.expand(*self.batch_shape, *self.B.shape[-2:])
            Q_A, R_A = torch.linalg.qr(A)  # Q_A [m, min(m, r)], R_A [min(m, r), r]
            Q_B, R_B = torch.linalg.qr(B.transpose(-1, -2))  # Q_B [n, min(n, r)]
            core = R_A @ R_B.transpose(-1, -2)
            U_core, S, Vh_core = torch.linalg.svd(core, full_matrices=False)
            U = Q_A @ U_core
            V = Q_B @ Vh_core.transpose(-1, -2)
            self._svd = (U, S, V)
        return self._svd

    def singular_values(self) -> torch.Tensor:
        """Singular values [..., min(m, n, r)] in descending order."""
        return self.svd()[1]

    def frobenius_norm(self) -> torch.Tensor:
        """‖AB‖_F [...], as sqrt(tr((AᵀA)(BBᵀ))) from the r x r Gram matrices."""
        gram_A = self.A.transpose(-1, -2) @ self.A
        gram_B = self.B @ self.B.transpose(-1, -2)
        # Both Gram matrices are symmetric, so tr(XY) is the sum of their elementwise product.
        squared = (gram_A * gram_B).sum(dim=(-1, -2))
        # Rounding can push an exact zero slightly negative.
        return squared.clamp(min=0).sqrt()
