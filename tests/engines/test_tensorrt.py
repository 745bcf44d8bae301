import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from engines import tensorrt
from engines.base import EngineError
from engines.build import build_engines
from engines.factory import gpu_available, load_engine, tensorrt_unavailable_reason
from engines.inputs import random_inputs
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import resolve
from engines.settings import Backend, EngineSettings
from engines.tensorrt import Profile, engine_cache_key, network_flags
from tests.engines import fake_tensorrt

BASE = ("abc", "10.9.0", "NVIDIA H100", "9.0", Profile(), '{"build": 2}')


@pytest.mark.parametrize(
    "changed",
    [
        ("abd", *BASE[1:]),
        (BASE[0], "11.0.0", *BASE[2:]),
        (*BASE[:2], "NVIDIA L4", *BASE[3:]),
        (*BASE[:3], "8.9", *BASE[4:]),
        (*BASE[:4], Profile(opt_batch=64), BASE[5]),
        (*BASE[:5], '{"build": 3}'),
    ],
)
def test_engine_cache_key_changes_with_everything_an_engine_is_tied_to(changed):
    assert engine_cache_key(*changed) != engine_cache_key(*BASE)
    assert engine_cache_key(*BASE) == engine_cache_key(*BASE)


def test_networks_are_strongly_typed_where_tensorrt_has_the_flag():
    assert network_flags(fake_tensorrt.FakeTensorRT(strongly_typed=True)) == 1 << 5
    assert network_flags(fake_tensorrt.FakeTensorRT(strongly_typed=False)) == 0
    typed = tensorrt.build_config(fake_tensorrt.FakeTensorRT(strongly_typed=True))
    weak = tensorrt.build_config(fake_tensorrt.FakeTensorRT(strongly_typed=False))
    assert typed != weak  # so a plan built weakly typed is never reused


@pytest.fixture
def fakes(monkeypatch, model_dir):
    """TensorRTEngine over the fake libraries, on the fraud model's artefact."""
    trt, cuda = fake_tensorrt.FakeTensorRT(), fake_tensorrt.FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", type(sys)("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    sys.modules["pycuda"].driver = cuda
    return trt, cuda, resolve(model_dir, "fraud")


def test_a_cached_plan_is_loaded_not_rebuilt_and_a_new_build_config_rebuilds(fakes, tmp_path):
    trt, _cuda, artifact = fakes
    first = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 8, 16))
    first.close()
    second = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 8, 16))
    second.close()
    assert (first.built, second.built) == (True, False)
    assert second.plan_path == first.plan_path and len(trt.builds) == 1
    assert trt.builds[0]["flags"] == 1 << 5
    weak = fake_tensorrt.FakeTensorRT(strongly_typed=False)
    sys.modules["tensorrt"] = weak
    third = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 8, 16))
    third.close()
    assert third.built and third.plan_path != first.plan_path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temps


def test_a_foreign_timing_cache_is_replaced_not_fatal(fakes, tmp_path):
    trt, cuda, artifact = fakes
    timing = tensorrt.timing_cache_path(tmp_path, trt.__version__, cuda.gpu, "9.0")
    timing.write_bytes(b"timing of another GPU")
    with capture_logs() as logs:
        engine = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 8, 16))
    engine.close()
    assert engine.built
    assert "tensorrt_timing_cache_ignored" in [entry["event"] for entry in logs]
    assert timing.read_bytes() == trt.own_timing
    other = tensorrt.timing_cache_path(tmp_path, trt.__version__, "NVIDIA L4", "8.9")
    assert other != timing  # each GPU model keeps its own


def test_loaded_on_one_thread_run_and_closed_on_another_releases_everything(fakes, tmp_path):
    _trt, cuda, artifact = fakes
    loaded = []
    loader = threading.Thread(
        target=lambda: loaded.append(tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 8, 16)))
    )
    loader.start()
    loader.join()
    (engine,) = loaded
    assert not cuda.context.current()  # the load popped what it pushed
    out = engine.infer({"numeric": np.ones((3, 4), dtype=np.float32)})
    assert out["score"].shape == (3,) and not cuda.context.current()
    host, device = len(engine._buffers.host), len(engine._buffers.device)
    assert (host, device) == (2, 2)
    engine.close()
    engine.close()  # twice is harmless
    # Two device buffers, two page-locked buffers and the stream: each freed once, with the
    # context current here; the primary context's retain released where pycuda honours it.
    assert len(cuda.live) == 5
    assert cuda.misreleased() == []
    assert (cuda.context.retained, cuda.context.leaked_detaches) == (0, 0)
    assert not cuda.context.current()


@pytest.mark.gpu
def test_pycuda_buffers_carry_batches_through_a_real_gpu_from_any_thread(
    monkeypatch, model_dir, tmp_path
):
    # Real pycuda, TensorRT replaced by a device-side copy: the page-locked buffers, the async
    # copies on the engine's stream, the context pushed per call on the loading, serving and
    # closing threads, and the release, all on a real GPU (TensorRT itself is not needed).
    if importlib.util.find_spec("pycuda") is None:
        pytest.skip("pycuda is not installed (the `gpu` extra builds it against the CUDA toolkit)")
    if not gpu_available():
        pytest.skip("no CUDA GPU is present")
    import pycuda.driver as cuda

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.EchoTensorRT(cuda))
    artifact = resolve(model_dir, "fraud")
    engines, results, errors = [], [], []
    rng = np.random.default_rng(8)
    batches = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 7, 255, 256)]

    def on_thread(work):
        def run():
            try:
                work()
            except Exception as exc:  # named by the assertion below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    on_thread(
        lambda: engines.append(tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 8, 256)))
    )
    assert errors == []
    (engine,) = engines
    on_thread(lambda: results.extend(engine.infer({"numeric": b}) for b in batches))
    results.extend(engine.infer({"numeric": b}) for b in reversed(batches))  # and this thread
    with pytest.raises(EngineError, match="exceeds"):
        engine.infer({"numeric": np.zeros((257, 4), np.float32)})
    on_thread(engine.close)
    assert errors == []
    for got, sent in zip(results, batches + batches[::-1], strict=True):
        assert set(got) == {"echo"} and np.array_equal(got["echo"], sent)
    assert engine._buffers.device == {} and engine._buffers.stream is None


def assert_close(got, expected, tolerance):
    """Within `tolerance` of the output's own scale: TF32 and FP16 err relative to magnitude,
    and the reason contributions are not bounded by 1 as the scores are.
    """
    for output in expected:
        assert got[output].shape == expected[output].shape, output
        scale = max(1.0, float(np.max(np.abs(expected[output]))))
        error = float(np.max(np.abs(got[output] - expected[output])))
        assert error <= tolerance * scale, (output, error, scale)


def needs_tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fraud", "ranking"])
def test_tensorrt_matches_onnxruntime_and_reuses_its_plan(model_dir, tmp_path, name):
    needs_tensorrt()
    artifact = resolve(model_dir, name)
    engine = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 64, 256))
    try:
        assert engine.built
        for batch in (1, 64, 256):
            inputs = random_inputs(artifact, batch, np.random.default_rng(batch))
            assert_close(engine.infer(inputs), OnnxRuntimeEngine(artifact).infer(inputs), 2e-3)
    finally:
        engine.close()
    again = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 64, 256))
    again.close()
    assert not again.built and again.plan_path == engine.plan_path
    assert engine.timing_path.is_file()


@pytest.mark.gpu
def test_tensorrt_loaded_on_one_thread_serves_another_and_closes_on_a_third(model_dir, tmp_path):
    needs_tensorrt()
    artifact = resolve(model_dir, "fraud")
    inputs = random_inputs(artifact, 32, np.random.default_rng(4))
    engines, results = [], []
    for target in (
        lambda: engines.append(tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 32, 64))),
        lambda: results.append(engines[0].infer(inputs)),
        lambda: engines[0].close(),
    ):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert_close(results[0], OnnxRuntimeEngine(artifact).infer(inputs), 2e-3)


@pytest.mark.gpu
def test_tensorrt_builds_past_a_foreign_timing_cache(model_dir, tmp_path):
    needs_tensorrt()
    artifact = resolve(model_dir, "fraud")
    probe = tensorrt.TensorRTEngine(artifact, tmp_path / "first", Profile(1, 8, 16))
    probe.close()
    timing = tmp_path / "second" / probe.timing_path.name
    timing.parent.mkdir()
    timing.write_bytes(b"\x00" * 64 + b"not a timing cache of this GPU")
    engine = tensorrt.TensorRTEngine(artifact, tmp_path / "second", Profile(1, 8, 16))
    engine.close()
    assert engine.built and timing.read_bytes() != b"\x00" * 64 + b"not a timing cache of this GPU"


@pytest.mark.gpu
def test_tensorrt_fp16_builds_from_the_cache_and_stays_close(model_dir, tmp_path):
    needs_tensorrt()
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (it comes with the `gpu` extra)")
    artifact = resolve(model_dir, "fraud")
    before = sorted(p.name for p in artifact.path.iterdir())
    engine = tensorrt.TensorRTEngine(artifact, tmp_path, Profile(1, 64, 64), precision="fp16")
    try:
        inputs = random_inputs(artifact, 64, np.random.default_rng(5))
        assert_close(engine.infer(inputs), OnnxRuntimeEngine(artifact).infer(inputs), 2e-2)
    finally:
        engine.close()
    assert sorted(p.name for p in artifact.path.iterdir()) == before
    assert list(tmp_path.glob("*.fp16.onnx")) and "-fp16-" in engine.plan_path.name


@pytest.mark.gpu
def test_build_engines_and_load_engine_serve_tensorrt(model_dir, tmp_path):
    needs_tensorrt()
    settings = EngineSettings(
        model_dir=model_dir,
        backend=Backend.TENSORRT,
        engine_cache_dir=tmp_path,
        fraud_max_batch=64,
        ranking_max_batch=16,
    )
    built = build_engines(settings)
    assert [result.backend for result in built] == ["tensorrt", "tensorrt"]
    assert all(Path(result.artefact).is_file() for result in built)
    engine = load_engine(settings.pins()[0], settings)  # no fallback: it must be TensorRT
    try:
        assert engine.backend == "tensorrt" and not engine.built
    finally:
        engine.close()
