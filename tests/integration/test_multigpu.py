"""FMTT particles spread over ComfyUI's MultiGPU clones, in a real ComfyUI (see conftest.py).

The server runs on the CPU, where "MultiGPU CFG Split" makes no clones. FMTTTestMultiGPUClones
(multigpu_test_nodes.py) makes them with ComfyUI's own deepclone_multigpu on the main device itself: ComfyUI's
sampling then loads them, builds its MultiGPUThreadPool and hands both to the FMTT sampler, exactly as with GPUs,
except that every device is the CPU. The clones count the rows their BaseModel computes, so a test fails if the
clone never ran its particles; the results must equal the plain MODEL's, bit for bit (same batches).
"""
from __future__ import annotations

import itertools
import json
import re
import time

import pytest

from fmtt_testing.comfy_prompts import custom_prompt, error_message, fmtt_sampler, ksampler_prompt, latent_of, ok

pytestmark = pytest.mark.integration

_seeds = itertools.count(700_000)
_tags = itertools.count()

LOOKAHEADS = {
    "ode": {"class_type": "FMTTBaseModelLookahead", "inputs": {"kind": "ode", "steps": 2, "solver": "heun",
                                                               "checkpoint": True}},
    "flow_map": {"class_type": "FMTTFlowMapLookahead", "inputs": {"flow_map": "tiny_flow_map.safetensors",
                                                                  "jumps": 2, "checkpoint": True}},
    "flux_lora": {"class_type": "FMTTFluxFlowMapLookahead", "inputs": {
        "model": ["model", 0], "lora_name": "tiny_flux_flowmap_lora.safetensors", "strength": 1.0, "jumps": 2,
        "checkpoint": True}},
}


def with_clones(prompt, clones=1, **options):
    """The prompt with its MODEL passed through FMTTTestMultiGPUClones; returns (prompt, tag of the counts)."""
    tag = f"t{next(_tags)}"
    prompt["mgpu"] = {"class_type": "FMTTTestMultiGPUClones", "inputs": {
        "model": ["model", 0], "clones": clones, "tag": tag, "fail_after": -1, "fail_kind": "error", **options}}
    prompt["ks"]["inputs"]["model"] = ["mgpu", 0]
    prompt["counts"] = {"class_type": "FMTTTestMultiGPUReport", "inputs": {"tag": tag, "samples": ["ks", 0]}}
    return prompt, tag


def counting_reward(prompt, tag):
    prompt["reward"] = {"class_type": "FMTTTestCountingReward", "inputs": {"tag": tag, "slope": 30.0}}
    return prompt


def summary_of(entry) -> str:
    return entry["outputs"]["summary"]["text"][0]


def comparable(summary: str) -> list[str]:
    """The summary without what may differ between the runs: the time, the device line."""
    return [re.sub(r"time [\d.]+ s", "time", line) for line in summary.splitlines() if not line.startswith("MultiGPU")]


def model_rows(summary: str, counter: str = "model") -> int:
    """Rows through the diffusion model by the core's NFE counters: "model" (denoiser + base-model look-ahead), or
    "denoiser" (when the look-ahead is another network)."""
    return int(re.search(rf"NFE \(particle-evaluations\):.*\b{counter} (\d+)", summary).group(1))


def pair(comfy, lookahead=None, clones=1, **fmtt):
    """The same prompt with the plain MODEL and with the clone-carrying MODEL -> (plain, spread, counts)."""
    seed = next(_seeds)
    look = LOOKAHEADS.get(lookahead)
    plain = ok(comfy.run(ksampler_prompt(seed, lookahead=look, **fmtt)))
    prompt, _ = with_clones(ksampler_prompt(seed, lookahead=look, **fmtt), clones)
    spread = ok(comfy.run(prompt))
    return plain, spread, json.loads(spread["outputs"]["counts"]["text"][0])


@pytest.mark.parametrize("mode,lookahead", [("exact", None), ("search", None), ("exact", "ode"),
                                            ("exact", "flow_map"), ("exact", "flux_lora"), ("zero_order", None)])
def test_spread_over_a_clone_gives_the_one_device_result(comfy, mode, lookahead):
    plain, spread, counts = pair(comfy, lookahead, mode=mode, particles=4, chunk_size=2, output="top_k",
                                 output_count=4, search_keep=2)
    assert latent_of(spread) == latent_of(plain), "the spread run's particles differ from the one-device run's"
    text = summary_of(spread)
    assert comparable(text) == comparable(summary_of(plain)), text
    assert "MultiGPU: particles per step on cpu (main, this thread): 2 particle(s), cpu (clone 1): 2 particle(s)" \
        in text, text
    assert "WARNING" not in text, text
    # The clone's BaseModel computed exactly its half of every call of the diffusion model (a flow-map file is
    # another network; the LoRA's checkpointed jumps run the model again in the backward pass).
    assert counts.get("clone 1", 0) > 0, f"the clone never ran: {counts}"
    expected = model_rows(text, "denoiser" if lookahead == "flow_map" else "model")
    expected += model_rows(text, "backward_model") if lookahead == "flux_lora" else 0
    assert 2 * counts["clone 1"] == expected, (counts, text)


def test_three_devices_uneven_split_and_the_reward_copies(comfy):
    """Two clones (both on the main device: ComfyUI's pool then has one worker for them) and 5 particles in chunks
    of 1: blocks of 2, 2 and 1 rows. Each device's reward copy scores its own rows."""
    seed = next(_seeds)
    fmtt = {"particles": 5, "chunk_size": 1, "output": "top_k", "output_count": 5}
    plain = ok(comfy.run(counting_reward(ksampler_prompt(seed, **fmtt), "plain-reward")))
    prompt, tag = with_clones(ksampler_prompt(seed, **fmtt), clones=2)
    spread = ok(comfy.run(counting_reward(prompt, tag)))
    assert latent_of(spread) == latent_of(plain)
    text = summary_of(spread)
    assert comparable(text) == comparable(summary_of(plain)), text
    assert "cpu (main, this thread): 2 particle(s), cpu (clone 1): 2 particle(s), cpu (clone 2): 1 particle(s)" \
        in text, text
    counts = json.loads(spread["outputs"]["counts"]["text"][0])
    rows = model_rows(text)
    assert (5 * counts["clone 1"], 5 * counts["clone 2"]) == (2 * rows, rows), (counts, text)
    rewards = [k for k in counts if k.startswith("reward")]
    assert len(rewards) == 3, f"expected the reward and two copies to score particles: {counts}"
    # The clones ran on ComfyUI's pool worker (one for the CPU), not on the thread that runs the prompt; so did
    # the two reward copies, and the original reward ran on the prompt's thread.
    threads = counts["threads"]
    assert threads["clone 1"] == threads["clone 2"], threads
    worker = threads["clone 1"]
    on_worker = [k for k in rewards if threads[k] == worker]
    elsewhere = [k for k in rewards if not set(threads[k]) & set(worker)]
    assert len(worker) == 1 and len(on_worker) == 2 and len(elsewhere) == 1, threads


def test_the_fmtt_sampler_in_samplercustomadvanced_spreads_too(comfy):
    """The SAMPLER path: MultiGPU MODEL -> BasicGuider -> SamplerCustomAdvanced with the FMTT Sampler."""
    seed = next(_seeds)
    sampler = fmtt_sampler(particles=4, chunk_size=1, output="top_k", output_count=4)
    plain = ok(comfy.run(custom_prompt(seed, sampler)))
    prompt = custom_prompt(seed, sampler)
    prompt["mgpu"] = {"class_type": "FMTTTestMultiGPUClones", "inputs": {
        "model": ["model", 0], "clones": 1, "tag": "custom", "fail_after": -1, "fail_kind": "error"}}
    prompt["guider"]["inputs"]["model"] = ["mgpu", 0]
    prompt["counts"] = {"class_type": "FMTTTestMultiGPUReport", "inputs": {"tag": "custom", "samples": ["sca", 0]}}
    spread = ok(comfy.run(prompt))
    assert latent_of(spread) == latent_of(plain)
    assert json.loads(spread["outputs"]["counts"]["text"][0]).get("clone 1", 0) > 0


@pytest.mark.parametrize("companion_clones", [False, True])
def test_a_look_ahead_without_copies_runs_on_the_main_device_with_a_warning(comfy, companion_clones):
    """A companion runs on the main device; one that carries MultiGPU clones itself keeps its gradient there."""
    seed = next(_seeds)
    companion = {"class_type": "FMTTCompanionLookahead", "inputs": {
        "model": ["schnell", 0], "positive": ["cond", 0], "cfg": 1.0, "steps": 2, "solver": "euler",
        "checkpoint": True}}
    schnell = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_schnell.safetensors",
                                                      "weight_dtype": "default"}}
    plain_prompt = ksampler_prompt(seed, lookahead=companion, particles=2)
    plain_prompt["schnell"] = schnell
    prompt, _ = with_clones(ksampler_prompt(seed, lookahead=companion, particles=2))
    prompt["schnell"] = schnell
    if companion_clones:
        prompt["schnell_mgpu"] = {"class_type": "FMTTTestMultiGPUClones", "inputs": {
            "model": ["schnell", 0], "clones": 1, "tag": f"companion{seed}", "fail_after": -1, "fail_kind": "error"}}
        prompt["look"] = {**companion, "inputs": {**companion["inputs"], "model": ["schnell_mgpu", 0]}}
    plain, spread = ok(comfy.run(plain_prompt)), ok(comfy.run(prompt))
    assert latent_of(spread) == latent_of(plain)
    text = summary_of(spread)
    assert "MultiGPU: every particle runs on the main device, because the look-ahead (companion model" in text, text
    assert json.loads(spread["outputs"]["counts"]["text"][0]).get("clone 1", 0) == 0


def test_a_failing_device_gives_a_clear_error_and_the_server_keeps_serving(comfy):
    prompt, _ = with_clones(ksampler_prompt(next(_seeds), particles=4, chunk_size=2), fail_after=4)
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "the particles on cpu (MultiGPU clone 1) failed" in message, message
    assert "test failure inside the BaseModel of clone 1" in message, message
    ok(comfy.run(ksampler_prompt(next(_seeds), particles=2)))


def test_an_interrupt_inside_a_device_stops_the_run(comfy):
    prompt, _ = with_clones(ksampler_prompt(next(_seeds), particles=4, chunk_size=2, steps=6), fail_after=4,
                            fail_kind="interrupt")
    entry = comfy.run(prompt)
    messages = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    ok(comfy.run(ksampler_prompt(next(_seeds), particles=2)))


def test_cancel_stops_a_run_whose_device_hangs(comfy):
    """A clone that stops answering (sleeps inside its model call) must not hang the run: Cancel ends it while the
    device is still stuck, and the server keeps serving."""
    prompt, _ = with_clones(ksampler_prompt(next(_seeds), particles=4, chunk_size=2, steps=6), fail_after=4,
                            fail_kind="hang")
    status, body = comfy.submit(prompt)
    assert status == 200
    deadline = time.time() + 60
    while comfy.get("/queue")["queue_running"] == [] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(5.0)  # well past the clone's second call, where it hangs
    sent = time.time()
    comfy.post("/interrupt", {})
    entry = comfy.wait(body["prompt_id"], timeout=40)
    assert time.time() - sent < 20, "the run did not stop while the device hung"
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    ok(comfy.run(ksampler_prompt(next(_seeds), particles=2)))
