"""The one exception ds-quant raises for bad input."""


class DsQuantError(ValueError):
    """Bad input to ds-quant: the message names the file, field or flag and what was expected.

    The CLI turns it into one line on stderr and exit code 2.
    """
