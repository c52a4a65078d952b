"""Random few-step LoRAs for the tiny SD1.5 / SDXL / FLUX models, in kohya and in diffusers naming, and damaged ones
(run with ComfyUI's python after tiny_models.py and tiny_unets.py filled the same base directory):

    python tiny_few_step_loras.py COMFYUI_PATH BASE_DIR

The layer names come from ComfyUI's own key map of each loaded model (comfy.lora.model_lora_keys_unet): exactly the
names its LoraLoader accepts. kohya files use kohya's `lora_unet_<diffusers module>` names (`lora_unet_<ComfyUI
module>` for FLUX, as kohya's FLUX scripts write), `lora_down` / `lora_up` and alpha; diffusers files use
`unet.<module>` (`transformer.<module>` for FLUX, where to_q / to_k / to_v are row slices of ComfyUI's fused qkv)
with `lora.down` / `lora.up` (attention processors: `_lora.down`) and peft's `lora_A` / `lora_B`. Every layer of the
UNet / transformer gets a rank-4 LoRA, convolutions included, strong enough to change the model's output.

Writes under BASE_DIR/models/loras:
  tiny_sd15_lcm_kohya, tiny_sd15_hyper_diffusers, tiny_sdxl_lcm_kohya, tiny_sdxl_tcd_diffusers,
  tiny_sdxl_lightning_diffusers, tiny_flux_turbo_kohya, tiny_flux_turbo_diffusers   (.safetensors)
  tiny_sdxl_fewstep_meta        kohya, a neutral name; its metadata (ss_output_name) says LCM
  tiny_sd15_nan_lcm, tiny_sd15_ranks_lcm, tiny_sd15_truncated_lcm, tiny_sd15_unknown_lcm   damaged / wrong files
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

RANK = 4


def key_map_of(loader_path: str, kind: str):
    import comfy.lora
    import comfy.sd
    if kind == "checkpoint":
        patcher = comfy.sd.load_checkpoint_guess_config(loader_path, output_vae=False, output_clip=False)[0]
    else:
        patcher = comfy.sd.load_diffusion_model(loader_path)
    return comfy.lora.model_lora_keys_unet(patcher.model, {}), patcher.model.state_dict()


def _target(value):
    return (value, None) if isinstance(value, str) else (value[0], value[1])


def choose(key_map: dict, state: dict, accept) -> dict:
    """{file name: (target weight key, offset)}: one accepted name per target (the first in sorted order)."""
    chosen, taken = {}, set()
    for name in sorted(key_map):
        key, offset = _target(key_map[name])
        if not accept(name) or key not in state or state[key].ndim not in (2, 4):
            continue
        ident = (key, None if offset is None else tuple(offset))
        if ident in taken:
            continue
        taken.add(ident)
        chosen[name] = (key, offset)
    return chosen


def random_lora(chosen: dict, state: dict, seed: int, naming: str, alpha: float | None = 2.0, up_scale=1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (key, offset) in chosen.items():
        w = state[key]
        rows = w.shape[0] if offset is None else int(offset[2])
        kernel = tuple(w.shape[2:])
        down = torch.randn(RANK, w.shape[1], *kernel, generator=g) / (w[0].numel()) ** 0.5
        up = torch.randn(rows, RANK, *[1] * len(kernel), generator=g) * up_scale
        if naming == "kohya":
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(alpha)
        elif ".processor." in name:  # diffusers' attention-processor LoRA names
            out[f"{name}_lora.down.weight"], out[f"{name}_lora.up.weight"] = down, up
        elif len(out) % 4 == 0:
            out[f"{name}.lora.down.weight"], out[f"{name}.lora.up.weight"] = down, up
        else:  # peft names, as diffusers' save_lora_weights writes them
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
    return out


def main(comfy_path: str, base: str):
    sys.path.insert(0, comfy_path)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    from safetensors.torch import save_file
    models = Path(base) / "models"
    loras = models / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    kohya = lambda n: n.startswith("lora_unet_") and not n.startswith(  # noqa: E731
        ("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block", "lora_unet_time_embed",
         "lora_unet_label_emb", "lora_unet_out_", "lora_unet_in_"))
    diffusers = lambda n: n.startswith("unet.")  # noqa: E731
    written = {}
    for family, seed in (("sd15", 40), ("sdxl", 50)):
        key_map, state = key_map_of(str(models / "checkpoints" / f"tiny_{family}.safetensors"), "checkpoint")
        written[family] = (random_lora(choose(key_map, state, kohya), state, seed, "kohya"),
                           random_lora(choose(key_map, state, diffusers), state, seed + 1, "diffusers"))
    sd15_kohya, sd15_diffusers = written["sd15"]
    sdxl_kohya, sdxl_diffusers = written["sdxl"]
    save_file(sd15_kohya, loras / "tiny_sd15_lcm_kohya.safetensors")
    save_file(sd15_diffusers, loras / "tiny_sd15_hyper_diffusers.safetensors")
    save_file(sdxl_kohya, loras / "tiny_sdxl_lcm_kohya.safetensors")
    save_file(sdxl_diffusers, loras / "tiny_sdxl_tcd_diffusers.safetensors")
    save_file(sdxl_diffusers, loras / "tiny_sdxl_lightning_diffusers.safetensors")
    save_file(sdxl_kohya, loras / "tiny_sdxl_fewstep_meta.safetensors", {"ss_output_name": "lcm-lora-sdxl"})

    key_map, state = key_map_of(str(models / "diffusion_models" / "tiny_flux_dev.safetensors"), "unet")
    flux_kohya = choose(key_map, state, lambda n: n.startswith("lora_unet_"))
    flux_diffusers = choose(key_map, state, lambda n: n.startswith("transformer."))
    # Milder on FLUX: its residual stream compounds a strong LoRA into values whose gradients overflow.
    save_file(random_lora(flux_kohya, state, 60, "kohya", alpha=8.0, up_scale=0.1),
              loras / "tiny_flux_turbo_kohya.safetensors")
    save_file(random_lora(flux_diffusers, state, 61, "diffusers", up_scale=0.2),
              loras / "tiny_flux_turbo_diffusers.safetensors")

    # Damaged and wrong files (bad-input tests): each names the file and the fix.
    nan = dict(sd15_kohya)
    first_up = next(k for k in nan if k.endswith(".lora_up.weight"))
    nan[first_up] = nan[first_up].clone()
    nan[first_up][0, 0] = float("nan")
    save_file(nan, loras / "tiny_sd15_nan_lcm.safetensors")
    ranks = dict(sd15_kohya)
    ranks[first_up] = ranks[first_up][:, :RANK - 1].contiguous()
    save_file(ranks, loras / "tiny_sd15_ranks_lcm.safetensors")
    data = (loras / "tiny_sd15_lcm_kohya.safetensors").read_bytes()
    (loras / "tiny_sd15_truncated_lcm.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"lora_unet_not_a_layer_of_any_model.lora_down.weight": torch.zeros(RANK, 8),
               "lora_unet_not_a_layer_of_any_model.lora_up.weight": torch.zeros(8, RANK),
               **{k: v for k, v in list(sd15_kohya.items())[:6]}}, loras / "tiny_sd15_unknown_lcm.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:3])
