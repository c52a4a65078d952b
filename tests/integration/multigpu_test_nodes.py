"""Test-only ComfyUI nodes for the MultiGPU suite (test_multigpu.py), loaded by comfy_test_nodes.py.

  FMTTTestMultiGPUClones   a MODEL carrying real MultiGPU clones, made the way "MultiGPU CFG Split"
                           (comfy.multigpu.create_multigpu_deepclones) makes them, but on the main device itself:
                           a CPU-only machine has no other device, and create_multigpu_deepclones makes none there.
                           Each clone's BaseModel counts the rows it computes (and can be told to fail).
  FMTTTestCountingReward   slope x mean brightness, counting the rows each reward object (the original or a copy
                           on a device) scores
  FMTTTestMultiGPUReport   the counts of a tag and the threads that computed them, as text (after the sampler:
                           it takes the sampled LATENT)
"""
import json
import threading
import time
from collections import defaultdict

import comfy.model_management
import comfy.multigpu
import torch
from comfy_api.latest import io, ui

Reward = io.Custom("FMTT_REWARD")
# tag -> who -> rows: "clone 1", "clone 2", ... for the clones' BaseModels, "reward <n>" for each reward object
COUNTS: dict = defaultdict(lambda: defaultdict(int))
HANG_S = 60.0
THREADS: dict = defaultdict(lambda: defaultdict(set))  # tag -> who -> names of the threads that computed


def _count(tag: str, who: str, rows: int) -> None:
    COUNTS[tag][who] += rows
    THREADS[tag][who].add(threading.current_thread().name)


def _counter(tag: str, who: str, fail_after: int, fail_kind: str):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        _count(tag, who, int(x.shape[0]))
        if 0 <= fail_after < COUNTS[tag][who]:
            if fail_kind == "interrupt":  # what ComfyUI's cancel button does, from inside a worker's model call
                comfy.model_management.interrupt_current_processing(True)
            elif fail_kind == "hang":  # a device that stops answering (for HANG_S, then the call goes on)
                COUNTS[tag]["hanging"] = 1
                time.sleep(HANG_S)
            else:
                raise RuntimeError(f"test failure inside the BaseModel of {who}")
    return hook


class TestMultiGPUClones(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestMultiGPUClones", category="testing",
                         inputs=[io.Model.Input("model"),
                                 io.Int.Input("clones", default=1, min=1, max=4),
                                 io.String.Input("tag", default="mgpu"),
                                 io.Int.Input("fail_after", default=-1, min=-1, max=10**6),
                                 io.Combo.Input("fail_kind", options=["error", "interrupt", "hang"],
                                                default="error")],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, clones, tag, fail_after, fail_kind):
        model = model.clone()
        made = []
        for i in range(clones):
            # ComfyUI's own deep clone: a fresh BaseModel loaded by the loader's factory, for a load device.
            clone = model.deepclone_multigpu(new_load_device=model.load_device)
            clone.is_multigpu_base_clone = True
            clone.model.diffusion_model.register_forward_pre_hook(
                _counter(tag, f"clone {i + 1}", fail_after, fail_kind), with_kwargs=True)
            made.append(clone)
        model.set_additional_models("multigpu", made)
        model.match_multigpu_clones()
        comfy.multigpu.GPUOptionsGroup().register(model)
        return io.NodeOutput(model)


class CountingReward(torch.nn.Module):
    name = "counting test reward"

    def __init__(self, tag, slope):
        super().__init__()
        self.tag, self.slope = tag, slope
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # a tensor for the copy to move

    def forward(self, images):
        _count(self.tag, f"reward {id(self)}", int(images.shape[0]))
        return self.slope * self.scale * images.mean((1, 2, 3))


class TestCountingReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestCountingReward", category="testing",
                         inputs=[io.String.Input("tag", default="mgpu"),
                                 io.Float.Input("slope", default=1.0, min=-1e9, max=1e9)],
                         outputs=[Reward.Output()])

    @classmethod
    def execute(cls, tag, slope):
        return io.NodeOutput(CountingReward(tag, slope))


class TestMultiGPUReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestMultiGPUReport", category="testing", is_output_node=True,
                         inputs=[io.String.Input("tag", default="mgpu"), io.Latent.Input("samples")], outputs=[])

    @classmethod
    def execute(cls, tag, samples):
        threads = {who: sorted(names) for who, names in THREADS[tag].items()}
        return io.NodeOutput(ui=ui.PreviewText(json.dumps({**COUNTS[tag], "threads": threads})))


NODES = [TestMultiGPUClones, TestCountingReward, TestMultiGPUReport]
