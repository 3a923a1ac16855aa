"""Errors that name what is wrong: the file, the column, the row, what was expected and what came."""
from __future__ import annotations


class B3MineError(Exception):
    """Base class of every error b3mine raises on purpose."""


class InputError(B3MineError, ValueError):
    """Bad user input (embeddings, ids, configuration). The message names where and what."""

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
        expected: str | None = None,
        got: str | None = None,
    ) -> None:
        self.problem, self.file, self.column, self.row = problem, file, column, row
        self.expected, self.got = expected, got
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"column {column!r}" if column else "",
                f"row {row}" if row is not None else "",
            )
            if part
        )
        message = f"{where}: {problem}" if where else problem
        if expected is not None:
            message += f" (expected {expected}"
            message += f", got {got})" if got is not None else ")"
        super().__init__(message)


class PlanError(B3MineError):
    """A plan directory that is missing, incomplete or breaks an invariant."""
