"""Our CPU kernels (csrc/): built on first use with the system C compiler, in the variant the CPU runs best.

Variants, one source: avx512vnni (AVX-512 VL + VNNI: Zen 4, Intel Ice Lake server and later), avxvnni
(AVX-VNNI: Intel Alder Lake and later), avx2 (AVX2 + FMA + F16C). LLAMASERVE_KERNELS forces one of them,
or `torch` for torch's kernels; by default the best one the CPU has is used. Where none applies (ARM, an
old x86, no compiler, a failed build) `available()` is False, `info()` says why, and the layers use
torch's kernels. Libraries are cached in a private directory (0700, ours), never a shared path.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import math
import mmap
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from llamaserve.model.formats import FORMATS, GROUP

log = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("gemm.c", "decode.c", "attention.c")
_BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
# name -> (extra compiler flags, /proc/cpuinfo flags the CPU needs), best first.
VARIANTS: dict[str, tuple[list[str], set[str]]] = {
    "avx512vnni": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DLS_AVX512VNNI"],
                   {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "avxvnni": (["-mavxvnni", "-DLS_AVXVNNI"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "avx2": ([], {"avx2", "fma", "f16c"}),
    # The VNNI code path with vpdpbusd emulated on AVX2: never chosen, forced by tests on CPUs without VNNI.
    "vnni-emulated": (["-DLS_VNNI_EMULATED"], {"avx2", "fma", "f16c"}),
}
AUTO = ("avx512vnni", "avxvnni", "avx2")  # what "auto" picks from, best first
ABI_VERSION = 6
MAX_PARTS = 3
LS_ENOMEM, LS_EINVAL = -1, -2


class LsPart(ctypes.Structure):  # ls.h's ls_part
    _fields_ = [("fmt", ctypes.c_int64), ("rows", ctypes.c_int64), ("q", ctypes.c_void_p),
                ("hi", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("sc", ctypes.c_void_p), ("mn", ctypes.c_void_p)]


class LsLinear(ctypes.Structure):  # ls.h's ls_linear
    _fields_ = [("k", ctypes.c_int64), ("n", ctypes.c_int64), ("nparts", ctypes.c_int64),
                ("part", LsPart * MAX_PARTS)]


class LsKV(ctypes.Structure):  # ls.h's ls_kv
    _fields_ = [("dtype", ctypes.c_int64), ("slots", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("dim", ctypes.c_int64), ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p)]


KV_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}  # ls.h's LS_KV_*


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(text: str | None = None) -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo (or its `text`, already read)."""
    text = _cpuinfo() if text is None else text
    return set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").partition(":")[2].split())


def cpu_description() -> str:
    """The CPU's model name and the features that decide which of our kernels are fast, for benchmark
    reports (the machines here differ: AVX2 only, or AVX-512 with VNNI)."""
    text = _cpuinfo()
    name = next((ln.partition(":")[2].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.machine())
    flags = cpu_flags(text)
    extra: list[str] = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    extra = extra or ["no AVX-512, no AMX"]
    return f"{name} ({', '.join(extra)})"


def supported_variants() -> list[str]:
    """The variants this CPU can run, best first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = cpu_flags()
    return [name for name, (_, need) in VARIANTS.items() if need <= flags]


def _choose() -> tuple[str | None, str]:
    """(variant, '') or (None, why torch's kernels are used)."""
    forced = os.environ.get("LLAMASERVE_KERNELS", "auto")
    if os.environ.get("LLAMASERVE_NATIVE") == "0":
        forced = "torch"
    supported = supported_variants()
    if forced == "torch":
        return None, "LLAMASERVE_KERNELS=torch"
    if forced == "auto":
        best = [v for v in supported if v in AUTO]
        if not best:
            return None, f"the CPU ({platform.machine()}) lacks AVX2, FMA or F16C"
        return best[0], ""
    if forced not in VARIANTS:
        return None, f"LLAMASERVE_KERNELS={forced!r} is not one of auto, torch, {', '.join(VARIANTS)}"
    if forced not in supported:
        missing = " ".join(sorted(VARIANTS[forced][1] - cpu_flags()))
        return None, f"LLAMASERVE_KERNELS={forced} but the CPU lacks {missing}"
    return forced, ""


def check_private_dir(path: Path) -> None:
    """Raise PermissionError unless `path` is a real directory owned by us that nobody else can write."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if st.st_mode & 0o022:
        raise PermissionError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def cache_dir() -> Path:
    """The kernel cache: $XDG_CACHE_HOME/llamaserve (or ~/.cache), created 0700 and checked; else a fresh
    private temporary directory for this process (never a predictable path in /tmp)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "llamaserve"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(path)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
        return path
    except OSError as e:
        fresh = Path(tempfile.mkdtemp(prefix="llamaserve-kernels-"))  # 0700, a random name
        atexit.register(shutil.rmtree, fresh, True)  # (a loaded library may be unlinked on Linux)
        log.warning("kernel cache %s refused (%s): building into %s", path, e, fresh)
        return fresh


def _build(variant: str) -> Path:
    """Compile the variant once per source version (atomic rename: concurrent builds are safe)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r})")
    flags = [*_BASE_FLAGS, *VARIANTS[variant][0]]
    digest = hashlib.sha256(" ".join([cc, *flags]).encode())
    for name in sorted(p.name for p in _CSRC.iterdir()):
        digest.update(name.encode() + (_CSRC / name).read_bytes())
    out_dir = cache_dir()
    target = out_dir / f"kernels-{variant}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        check_private_dir(out_dir)  # again, right before loading code from it
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cc, *flags, "-o", tmp, *(str(_CSRC / s) for s in _SOURCES)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@dataclass(frozen=True, slots=True)
class Kernels:
    lib: ctypes.CDLL | None
    variant: str | None
    reason: str  # why torch's kernels are used ('' when ours are)


def _bind(path: Path, variant: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ls_abi_version.restype = lib.ls_sizeof_linear.restype = lib.ls_sizeof_kv.restype = i64
    lib.ls_variant.restype = ctypes.c_char_p
    found = (lib.ls_abi_version(), lib.ls_sizeof_linear(), lib.ls_sizeof_kv())
    expected = (ABI_VERSION, ctypes.sizeof(LsLinear), ctypes.sizeof(LsKV))
    if found != expected:
        raise OSError(f"{path.name}: ABI / struct sizes {found}, expected {expected}")
    if lib.ls_variant().decode() != variant:
        raise OSError(f"{path.name} is the {lib.ls_variant().decode()} variant, not {variant}")
    lib.ls_matmul.argtypes = [ptr, ptr, i64, ptr]
    lib.ls_linear_check.argtypes = [ptr]
    lib.ls_decode_layers.argtypes = [ptr, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.ls_kv_check.argtypes = [ptr]
    lib.ls_kv_store.argtypes = [ptr, ptr, i64, ptr, i64]
    lib.ls_attention.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64]
    for fn in (lib.ls_matmul, lib.ls_linear_check, lib.ls_decode_layers, lib.ls_kv_check, lib.ls_kv_store,
               lib.ls_attention):
        fn.restype = ctypes.c_int
    lib.ls_stream_read.argtypes = [ptr, i64]
    lib.ls_stream_read.restype = i64
    return lib


@functools.cache
def kernels() -> Kernels:
    variant, reason = _choose()
    if variant is None:
        return Kernels(None, None, reason)
    try:
        return Kernels(_bind(_build(variant), variant), variant, "")
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native kernels unavailable (%s): using torch's, which are slower", exc)
        return Kernels(None, None, str(exc))


def stream_read(buf: torch.Tensor) -> int:
    """Read a contiguous uint8 buffer (length a multiple of 256) once on every thread, as a one-row matmul
    streams its weights; returns the bytes' XOR. For timing the machine's streaming-read rate."""
    if buf.dtype != torch.uint8 or not buf.is_contiguous() or buf.numel() % 256 or buf.device.type != "cpu":
        raise ValueError("stream_read needs a contiguous CPU uint8 buffer of a multiple of 256 bytes")
    return int(_require().ls_stream_read(buf.data_ptr(), buf.numel()))


def available() -> bool:
    return kernels().lib is not None


def info() -> str:
    """One line for `llamaserve info` and the load log: the variant in use, or why there is none."""
    k = kernels()
    if k.lib is not None:
        return f"native {k.variant} (CPU supports: {', '.join(v for v in supported_variants() if v in AUTO)})"
    return f"torch's kernels ({k.reason})"


def supports(out_features: int, in_features: int) -> bool:
    """Shapes our kernels take: rows in groups of 8, blocks of 32 values."""
    return out_features % 8 == 0 and in_features % GROUP == 0


def _require() -> ctypes.CDLL:
    lib = kernels().lib
    if lib is None:  # the layers check available() when they choose their format
        raise RuntimeError(f"native kernels are not available on this machine: {kernels().reason}")
    return lib


def _check(rc: int, what: str) -> None:
    if rc == LS_ENOMEM:
        raise MemoryError(f"{what}: native kernel could not allocate its scratch buffers")
    if rc != 0:
        raise ValueError(f"{what}: the native kernel refused its arguments (code {rc})")


HUGE_PAGE = 2 << 20


def maps_supported() -> bool:
    """Whether private anonymous maps can be made here (not on Windows)."""
    return hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


def huge_page_map(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes], zero-filled, from a 2 MiB boundary of a private anonymous map advised for transparent
    huge pages before any page is touched (the system's setting decides; none are reserved). The map is
    unmapped when the last tensor viewing it is gone."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(m, dtype=torch.uint8)  # (holds the map)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor in a huge_page_map (torch.zeros where maps are not supported). Its pages,
    2 MiB at a time, come into memory as they are first written."""
    n = math.prod(shape) * dtype.itemsize
    if not maps_supported() or n == 0:
        return torch.zeros(shape, dtype=dtype)
    return huge_page_map(n).view(dtype).view(shape)


class WeightArena:
    """Where packed weights live: huge_page_maps of at least CHUNK bytes, filled in load order.

    A one-row matmul streams its weight from DRAM; on 4 KiB pages every page is a TLB miss and a point
    where the hardware prefetchers stop, and separately allocated buffers scatter a layer's weights.
    Llama 2 7B Q4_K_M's one-row matmuls (12 layers, Zen 4, 30 alternated rounds in one process) took
    0.95x the time from this arena with huge pages, 0.985x from the same arena on 4 KiB pages.
    A map is unmapped when the last tensor in it is gone (the tensors hold it); the arena also holds the
    map it is filling, so a process that drops a model keeps at most CHUNK bytes of its weights resident
    until the next weights fill that map.
    """

    CHUNK = 64 << 20
    ALIGN = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: torch.Tensor | None = None  # the map being filled
        self._used = 0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of contiguous CPU tensor t in the arena (t itself where the arena cannot hold it)."""
        n = t.numel() * t.element_size()
        if n == 0 or not maps_supported() or t.device.type != "cpu" or not t.is_contiguous():
            return t
        with self._lock:
            if self._base is None or self._used + n > self._base.numel():  # (the old map's tail: untouched)
                self._base, self._used = huge_page_map(max(self.CHUNK, -(-n // HUGE_PAGE) * HUGE_PAGE)), 0
            base, start = self._base, self._used
            self._used = -(-(start + n) // self.ALIGN) * self.ALIGN
        out = base[start : start + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


_ARENA = WeightArena()


class NativeWeight:
    """A linear's weight on our kernels: 1..3 stacks of rows (parts), each in its GGUF type's format.

    Holds the packed tensors (copied into the WeightArena, in load order) and the ls_linear that points at
    them (checked by the C side once, before the copy).
    """

    def __init__(self, k: int, parts: list[tuple[QT, dict[str, torch.Tensor]]]) -> None:
        if not 1 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"a native linear has 1..{MAX_PARTS} parts, got {len(parts)}")
        self.k = k
        self.n = sum(b["q"].shape[0] * 8 for _, b in parts)
        self._point(parts)
        _check(_require().ls_linear_check(self.address), "native linear")
        self._point([(qtype, {name: _ARENA.place(t) for name, t in bufs.items()}) for qtype, bufs in parts])

    def _point(self, parts: list[tuple[QT, dict[str, torch.Tensor]]]) -> None:
        self.parts = parts
        self.struct = LsLinear(k=self.k, n=self.n, nparts=len(parts))
        for i, (qtype, bufs) in enumerate(parts):
            ptr = {name: t.data_ptr() if t.numel() else None for name, t in bufs.items()}
            self.struct.part[i] = LsPart(fmt=FORMATS[qtype].code, rows=bufs["q"].shape[0] * 8, **ptr)
        self.address = ctypes.addressof(self.struct)  # a plain int: torch.compile can hold it

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, b in self.parts for t in b.values())

    def types(self) -> list[str]:
        return [q.name for q, _ in self.parts]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, k] -> float32 [M, n]."""
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"native linear: x {tuple(x.shape)} does not fit a [{self.n}, {self.k}] weight")
        return _matmul_at(x, self.address, self.n)


def _matmul_at(x: torch.Tensor, address: int, n: int) -> torch.Tensor:
    x = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _check(_require().ls_matmul(address, x.data_ptr(), x.shape[0], y.data_ptr()), "native linear")
    return y


# torch.compile sees the kernel as an opaque op (a ctypes call inside a graph would break it).
@torch.library.custom_op("llamaserve::native_matmul", mutates_args=())
def _native_op(x: torch.Tensor, address: int, n: int) -> torch.Tensor:
    return _matmul_at(x, address, n)


@_native_op.register_fake
def _(x, address, n):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


def matmul(x: torch.Tensor, w: NativeWeight) -> torch.Tensor:
    """x [M, k] -> float32 [M, n] on our kernels, also inside torch.compile."""
    if torch.compiler.is_compiling():
        return _native_op(x, w.address, w.n)
    return w.matmul(x)


class NativeKV:
    """One layer's KV pool as our kernels see it (an ls_kv): stores new K/V and runs attention over it
    in the pool's own dtype. `data` [slots, 2 * kv_heads, D] (float32, bfloat16, float16 or int8) and, for
    int8, `scale` [slots, 2 * kv_heads] float32 must stay where they are while this object lives."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None) -> None:
        if data.dtype not in KV_DTYPE_CODES or data.dim() != 3 or not data.is_contiguous() or data.is_cuda:
            raise ValueError(f"a native KV pool is a contiguous CPU [slots, heads, dim] tensor of "
                             f"{', '.join(map(str, KV_DTYPE_CODES))}; got {data.dtype} {tuple(data.shape)}")
        if (scale is None) != (data.dtype != torch.int8) or (
                scale is not None and (scale.dtype != torch.float32 or scale.shape != data.shape[:2]
                                       or not scale.is_contiguous())):
            raise ValueError("an int8 KV pool needs a contiguous float32 scale [slots, heads]; others none")
        self.data, self.scale = data, scale
        # What the ops take as the scale argument: an empty tensor for float pools (made once, not per call).
        self.scale_arg = scale if scale is not None else data.new_empty(0, dtype=torch.float32)
        self.heads, self.dim = data.shape[1], data.shape[2]
        self.struct = LsKV(dtype=KV_DTYPE_CODES[data.dtype], slots=data.shape[0], heads=self.heads,
                           dim=self.dim, data=data.data_ptr(),
                           scale=scale.data_ptr() if scale is not None else None)
        self.address = ctypes.addressof(self.struct)
        _check(_require().ls_kv_check(self.address), "native KV pool")

    def store(self, kv_new: torch.Tensor, slots: torch.Tensor) -> None:
        """kv_new [T, heads, dim] (any float dtype) into slots [T]."""
        _kv_store_at(self.data, self.scale_arg, kv_new, slots, self.address)

    def attend(self, q: torch.Tensor, q_lens: torch.Tensor, ctx_slots: torch.Tensor,
               ctx_lens: torch.Tensor) -> torch.Tensor:
        """q [T, H, dim] -> float32 [T, H * dim]: each sequence's rows attend causally to its context."""
        return _attention_at(self.data, self.scale_arg, q, q_lens, ctx_slots, ctx_lens, self.address)


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def _kv_store_at(data: torch.Tensor, scale: torch.Tensor, kv_new: torch.Tensor, slots: torch.Tensor,
                 address: int) -> None:
    heads, dim = data.shape[1], data.shape[2]
    src = kv_new.to(torch.float32).reshape(-1, heads * dim).contiguous()
    slots = _i64(slots)
    if slots.shape[0] != src.shape[0]:
        raise ValueError(f"native KV store: {src.shape[0]} rows for {slots.shape[0]} slots")
    _check(_require().ls_kv_store(address, src.data_ptr(), heads * dim, slots.data_ptr(), src.shape[0]),
           "native KV store")


def _attention_at(data: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, q_lens: torch.Tensor,
                  ctx_slots: torch.Tensor, ctx_lens: torch.Tensor, address: int) -> torch.Tensor:
    T, H, dim = q.shape
    q = q.to(torch.float32).contiguous()
    q_lens, ctx_slots, ctx_lens = _i64(q_lens), _i64(ctx_slots), _i64(ctx_lens)
    B, L = ctx_slots.shape
    if dim != data.shape[2] or q_lens.shape[0] != B or ctx_lens.shape[0] != B or int(q_lens.sum()) != T:
        raise ValueError("native attention: queries and metadata do not match")
    out = torch.empty(T, H * dim, dtype=torch.float32)
    _check(_require().ls_attention(address, q.data_ptr(), H * dim, H, B, q_lens.data_ptr(),
                                   ctx_slots.data_ptr(), L, ctx_lens.data_ptr(), out.data_ptr(), H * dim),
           "native attention")
    return out


# torch.compile sees both as opaque ops; the pool tensors are arguments, so a graph orders a layer's
# attention after the store that wrote its new tokens.
@torch.library.custom_op("llamaserve::kv_store", mutates_args=("data", "scale"))
def _kv_store_op(data: torch.Tensor, scale: torch.Tensor, kv_new: torch.Tensor, slots: torch.Tensor,
                 address: int) -> None:
    _kv_store_at(data, scale, kv_new, slots, address)


@torch.library.custom_op("llamaserve::attention", mutates_args=())
def _attention_op(data: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, q_lens: torch.Tensor,
                  ctx_slots: torch.Tensor, ctx_lens: torch.Tensor, address: int) -> torch.Tensor:
    return _attention_at(data, scale, q, q_lens, ctx_slots, ctx_lens, address)


@_attention_op.register_fake
def _(data, scale, q, q_lens, ctx_slots, ctx_lens, address):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2], dtype=torch.float32)


def kv_store(kv: NativeKV, kv_new: torch.Tensor, slots: torch.Tensor) -> None:
    """NativeKV.store, also inside torch.compile."""
    if torch.compiler.is_compiling():
        _kv_store_op(kv.data, kv.scale_arg, kv_new, slots, kv.address)
    else:
        kv.store(kv_new, slots)


def attention(kv: NativeKV, q: torch.Tensor, q_lens: torch.Tensor, ctx_slots: torch.Tensor,
              ctx_lens: torch.Tensor) -> torch.Tensor:
    """NativeKV.attend, also inside torch.compile."""
    if torch.compiler.is_compiling():
        return _attention_op(kv.data, kv.scale_arg, q, q_lens, ctx_slots, ctx_lens, kv.address)
    return kv.attend(q, q_lens, ctx_slots, ctx_lens)


class FusedDecoder:
    """Runs every transformer layer of a decode step (one new token per sequence) in one C call.

    The model runner uses it where all of a model's layer matmuls run on our kernels with float32
    activations (the KV pool may hold any dtype NativeKV takes); prefill steps keep the layer path, on
    the same attention kernel. `for_model` returns None for any other model. It keeps the addresses of
    the model's norm weights and packed weights: the model must not be moved or converted (`.to()`,
    `.float()`, a new state dict) afterwards.
    """

    def __init__(self, model: Any, rows: list[list[int]], final_norm: int) -> None:  # a Transformer
        cfg = model.config
        self.rows = rows  # per layer: norms, then the 4 linears' ls_linear (the pool is added per cache)
        self.final_norm = final_norm  # the address of the model's last RMSNorm weight (float32)
        self.shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self._table: tuple[tuple[int, ...], torch.Tensor] | None = None  # (pool addresses, pointer table)

    @classmethod
    def for_model(cls, model: Any) -> FusedDecoder | None:  # a Transformer
        if not available() or getattr(model, "dtype", None) != torch.float32 or model.config.head_dim % 8:
            return None
        rows = []
        final = model.norm.weight
        if final.dtype != torch.float32 or not final.is_contiguous():
            return None
        for layer in model.layers:
            norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            if any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
                return None
            weights = [getattr(m, "native_weight", None) for m in (
                layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2)]
            if any(w is None for w in weights):
                return None
            rows.append([norms[0].data_ptr(), norms[1].data_ptr(), *(w.address for w in weights if w)])
        return cls(model, rows, final.data_ptr())

    def _pointers(self, pools: list[NativeKV]) -> torch.Tensor:
        key = tuple(p.address for p in pools)
        if self._table is None or self._table[0] != key:
            rows = [[pool, *row] for pool, row in zip(key, self.rows, strict=True)]
            self._table = (key, torch.tensor(rows, dtype=torch.int64))
        return self._table[1]

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
            ctx_slots: torch.Tensor, ctx_lens: torch.Tensor, pools: list[NativeKV],
            final_norm: bool = True) -> torch.Tensor:
        """x [B, hidden] float32 (one token per sequence) -> the hidden states after the last layer and,
        with final_norm, the model's last RMSNorm."""
        layers, dim, heads, kv_heads, head_dim, inter = self.shape
        B = x.shape[0]
        x = x.contiguous().clone()
        cos, sin = cos.reshape(B, head_dim).contiguous(), sin.reshape(B, head_dim).contiguous()
        slots = slot_mapping.to(torch.int64).contiguous()
        ctx = ctx_slots.to(torch.int64).contiguous()
        lens = ctx_lens.to(torch.int64).contiguous()
        if (x.dtype != torch.float32 or cos.dtype != torch.float32 or x.shape[1] != dim
                or slots.shape[0] != B or ctx.shape[0] != B or lens.shape[0] != B):
            raise ValueError("fused decode: inputs do not match the model")
        norm = self.final_norm if final_norm else 0
        sizes = [layers, B, dim, heads, kv_heads, head_dim, inter, ctx.shape[1], norm]
        cfg = torch.tensor(sizes, dtype=torch.int64)
        table = self._pointers(pools)
        _check(_require().ls_decode_layers(cfg.data_ptr(), self.eps, x.data_ptr(), cos.data_ptr(),
                                           sin.data_ptr(), slots.data_ptr(), ctx.data_ptr(), lens.data_ptr(),
                                           table.data_ptr()), "fused decode")
        return x
