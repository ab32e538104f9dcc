"""vLLM's own `EncoderCudaGraphManager` (0.33.0 or 0.34.0) driving a model's encoder CUDA-graph protocol on
the CPU: the manager's capture runs as it is; only `torch.cuda.CUDAGraph` is replaced, by a stand-in whose
replay reruns the body the manager ran under capture."""

from __future__ import annotations

import contextlib

import torch

from fused_moonvit.integration.encoder_graph import PLAN_KEY


class StandInGraph:
    """`torch.cuda.CUDAGraph`'s stand-in on the CPU. The manager's own capture runs the body once under
    `stand_in_capture`, which records what the model's forward was given; replay reruns that forward on
    those buffers and copies it into the manager's output buffer, which is what replaying the graph does."""

    capturing: list["StandInGraph"] = []

    def __init__(self):
        self.forward = self.output_buffer = self.key = self.replays = None

    def replay(self):
        self.replays.append(self.key)
        with torch.inference_mode():
            self.output_buffer.copy_(self.forward())


@contextlib.contextmanager
def stand_in_capture(graph, pool=None, stream=None):
    StandInGraph.capturing.append(graph)
    try:
        yield
    finally:
        StandInGraph.capturing.pop()


def captured_manager(model, config, monkeypatch, dtype=torch.float32):
    """vLLM's EncoderCudaGraphManager for `model` after its own `capture`, with stand-in graphs; and the
    list every replay appends its graph's key to (the token budget, or (budget, axis keys) where the
    model's graphs have a capture axis)."""
    from vllm.v1.worker.encoder_cudagraph import EncoderCudaGraphManager

    forward = model.encoder_cudagraph_forward

    def recording_forward(values, path="default"):
        if StandInGraph.capturing:
            StandInGraph.capturing[-1].forward = lambda: forward(dict(values), path=path)
        return forward(values, path=path)

    monkeypatch.setattr(model, "encoder_cudagraph_forward", recording_forward)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", stand_in_capture)
    manager = EncoderCudaGraphManager(vllm_config=config, device=torch.device("cpu"), dtype=dtype, model=model)
    manager.capture(graph_pool=object())
    replays = []
    for key, graph in manager._get_graph_set("default").items():
        assert graph.graph.forward is not None, key
        graph.graph.output_buffer, graph.graph.key, graph.graph.replays = graph.output_buffer, key, replays
    return manager, replays


def poison(manager, seed):
    """Every captured graph's buffers of the fused encoder poisoned: NaN pixels and a random plan, so that
    a replay that reads anything it was not given shows it."""
    g = torch.Generator().manual_seed(seed)
    for graph in manager._get_graph_set("default").values():
        graph.input_buffers["pixel_values"].fill_(float("nan"))
        plan = graph.input_buffers[PLAN_KEY]
        plan.copy_(torch.randint(-(2**20), 2**20, plan.shape, generator=g, dtype=torch.int32))
