"""The error a data source raises when it is configured wrongly.

Distinct from ``BadSampleError`` (one unusable sample, skipped and counted): a
``DataConfigError`` means no sample can be read as configured, so the run stops with its
message, which names the file, line or key at fault and the fix.
"""


class DataConfigError(ValueError):
    """A data source cannot be used as configured (missing file, malformed line, wrong key)."""
