"""Which floating-point precision networks run in, decided once per device.

Mixed precision (``torch.autocast``) runs convolutions and matrix products in
a 16-bit type and keeps reductions, losses and weights in float32. Where the
hardware has native 16-bit arithmetic that is several times faster:
EfficientNet-Lite0 feature extraction at 224 px, batch 32, 2 CPU threads on a
CPU with AVX512-BF16 went from 49 (float32, channels-last) to 118 images/s
under bfloat16 autocast on an idle machine (issue 12); on a loaded one
1.7-3x plain eager float32 timm depending on the load, 5.5x together with
:mod:`wbclib.streams` (``bench/bench_throughput.py``). On 200 pbc
images the embeddings keep a cosine of 0.998 to float32 (0.994 at worst) and
a linear probe's predictions 99.5% unchanged, macro-F1 0.777 against 0.778
(``bench/agreement_precision.py``). Without that hardware bfloat16 is slower
than float32, so the choice is made at run time:

* CUDA: bfloat16 where the GPU supports it, else float16 (training then
  scales the loss with ``torch.amp.GradScaler``, see ``Method.step``);
* CPU inference: bfloat16 only where the CPU has AVX512-BF16 or AMX instructions;
* CPU training (:func:`train.train_run`): float32. The backward pass of the
  convolutions is slower under bfloat16 autocast than in float32 on this
  hardware: EfficientNet-Lite0, batch 32, 2 threads, images/s in float32
  against bfloat16 autocast: 40.9 / 28.2 fine-tuning everything at 128 px,
  64.9 / 47.5 with 3 stages frozen, 11.7 / 11.1 at 224 px, 129 / 61 at 64 px
  (``bench/train_precision.py``; in torch's profiler, 69 % of a bfloat16
  step at 128 px was ``convolution_backward``);
* anything else (MPS, other CPUs): float32.

Separately, ``WBC_COMPILE=1`` compiles inference models with
``torch.compile`` (inductor, weights frozen into the graph; see
:func:`for_inference`): between 2.2x and 7x plain eager float32 on a loaded
2-core machine, depending on the load, but compiling takes 1-3 minutes there
and comes again for every new model object and input shape, and a compiled
model cannot use :mod:`wbclib.streams` (5.5x under the same load), so it is
off by default.

The setting ``"auto"`` (default) applies these rules; ``"fp32"`` turns autocast
off and ``"bf16"`` / ``"fp16"`` force a type. The environment variable
``WBC_PRECISION`` overrides the default, e.g. ``WBC_PRECISION=fp32`` to
reproduce float32 results exactly. Results depend on the precision, so run
configurations and embedding caches record :func:`precision_tag`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

#: Environment variable that turns on torch.compile for inference ("1", "true", "on").
COMPILE_ENV = "WBC_COMPILE"
#: Accepted precision settings.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Environment variable that overrides the default setting.
PRECISION_ENV = "WBC_PRECISION"
#: CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TAGS = {None: "fp32", torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}

Device = Union[torch.device, str]


def resolve_precision(precision: Optional[str] = None) -> str:
    """The setting in force: ``precision`` if given, else ``$WBC_PRECISION``, else ``"auto"``."""
    setting = precision if precision is not None else os.environ.get(PRECISION_ENV, "auto")
    setting = setting.strip().lower()
    if setting not in PRECISIONS:
        source = "precision" if precision is not None else PRECISION_ENV
        raise ValueError(f"{source} must be one of {PRECISIONS}, got {setting!r}")
    return setting


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX).

    Read from the Linux CPU flags; elsewhere from the instruction set torch
    dispatches to (``torch.backends.cpu.get_cpu_capability``), which names AMX
    but not AVX512-BF16, so some capable CPUs off Linux stay on float32.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return any(flag in line.split() for flag in CPU_BF16_FLAGS)
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: Device, precision: Optional[str] = None, training: bool = False) -> Optional[torch.dtype]:
    """The autocast type for ``device`` under ``precision`` (see the module
    docstring), or None for float32. ``training`` says the type is for
    :func:`train.train_run`, which adds a loss scaler where it is float16;
    under ``"auto"`` CPU training runs in float32 (faster there)."""
    setting = resolve_precision(precision)
    if setting == "fp32":
        return None
    if setting in _DTYPES:
        return _DTYPES[setting]
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu" and cpu_has_native_bf16() and not training:
        return torch.bfloat16
    return None


def compile_enabled(compile: Optional[bool] = None) -> bool:
    """Whether :func:`for_inference` compiles: ``compile`` if given, else ``$WBC_COMPILE``."""
    if compile is not None:
        return bool(compile)
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "on", "yes")


def precision_tag(device: Device, precision: Optional[str] = None, training: bool = False,
                  compile: Optional[bool] = None) -> str:
    """What a run records of its numerics: ``"fp32"``, ``"bf16-autocast"`` or
    ``"fp16-autocast"`` (the resolved type, not the setting, so an "auto" run
    on a CPU without bfloat16 and one with it are told apart), with
    ``"+compiled"`` when inference is compiled (frozen weights round
    differently). Training is never compiled."""
    tag = _TAGS[autocast_dtype(device, precision, training)]
    return tag + "+compiled" if not training and compile_enabled(compile) else tag


def for_inference(model: torch.nn.Module, compile: Optional[bool] = None) -> torch.nn.Module:
    """``model`` (in eval mode), compiled with inductor and frozen weights
    when :func:`compile_enabled`. Freezing folds batch norms into the
    convolutions and pre-packs weights, the part of compiling that pays on
    CPU; its graph is specialised to the input shape, so a smaller last
    batch compiles once more."""
    model = model.eval()
    if not compile_enabled(compile):
        return model
    return torch.compile(model, dynamic=False, options={"freezing": True})


@contextlib.contextmanager
def autocast(device: Device, precision: Optional[str] = None, training: bool = False) -> Iterator[Optional[torch.dtype]]:
    """``torch.autocast`` with :func:`autocast_dtype`'s type, or float32
    (autocast off) when that is None; yields the type."""
    dtype = autocast_dtype(device, precision, training)
    device_type = torch.device(device).type
    if dtype is None:
        # Explicitly off, so an enclosing autocast does not leak in.
        with torch.autocast(device_type, enabled=False):
            yield None
    else:
        with torch.autocast(device_type, dtype=dtype):
            yield dtype
