import dataclasses
import importlib.util
import shutil
import sys
import threading

import numpy as np
import onnx
import pytest
from structlog.testing import capture_logs

from engines import factory
from engines.factory import choose_backend, gpu_available, load_engine, tensorrt_unavailable_reason
from engines.inputs import random_inputs
from engines.models import map_item_ids
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import resolve, write_atomic
from engines.settings import Backend, EngineSettings
from engines.tensorrt import fp16_onnx
from engines.torch import TorchEngine, bucket_for, build_module

# Operators the TensorRT 10 ONNX parser supports that these models may use (onnx-tensorrt
# docs/operators.md); a new operator must be checked there before it is added here.
TENSORRT_OPS = {
    "Add",
    "Cast",
    "Concat",
    "Div",
    "Einsum",
    "Equal",
    "Gather",
    "Gemm",
    "Greater",
    "MatMul",
    "Mul",
    "Not",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Squeeze",
    "Sub",
    "Transpose",
    "Unsqueeze",
    "Where",
    "Constant",
    "Shape",
    "Expand",
    "Identity",
}


@pytest.fixture(scope="module", params=["fraud", "ranking"])
def artifact(request, model_dir):
    return resolve(model_dir, request.param)


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_onnxruntime_matches_torch(artifact, batch):
    rng = np.random.default_rng(batch)
    inputs = random_inputs(artifact, batch, rng)
    ort_out = OnnxRuntimeEngine(artifact).infer(inputs)
    torch_out = TorchEngine(artifact).infer(inputs)
    assert set(ort_out) == set(torch_out) == set(artifact.manifest["outputs"])
    for name in ort_out:
        assert ort_out[name].shape[0] == batch
        # Relative as well as absolute: the two runtimes sum in different orders (and, per
        # CPU, with different SIMD widths), so float32 outputs of magnitude 10 differ by a
        # few dozen ulps (1.5e-5 on a contribution of 3.15 on an AMD EPYC, measured).
        np.testing.assert_allclose(
            ort_out[name], torch_out[name], rtol=1e-5, atol=1e-5, err_msg=name
        )


def test_graph_is_tensorrt_parsable_with_only_a_dynamic_batch(artifact):
    model = onnx.load(str(artifact.onnx_path))
    ops = {node.op_type for node in model.graph.node}
    assert ops <= TENSORRT_OPS, ops - TENSORRT_OPS
    for tensor in [*model.graph.input, *model.graph.output]:
        dims = tensor.type.tensor_type.shape.dim
        assert dims[0].dim_param, tensor.name
        assert all(d.dim_value > 0 for d in dims[1:]), tensor.name


def test_ranking_survives_unknown_ids_and_empty_history(model_dir):
    artifact = resolve(model_dir, "ranking")
    engine = OnnxRuntimeEngine(artifact)
    vocabulary = artifact.manifest["item_vocabulary"]
    slots = artifact.manifest["candidates"]
    length = artifact.manifest["config"]["history_length"]
    candidates = np.array([[10**9, -7, 3] + [-1] * (slots - 3)])
    out = engine.infer(
        {
            "history_items": map_item_ids(np.full((1, length), -1), vocabulary),
            "history_categories": map_item_ids(np.full((1, length), -1), 10),
            "candidate_items": map_item_ids(candidates, vocabulary),
        }
    )["scores"]
    assert out.shape == (1, slots) and np.all(np.isfinite(out))


def test_map_item_ids_never_leaves_the_table():
    ids = np.array([-1, -2, 0, 9, 10, 10**15])
    assert list(map_item_ids(ids, 10)) == [0, 1, 2, 11, 1, 1]


def test_fraud_scores_are_probabilities_and_contributions_explain_the_logit(model_dir):
    artifact = resolve(model_dir, "fraud")
    rng = np.random.default_rng(0)
    out = OnnxRuntimeEngine(artifact).infer(random_inputs(artifact, 64, rng))
    assert np.all((out["score"] >= 0) & (out["score"] <= 1))
    assert out["contributions"].shape == (64, len(artifact.manifest["features"]))


def test_manifest_records_what_serving_needs(model_dir):
    for name in ("fraud", "ranking"):
        manifest = resolve(model_dir, name).manifest
        assert {
            "version",
            "inputs",
            "outputs",
            "opset",
            "feature_hash",
            "training_data",
            "metrics",
        } <= set(manifest)


def test_auto_picks_tensorrt_only_where_it_can_run():
    expected = Backend.TENSORRT if tensorrt_unavailable_reason() is None else Backend.ONNXRUNTIME
    assert choose_backend(Backend.AUTO) is expected
    assert choose_backend(Backend.TORCH) is Backend.TORCH


def test_trained_models_beat_chance(model_dir):
    fraud = resolve(model_dir, "fraud").manifest["metrics"]
    assert fraud["roc_auc"] > 0.8
    ranking = resolve(model_dir, "ranking").manifest["metrics"]
    assert ranking["ndcg_at_10"] > ranking["baselines"]["random"]["ndcg_at_10"]


def test_bench_times_every_batch_size(model_dir):
    from engines.bench import bench_engine

    artifact = resolve(model_dir, "fraud")
    rows = bench_engine(artifact, OnnxRuntimeEngine(artifact), (1, 16), min_seconds=0.01)
    assert [row.batch for row in rows] == [1, 16]
    assert {row.device for row in rows} == {"cpu"}
    for row in rows:
        assert row.us_per_batch > 0
        assert row.us_per_event == pytest.approx(row.us_per_batch / row.batch)
        assert row.events_per_s == pytest.approx(1e6 / row.us_per_event)


def test_serving_ranking_module_scores_like_the_trained_one(model_dir):
    import torch

    from engines.models import RankingModel, RankingServing

    artifact = resolve(model_dir, "ranking")
    serving = build_module(artifact)
    assert isinstance(serving, RankingServing)
    trained = serving.model
    assert isinstance(trained, RankingModel)
    inputs = random_inputs(artifact, 32, np.random.default_rng(4))
    with torch.inference_mode():
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        delta = (serving(**tensors) - trained(**tensors)).abs().max().item()
    assert delta <= 1e-5


@pytest.mark.parametrize("backend", [Backend.ONNXRUNTIME, Backend.TORCH])
def test_engines_take_their_pinned_max_batch(model_dir, backend):
    settings = EngineSettings(model_dir=model_dir, backend=backend, ranking_max_batch=48)
    for pin in settings.pins():
        engine = load_engine(pin, settings)
        try:
            assert engine.max_batch_size == pin.max_batch
            if backend is Backend.TORCH:
                assert engine.on_gpu is gpu_available()
            else:  # ONNX Runtime puts CUDA first when onnxruntime-gpu and a GPU are present
                assert engine.on_gpu is (engine.providers[0] == "CUDAExecutionProvider")
            artifact = resolve(model_dir, pin.name)
            for batch in (1, pin.max_batch):
                out = engine.infer(random_inputs(artifact, batch, np.random.default_rng(batch)))
                assert all(len(value) == batch for value in out.values())
        finally:
            engine.close()


class DriverError(Exception):
    """Like pycuda._driver.Error: an Exception, not a RuntimeError."""


@pytest.mark.parametrize(
    "error",
    [
        DriverError("cuInit failed: no CUDA-capable device"),
        OSError("libnvinfer.so.10"),
        AttributeError("x"),
    ],
)
def test_any_gpu_load_error_falls_back_to_onnxruntime_and_is_logged(model_dir, monkeypatch, error):
    real = factory.load_backend

    def load_backend(artifact, backend, settings, max_batch):
        if backend is Backend.TENSORRT:
            raise error
        return real(artifact, backend, settings, max_batch)

    monkeypatch.setattr(factory, "load_backend", load_backend)
    settings = EngineSettings(model_dir=model_dir, backend=Backend.TENSORRT)
    with capture_logs() as logs:
        engine = load_engine(settings.pins()[0], settings)
    engine.close()
    assert engine.backend == "onnxruntime"
    (fallback,) = [entry for entry in logs if entry["event"] == "engine_fallback"]
    assert fallback["error"] == str(error)
    assert fallback["error_type"].endswith(type(error).__qualname__)


def test_an_onnxruntime_load_error_is_not_swallowed(model_dir, monkeypatch):
    monkeypatch.setattr(
        factory, "load_backend", lambda *args: (_ for _ in ()).throw(OSError("disk"))
    )
    settings = EngineSettings(model_dir=model_dir, backend=Backend.ONNXRUNTIME)
    with pytest.raises(OSError, match="disk"):
        load_engine(settings.pins()[0], settings)


def test_bucket_is_the_smallest_that_holds_the_batch():
    buckets = (1, 8, 64, 256)
    assert [bucket_for(n, buckets) for n in (1, 2, 8, 9, 64, 65, 256)] == [
        1,
        8,
        8,
        64,
        64,
        256,
        256,
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fraud", "ranking"])
def test_torch_cuda_graphs_match_cpu(model_dir, name):
    if not gpu_available():
        pytest.skip("no CUDA GPU is present")
    artifact = resolve(model_dir, name)
    cuda = TorchEngine(artifact, device="cuda", max_batch_size=256)
    cpu = TorchEngine(artifact)
    assert cuda.on_gpu and not cpu.on_gpu
    try:
        for batch in (1, 5, 64, 200, 256):  # exact buckets and padded ones
            inputs = random_inputs(artifact, batch, np.random.default_rng(batch))
            expected, got = cpu.infer(inputs), cuda.infer(inputs)
            for output in expected:
                assert got[output].shape == expected[output].shape
                assert np.max(np.abs(got[output] - expected[output])) <= 1e-4, output
    finally:
        cuda.close()


@pytest.mark.gpu
def test_torch_cuda_graphs_captured_on_a_reload_thread_while_another_thread_infers(model_dir):
    # The pipeline's pattern: the watcher loads (and captures) the new version on its thread
    # while the inference thread keeps serving the old one on the same GPU.
    if not gpu_available():
        pytest.skip("no CUDA GPU is present")
    artifact = resolve(model_dir, "fraud")
    serving = TorchEngine(artifact, device="cuda", max_batch_size=256)
    inputs = random_inputs(artifact, 200, np.random.default_rng(6))
    stop, errors, served = threading.Event(), [], []

    def serve():
        while not stop.is_set():
            try:
                served.append(serving.infer(inputs))
            except Exception as exc:  # recorded: the assertion below names it
                errors.append(exc)
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        reloaded = TorchEngine(artifact, device="cuda", max_batch_size=256)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and served
    expected = TorchEngine(artifact).infer(inputs)
    for output, value in reloaded.infer(inputs).items():
        assert np.max(np.abs(value - expected[output])) <= 1e-3 * max(1.0, np.abs(value).max())
    reloaded.close()
    serving.close()


@pytest.mark.parametrize("name", ["fraud", "ranking"])
def test_fp16_onnx_keeps_the_signature_and_stays_close(model_dir, tmp_path, name):
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed (it comes with the `gpu` extra)")
    artifact = resolve(model_dir, name)
    fp16 = fp16_onnx(artifact.onnx_path, tmp_path / "cache")
    assert fp16.parent == tmp_path / "cache"
    model = onnx.load(str(fp16))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    full = OnnxRuntimeEngine(artifact)
    shutil.copy(fp16, tmp_path / "model.onnx")  # serve the FP16 graph from a copied version
    half = OnnxRuntimeEngine(dataclasses.replace(artifact, path=tmp_path))
    inputs = random_inputs(artifact, 64, np.random.default_rng(2))
    expected, got = full.infer(inputs), half.infer(inputs)
    for output in expected:
        assert got[output].dtype == expected[output].dtype
        scale = max(1.0, float(np.max(np.abs(expected[output]))))
        assert np.max(np.abs(got[output] - expected[output])) <= 2e-2 * scale, output


def test_fp16_onnx_goes_to_the_cache_atomically_and_is_made_once(model_dir, tmp_path, monkeypatch):
    # The conversion itself is ModelOpt's (tested above where installed); this stand-in
    # returns the graph unchanged so that where and how the result is written can be checked.
    calls = []

    def convert_to_mixed_precision(onnx_path, low_precision_type, keep_io_types):
        calls.append((low_precision_type, keep_io_types))
        return onnx.load(onnx_path)

    autocast = type(sys)("modelopt.onnx.autocast")
    autocast.convert_to_mixed_precision = convert_to_mixed_precision
    for name in ("modelopt", "modelopt.onnx"):
        monkeypatch.setitem(sys.modules, name, type(sys)(name))
    monkeypatch.setitem(sys.modules, "modelopt.onnx.autocast", autocast)
    artifact = resolve(model_dir, "fraud")
    before = sorted(p.name for p in artifact.path.iterdir())
    cache = tmp_path / "engines"
    fp16 = fp16_onnx(artifact.onnx_path, cache)
    assert fp16_onnx(artifact.onnx_path, cache) == fp16
    assert calls == [("fp16", True)]
    assert sorted(p.name for p in artifact.path.iterdir()) == before  # the model dir untouched
    assert [p.name for p in cache.iterdir()] == [fp16.name]  # no temporary file left
    onnx.checker.check_model(onnx.load(str(fp16)))
    other = resolve(model_dir, "ranking")
    assert fp16_onnx(other.onnx_path, cache) != fp16  # named by the source's hash


def test_concurrent_atomic_writers_leave_one_whole_file(tmp_path):
    target = tmp_path / "plan"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(target, data)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]
