"""The one table of parameter dtypes: names in configs and on command lines -> torch dtypes."""
from __future__ import annotations

from typing import Literal, Union, get_args

import torch

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = dict(zip(get_args(Dtype), (torch.float32, torch.bfloat16, torch.float16)))
# What command lines also accept (``llave-ds export --dtype bf16``).
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def to_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / a torch dtype -> the torch dtype; ValueError naming the
    choices for anything else."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    key = ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(list(DTYPES) + list(ALIASES))}")
    return DTYPES[key]


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """The table's name of a dtype (``torch.bfloat16`` and ``"bf16"`` -> ``"bfloat16"``)."""
    wanted = to_dtype(dtype)
    return next(name for name, value in DTYPES.items() if value == wanted)
