"""FMTT for ComfyUI: Flow Map Trajectory Tilting (arXiv 2511.22688) as ComfyUI nodes.

ComfyUI imports this file as a package (custom_nodes/<pack>/__init__.py); everything below uses relative
imports so the pack never shadows ComfyUI's own top-level modules (`nodes` in particular).
"""
import importlib.util

# Outside ComfyUI (pytest collecting this repository, a plain `import`), there is no comfy_api and the
# entry point stays undefined; inside ComfyUI any import error below surfaces as IMPORT FAILED.
if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension, io

    from .nodes import NODES

    class FMTTExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> FMTTExtension:
        return FMTTExtension()
