"""Small stand-ins for `tensorrt` and `pycuda.driver`, enough to run `TensorRTEngine` on CPU.

They record what the engine asks of them: whether device memory, page-locked memory and
streams were released once, with their context current in the releasing thread, and whether
the context was detached where pycuda honours it (current in the detaching thread; elsewhere
pycuda silently keeps it).
"""

import threading
from types import SimpleNamespace

import numpy as np

# --- pycuda.driver ----------------------------------------------------------------------------


class Context:
    """The primary context: a per-thread stack of pushes, and the retains it holds."""

    def __init__(self):
        self.local = threading.local()
        self.retained = 1
        self.leaked_detaches = 0

    def stack(self):
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def current(self):
        return bool(self.stack())

    def push(self):
        self.stack().append(self)

    def pop(self):
        assert self.stack(), "pop without a push in this thread"
        self.stack().pop()

    def detach(self):
        if self.current():
            self.retained -= 1
            self.stack().pop()
        else:  # pycuda: out-of-thread or not current, silently left as it is
            self.leaked_detaches += 1


class Released:
    """Something to free once, with the context current in the freeing thread."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.frees = 0
        self.in_context = False
        cuda.live.append(self)

    @property
    def freed(self):
        return self.frees > 0

    def free(self):
        self.frees += 1
        self.in_context = self.cuda.context.current()


class DeviceAllocation(Released):
    def __int__(self):
        return 1


class HostAllocation(bytearray):
    def __init__(self, cuda, size):
        super().__init__(size)
        self.tracker = Released(cuda)

    def free(self):
        self.tracker.free()


class Stream:
    def __init__(self, cuda):
        self.tracker = Released(cuda)
        self.handle = 7

    def synchronize(self):
        pass

    def __del__(self):
        self.tracker.free()


class FakeCuda:
    """`pycuda.driver` with one device."""

    def __init__(self, gpu="NVIDIA H100"):
        self.context = Context()
        self.live = []
        self.gpu = gpu

    def init(self):
        pass

    def Device(self, ordinal):
        return SimpleNamespace(
            name=lambda: self.gpu,
            compute_capability=lambda: (9, 0),
            retain_primary_context=lambda: self.context,
        )

    def Stream(self):
        return Stream(self)

    def pagelocked_empty(self, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.ndarray(shape, dtype, buffer=HostAllocation(self, nbytes))

    def mem_alloc(self, nbytes):
        return DeviceAllocation(self)

    def memcpy_htod_async(self, device, host, stream):
        assert self.context.current()

    def memcpy_dtoh_async(self, host, device, stream):
        assert self.context.current()
        host[...] = 0.5

    def misreleased(self):
        """What is not freed exactly once, with its context current."""
        return [t for t in self.live if t.frees != 1 or not t.in_context]


# --- tensorrt ---------------------------------------------------------------------------------

INPUT, OUTPUT = "input", "output"
TENSORS = {"numeric": (INPUT, (-1, 4)), "score": (OUTPUT, (-1,))}


class Engine:
    num_io_tensors = len(TENSORS)

    def get_tensor_name(self, i):
        return list(TENSORS)[i]

    def get_tensor_mode(self, name):
        return TENSORS[name][0]

    def get_tensor_shape(self, name):
        return TENSORS[name][1]

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return SimpleNamespace(
            set_input_shape=lambda name, shape: None,
            set_tensor_address=lambda name, address: None,
            execute_async_v3=lambda stream: True,
        )


class BuilderConfig:
    def __init__(self, trt):
        self.trt = trt
        self.cache = None

    def set_memory_pool_limit(self, pool, size):
        pass

    def add_optimization_profile(self, profile):
        pass

    def create_timing_cache(self, data):
        return SimpleNamespace(data=bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data not in (b"", self.trt.own_timing):
            return False  # made on another device
        self.cache = cache
        return True

    def get_timing_cache(self):
        return (
            None if self.cache is None else SimpleNamespace(serialize=lambda: self.trt.own_timing)
        )


class FakeTensorRT:
    """`tensorrt` 10.x: builds record their network flags; plans are a fixed byte string."""

    __version__ = "10.9.0"

    def __init__(self, strongly_typed=True):
        self.builds = []
        self.own_timing = b"timing of this GPU"
        flags = {"STRONGLY_TYPED": 5} if strongly_typed else {}
        self.NetworkDefinitionCreationFlag = SimpleNamespace(**flags)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.TensorIOMode = SimpleNamespace(INPUT=INPUT)
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    def nptype(self, dtype):
        return np.dtype(dtype)

    def Runtime(self, logger):
        return SimpleNamespace(
            deserialize_cuda_engine=lambda plan: Engine() if plan == b"plan" else None
        )

    def Builder(self, logger):
        trt = self

        class Builder:
            def create_network(self, flags):
                trt.builds.append({"flags": flags})
                return SimpleNamespace(
                    num_inputs=1,
                    get_input=lambda i: SimpleNamespace(name="numeric", shape=(-1, 4)),
                )

            def create_builder_config(self):
                config = BuilderConfig(trt)
                trt.builds[-1]["config"] = config
                return config

            def create_optimization_profile(self):
                return SimpleNamespace(set_shape=lambda *args: None)

            def build_serialized_network(self, network, config):
                return b"plan"

        return Builder()

    def OnnxParser(self, network, logger):
        return SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)


class EchoTensorRT(FakeTensorRT):
    """`tensorrt` whose engine copies its input tensor to its output on the device, through the
    real `pycuda.driver` given: the buffers, copies, stream and context handling of
    `TensorRTEngine` then run on a real GPU without TensorRT.
    """

    def __init__(self, cuda):
        super().__init__()
        self.cuda = cuda
        self.TENSORS = {"numeric": (INPUT, (-1, 4)), "echo": (OUTPUT, (-1, 4))}

    def Runtime(self, logger):
        trt = self

        class EchoEngine(Engine):
            def get_tensor_name(self, i):
                return list(trt.TENSORS)[i]

            def get_tensor_mode(self, name):
                return trt.TENSORS[name][0]

            def get_tensor_shape(self, name):
                return trt.TENSORS[name][1]

            def create_execution_context(self):
                return EchoContext(trt.cuda)

        return SimpleNamespace(
            deserialize_cuda_engine=lambda plan: EchoEngine() if plan == b"plan" else None
        )


class EchoContext:
    """An execution context that copies `numeric` to `echo` on the device."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.shapes = {}
        self.addresses = {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle):
        # A synchronous copy on the legacy default stream, which waits for the engine's own
        # (blocking) stream to finish the input copy, as a kernel launched on it would.
        nbytes = int(np.prod(self.shapes["numeric"])) * np.dtype(np.float32).itemsize
        self.cuda.memcpy_dtod(self.addresses["echo"], self.addresses["numeric"], nbytes)
        return True
