"""The load tester's one error: a bad option or workload, reported to the user without a traceback."""

from __future__ import annotations

from s2ft_serve.errors import InvalidRequestError


class LoadtestConfigError(InvalidRequestError):
    """An option, workload or server answer that makes the requested run impossible."""
