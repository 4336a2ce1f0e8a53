"""Shared checks for the public functions."""

from __future__ import annotations

import torch

from linops import LinearOperator

from .auto import Auto


def check_operator(A, fname: str, square: bool = True) -> LinearOperator:
    if isinstance(A, torch.Tensor):
        raise TypeError(
            f"{fname} takes a LinearOperator; wrap a matrix with linops.Dense(M) first."
        )
    if not isinstance(A, LinearOperator):
        raise TypeError(f"{fname} takes a LinearOperator, got {type(A).__name__}.")
    if square and not A.is_square():
        raise ValueError(f"{fname} needs a square operator; A has shape {A.shape}.")
    if A.device.type == "meta":
        raise ValueError(
            f"{fname}: A is on the 'meta' device, whose tensors have shapes but no values, so "
            "there is nothing to solve or decompose. Build A from real data (for a model "
            "made on 'meta', model.to_empty(device='cpu') and load its weights first)."
        )
    return A


def check_alg(alg, fname: str):
    if alg is None:
        return Auto()
    if isinstance(alg, type):
        raise TypeError(f"{fname}: pass an algorithm instance, e.g. alg={alg.__name__}(), "
                        "not the class.")
    if not hasattr(alg, "__dataclass_fields__"):
        raise TypeError(
            f"{fname}: alg must be an algorithm config such as solvers.Auto(), solvers.CG(), "
            f"solvers.Lanczos(); got {type(alg).__name__}."
        )
    return alg


def on_failure_of(alg) -> str:
    return getattr(alg, "on_failure", "warn")


def algorithm_name(alg) -> str:
    return type(alg).__name__
