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
