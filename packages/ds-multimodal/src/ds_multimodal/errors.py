"""The package's one exception type."""


class DsMultimodalError(ValueError):
    """Bad input to ds-multimodal: the message names the argument, file or field and what was expected."""
