"""Helpers shared by the test suite (pytest puts tests/ on sys.path: see pyproject.toml).

- `workflows`: read, check and convert ComfyUI workflows without ComfyUI.
- `hf_models`: tiny random transformers / tokenizers folders of the real architectures (CLIP, Idefics3 /
  SmolVLM, Qwen2-VL), written as users have them. The unit tests and the real-ComfyUI suite both build theirs
  here, so the integration suite's models are exactly the ones the reward tests check.
- `comfy_prompts`: API-format prompts on the integration suite's tiny models, and reading their results.
- `flux_flow_map_reference`: the diffusers reference of the FLUX flow-map LoRA (unit and integration tests).
- `dist_tools`, `dist_worker`: a real gloo process group of N local processes for the distributed tests.
- `damaged_files`: the ways a model file arrives damaged (zero bytes, a 2^40 header, a renamed text file, ...).
- `comfy_pack`: inside the test ComfyUI server, the pack's modules as ComfyUI loaded them (`pack_module`).
"""
