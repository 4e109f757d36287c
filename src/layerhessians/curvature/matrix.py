"""A dense symmetric matrix as an operator (tests, small problems)."""

from __future__ import annotations

import torch
from torch import Tensor

from layerhessians.curvature.base import SymmetricOperator
from layerhessians.errors import UserError

__all__ = ["MatrixOperator"]


class MatrixOperator(SymmetricOperator):
    """A dense symmetric matrix [dim, dim] as an operator: ``.dim``, ``.matvec``,
    ``.matmat``, ``.to_scipy()``; products in the matrix's dtype, results in the input's dtype.

    Raises:
        UserError: the matrix is not square and non-empty.
    """

    def __init__(self, matrix, name: str = "matrix"):
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise UserError("MatrixOperator needs a non-empty square matrix")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.name = name
        self.dtype, self.device = matrix.dtype, matrix.device

    def matvec(self, vector: Tensor, out: Tensor | None = None) -> Tensor:
        """``A v``: ``vector`` 1-D [dim] -> 1-D [dim].

        Args:
            vector: any dtype; the product is formed in the matrix's dtype on its device.
            out: optional 1-D [dim] tensor that receives the result.

        Returns:
            ``A v`` in ``vector``'s dtype on the matrix's device (``out`` when given).
        """
        vector = torch.as_tensor(vector)
        result = (self.matrix @ vector.to(self.device, self.dtype)).to(vector.dtype)
        return result if out is None else out.copy_(result)

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A V``: ``matrix`` [dim, k] -> [dim, k], as one matrix product.

        Args:
            matrix: [dim, k], any dtype; the product is formed in the matrix's dtype on its device.

        Returns:
            ``A V`` [dim, k] in ``matrix``'s dtype on the matrix's device.
        """
        matrix = torch.as_tensor(matrix)
        return (self.matrix @ matrix.to(self.device, self.dtype)).to(matrix.dtype)
