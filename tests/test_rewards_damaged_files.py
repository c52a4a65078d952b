"""Damaged model files reach the user as a message naming the file, what is wrong and what to do, for every reward
loader: garbage and truncated .safetensors, truncated and garbage PyTorch checkpoints, pickles carrying Python
objects, corrupt config.json. The files are checked before a model is built (a bad file for ViT-H-14 fails in
well under the seconds building it takes), and a load that fails after building keeps nothing in memory."""
from __future__ import annotations

import gc
import json
import re
import time

import pytest
import torch
from safetensors.torch import save_file

import fmtt_rewards as R
from fmtt_rewards.local_files import RewardFilesError, RewardWeightsError
from fmtt_testing.hf_models import register_open_clip_archs

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

PROMPT = "a red cat"
ARCH, WIDE_ARCH = "fmtt-damaged-tiny-vit", "fmtt-damaged-tiny-vit-wide"
CFG = {"embed_dim": 32,
       "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
WIDE_CFG = {**CFG, "vision_cfg": {**CFG["vision_cfg"], "width": 96}}
DAMAGED = r"(truncated|corrupt|not a valid safetensors|not a safetensors)"
FIX = "Download or copy it again"


class Payload:
    """Any Python object: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and damaged weight files of a tiny open_clip CLIP, in every format users have."""
    d = tmp_path_factory.mktemp("damaged")
    register_open_clip_archs(d, {ARCH: CFG, WIDE_ARCH: WIDE_CFG})
    torch.manual_seed(0)
    state = open_clip.create_model(ARCH).state_dict()
    save_file(state, d / "good.safetensors")
    torch.save({"state_dict": state}, d / "good.pt")
    raw, raw_pt = (d / "good.safetensors").read_bytes(), (d / "good.pt").read_bytes()
    contents = {"truncated.safetensors": raw[: len(raw) // 2],
                "garbage.safetensors": b"<html>404 Not Found</html>" * 40,
                "pickle_named.safetensors": raw_pt,
                "truncated.pt": raw_pt[: len(raw_pt) // 2],
                "garbage.pt": bytes(range(256)) * 8}
    for name, content in contents.items():
        (d / name).write_bytes(content)
    torch.save({"state_dict": {}, "hook": Payload()}, d / "unsafe.pt")
    out = {"good": d / "good.safetensors", "dir": d, "truncated_st": d / "truncated.safetensors",
           "garbage_st": d / "garbage.safetensors", "pickle_st": d / "pickle_named.safetensors",
           "truncated_pt": d / "truncated.pt", "garbage_pt": d / "garbage.pt", "unsafe_pt": d / "unsafe.pt"}
    return out


def check_message(err, path, *needles):
    message = str(err.value)
    assert str(path) in message, message
    for needle in needles:
        assert re.search(needle, message), (needle, message)


@pytest.mark.parametrize("case,needles", [
    ("truncated_st", (DAMAGED, FIX)),
    ("garbage_st", (DAMAGED, FIX)),
    ("pickle_st", ("pickle", "safetensors")),
    ("truncated_pt", ("truncated or corrupt", FIX)),
    ("garbage_pt", ("corrupt", FIX)),
    ("unsafe_pt", ("never unpickled", "safetensors")),
])
def test_open_clip_loaders_name_the_file_and_the_fix(files, case, needles):
    for load in (lambda p: R.load_open_clip_score(ARCH, p, PROMPT), lambda p: R.load_hpsv2(p, PROMPT, arch=ARCH)):
        with pytest.raises(RewardWeightsError) as err:
            load(files[case])
        check_message(err, files[case], *needles)


def test_a_bad_file_fails_before_vit_h_is_built(files):
    """Building open_clip ViT-H-14 takes seconds and ~3.7 GB; a damaged file must be refused before that."""
    for case in ("truncated_st", "garbage_pt", "unsafe_pt"):
        started = time.perf_counter()
        with pytest.raises(RewardWeightsError):
            R.load_hpsv2(files[case], PROMPT)  # the real HPSv2 architecture, ViT-H-14
        assert time.perf_counter() - started < 1.0, f"{case}: the model was built before the file was checked"


def live_clip_models() -> int:
    gc.collect()
    return sum(issubclass(type(o), open_clip.model.CLIP) for o in gc.get_objects())


def test_a_failed_load_keeps_no_model_in_memory(files):
    """The weights do not fit the architecture: the model built for them is freed although the error (and its
    traceback) is still held, as ComfyUI holds it to report it."""
    before = live_clip_models()
    with pytest.raises(RewardWeightsError, match="do not fit the architecture") as err:
        R.load_open_clip_score(WIDE_ARCH, files["good"], PROMPT)
    assert err.value.__traceback__ is not None
    assert live_clip_models() == before


def test_aesthetic_names_a_damaged_head_or_clip(files):
    with pytest.raises(RewardWeightsError) as err:
        R.load_aesthetic(files["truncated_pt"], files["good"], clip_arch=ARCH)
    check_message(err, files["truncated_pt"], "truncated or corrupt", FIX)
    head = files["dir"] / "head.pth"
    torch.manual_seed(1)
    torch.save(R.aesthetic.AestheticMLP(32).state_dict(), head)
    with pytest.raises(RewardWeightsError) as err:
        R.load_aesthetic(head, files["truncated_st"], clip_arch=ARCH)
    check_message(err, files["truncated_st"], DAMAGED, FIX)


def test_imagereward_names_a_damaged_checkpoint(files, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    for case, needle in (("truncated_pt", "truncated or corrupt"), ("truncated_st", DAMAGED),
                         ("unsafe_pt", "never unpickled")):
        with pytest.raises(RewardWeightsError) as err:
            R.load_imagereward(files[case], tmp_path / "bert", PROMPT)
        check_message(err, files[case], needle)


# ---------------------------------------------------------------- transformers folders (CLIP, PickScore, VLM)

def write_clip_folder(folder):
    """A tiny transformers CLIP folder with a byte-level BPE tokenizer (vocab.json + merges.txt)."""
    folder.mkdir()
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    v = len(vocab)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=v - 2, eos_token_id=v - 1,
                         pad_token_id=v - 1),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=16)
    torch.manual_seed(2)
    transformers.CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("hf") / "clip")


def copy_folder(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_clip_folder_loads_when_intact(clip_folder):
    assert torch.isfinite(R.load_hf_clip_score(clip_folder, PROMPT)(torch.rand(1, 3, 32, 32))).all()


def test_clip_folder_with_damaged_files_names_them(clip_folder, tmp_path):
    weights = clip_folder / "model.safetensors"
    truncated = copy_folder(clip_folder, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[:5000])
    for load in (R.load_hf_clip_score, R.load_pickscore):
        with pytest.raises(RewardWeightsError) as err:
            load(truncated, PROMPT)
        check_message(err, truncated / "model.safetensors", DAMAGED, FIX)

    # A pickle in a transformers folder: never unpickled, named with the fix.
    pickled = copy_folder(clip_folder, tmp_path / "pickled", skip=("model.safetensors",))
    torch.save({"weights": torch.zeros(1), "hook": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(RewardWeightsError) as err:
        R.load_pickscore(pickled, PROMPT)
    check_message(err, pickled / "pytorch_model.bin", "never unpickled", "safetensors")

    broken_config = copy_folder(clip_folder, tmp_path / "config")
    (broken_config / "config.json").write_text('{"model_type": "clip", "text_config": {')
    with pytest.raises(RewardFilesError) as err:
        R.load_hf_clip_score(broken_config, PROMPT)
    check_message(err, broken_config / "config.json", "not valid JSON", FIX)

    broken_vocab = copy_folder(clip_folder, tmp_path / "vocab")
    (broken_vocab / "vocab.json").write_text('{"a": 0, "b"')
    with pytest.raises(RewardWeightsError) as err:
        R.load_hf_clip_score(broken_vocab, PROMPT)
    check_message(err, broken_vocab, "tokenizer", FIX)


def test_vlm_folder_with_damaged_weights_names_them(tmp_path):
    folder = tmp_path / "vlm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    for name in ("tokenizer_config.json", "tokenizer.json", "preprocessor_config.json"):
        (folder / name).write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    save_file({"w": torch.zeros(64, 64)}, folder / "model.safetensors")
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    started = time.perf_counter()
    with pytest.raises(RewardWeightsError) as err:
        R.load_vlm_reward(folder, "Is it red?")
    check_message(err, folder / "model.safetensors", "truncated", FIX)
    assert time.perf_counter() - started < 1.0
    (folder / "config.json").write_text("{not json")
    with pytest.raises(RewardFilesError) as err:
        R.load_vlm_reward(folder, "Is it red?")
    check_message(err, folder / "config.json", "not valid JSON")
