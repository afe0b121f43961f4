"""Errors of the data layer: each message names the file, record or option and what to do."""

from __future__ import annotations


class DataError(Exception):
    """Base class of every data-layer error."""


class DatasetFilesMissing(DataError):
    """A dataset's raw files are not where the configuration says."""


class CorruptDataFile(DataError):
    """A raw file is truncated or not of the expected format."""


class UnreadableImage(DataError):
    """An image in a user's folder cannot be decoded."""


class DownloadError(DataError):
    """A download failed or its checksum does not match."""


class ConfigError(DataError):
    """A dataset, preprocessing or split option is invalid."""


class DamagedCacheEntry(DataError):
    """A prepared-array cache entry is incomplete or no longer matches what was recorded."""
