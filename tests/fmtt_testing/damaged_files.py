"""The ways a model file arrives damaged, as users meet them: every file-reading input of the pack is tried with each.

Each damage maps the bytes of a good safetensors file to the bytes of a bad one, with a phrase the error must say.
"""
from __future__ import annotations

import struct

DAMAGES = {
    "zero_byte": (lambda good: b"", "holds only 0 bytes"),
    "header_2_40": (lambda good: struct.pack("<Q", 2 ** 40) + good[8:], "not a valid safetensors file"),
    "text_renamed": (lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n",
                     "not a valid safetensors file"),
    "truncated": (lambda good: good[: len(good) * 2 // 3], "truncated"),
}
