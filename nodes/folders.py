"""Model folders of the pack, registered with ComfyUI's folder system.

models/reward_models/   reward weights: single files (HPSv2 .pt, aesthetic head, ImageReward.pt, open_clip
                        .safetensors) and model folders (transformers CLIP / PickScore, VLMs, tokenizers)
models/fmtt_flow_maps/  learned flow maps: the pack's format (fmtt_core.flow_maps.conv_resnet) and two-time
                        flow-map LoRAs (FLUX, FMRG)
"""
from __future__ import annotations

import os

import folder_paths

REWARDS, FLOW_MAPS = "reward_models", "fmtt_flow_maps"
WEIGHT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin"}
MODEL_FOLDER_MARKERS = ("config.json",)
TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")


def register() -> None:
    """Add our folders with an explicit extension set (a bare add_model_folder_path would match every file),
    keeping any paths users configured for them in extra_model_paths.yaml."""
    for name, exts in ((REWARDS, WEIGHT_EXTENSIONS), (FLOW_MAPS, {".safetensors"})):
        default = os.path.join(folder_paths.models_dir, name)
        paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
        folder_paths.folder_names_and_paths[name] = ([default] + [p for p in paths if p != default], set(exts))


def _roots(name: str) -> list[str]:
    return [p for p in folder_paths.get_folder_paths(name) if os.path.isdir(p)]


def model_folders(name: str = REWARDS, markers=MODEL_FOLDER_MARKERS) -> list[str]:
    """Sub-folders (relative, '/'-separated) holding any of `markers`: transformers model or tokenizer folders."""
    found = set()
    for root in _roots(name):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            if dirpath != root and any(m in filenames for m in markers):
                found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(found)


def weight_files(name: str = REWARDS) -> list[str]:
    """Weight files, leaving out the files inside model folders (those are picked as folders)."""
    folders = model_folders(name)
    return [f for f in folder_paths.get_filename_list(name)
            if not any(f.replace(os.sep, "/").startswith(d + "/") for d in folders)]


def file_path(name: str, relative: str) -> str:
    path = folder_paths.get_full_path(name, relative)
    if path is None:
        raise FileNotFoundError(f"FMTT: '{relative}' was not found in models/{name}/ "
                                f"({', '.join(folder_paths.get_folder_paths(name))}). Put the file there and "
                                "refresh the browser (press R) so the list updates.")
    return path


def folder_path(name: str, relative: str) -> str:
    for root in folder_paths.get_folder_paths(name):
        path = os.path.join(root, os.path.relpath(os.path.join("/", relative), "/"))
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"FMTT: model folder '{relative}' was not found in models/{name}/ "
                            f"({', '.join(folder_paths.get_folder_paths(name))}). Copy the whole model folder there.")
