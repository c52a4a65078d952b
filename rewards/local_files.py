"""Loading reward weights from local files only: file checks, safe weight loading, no network.

Users put reward models under ComfyUI's models/reward_models/; nothing here ever downloads.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

PathLike = str | os.PathLike
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


def load_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pt/.pth/.bin with torch.load(weights_only=True).

    Unwraps a {'state_dict': ...} checkpoint and strips DataParallel's 'module.' prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle with arbitrary objects, TorchScript archive, corrupt file
            raise RewardWeightsError(
                f"{what}: could not read '{path}' as a weights file with torch.load(weights_only=True) ({err}). "
                "Only plain tensor checkpoints are loaded (arbitrary pickles can run code). "
                "Use the published .safetensors file, or re-save the tensors with safetensors.torch.save_file "
                "in a trusted environment.") from err
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardWeightsError(f"{what}: '{path}' does not contain a tensor state dict.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """load_state_dict(strict=True) with an error that lists the mismatch and how to fix it."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
        raise RewardWeightsError(
            f"{what}: the weights do not fit the architecture. {hint}\n"
            f"  missing keys ({len(missing)}): {_head(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_head(unexpected)}\n"
            f"  shape mismatches ({len(shapes)}): {_head(shapes)}") from err


def _head(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "") if items else "none"
