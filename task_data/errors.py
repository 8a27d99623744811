"""The one error of bad data, shared by every loader."""


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names file and line."""
