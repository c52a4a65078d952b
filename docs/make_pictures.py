"""Regenerate the README's pictures (docs/images/): nothing in them is drawn by hand.

    .venv/bin/python docs/make_pictures.py                 # the digits pictures (CPU, ~15 s)
    .venv/bin/python docs/make_pictures.py --comfyui /path/ComfyUI --comfyui-python /path/comfy-venv/bin/python
                                                            # and the workflow screenshot

- digits_samples.png, digits_diagnostics.png: `fmtt demo`'s own plots (fmtt_demo.report) for the default run
  (digit 3, 64 FMTT particles, 40 steps, seed 0), with base sampling, best-of-N, FK steering and FMTT.
- workflow.png: an example workflow loaded into the real ComfyUI frontend (app.loadGraphData), served by a
  headless ComfyUI with this pack installed, photographed by headless chromium through playwright. Needs a
  ComfyUI checkout and a python that runs it with playwright installed (pip install playwright); chromium is
  taken from CHROMIUM (default /usr/bin/chromium).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGES = HERE / "images"
WORKFLOW = REPO / "workflows" / "fmtt_flux_dev_schnell_lookahead_pickscore.json"
DIGITS_METHODS = "base,best_of_n,fk,fmtt_exact,fmtt_search"


def digits_pictures(out: Path) -> None:
    import torch

    from fmtt_demo.cli import run_demo
    from fmtt_demo.report import asked_for, save_samples_grid, save_traces_plot

    torch.set_num_threads(1)  # the networks are tiny: one thread is the fast setting
    runs, settings = run_demo(methods=DIGITS_METHODS, progress=False)
    save_samples_grid(runs, out / "digits_samples.png", seed=settings["seed"], title=asked_for(settings))
    save_traces_plot(runs, out / "digits_diagnostics.png")
    for run in runs:
        print(f"{run.method.label}: judge accuracy {run.metrics['judge_accuracy']:.1%}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "checkpoints", "loras", "reward_models", "fmtt_flow_maps")


def stand_in_model_files(graph: dict, models: Path) -> None:
    """Empty files (and folders) named as the workflow's loaders and rewards expect, so that the frontend
    draws the graph as a user with the models sees it, not with missing-model errors. Nothing runs."""
    names = {value for node in graph["nodes"] if "Loader" in node["type"] or "Reward" in node["type"]
             for value in node.get("widgets_values") or [] if isinstance(value, str) and value and " " not in value}
    for folder in MODEL_FOLDERS:
        (models / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            if Path(name).suffix in (".safetensors", ".pt", ".pth", ".bin"):
                (models / folder / name).touch()
            elif folder == "reward_models" and "_" in name or "-" in name:  # a model folder (PickScore_v1, ...)
                (models / folder / name).mkdir(exist_ok=True)


def workflow_screenshot(comfyui: Path, python: str, out: Path, workflow: Path = WORKFLOW) -> None:
    """Start ComfyUI with the pack linked into a temporary custom_nodes/, load `workflow` in its frontend."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "custom_nodes").mkdir()
        os.symlink(REPO, base / "custom_nodes" / "comfyui-fmtt")
        stand_in_model_files(json.loads(workflow.read_text()), base / "models")
        port = _free_port()
        log = open(base / "comfyui.log", "w")
        server = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                   "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
                                  cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(url + "/object_info/FMTTSampler", timeout=5).read()
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        tail = (base / "comfyui.log").read_text()[-3000:]
                        raise RuntimeError(f"ComfyUI did not start: {tail}") from None
                    time.sleep(0.5)
            # playwright lives in ComfyUI's python: photograph from there.
            subprocess.run([python, __file__, "--screenshot-worker", url, str(workflow), str(out / "workflow.png")],
                           check=True, timeout=300)
        finally:
            server.terminate()
            server.wait(30)
            log.close()


def screenshot_worker(url: str, workflow: Path, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    graph = json.loads(workflow.read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 2300, "height": 1040}, device_scale_factor=1)
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        page.evaluate("g => window.app.loadGraphData(g)", graph)
        page.wait_for_timeout(2000)
        page.keyboard.press("Escape")  # the missing-models dialog: the models are not in this bare ComfyUI
        page.evaluate("() => { for (const d of document.querySelectorAll('.p-dialog-mask')) d.remove(); }")
        # The whole graph at a zoom the frontend still draws in full detail (it simplifies nodes below ~0.6).
        page.evaluate("""() => {
            try { window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
            const c = window.app.canvas, scale = 0.65;
            c.ds.scale = scale; c.ds.offset = [90 / scale, 130 / scale]; c.setDirty(true, true); }""")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(path))
        browser.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=IMAGES, help=f"folder for the pictures (default {IMAGES})")
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="a ComfyUI checkout: also photograph a workflow in its frontend (default: skip)")
    parser.add_argument("--comfyui-python", default=sys.executable,
                        help="the python that runs ComfyUI and has playwright (default: this one)")
    parser.add_argument("--skip-digits", action="store_true", help="only the workflow screenshot")
    parser.add_argument("--screenshot-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.screenshot_worker:
        url, workflow, path = args.screenshot_worker
        screenshot_worker(url, Path(workflow), Path(path))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_digits:
        digits_pictures(args.out)
    if args.comfyui is not None:
        workflow_screenshot(args.comfyui, args.comfyui_python, args.out)
    print(f"pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
