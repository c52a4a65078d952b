"""fmtt_core.files: a model file's header is checked, and a bad file named, before anything is built."""
import pytest
import torch
from safetensors.torch import save_file

from fmtt_core.files import FMTTFileError, read_safetensors_header


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64), "b": torch.zeros(3)}, str(path), metadata={"fmtt.format": "flow_map"})
    return path


def test_reads_header_and_metadata(good):
    header = read_safetensors_header(good)
    assert header["__metadata__"] == {"fmtt.format": "flow_map"}
    assert header["w"]["shape"] == [64]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b"<html>not found</html>" * 10, "not a valid safetensors file"),
    (lambda b: b[:4], "only 4 bytes"),
])
def test_damaged_files_are_named_with_the_fix(good, tmp_path, damage, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(FMTTFileError, match=message) as e:
        read_safetensors_header(bad, "flow-map file")
    assert str(bad) in str(e.value) and "again" in str(e.value)


def test_pickle_under_a_safetensors_name_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(FMTTFileError, match="pickle"):
        read_safetensors_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(FMTTFileError, match="not found"):
        read_safetensors_header(tmp_path / "nope.safetensors", "reward weights")


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"], ids=["0x80", "PK"])
def test_a_valid_file_whose_header_length_looks_like_a_pickle_signature_is_read(tmp_path, first_bytes):
    """The header length is little-endian: 1 valid file in 256 starts with 0x80, 1 in 65536 with "PK"."""
    import json
    import struct
    target = int.from_bytes(first_bytes.ljust(2, b"\x00")[:len(first_bytes)], "little")
    modulus = 256 ** len(first_bytes)
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"pad": ""}}
    text = json.dumps(header).encode()
    pad = (target - len(text)) % modulus  # grow the metadata until the length ends in those bytes
    header["__metadata__"]["pad"] = "x" * pad
    text = json.dumps(header).encode()
    assert len(text) % modulus == target
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * 4)
    assert path.read_bytes()[:len(first_bytes)] == first_bytes
    assert read_safetensors_header(path)["w"]["shape"] == [1]
