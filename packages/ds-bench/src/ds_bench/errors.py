"""The package's one exception: bad input, reported by the CLI as one line with exit code 2."""


class BenchError(ValueError):
    """Bad ds-bench input: an unknown backend or scenario, a model directory the backend cannot load,
    a result file of another format. The message names the flag, file or field and what was expected."""
