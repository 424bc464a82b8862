"""What llama-server really allocated, read from its startup log. Pure code.

The planner predicts model, KV and compute bytes per device; llama-server prints what it got when
it loads (the llama.cpp that llama-cpp-python 0.3.36 vendors, at ``--log-verbosity 4``, which the
operator passes: it prints these lines and nothing of the requests). The lines read, with the
llama.cpp function that writes them:

* ``common_param:   - RPC0    : 127.0.0.1:50052 (24105 MiB, 24105 MiB free)`` (``common_params``
  device list): every device llama.cpp found, with its total and free memory.
* ``llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:05.0) - 80000 MiB free``:
  the devices the model uses, in ``--tensor-split`` order.
* ``load_tensors: offloaded 20/31 layers to GPU``: layers placed on devices other than the host.
  llama.cpp prints it even when it found no GPU (every layer then stays on the CPU), so a log
  without a device counts as nothing offloaded.
* ``load_tensors: <buffer> model buffer size = X MiB``, ``llama_kv_cache: <buffer> KV buffer size``,
  ``sched_reserve: <buffer> compute buffer size``: bytes per buffer, two decimals of MiB.

Buffer names: ``CUDA0`` is a device; ``RPC0[127.0.0.1:50052]`` is the RPC device with that
endpoint (llama.cpp prints ``RPC0`` for every RPC device, so the endpoint tells them apart);
``CPU``, ``CPU_Mapped``, ``CPU_REPACK`` and ``CUDA_Host`` (pinned) are host memory.

With llama.cpp's own ``--fit`` on (the default, not the operator's), a first pass builds the model
without allocating and prints buffers of zero bytes; each ``loading model tensors`` line starts
the count again, so only the real load is kept.
"""

from __future__ import annotations

import dataclasses
import re

MiB = 1024 * 1024
HOST = "Host"
"""The name this module gives host memory (llama.cpp's own ``common_memory_breakdown_print`` word)."""

_LINE_PREFIX = r"^(?:[\d.]+ [A-Z] )?"
"""llama.cpp's optional timestamp and level (``0.00.263.183 I``)."""
_DEVICE_INFO = re.compile(_LINE_PREFIX + r"(?:cmn\s+)?common_param:\s+- (?P<dev>\S+)\s*: (?P<desc>.*?) "
                          r"\((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$", re.M)
_USING = re.compile(r"using device (?P<dev>\S+) \((?P<desc>.*?)\) .*?- (?P<free>\d+) MiB free")
_LOADING = re.compile(r"load_tensors: loading model tensors")
_OFFLOADED = re.compile(r"load_tensors: offloaded (?P<n>\d+)/(?P<total>\d+) layers to GPU")
_BUFFER = re.compile(r"(?P<where>load_tensors|llama_kv_cache|sched_reserve):\s+(?P<buf>\S+)\s+"
                     r"(?P<kind>model|KV|compute) buffer size =\s+(?P<mib>[\d.]+) MiB")
_PIPELINE = re.compile(r"llama_context: pipeline parallelism enabled")
_HOST_BUFFERS = re.compile(r"^(CPU(_\w+)?|\w+_Host)$")


class LogError(ValueError):
    """The log is not a llama-server startup log this parser understands (or is cut short)."""


@dataclasses.dataclass(frozen=True)
class DeviceUse:
    """Bytes llama.cpp allocated on one device (or the host) for weights, KV cache and compute."""

    name: str
    """``CUDA0``, ``RPC1`` (numbered in device order, not as llama.cpp's buffer names say), or ``Host``."""
    description: str = ""
    """The GPU's name (``NVIDIA H100 80GB HBM3``) or an RPC endpoint."""
    model: int = 0
    kv: int = 0
    compute: int = 0
    free: int | None = None
    """Free memory when llama.cpp started, if it said."""
    total_memory: int | None = None

    @property
    def total(self) -> int:
        return self.model + self.kv + self.compute


@dataclasses.dataclass(frozen=True)
class ServerLog:
    """What one llama-server start allocated, per device and on the host."""

    devices: tuple[DeviceUse, ...]
    """The devices other than the host the model used, in llama.cpp's order (``--tensor-split``'s)."""
    host: DeviceUse
    offloaded_layers: int
    """Layers on a device other than the host (0 when llama.cpp found no device, whatever it printed)."""
    total_layers: int
    pipeline_parallel: bool = False


@dataclasses.dataclass
class _Device:
    name: str
    description: str = ""
    free: int | None = None
    total_memory: int | None = None
    bytes: dict[str, int] = dataclasses.field(default_factory=lambda: {"model": 0, "KV": 0, "compute": 0})


def _mib(text: str) -> int:
    return round(float(text) * MiB)


def parse(text: str) -> ServerLog:
    """The allocation of the last model load in ``text``; ``LogError`` when there is none yet."""
    found: dict[str, _Device] = {}
    for info in _DEVICE_INFO.finditer(text):
        found[info["dev"]] = _Device(info["dev"], info["desc"].strip(), int(info["free"]) * MiB,
                                     int(info["total"]) * MiB)
    order: list[str] = []
    host = _Device(HOST)
    offloaded: tuple[int, int] | None = None
    pipeline = False
    for line in text.splitlines():
        if (m := _USING.search(line)) is not None:
            dev = found.setdefault(m["dev"], _Device(m["dev"], m["desc"].strip()))
            dev.description = dev.description or m["desc"].strip()
            dev.free = int(m["free"]) * MiB  # free when the model was placed: the freshest figure
            if m["dev"] not in order:
                order.append(m["dev"])
        elif _LOADING.search(line):
            # a new load (the real one after --fit's dry run): count again from zero
            host = _Device(HOST, host.description, host.free, host.total_memory)
            for dev in found.values():
                dev.bytes = {"model": 0, "KV": 0, "compute": 0}
            offloaded, pipeline = None, False
        elif (m := _OFFLOADED.search(line)) is not None:
            offloaded = (int(m["n"]), int(m["total"]))
        elif (m := _BUFFER.search(line)) is not None:
            target = _buffer_device(m["buf"], found, order, host)
            target.bytes[m["kind"]] += _mib(m["mib"])
        elif _PIPELINE.search(line):
            pipeline = True
    if offloaded is None:
        raise LogError("the log has no 'load_tensors: offloaded N/M layers' line: llama-server has not loaded "
                       "the model yet, or it does not log at --log-verbosity 4 or more")
    cpu = found.get("CPU")
    if cpu is not None:
        host.description, host.free, host.total_memory = cpu.description, cpu.free, cpu.total_memory
    devices = tuple(_use(found[name], name) for name in order)
    n, total = offloaded
    return ServerLog(devices=devices, host=_use(host, HOST), offloaded_layers=n if devices else 0,
                     total_layers=total, pipeline_parallel=pipeline)


def _buffer_device(buffer: str, found: dict[str, _Device], order: list[str], host: _Device) -> _Device:
    """The device a buffer name belongs to: ``RPC0[endpoint]`` by its endpoint, ``CUDA0`` by name,
    host buffers to the host; a name seen nowhere else becomes a device of its own."""
    name, _, rest = buffer.partition("[")
    endpoint = rest.rstrip("]")
    if endpoint:
        for dev_name in order:
            if found[dev_name].description == endpoint:
                return found[dev_name]
    if _HOST_BUFFERS.match(name):
        return host
    if name not in found:
        found[name] = _Device(name, endpoint)
    if name not in order:
        order.append(name)
    return found[name]


def _use(dev: _Device, name: str) -> DeviceUse:
    return DeviceUse(name=name, description=dev.description, model=dev.bytes["model"], kv=dev.bytes["KV"],
                     compute=dev.bytes["compute"], free=dev.free, total_memory=dev.total_memory)
