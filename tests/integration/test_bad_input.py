"""Bad input to a real ComfyUI (see conftest.py): every out-of-range, non-integer, NaN, string or unknown value for
every widget of every FMTT node is refused with HTTP 400 naming the input and its limit, once; every file-reading
input refuses each kind of damaged model file naming the file and the fix; cross-input problems and runs that cannot
fit in memory fail with one clear message; settings that steer nothing say so on the node; and the server keeps
serving. The nodes and inputs tried come from the node schemas (the snapshot for the node list, checked against
the live server; the live schemas for the inputs), so a new node or input cannot be left out."""
from __future__ import annotations

import base64
import json
import math
import os
import socket
import struct
import time
import urllib.parse

import numpy as np
import pytest

from fmtt_testing import workflows as wt
from fmtt_testing.damaged_files import DAMAGES

pytestmark = pytest.mark.integration

PACK_NODES = json.loads(wt.SNAPSHOT.read_text())["pack_nodes"]  # every node of the pack (test_comfyui keeps it live)
_seeds = iter(range(7_000_000, 8_000_000))  # apart from the other test modules' seeds: no cached results

# Nodes that provide each link type (their own inputs valid).
PROVIDERS = {
    "MODEL": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_dev.safetensors",
                                                     "weight_dtype": "default"}},
    "VAE": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taef1.safetensors"}},
    "CONDITIONING": {"class_type": "FMTTTestConditioning", "inputs": {"seed": 0, "tokens": 4}},
    "LATENT": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    "FMTT_REWARD": {"class_type": "FMTTSymmetryReward", "inputs": {"kind": "mirror_left_right", "angles": "90"}},
    "IMAGE": {"class_type": "LoadImage", "inputs": {"image": "tiny_image.png"}},
    "MASK": {"class_type": "LoadImageMask", "inputs": {"image": "tiny_mask.png", "channel": "red"}},
    "FMTT_LOOKAHEAD": {"class_type": "FMTTFluxFlowMapLookahead", "inputs": {
        "model": ["MODEL", 0], "lora_name": "tiny_flux_flowmap_lora.safetensors", "strength": 1.0, "jumps": 1,
        "checkpoint": False}},
}
OPTIONAL_UNLINKED = {"FMTT_LOOKAHEAD"}  # an optional look-ahead stays unconnected (the base model's denoiser)


def widget_value(spec):
    """A valid value of a widget from its /object_info entry: its default, else its first option."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return options.get("default", kind[0] if kind else "")
    if kind == "COMBO":
        return options.get("default", (options.get("options") or [""])[0])
    if kind == "STRING":  # an empty text is refused by the nodes that need one (a prompt, questions)
        return options.get("default") or "a red cat"
    return options.get("default", {"INT": 0, "FLOAT": 0.0, "BOOLEAN": True}.get(kind))


def node_with_providers(prompt, key, node_type, object_info):
    """Add node `key` of `node_type` with default widgets, linking each socket to a provider node."""
    inputs = {}
    info = object_info[node_type]["input"]
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            kind = spec[0]
            if isinstance(kind, str) and kind in PROVIDERS:
                if section == "optional" and kind in OPTIONAL_UNLINKED:
                    continue
                if kind == "FMTT_LOOKAHEAD" and "MODEL" not in prompt:
                    prompt["MODEL"] = json.loads(json.dumps(PROVIDERS["MODEL"]))
                if kind not in prompt:
                    prompt[kind] = json.loads(json.dumps(PROVIDERS[kind]))
                inputs[name] = [kind, 0]
            elif isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if section == "required" or name == "block_checkpointing":
                    inputs[name] = widget_value(spec)
    if node_type in ("FMTTKSampler", "FMTTSampler"):
        inputs.update(particles=2, search_steps=1)
    if node_type == "FMTTKSampler":
        inputs.update(steps=2, seed=next(_seeds))
    prompt[key] = {"class_type": node_type, "inputs": inputs}


def prompt_for(node_type, object_info):
    """A prompt in which node "x" of node_type leads to an output node (ComfyUI validates only such nodes)."""
    p = {}
    node_with_providers(p, "x", node_type, object_info)
    outputs = object_info[node_type]["output"]
    if "LATENT" in outputs:
        p["out"] = {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["x", 0]}}
    elif "FMTT_REWARD" in outputs or "FMTT_LOOKAHEAD" in outputs:
        node_with_providers(p, "ks", "FMTTKSampler", object_info)
        p["ks"]["inputs"]["reward" if "FMTT_REWARD" in outputs else "lookahead"] = ["x", 0]
        p["out"] = {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["ks", 0]}}
    elif "SAMPLER" in outputs:
        p["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["MODEL", 0], "scheduler": "simple",
                                                                  "steps": 2, "denoise": 1.0}}
        p["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": next(_seeds)}}
        p["guider"] = {"class_type": "BasicGuider", "inputs": {"model": ["MODEL", 0],
                                                               "conditioning": ["CONDITIONING", 0]}}
        for kind in ("MODEL", "CONDITIONING", "LATENT"):
            p.setdefault(kind, json.loads(json.dumps(PROVIDERS[kind])))
        p["sca"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["x", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["LATENT", 0]}}
        p["out"] = {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["sca", 0]}}
    elif node_type == "FMTTDiagnostics":  # an output node itself; its diagnostics come from an FMTT Sampler
        sub = prompt_for("FMTTSampler", object_info)
        sub["sampler_node"] = sub.pop("x")
        sub["sca"]["inputs"]["sampler"] = ["sampler_node", 0]
        sub.update(p)
        sub["x"]["inputs"].update(diagnostics=["sampler_node", 1], samples=["sca", 0])
        p = sub
    return p


def bad_values(spec):
    """(value, what ComfyUI must say) for each way a widget's value can be wrong."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        return [("no such option", "not in")]
    cases = []
    lo, hi = options.get("min"), options.get("max")
    if kind == "INT":
        if hi is not None:
            cases += [(hi + 1, f"bigger than max of {hi}")]
            if hi < 100000:
                cases += [(100000, f"bigger than max of {hi}")]
        if lo is not None:
            cases += [(lo - 1, f"smaller than min of {lo}"), (lo + 0.5, f"whole numbers from {lo} to {hi}"),
                      (str(max(lo, 1)), f"whole numbers from {lo} to {hi}")]
    elif kind == "FLOAT":
        cases += [(math.nan, "not a finite number")]  # NaN passes ComfyUI's own min / max comparisons
        if hi is not None:
            cases += [(hi + abs(hi) + 1.0, f"bigger than max of {hi}")]
        if lo is not None:
            cases += [(lo - abs(lo) - 1.0, f"smaller than min of {lo}"), (str(lo), f"numbers from {lo} to {hi}")]
    return cases


def errors_for(body, node_key, name):
    errors = body.get("node_errors", {}).get(node_key, {}).get("errors", [])
    return [e for e in errors if e.get("extra_info", {}).get("input_name") == name]


@pytest.mark.parametrize("node_type", PACK_NODES)
def test_every_bad_widget_value_is_refused_naming_the_input_and_its_limit(comfy, object_info, node_type):
    info = object_info[node_type]["input"]
    widgets = {name: spec for section in ("required", "optional") for name, spec in info.get(section, {}).items()
               if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "COMBO")}
    tried = 0
    for name, spec in widgets.items():
        if isinstance(spec[0], list) or spec[0] == "COMBO":
            if not (spec[1] if len(spec) > 1 else {}).get("options", spec[0] if isinstance(spec[0], list) else []):
                continue  # a model list that is empty here: no valid value to start from
        for value, said in bad_values(spec):
            p = prompt_for(node_type, object_info)
            p["x"]["inputs"][name] = value
            status, body = comfy.submit(p)
            assert status == 400, f"{node_type}.{name} = {value!r} was accepted"
            mine = errors_for(body, "x", name)
            text = json.dumps(mine)
            assert len(mine) == 1, f"{node_type}.{name} = {value!r}: expected one error naming it, got {body}"
            assert said in text, f"{node_type}.{name} = {value!r}: {text}"
            tried += 1
    assert tried or not widgets


def test_a_cross_input_problem_is_reported_once_when_the_node_runs(comfy, object_info):
    p = prompt_for("FMTTKSampler", object_info)
    p["x"]["inputs"].update(particles=2, output="top_k", output_count=3)
    status, body = comfy.submit(p)
    assert status == 200, body
    entry = comfy.wait(body["prompt_id"])
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1 and errors[0]["exception_message"].count("output_count (3)") == 1, errors
    assert "lower output_count or raise particles" in errors[0]["exception_message"]

    p = prompt_for("FMTTSampler", object_info)
    p["x"]["inputs"].update(particles=4, mode="search", search_keep=5)
    entry = comfy.wait(comfy.submit(p)[1]["prompt_id"])
    message = next(d["exception_message"] for k, d in entry["status"]["messages"] if k == "execution_error")
    assert "search_keep" in message and "top_k" not in message, message  # the core speaks, in the node's words


def run_ksampler(comfy, object_info, size=32, **settings):
    p = prompt_for("FMTTKSampler", object_info)
    p["LATENT"]["inputs"].update(width=size, height=size)
    p["x"]["inputs"].update(settings)
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["x", 2]}}
    status, body = comfy.submit(p)
    assert status == 200, body
    entry = comfy.wait(body["prompt_id"])
    errors = [d["exception_message"] for k, d in entry["status"]["messages"] if k == "execution_error"]
    summary = entry["outputs"].get("summary", {}).get("text", [""])[0]
    return entry["status"]["status_str"], (errors[0] if errors else ""), summary


def test_memory_guard_refuses_what_cannot_fit_and_chooses_the_chunk_size(comfy, object_info):
    # The server's budget is FMTT_MEMORY_BUDGET_MB (conftest.py). One particle of a 2048 x 2048 image needs far more.
    status, error, _ = run_ksampler(comfy, object_info, size=2048, particles=1)
    assert status == "error" and "not enough memory" in error and "lower the image size" in error, error
    assert "MiB is free" in error

    # Too many particles: the refusal names them and says how many fit. (At 256 x 256, 4096 particles' state alone
    # is 2 GiB; one particle's pass is measured before sampling.)
    status, error, _ = run_ksampler(comfy, object_info, size=256, particles=4096)
    assert status == "error" and "4096 particles need about" in error, error
    most = int(error.split("lower particles to at most ")[1].split(",")[0])
    assert 1 <= most < 4096

    # A chunk size that does not fit is refused with the largest that does (at 128 x 128 the measured pass, the
    # VAE decode's activations mostly, is far above 1500 / 64 MiB).
    status, error, _ = run_ksampler(comfy, object_info, size=128, particles=64, chunk_size=64)
    assert status == "error" and "not enough memory for chunk_size 64" in error, error
    fit = int(error.split("Lower chunk_size to at most ")[1].split(",")[0])
    assert 1 <= fit < 64

    # Automatic: the largest chunk that fits, shown in the diagnostics; the run completes in chunks.
    particles = fit + 3
    status, error, summary = run_ksampler(comfy, object_info, size=128, particles=particles)
    assert status == "success", error
    chunk = int(summary.split("memory: chunk size ")[1].split(" ")[0])
    assert fit <= chunk < particles and f"of {particles} particles (automatic)" in summary, summary
    status, error, summary = run_ksampler(comfy, object_info, particles=3)
    assert "memory: chunk size 3 of 3 particles (automatic)" in summary, summary


class Frames:
    """A minimal websocket client of ComfyUI's /ws (the standard library has none): reads what the frontend reads."""

    def __init__(self, url: str):
        parts = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId=fmtt-test HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("websocket closed")
            data += chunk
        return data

    def binary_messages(self, seconds: float):
        """Binary frames (ComfyUI's previews and node texts) arriving within `seconds`."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                b0, b1 = self._exact(2)
            except TimeoutError:
                continue
            n = b1 & 0x7F
            n = struct.unpack(">H", self._exact(2))[0] if n == 126 else struct.unpack(">Q", self._exact(8))[0] \
                if n == 127 else n
            payload = self._exact(n)
            if b0 & 0x0F == 2:
                yield payload

    def close(self):
        self.sock.close()


def node_texts(frames: Frames, seconds: float):
    """(node id, text) of ComfyUI's progress-text events (BinaryEventTypes.TEXT = 3) shown under nodes."""
    for payload in frames.binary_messages(seconds):
        if struct.unpack(">I", payload[:4])[0] == 3:
            n = struct.unpack(">I", payload[4:8])[0]
            yield payload[8:8 + n].decode(), payload[8 + n:].decode()


def test_warnings_reach_the_summary_and_blown_up_results_are_flagged(comfy, object_info):
    p = prompt_for("FMTTKSampler", object_info)
    # The extreme but allowed settings (reward scale 1e5, eta 10) on a reward with a steep gradient.
    p["x"]["inputs"].update(reward_scale=100000.0, eta=10.0, particles=2, steps=4)
    p["x"]["inputs"]["reward"] = ["steep", 0]
    p["steep"] = {"class_type": "FMTTTestLinearReward", "inputs": {"slope": 1000.0}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["x", 2]}}
    p["plot"] = {"class_type": "PreviewImage", "inputs": {"images": ["x", 1]}}
    frames = Frames(comfy.url)
    try:
        entry = comfy.wait(comfy.submit(p)[1]["prompt_id"])
        shown = [(node, text) for node, text in node_texts(frames, 3.0) if "FMTT warnings" in text]
    finally:
        frames.close()
    assert entry["status"]["status_str"] == "success"
    assert shown and shown[0][0] == "x" and "far outside the model's range" in shown[0][1], shown  # on the node
    summary = entry["outputs"]["summary"]["text"][0]
    warnings = [line for line in summary.splitlines() if line.startswith("WARNING:")]
    assert any("far outside the model's range" in w for w in warnings), summary
    assert any("reward gradient moves a particle" in w for w in warnings), summary
    assert "FMTT warnings:" in comfy.log.read_text()
    from PIL import Image  # the plot lists the warnings in red under its two panels (2 x 200 + 36 px)
    image = entry["outputs"]["plot"]["images"][0]
    with Image.open(comfy.base / image["type"] / image["subfolder"] / image["filename"]) as im:
        below = np.asarray(im.convert("RGB"))[436:].reshape(-1, 3).astype(int)
        assert im.height > 436 and ((below[:, 0] > 150) & (below[:, 1] < 100)).any(), im.size


def test_the_server_still_serves_a_normal_prompt(comfy, object_info):
    status, error, summary = run_ksampler(comfy, object_info, particles=2, steps=3)
    assert status == "success", error
    assert "FMTT exact" in summary and not any(line.startswith("WARNING") for line in summary.splitlines())
    assert math.isfinite(float(summary.split("final reward best ")[1].split(",")[0]))


def test_damaged_reward_files_are_named_with_the_fix(comfy, object_info):
    """A truncated weights file and a model folder whose weights are garbage, picked in the CLIP reward node."""
    rewards = comfy.base / "models" / "reward_models"
    good = (rewards / "tiny_clip" / "model.safetensors").read_bytes()
    (rewards / "truncated_clip.safetensors").write_bytes(good[: len(good) // 3])
    folder = rewards / "garbage_clip"
    folder.mkdir(exist_ok=True)
    for f in (rewards / "tiny_clip").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes(b"<html>502 Bad Gateway</html>" * 50)
    for model, file, said in (("truncated_clip.safetensors", rewards / "truncated_clip.safetensors", "truncated"),
                              ("garbage_clip", folder / "model.safetensors", "not a valid safetensors file")):
        p = prompt_for("FMTTKSampler", object_info)
        p["x"]["inputs"]["reward"] = ["clip", 0]
        p["clip"] = {"class_type": "FMTTCLIPScoreReward", "inputs": {
            "model": model, "open_clip_arch": "ViT-B-32", "prompt": "a red cat", "scale": "logit", "dtype": "auto"}}
        status, body = comfy.submit(p)
        assert status == 200, body
        entry = comfy.wait(body["prompt_id"])
        error = next(d for k, d in entry["status"]["messages"] if k == "execution_error")
        assert error["node_type"] == "FMTTCLIPScoreReward", error
        assert str(file) in error["exception_message"] and said in error["exception_message"], error
        assert "Download or copy it again" in error["exception_message"], error


def test_the_node_list_tried_here_is_the_live_servers(object_info):
    assert wt.pack_nodes(object_info) == PACK_NODES, "a pack node is missing from the snapshot: refresh it"


@pytest.fixture(scope="module")
def damaged(comfy):
    """Damaged copies of a good safetensors file, `damaged_<kind>.safetensors`, and the good file itself,
    `intact.safetensors` (for a node's other file inputs), in every model folder (the pack's and ComfyUI's), and a
    BERT tokenizer folder (ImageReward's other input); removed afterwards. In reward_models/ the intact file is an
    aesthetic-predictor head: the one node with two file inputs reads its head first."""
    import torch
    from safetensors.torch import save_file

    from fmtt_rewards.aesthetic import AestheticMLP

    models = comfy.base / "models"
    good = (models / "fmtt_flow_maps" / "tiny_flow_map.safetensors").read_bytes()
    written = []
    for folder in (p for p in models.iterdir() if p.is_dir()):
        for kind, (make, _) in DAMAGES.items():
            path = folder / f"damaged_{kind}.safetensors"
            path.write_bytes(make(good))
            written.append(path)
        (folder / "intact.safetensors").write_bytes(good)
        written.append(folder / "intact.safetensors")
    torch.manual_seed(0)
    save_file(AestheticMLP(768).state_dict(), str(models / "reward_models" / "intact.safetensors"))
    tokenizer = models / "reward_models" / "intact_tokenizer"
    tokenizer.mkdir(exist_ok=True)
    (tokenizer / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]))
    yield comfy.get("/object_info")  # the live schemas, listing the damaged files
    for path in written + [tokenizer / "vocab.txt"]:
        path.unlink()
    tokenizer.rmdir()


def file_inputs(info: dict) -> list[str]:
    """A node's inputs that read a model file: the combos whose options list the damaged files."""
    return [name for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
            if f"damaged_{next(iter(DAMAGES))}.safetensors" in _options(spec)]


def _options(spec) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return (spec[1] if len(spec) > 1 else {}).get("options", []) if spec[0] == "COMBO" else []


@pytest.mark.parametrize("node_type", PACK_NODES)
def test_every_file_reading_input_names_a_damaged_file_and_the_fix(comfy, damaged, node_type):
    info = damaged[node_type]
    inputs = file_inputs(info)
    # An input that says it takes a file from models/ must be one of them (a new file input cannot be skipped).
    promised = [name for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
                if "models/" in (spec[1] if len(spec) > 1 else {}).get("tooltip", "")
                and "folder" not in (spec[1] if len(spec) > 1 else {}).get("tooltip", "").lower()]
    assert set(promised) <= set(inputs), (promised, inputs)
    combos = {n: spec for section in ("required", "optional") for n, spec in info["input"].get(section, {}).items()
              if _options(spec)}
    for name in inputs:
        for kind, (_, said) in DAMAGES.items():
            p = prompt_for(node_type, damaged)
            x = p["x"]["inputs"]
            for other, spec in combos.items():  # the node's other files and folders: intact ones
                x[other] = next((o for o in _options(spec) if str(o).startswith("intact")), x.get(other))
            x[name] = f"damaged_{kind}.safetensors"
            status, body = comfy.submit(p)
            assert status == 200, body
            entry = comfy.wait(body["prompt_id"])
            error = next((d for k, d in entry["status"]["messages"] if k == "execution_error"), None)
            assert error is not None, f"{node_type}.{name} = damaged_{kind}: the run succeeded"
            message = error["exception_message"]
            assert error["node_type"] == node_type, (node_type, name, kind, error["node_type"], message)
            assert f"damaged_{kind}.safetensors" in message and said in message, (node_type, name, message)
            assert "Download or copy it again" in message, (node_type, name, message)


def test_settings_that_steer_nothing_say_so_on_the_node(comfy, object_info):
    p = prompt_for("FMTTKSampler", object_info)
    p["x"]["inputs"].update(particles=2, steps=2)  # the only tilted step is the last one: no gradient ever acts
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["x", 2]}}
    frames = Frames(comfy.url)
    try:
        entry = comfy.wait(comfy.submit(p)[1]["prompt_id"])
        shown = [(node, text) for node, text in node_texts(frames, 3.0) if "FMTT warnings" in text]
    finally:
        frames.close()
    assert entry["status"]["status_str"] == "success"
    assert shown and shown[0][0] == "x" and "no backward pass runs" in shown[0][1], shown
    assert "no backward pass runs" in entry["outputs"]["summary"]["text"][0]
