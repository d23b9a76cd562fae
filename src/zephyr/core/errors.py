"""Errors a user can act on. The CLI prints their message (no traceback) and exits with 2."""


class ZephyrError(Exception):
    """A problem with the user's input: a recipe, a data file, a model spec, an asset."""

    exit_code = 2


class ConfigError(ZephyrError):
    """A recipe or override names an unknown key or holds a bad value."""


class DataError(ZephyrError):
    """A data file holds a record that breaks its schema (message: FILE:LINE: field: problem)."""


class AssetError(ZephyrError):
    """An offline asset could not be fetched or verified."""
