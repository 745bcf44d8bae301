"""GPU floors for `deploy/gpu/check.sh`: what the torch backend's CUDA graphs buy over eager
CUDA, how much of a batch is the GPU's own time, and the fixed cost per batch of the TensorRT
backend's pycuda buffer path (`TensorRTEngine` with TensorRT's execution replaced by a device
copy, so it runs where TensorRT is not installed).

Each figure is the median of timed calls after warm-up, on fresh random valid inputs.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from engines.inputs import random_inputs
from engines.registry import resolve
from engines.torch import TorchEngine, build_module
from pipeline.settings import load_settings

BATCHES = (1, 64, 256, 1024)


def median_us(call: Callable[[], object], repeats: int = 200) -> float:
    """Median wall time of `call` in µs, after 20 warm-up calls."""
    for _ in range(20):
        call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def replay_us(engine: TorchEngine, batch: int, repeats: int = 200) -> float:
    """Median GPU time of one graph replay of `batch`'s bucket, by CUDA events."""
    graph = engine._graphs[min(b for b in engine._graphs if b >= batch)].graph
    for _ in range(20):
        graph.replay()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def torch_floors(model_dir: Path) -> None:
    """Graph replay against eager CUDA, and the replay's own GPU time, per model and batch."""
    print(f"{'model':8} {'batch':>5} {'eager µs':>9} {'graph µs':>9} {'gpu µs':>7} {'speed-up':>8}")
    for name in ("fraud", "ranking"):
        artifact = resolve(model_dir, name)
        engine = TorchEngine(artifact, device="cuda", max_batch_size=max(BATCHES))
        module = build_module(artifact).to("cuda")
        rng = np.random.default_rng(1)
        for batch in BATCHES:
            inputs = random_inputs(artifact, batch, rng)
            eager = partial(eager_cuda, module, inputs)
            for got, want in zip(engine.infer(inputs).values(), eager(), strict=True):
                assert np.allclose(got, want, atol=1e-4), (name, batch)
            eager_us = median_us(eager)
            graph_us = median_us(partial(engine.infer, inputs))
            gpu_us = replay_us(engine, batch)
            print(
                f"{name:8} {batch:>5} {eager_us:>9.1f} {graph_us:>9.1f} {gpu_us:>7.1f}"
                f" {eager_us / graph_us:>7.2f}x"
            )
        engine.close()


def eager_cuda(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One batch through `module` on CUDA without a graph: a launch per operator."""
    with torch.inference_mode():
        tensors = {k: torch.from_numpy(v).to("cuda") for k, v in inputs.items()}
        result = module(**tensors)
        outputs = result if isinstance(result, tuple) else (result,)
        return [t.cpu().numpy() for t in outputs]


def pycuda_floor(model_dir: Path) -> None:
    """`TensorRTEngine.infer` over real pycuda buffers with a device copy for the engine."""
    if importlib.util.find_spec("pycuda") is None:
        print("pycuda buffers: skipped, pycuda is not installed")
        return
    import pycuda.driver as cuda

    from engines.tensorrt import Profile, TensorRTEngine
    from tests.engines.fake_tensorrt import EchoTensorRT

    sys.modules["tensorrt"] = EchoTensorRT(cuda)  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as cache:
        engine = TensorRTEngine(resolve(model_dir, "fraud"), Path(cache), Profile(1, 256, 1024))
        rng = np.random.default_rng(2)
        print(f"{'pycuda batch':>12} {'µs/batch':>9}  (copy in, device copy, copy out, sync)")
        for batch in BATCHES:
            data = {"numeric": rng.standard_normal((batch, 4)).astype(np.float32)}
            assert np.array_equal(engine.infer(data)["echo"], data["numeric"])
            print(f"{batch:>12} {median_us(partial(engine.infer, data)):>9.1f}")
        engine.close()


def main() -> None:
    """Print both tables for the configured model directory."""
    model_dir = load_settings().engine.model_dir
    print(torch.cuda.get_device_name(), "| models:", model_dir)
    torch_floors(model_dir)
    pycuda_floor(model_dir)


if __name__ == "__main__":
    main()
