"""Loading reward weights from local files only: file checks, safe weight loading, no network.

Users put reward models under ComfyUI's models/reward_models/; nothing here ever downloads.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

try:  # inside the ComfyUI pack, rewards/ and fmtt_core/ are sub-packages of the pack
    from ..fmtt_core.files import FMTTFileError, read_safetensors_header
except ImportError:  # installed: fmtt_rewards next to fmtt_core
    from fmtt_core.files import FMTTFileError, read_safetensors_header

PathLike = str | os.PathLike
REDOWNLOAD = "Download or copy it again (an interrupted download or a copy error leaves such a file)."
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class RewardFilesError(FileNotFoundError):
    """A reward's local file or folder is missing or incomplete."""


class RewardWeightsError(ValueError):
    """A reward's weights file cannot be read safely or does not fit the architecture."""


@contextmanager
def hub_offline() -> Iterator[None]:
    """Force Hugging Face libraries offline while loading; restore the caller's settings afterwards.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so its cached constant is set as well.
    """
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - transformers / open_clip always bring huggingface_hub
        hub_constants = None
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    saved_flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    os.environ.update({k: "1" for k in _OFFLINE_VARS})
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_flag


@contextmanager
def loading_errors(what: str, folder: PathLike, part: str) -> Iterator[None]:
    """A library's error while loading a model folder, said with the folder's name and the fix. The library's own
    exception is not chained: it would keep a half-built model in memory."""
    try:
        yield
    except (RewardFilesError, RewardWeightsError, ImportError):
        raise
    except Exception as err:  # transformers / tokenizers raise many types for a damaged folder
        detail = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    else:
        return
    raise RewardWeightsError(f"{what}: could not load the {part} in '{folder}' ({detail}). A file in the folder is "
                             f"damaged or does not belong to it. {REDOWNLOAD}")


def require_file(path: str | os.PathLike, what: str, expected: str) -> Path:
    """Return `path` as a Path, or raise naming the missing file and what should be there."""
    p = Path(path).expanduser()
    if not p.is_file():
        state = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise RewardFilesError(f"{what}: '{p}' {state}. Expected {expected}.")
    return p


def require_folder(folder: str | os.PathLike, what: str, groups: Sequence[tuple[str, Sequence[str]]]) -> Path:
    """Check a model folder holds every required file group; raise listing exactly what is missing.

    groups: (description, alternatives) pairs; a group is satisfied when any one alternative exists.
    An alternative may name several files joined by '+' (e.g. "vocab.json+merges.txt").
    """
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise RewardFilesError(f"{what}: folder '{p}' does not exist. " + _expected_listing(groups))

    def present(alternative: str) -> bool:
        return all((p / name).is_file() for name in alternative.split("+"))

    missing = [(desc, alts) for desc, alts in groups if not any(present(a) for a in alts)]
    if missing:
        lines = "\n".join(f"  - {desc}: {' or '.join(alts)}" for desc, alts in missing)
        raise RewardFilesError(
            f"{what}: folder '{p}' is incomplete. Missing:\n{lines}\n" + _expected_listing(groups)
            + f"\nFound: {sorted(x.name for x in p.iterdir()) or 'nothing'}.")
    return p


def _expected_listing(groups: Sequence[tuple[str, Sequence[str]]]) -> str:
    return "Expected files: " + "; ".join(f"{desc} ({' or '.join(alts)})" for desc, alts in groups) + "."


def check_safetensors(path: PathLike, what: str) -> dict:
    """The header of a safetensors file, read before anything is built for it; RewardWeightsError naming the file,
    what is wrong (missing, a pickle, corrupt, truncated) and what to do."""
    try:
        return read_safetensors_header(path, what)
    except FMTTFileError as err:
        raise RewardWeightsError(str(err)) from None


def _torch_load(path: Path, what: str, mmap: bool):
    """torch.load(weights_only=True) with errors that say whether the file is unsafe or damaged."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises many types for a damaged file
        message = str(err)
        if mmap and "mmap can only be used" in message:
            return None  # a legacy (non-zip) checkpoint cannot be mapped: the caller reads it in full
        if "Unsupported global" in message:
            problem = ("holds Python objects besides tensors (a pickle that can run code when loaded), so it is "
                       "never unpickled: torch.load(weights_only=True) refused it. Use the published .safetensors "
                       "file, or re-save the tensors with safetensors.torch.save_file in a trusted environment.")
        else:
            first = next((line.strip() for line in message.splitlines() if "Unsupported" in line),
                         (message.splitlines() or [type(err).__name__])[0])
            problem = (f"cannot be read as a PyTorch checkpoint: it is truncated or corrupt ({first[:200]}). "
                       f"{REDOWNLOAD}")
    raise RewardWeightsError(f"{what}: '{path}' {problem}")


def check_weights_file(path: PathLike, what: str) -> None:
    """Check a weights file before a model is built for it: a safetensors header, or a PyTorch checkpoint opened
    with weights_only=True (memory-mapped when it can be: nothing is read in full, nothing but tensors unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        check_safetensors(path, what)
    elif path.is_file():
        if _torch_load(path, what, mmap=True) is None:
            _torch_load(path, what, mmap=False)
    else:
        raise RewardFilesError(f"{what}: '{path}' does not exist. {REDOWNLOAD}")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file whatever its name says: its 8-byte header length is followed by a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def read_json(path: PathLike, what: str) -> dict:
    """A JSON file of a model folder, or RewardFilesError naming it when it is not valid JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RewardFilesError(f"{what}: '{path}' is not valid JSON ({err}): it is corrupt or truncated. "
                               f"{REDOWNLOAD}") from None
    if not isinstance(data, dict):
        raise RewardFilesError(f"{what}: '{path}' does not hold a JSON object. {REDOWNLOAD}")
    return data


def check_folder_weights(folder: Path, what: str) -> None:
    """Check the weights of a transformers model folder (model.safetensors, its shards, or pytorch_model.bin)
    before transformers builds the model, so a damaged file is named instead of failing deep inside it."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        check_safetensors(folder / "model.safetensors", what)
    elif index.is_file():
        shards = sorted(set(read_json(index, what).get("weight_map", {}).values()))
        for shard in shards:
            check_safetensors(folder / shard, what)
    elif (folder / "pytorch_model.bin").is_file():
        check_weights_file(folder / "pytorch_model.bin", what)


def load_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pt/.pth/.bin with torch.load(weights_only=True).

    The file is checked first (a damaged or unsafe file gives RewardWeightsError naming it and the fix).
    Unwraps a {'state_dict': ...} checkpoint and strips DataParallel's 'module.' prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file
        check_safetensors(path, what)
        state = load_file(str(path), device="cpu")
    else:
        state = _torch_load(path, what, mmap=True)
        if state is None:
            state = _torch_load(path, what, mmap=False)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardWeightsError(f"{what}: '{path}' does not contain a tensor state dict.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """load_state_dict(strict=True) with an error that lists the mismatch and how to fix it."""
    message = _mismatch(module, state)
    if message is not None:
        # The error's traceback keeps this frame: drop the model so a failed load does not keep it in memory.
        del module, state
        raise RewardWeightsError(f"{what}: the weights do not fit the architecture. {hint}\n{message}")


def _mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    try:
        module.load_state_dict(state, strict=True)
        return None
    except RuntimeError:
        pass  # listed below, key by key; the RuntimeError itself is not kept (it would hold the model)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    return (f"  missing keys ({len(missing)}): {_head(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_head(unexpected)}\n"
            f"  shape mismatches ({len(shapes)}): {_head(shapes)}")


def _head(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "") if items else "none"
