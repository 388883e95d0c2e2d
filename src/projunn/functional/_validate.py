"""Kept for ``projunn.optim``, which imports these names from here: the checks live in ``projunn._validation``.

Remove once no module imports it.
"""

from .._validation import SUPPORTED_DTYPES, check_choice
from .._validation import check_int as check_positive_int

__all__ = ["SUPPORTED_DTYPES", "check_choice", "check_positive_int"]
