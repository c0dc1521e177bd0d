"""The one exception ds-data raises for bad input."""


class DsDataError(ValueError):
    """Bad input to ds-data: the message names the file, line, field or flag and what was expected."""
