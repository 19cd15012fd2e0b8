"""`DataError`: bad training or evaluation data, named down to the file, subset, row and field."""
from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """Bad data. The message names source/subset, file, row and field where known.

    ``reason`` is a skip reason (the keys of the datasets' skip counters, e.g.
    ``missing_image``; None for schema and configuration problems).
    """

    def __init__(self, message: str, *, reason: Optional[str] = None, subset: Optional[str] = None,
                 row: Optional[int] = None, field: Optional[str] = None, file: Optional[str] = None):
        super().__init__(message)
        self.reason = reason
        self.subset = subset
        self.row = row
        self.field = field
        self.file = file

    def __reduce__(self):  # keep the attributes across process boundaries (DataLoader workers)
        return (_rebuild, (type(self), str(self), self.reason, self.subset, self.row, self.field, self.file))


def _rebuild(cls, message, reason, subset, row, field_name, file):
    return cls(message, reason=reason, subset=subset, row=row, field=field_name, file=file)
