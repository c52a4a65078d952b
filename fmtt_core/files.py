"""Checking a model file before anything is built around it.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the data. Reading the header alone (a few KB) tells whether the file is a
safetensors file at all and whether it is complete, in milliseconds, before a loader spends seconds
and gigabytes building a model for it.
"""
from __future__ import annotations

import json
import os
import struct

from .errors import FMTTInputError

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class FMTTFileError(FMTTInputError):
    """A model file that is missing, not what it claims to be, or incomplete."""


def read_safetensors_header(path: str | os.PathLike, what: str = "model file") -> dict:
    """Return the header of a safetensors file ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}).

    Raises FMTTFileError naming the file, what is wrong and what to do, for a missing file, a file that is
    not safetensors (a pickle, an HTML error page, garbage) and a truncated file (an interrupted download).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FMTTFileError(f"{what} not found: {path}. Check the path, or copy the file there.")
    size = os.path.getsize(path)
    redownload = "Download or copy it again (an interrupted download or a copy error leaves such a file)."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FMTTFileError(f"{what} {path} is not a safetensors file: it holds only {size} bytes. {redownload}")
        (n,) = struct.unpack("<Q", head)
        # A pickle / zip signature counts only where the 8 bytes are no plausible header length: a real header of
        # 128 + 256 k bytes starts with 0x80, one of 0x4B50 + 65536 k bytes with "PK".
        if (n > _MAX_HEADER or 8 + n > size) and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise FMTTFileError(f"{what} {path} is a PyTorch pickle / zip checkpoint, not safetensors, despite its "
                                f"name. Pickles are never loaded by name alone: convert it to safetensors "
                                f"(safetensors.torch.save_file) or use the published .safetensors file.")
        if n > _MAX_HEADER or 8 + n > size:
            raise FMTTFileError(f"{what} {path} is not a valid safetensors file (its header claims {n} bytes, the "
                                f"file has {size}): it is corrupt, truncated or another format. {redownload}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FMTTFileError(f"{what} {path} has an unreadable safetensors header ({e}). {redownload}") from None
    if not isinstance(header, dict):
        raise FMTTFileError(f"{what} {path} has a malformed safetensors header. {redownload}")
    data = size - 8 - n
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if end > data:
        raise FMTTFileError(f"{what} {path} is truncated: its tensors need {end} bytes of data, the file holds "
                            f"{data}. {redownload}")
    return header
