"""Errors meant for people: the CLI prints them without a traceback and exits with their code."""


class SpatialScoreError(Exception):
    """A problem with the user's input (file, line, field, flag) — printed as `error: ...`, exit code 2."""

    exit_code = 2
