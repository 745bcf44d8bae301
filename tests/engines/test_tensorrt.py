import numpy as np
import pytest

from engines.factory import tensorrt_unavailable_reason
from engines.inputs import random_inputs
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import resolve
from engines.tensorrt import Profile, engine_cache_key

BASE = ("abc", "10.9.0", "NVIDIA H100", "9.0", Profile())


@pytest.mark.parametrize(
    "changed",
    [
        ("abd", *BASE[1:]),
        (BASE[0], "11.0.0", *BASE[2:]),
        (*BASE[:2], "NVIDIA L4", *BASE[3:]),
        (*BASE[:3], "8.9", BASE[4]),
        (*BASE[:4], Profile(opt_batch=64)),
    ],
)
def test_engine_cache_key_changes_with_everything_an_engine_is_tied_to(changed):
    assert engine_cache_key(*changed) != engine_cache_key(*BASE)
    assert engine_cache_key(*BASE) == engine_cache_key(*BASE)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fraud", "ranking"])
def test_tensorrt_matches_onnxruntime(model_dir, tmp_path, name):
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from engines.tensorrt import TensorRTEngine

    artifact = resolve(model_dir, name)
    engine = TensorRTEngine(artifact, tmp_path, Profile(1, 64, 256))
    try:
        for batch in (1, 64, 256):
            inputs = random_inputs(artifact, batch, np.random.default_rng(batch))
            expected = OnnxRuntimeEngine(artifact).infer(inputs)
            got = engine.infer(inputs)
            for output in expected:
                assert np.max(np.abs(got[output] - expected[output])) <= 1e-3, output
    finally:
        engine.close()
    # A second load deserialises the cached plan instead of building again.
    plans = list(tmp_path.glob(f"{name}-*.plan"))
    assert len(plans) == 1
    TensorRTEngine(artifact, tmp_path, Profile(1, 64, 256)).close()
    assert list(tmp_path.glob(f"{name}-*.plan")) == plans
