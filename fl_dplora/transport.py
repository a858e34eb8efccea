"""Adapter tensors <-> Flower ArrayRecord, in the configured transfer dtype, and wire byte counts.

Quantising for the wire happens after any noise was added, so it costs no privacy. NumPy has no
bfloat16, so bfloat16 travels as its raw 16-bit pattern (int16) and is viewed back on arrival.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, RecordDict

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_array_record(tensors: Mapping[str, torch.Tensor], transfer_dtype: str = "float32") -> ArrayRecord:
    dtype = _DTYPES[transfer_dtype]
    arrays = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu", dtype)
        if dtype is torch.bfloat16:
            t = t.view(torch.int16)
        arrays[key] = Array(t.numpy())
    return ArrayRecord(arrays)


def from_array_record(record: ArrayRecord, transfer_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Back to float32 tensors. Raises ValueError on a dtype that does not match the config."""
    expected = {"float32": "float32", "float16": "float16", "bfloat16": "int16"}[transfer_dtype]
    out = {}
    for key, arr in record.items():
        if arr.dtype != expected:
            raise ValueError(f"{key}: dtype {arr.dtype}, expected {expected} for transfer-dtype {transfer_dtype}")
        t = torch.from_numpy(arr.numpy().copy())
        if transfer_dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        out[key] = t.to(torch.float32)
    return out


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a message body as Flower 1.42 ships it: every deflated object of its tree."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
