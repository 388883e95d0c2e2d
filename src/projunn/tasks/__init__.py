"""Tasks of the paper's experiments: data, baselines (models and training come with the CLI)."""

from ._synthetic import (
    COPY_ALPHABET,
    COPY_BLANK,
    COPY_MARKER,
    COPY_SYMBOLS,
    adding_baseline,
    adding_batch,
    copy_baseline,
    copy_batch,
)

__all__ = [
    "COPY_ALPHABET",
    "COPY_BLANK",
    "COPY_MARKER",
    "COPY_SYMBOLS",
    "adding_baseline",
    "adding_batch",
    "copy_baseline",
    "copy_batch",
]
