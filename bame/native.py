"""Native CPU kernels (plain C, loaded with ctypes) for the N:M products and mask upkeep, compiled on first use.

``bame/csrc/nm_kernels.c`` is compiled with the system C compiler (``$CC``, else ``cc``) as
``-O3 -march=native -fPIC -shared`` into a cache directory (``$BAME_CACHE_DIR``, else
``$XDG_CACHE_HOME/bame``, else ``~/.cache/bame``). The file name is keyed by a hash of the source, the
compiler command and flags, the compiler's ``--version`` and the CPU model and flags, so a changed source,
compiler or machine (a shared home directory) gets its own build. A build is written under a temporary
name and moved into place with ``os.replace``, so concurrent processes (pytest-xdist workers, DDP ranks)
never load a half-written library; a cached library that fails to load is rebuilt.

Nothing here raises at import time: :func:`available` says whether the kernels can be used and
:func:`unavailable_reason` why not (no compiler, a failed build, ``BAME_NATIVE=0``). The product functions
raise ``NotImplementedError`` when the kernels are unavailable or the inputs are not float32 CPU tensors,
which makes :func:`bame.kernels.choose_plan` skip the ``"native"`` formulations; the mask-upkeep callers in
:mod:`bame.nm`, :mod:`bame.lma` and :mod:`bame.obf` ask :func:`ready` first and fall back to PyTorch.

Parallelism: ctypes releases the GIL during a call, so a call is split by row ranges over
``torch.get_num_threads()`` Python threads (balanced by slot count) when the work is large enough. A row's
result never depends on the split, so the output is bit-identical for any thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FLAGS",
    "available",
    "ready",
    "bag",
    "bag_chunked",
    "block_flips",
    "cache_dir",
    "check_inputs",
    "gather_rows",
    "kth_smallest",
    "lma_propose",
    "rows_forward",
    "rows_input_grad",
    "rows_weight_grad",
    "conv_bags",
    "conv_dots",
    "sampled_dot",
    "scatter_rows",
    "srste_decay_",
    "take",
    "to_tiles",
    "token_tile",
    "topn_mask",
    "unavailable_reason",
]

SOURCE = Path(__file__).with_name("csrc") / "nm_kernels.c"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
ABI_VERSION = 11  # must match nm_abi_version() in the C source
#: Multiply-adds below which a call stays on one thread (thread hand-off costs ~10-50 us).
MIN_PARALLEL_WORK = 1 << 18
#: Elements from which a mask-upkeep call (top-N, flip counts, LMA, OBF ranks) beats PyTorch's ops: below
#: it the call's fixed cost outweighs the work.
MIN_NUMEL = 1 << 15
#: Per-core L2 the token tiles are sized for (1 MiB on current Xeons).
L2_BYTES = 1 << 20

_lock = threading.Lock()
_state: dict[tuple[str, ...], tuple[ctypes.CDLL | None, str | None]] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_gomp: int | None = None  # GOMP_parallel's address (0: none), found on first use


# -- building and loading -------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$BAME_CACHE_DIR``, ``$XDG_CACHE_HOME/bame`` or ``~/.cache/bame``."""
    if os.environ.get("BAME_CACHE_DIR"):
        return Path(os.environ["BAME_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bame"


def _env_key() -> tuple[str, ...]:
    """The environment a load depends on: a change (in tests, say) triggers a fresh look-up."""
    return tuple(os.environ.get(k, "") for k in ("BAME_NATIVE", "CC", "BAME_CACHE_DIR", "XDG_CACHE_HOME"))


def _cpu_fingerprint() -> str:
    """CPU model and feature flags (``-march=native`` code is only valid on a matching CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))  # every core repeats them: keep one copy of each line
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _compile(cc: list[str], target: Path) -> None:
    """Compile the source into ``target`` atomically (temporary file + ``os.replace``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        done = subprocess.run(
            [*cc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0 or not tmp.exists():
            msg = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"C compiler failed ({shlex.join(cc)}): {msg[0] if msg else done.returncode}")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _open(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions (raises OSError on a bad or stale file)."""
    lib = ctypes.CDLL(str(path))
    lib.nm_abi_version.restype = ctypes.c_int64
    if lib.nm_abi_version() != ABI_VERSION:
        raise OSError(f"{path.name}: ABI version {lib.nm_abi_version()} != {ABI_VERSION}")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nm_bag_f32.argtypes = [p, i64, i64, i64, p, p, p, p, p, i64, i64, i64, i64]
    lib.nm_sampled_dot_f32.argtypes = [p, i64, p, i64, i64, i64, p, p, p, p, i64, i64]
    lib.nm_to_tiles_f32.argtypes = [p, i64, i64, i64, p, i64, i64]
    lib.nm_scatter_rows_f32.argtypes = [p, p, p, p, p, i64, i64, i64, i64]
    lib.nm_gather_rows_f32.argtypes = [p, i64, p, p, p, p, i64, i64]
    lib.nm_take_f32.argtypes = [p, p, p, i64, i64]
    lib.nm_topn_mask_f32.argtypes = [p, i64, i64, i64, i64, p, i64, i64]
    lib.nm_block_flips_u8.argtypes = [p, p, i64, p, i64, i64]
    lib.nm_lma_propose_f32.argtypes = [p, p, p, ctypes.c_float, i64, i64, p, i64, i64]
    lib.nm_kth_smallest_f32.argtypes = [p, i64, i64]
    lib.nm_lma_regrowth_f32.argtypes = [p, p, p, ctypes.c_float, i64, p, p, i64, i64]
    lib.nm_top_pruned_f32.argtypes = [p, p, i64, i64, i64, p, p, i64, i64]
    lib.nm_srste_decay_f32.argtypes = [p, p, p, ctypes.c_float, i64, i64]
    lib.nm_bag_chunked_f32.argtypes = [p, i64, i64, i64, p, p, i64, p, p, p, i64, i64, p, i64, i64]
    lib.nm_conv_bags_f32.argtypes = [p, p, p, p, p, p, i64, p, p]
    lib.nm_conv_dots_f32.argtypes = [p, p, p, p, p, p, i64, p, p]
    lib.nm_conv_bags_par_f32.argtypes = [p, i64, p, p, p, p, p, p, i64, p]
    lib.nm_conv_dots_par_f32.argtypes = [p, i64, p, p, p, p, p, p, i64, p]
    lib.nm_sum_rows_f32.argtypes = [p, i64, i64, p, i64, i64]
    for fn in (lib.nm_conv_bags_f32, lib.nm_conv_dots_f32, lib.nm_conv_bags_par_f32, lib.nm_conv_dots_par_f32):
        fn.restype = ctypes.c_int64
    lib.nm_rows_fwd_f32.argtypes = lib.nm_rows_dx_f32.argtypes = [p, i64, i64, p, p, i64, i64, p, p]
    lib.nm_rows_dw_f32.argtypes = [p, p, i64, i64, i64, p, i64, p, i64, p, p]
    lib.nm_rows_fwd_par_f32.argtypes = lib.nm_rows_dx_par_f32.argtypes = [p, i64, p, i64, i64, p, p, i64, i64, p]
    lib.nm_rows_dw_par_f32.argtypes = [p, i64, p, p, i64, i64, i64, p, i64, p, i64, p]
    for fn in (lib.nm_rows_fwd_f32, lib.nm_rows_dx_f32, lib.nm_rows_dw_f32, lib.nm_rows_fwd_par_f32,
               lib.nm_rows_dx_par_f32, lib.nm_rows_dw_par_f32):
        fn.restype = ctypes.c_int64
    lib.nm_kth_smallest_f32.restype = ctypes.c_float
    for fn in (lib.nm_srste_decay_f32, lib.nm_take_f32, lib.nm_topn_mask_f32, lib.nm_block_flips_u8,
               lib.nm_lma_propose_f32, lib.nm_lma_regrowth_f32, lib.nm_bag_f32, lib.nm_sampled_dot_f32,
               lib.nm_to_tiles_f32, lib.nm_scatter_rows_f32, lib.nm_gather_rows_f32, lib.nm_bag_chunked_f32,
               lib.nm_sum_rows_f32, lib.nm_top_pruned_f32):
        fn.restype = None
    return lib


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """Build (if needed) and load the library: ``(lib, None)`` or ``(None, reason)``."""
    if os.environ.get("BAME_NATIVE", "").strip() == "0":
        return None, "disabled by BAME_NATIVE=0"
    cc = shlex.split(os.environ.get("CC", "").strip() or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return None, f"no C compiler ({cc[0] if cc else 'cc'}) found"
    try:
        source = SOURCE.read_text()
    except OSError as e:
        return None, f"kernel source missing: {e}"
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler ({cc[0]}) does not run: {e}"
    h = hashlib.sha256()
    for part in (source, shlex.join(cc), " ".join(FLAGS), version.stdout, _cpu_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    target = cache_dir() / f"nm_kernels-{h.hexdigest()[:20]}.so"
    try:
        if target.exists():
            try:
                return _open(target), None
            except OSError:  # corrupt, truncated or stale: build it again below
                pass
        _compile(cc, target)
        return _open(target), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, " ".join(str(e).split())[:300]


def _lib() -> ctypes.CDLL | None:
    key = _env_key()
    with _lock:
        if key not in _state:
            _state[key] = _load()
        return _state[key][0]


def available() -> bool:
    """Whether the native kernels can run here (compiles them on the first call)."""
    return _lib() is not None


def unavailable_reason() -> str | None:
    """One line on why the native kernels cannot run (None when they can)."""
    _lib()
    return _state[_env_key()][1]


def ready(*floats: Tensor, masks: tuple[Tensor, ...] = (), m: int = 1) -> bool:
    """Whether a mask-upkeep kernel takes these tensors (the one gate every caller uses).

    ``floats`` must be float32 and ``masks`` bool, every one a contiguous CPU tensor not requiring grad; the
    first must hold at least :data:`MIN_NUMEL` elements (below that a call's overhead outweighs it), groups
    must be at most :data:`TOPN_MAX_M` wide, and the kernels must have been built.
    """
    tensors = (*floats, *masks)
    if not tensors or tensors[0].numel() < MIN_NUMEL or m > TOPN_MAX_M:
        return False
    for t, dtype in zip(tensors, [torch.float32] * len(floats) + [torch.bool] * len(masks)):
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.requires_grad:
            return False
    return available()


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise NotImplementedError(f"native N:M kernels unavailable: {unavailable_reason()}")
    return lib


# -- threading ----------------------------------------------------------------------------------------
def _threads(work: int) -> int:
    """How many threads a call of ``work`` multiply-adds uses."""
    return max(1, min(torch.get_num_threads(), work // MIN_PARALLEL_WORK, 64))


def _run_split(fn, off: Tensor, rows: int, work: int, threads: int | None = None) -> None:
    """Run ``fn(r0, r1)`` over ``[0, rows)`` split into ranges of about equal slot counts (per ``off``)."""
    global _pool, _pool_size
    k = _threads(work) if threads is None else max(1, min(threads, rows))
    if k <= 1 or rows <= 1:
        fn(0, rows)
        return
    nnz = int(off[rows])
    if nnz > 0:  # balance by slots (variable-length CSC bags), else by rows
        cuts = torch.searchsorted(off[: rows + 1], torch.arange(1, k, dtype=torch.int64) * (nnz // k)).tolist()
    else:
        cuts = [rows * j // k for j in range(1, k)]
    bounds = [0, *sorted(min(max(c, 0), rows) for c in cuts), rows]
    with _lock:
        if _pool is None or _pool_size < k - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=k - 1, thread_name_prefix="bame-native"), k - 1
        pool = _pool
    futures = [pool.submit(fn, bounds[j], bounds[j + 1]) for j in range(1, k) if bounds[j] < bounds[j + 1]]
    fn(bounds[0], bounds[1])  # this thread takes the first range
    for f in futures:
        f.result()


def check_inputs(*tensors: Tensor) -> None:
    """Raise ``NotImplementedError`` unless the kernels are available and every tensor is float32 on the
    CPU (the planner then skips the native formulations)."""
    _require()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise NotImplementedError(f"native kernels take float32 CPU tensors, not {t.dtype} on {t.device}")


def _split_call(fn: Callable[..., None], args: tuple, count: int, work: int, threads: int | None = None) -> None:
    """``fn(*args, c0, c1)`` over ``[0, count)`` cut into equal ranges (one per thread); nothing if empty."""
    if count > 0:
        _even_split(lambda c0, c1: fn(*args, c0, c1), count, work, threads)


def _even_split(fn, count: int, work: int, threads: int | None = None) -> None:
    """Run ``fn(q0, q1)`` over ``[0, count)`` cut into equal ranges (one per thread)."""
    k = _threads(work) if threads is None else max(1, threads)
    k = max(1, min(k, count))
    off = torch.arange(k + 1, dtype=torch.int64) * count // k  # (k + 1,) range bounds
    bounds = off.tolist()
    _run_split(lambda a, b: fn(bounds[a], bounds[b]), off.clamp(max=count), k, work, k)


# -- checks -------------------------------------------------------------------------------------------
def _f32(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise NotImplementedError(f"native kernels take float32 CPU tensors, not {t.dtype} on {t.device}")
        if not t.is_contiguous():
            raise ValueError("native kernels need contiguous tensors")


def _i64(t: Tensor) -> Tensor:
    """An index tensor as contiguous int64 (the C kernels' index type)."""
    return t.to(torch.int64).contiguous() if t.dtype != torch.int64 or not t.is_contiguous() else t


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _keep(slot_mask: Tensor | None) -> Tensor | None:
    """A bool slot mask as flat bytes (bool storage is one 0/1 byte per element)."""
    return None if slot_mask is None else slot_mask.reshape(-1).contiguous().view(torch.uint8)


# -- products -----------------------------------------------------------------------------------------
def token_tile(rows: int, tokens: int) -> int:
    """Tokens per tile of a ``(rows, tile)`` table: 64, 32 or 16 floats, the widest whose table takes at
    most half of :data:`L2_BYTES` (the other half for the streamed indices, weights and outputs); all
    tokens when there are no more than that."""
    tw = 64
    while tw > 16 and rows * tw * 4 > L2_BYTES // 2:
        tw //= 2
    return max(1, min(tw, tokens))


def to_tiles(a: Tensor, tw: int, threads: int | None = None) -> Tensor:
    """``(T, R)`` -> the tiled transposed layout ``(ceil(T / tw), R, tw)``, zero past ``T`` (as
    :func:`bame.kernels.tiles.to_tiles`, in one cache-blocked pass)."""
    lib = _require()
    _f32(a)
    tokens, rows = a.shape
    n_tiles = max(-(-tokens // tw), 1)
    out = a.new_empty(n_tiles, rows, tw)
    if tokens == 0:
        return out.zero_()
    off = torch.arange(rows + 1, dtype=torch.int64)  # balance by table rows

    def run(r0: int, r1: int) -> None:
        lib.nm_to_tiles_f32(a.data_ptr(), tokens, rows, tw, out.data_ptr(), r0, r1)

    _run_split(run, off, rows, rows * n_tiles * tw // 4, threads)
    return out


def bag(
    tiles: Tensor, tokens: int, idx: Tensor, off: Tensor, w: Tensor, wperm: Tensor | None = None,
    transpose_out: bool = True, threads: int | None = None,
) -> Tensor:
    """Weighted row sums ``out[r] = sum_{p in [off[r], off[r+1])} w[q(p)] * table[idx[p]]``.

    Args:
        tiles: the ``(rows, T)`` table in the tiled layout ``(n_tiles, rows, tw)`` (:func:`to_tiles`).
        tokens: ``T``.
        idx: ``(nnz,)`` row of the table of every slot.
        off: ``(bags + 1,)`` slot offsets of the bags.
        w: the slot weights; ``q(p) = wperm[p]`` when ``wperm`` is given, else ``p``.
        transpose_out: return ``(T, bags)`` (written directly in that layout) instead of ``(bags, T)``.
        threads: split over this many threads (None: by work size, up to ``torch.get_num_threads()``).

    Returns:
        ``(T, bags)``, or ``(bags, T)`` without ``transpose_out``.
    """
    lib = _require()
    _f32(tiles, w)
    idx, off = _i64(idx), _i64(off)
    wperm = None if wperm is None else _i64(wperm)
    bags, (_, rows, tw) = off.numel() - 1, tiles.shape
    out = tiles.new_empty((tokens, bags) if transpose_out else (bags, tokens))
    ldr, ldt = (1, bags) if transpose_out else (tokens, 1)
    args = (_ptr(tiles), rows, tokens, tw, _ptr(idx), _ptr(off), _ptr(w), _ptr(wperm), _ptr(out), ldr, ldt)

    def run(r0: int, r1: int) -> None:
        lib.nm_bag_f32(*args, r0, r1)

    if tokens > 0:
        _run_split(run, off, bags, idx.numel() * tokens, threads)
    return out


#: The table rows of one chunk of :func:`bag_chunked` take at most this many bytes (half of a 48 KiB L1).
CHUNK_BYTES = 24 << 10


def chunk_rows(tw: int, multiple: int = 1) -> int:
    """Table rows per chunk: as many as fit :data:`CHUNK_BYTES` at ``tw`` floats a row, a multiple of
    ``multiple`` (the forward's chunks hold whole N:M blocks)."""
    rows = max(CHUNK_BYTES // (tw * 4), multiple)
    return max(rows // multiple * multiple, multiple)


def bag_chunked(
    tiles: Tensor, tokens: int, idx: Tensor, cptr: Tensor, w: Tensor, wperm: Tensor | None = None,
    transpose_out: bool = True, threads: int | None = None,
) -> Tensor:
    """:func:`bag` with every bag split into chunks of table rows (``cptr``: ``(bags, nch + 1)`` offsets;
    chunk k of bag r is ``[cptr[r, k], cptr[r, k + 1])``), all bags taking one chunk before the next, so a
    chunk of the table stays in L1 (see ``nm_bag_chunked_f32``)."""
    lib = _require()
    _f32(tiles, w)
    idx, cptr = _i64(idx), _i64(cptr)
    wperm = None if wperm is None else _i64(wperm)
    bags, nch = cptr.shape[0], cptr.shape[1] - 1
    _, rows, tw = tiles.shape
    out = tiles.new_empty((tokens, bags) if transpose_out else (bags, tokens))
    scratch = tiles.new_empty(bags, tw)
    ldr, ldt = (1, bags) if transpose_out else (tokens, 1)
    args = (_ptr(tiles), rows, tokens, tw, _ptr(idx), _ptr(cptr), nch, _ptr(w), _ptr(wperm), _ptr(out), ldr, ldt,
            _ptr(scratch))

    def run(r0: int, r1: int) -> None:
        lib.nm_bag_chunked_f32(*args, r0, r1)

    if tokens > 0 and bags > 0:
        off = cptr[:, -1].new_zeros(bags + 1)
        off[1:] = cptr[:, -1]  # the bags' total slot counts, to balance the split
        _run_split(run, off if bool((off[1:] >= off[:-1]).all()) else torch.arange(bags + 1), bags,
                   idx.numel() * tokens, threads)
    return out


#: Tokens per tile of the row-major kernels (``nm_rows_*_f32``), and rows per lockstep group.
ROWS_TILE = 16


def _slots_per_row(cols: Tensor, rows: int, w: Tensor | None = None) -> tuple[Tensor, int]:
    """``(cols as int64, K)`` for the row-major kernels, K slots per row (and one value per slot)."""
    cols = _i64(cols)
    if rows <= 0 or cols.numel() % rows or (w is not None and w.numel() != cols.numel()):
        raise ValueError(f"{cols.numel()} slots are not K per row of {rows} rows, each with one value")
    return cols, cols.numel() // rows


def rows_forward(x: Tensor, cols: Tensor, w: Tensor, rows: int, threads: int | None = None) -> Tensor:
    """``y[t, r] = sum_k w[r * K + k] * x[t, cols[r * K + k]]``: the forward of an N:M Linear layer on a
    row-major ``x (T, in)``, written row-major ``(T, rows)`` (see ``nm_rows_fwd_f32``: 16 x 16 blocks
    transposed in registers, no transposed copy of x).

    Args:
        x: ``(T, in)`` float32, contiguous.
        cols: ``(rows * K,)`` column of every slot, row-major slot order (K slots per row).
        w: ``(rows * K,)`` float32 slot values.
        rows: output features.
    """
    lib = _require()
    _f32(x, w)
    cols, k = _slots_per_row(cols, rows, w)
    tokens, in_ = x.shape
    y = x.new_empty(tokens, rows)
    if tokens:
        _conv_call(lib, "rows_fwd", tokens * cols.numel(), threads, _ptr(x), tokens, in_, _ptr(cols), _ptr(w), rows,
                   k, _ptr(y))
    return y


def rows_input_grad(dy: Tensor, cols: Tensor, w: Tensor, in_features: int, threads: int | None = None) -> Tensor:
    """``dX = dY (W*B)`` for the slots of :func:`rows_forward`: ``dy (T, rows)`` -> ``(T, in_features)``,
    row-major in and out (see ``nm_rows_dx_f32``: every slot scatters into a tile's table of columns)."""
    lib = _require()
    _f32(dy, w)
    tokens, rows = dy.shape
    cols, k = _slots_per_row(cols, rows, w)
    dx = dy.new_empty(tokens, in_features)
    if tokens:
        _conv_call(lib, "rows_dx", tokens * cols.numel(), threads, _ptr(dy), tokens, rows, _ptr(cols), _ptr(w),
                   in_features, k, _ptr(dx))
    return dx


def rows_chunk(in_features: int, rows: int, tokens: int) -> int:
    """Tokens per chunk of :func:`rows_weight_grad`: 256 down to 16, the widest whose transposed tables of x and
    dY (``(in + rows) * chunk`` floats) take at most half of :data:`L2_BYTES`, and no wider than the tokens
    (rounded up to 16). A function of the shapes only, so the partial sums never depend on the thread count."""
    ch = 256
    while ch > ROWS_TILE and ((in_features + rows) * ch * 4 > L2_BYTES // 2 or ch >= 2 * max(tokens, 1)):
        ch //= 2
    return ch


def rows_weight_grad(dy: Tensor, x: Tensor, cols: Tensor, slot_mask: Tensor | None = None,
                     threads: int | None = None) -> Tensor:
    """``dW[p] = sum_t dy[t, p // K] * x[t, cols[p]]`` at the slots (0 where ``slot_mask`` is False), from
    row-major ``dy (T, rows)`` and ``x (T, in)``: ``(rows * K,)``. Each chunk of :func:`rows_chunk` tokens
    gives partial sums (``nm_rows_dw_f32``), added in chunk order."""
    lib = _require()
    _f32(dy, x)
    (tokens, rows), in_ = dy.shape, x.shape[1]
    cols, k = _slots_per_row(cols, rows)
    if x.shape[0] != tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, dY {tokens}")
    nnz, keep = cols.numel(), _keep(slot_mask)
    ch = rows_chunk(in_, rows, tokens)
    chunks = -(-tokens // ch)
    part = x.new_empty(chunks, nnz)
    out = x.new_zeros(nnz)
    if chunks and nnz:
        _conv_call(lib, "rows_dw", tokens * nnz, threads, _ptr(dy), _ptr(x), tokens, rows, in_, _ptr(cols), k,
                   _ptr(keep), ch, _ptr(part))
        lib.nm_sum_rows_f32(_ptr(part), chunks, nnz, _ptr(out), 0, nnz)  # in chunk order (a light pass: one thread)
    return out


#: The stacking of a stride-1 convolution's planes (``geo`` of :func:`conv_bags`, ``nm_conv_bags_f32``): input
#: planes (B, C, H, W), output planes (Ho, Wo), top zero rows, left zero columns, rows per image, floats per
#: row, images per chunk, the largest term shift, images per partial sum (the weight gradient).
CONV_GEO = ("B", "C", "H", "W", "Ho", "Wo", "top", "left", "sh", "wp", "nb", "maxshift", "per_part")


def _omp_parallel() -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch computes on, or None (another backend,
    or no such runtime loaded in this process). The convolution kernels run on that team: after every torch
    op its idle workers spin for a while, and threads of ours would compete with them for the cores."""
    global _gomp
    if _gomp is None:
        _gomp = 0
        if "parallel backend: OpenMP" in torch.__config__.parallel_info():
            _gomp = _torch_gomp_parallel()
    return _gomp or None


def _torch_gomp_parallel() -> int:
    """``GOMP_parallel`` as torch's own extension resolves it (a lookup through its dependencies), else from
    a libgomp loaded in this process, torch's copy first. Never another package's copy when torch's is
    found: scikit-learn ships one, whose team would compete with torch's for the cores (a 2x slower step,
    measured)."""
    try:
        return ctypes.cast(ctypes.CDLL(torch._C.__file__).GOMP_parallel, ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "gomp" in ln.rsplit("/", 1)[-1] and ".so" in ln}
    except OSError:
        return 0
    home = os.path.dirname(torch.__file__) + os.sep
    for path in sorted(paths, key=lambda p: (not p.startswith(home), p)):
        try:
            address = ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        if address:
            return address
    return 0


def _conv_call(lib: ctypes.CDLL, name: str, work: int, threads: int | None, *args) -> None:
    """Run ``nm_<name>`` on ``k`` threads that take its chunks from one shared counter: torch's OpenMP team
    when there is one (``nm_<name>_par``), else Python threads; raise when scratch memory ran out."""
    k = _threads(work) if threads is None else max(1, threads)
    gomp = _omp_parallel() if k > 1 else None
    if gomp is not None:
        status = [getattr(lib, f"nm_{name}_par_f32")(gomp, k, *args)]
    else:
        counter = torch.zeros(1, dtype=torch.int64)
        status = []
        _even_split(lambda a, b: status.append(getattr(lib, f"nm_{name}_f32")(*args, _ptr(counter))), k, work, k)
    if any(status):
        raise MemoryError(f"native nm_{name}_f32: scratch allocation failed")


def _conv_geo(geo: tuple[int, ...]) -> Tensor:
    if len(geo) != len(CONV_GEO):
        raise ValueError(f"geo needs {len(CONV_GEO)} entries {CONV_GEO}, got {len(geo)}")
    return torch.tensor(geo, dtype=torch.int64)


def conv_bags(x: Tensor, geo: tuple[int, ...], row: Tensor, shift: Tensor, ptr: Tensor, w: Tensor,
              threads: int | None = None) -> Tensor:
    """Bags over stacked planes (see ``nm_conv_bags_f32``): ``(B, R, Ho, Wo)`` with R = ``ptr.numel() - 1``.

    Args:
        x: ``(B, C, H, W)`` float32 input planes.
        geo: the stacking, :data:`CONV_GEO` (``bame.kernels.conv.Stacking.geo``).
        row: ``(nnz,)`` input plane of every term; ``shift``: its flat shift on the stacked planes;
            ``ptr``: ``(R + 1,)`` the terms of every output plane.
        w: ``(nnz,)`` the terms' weights.
    """
    lib = _require()
    x, w = x.contiguous(), w.contiguous()
    _f32(x, w)
    row, shift, ptr = _i64(row), _i64(shift), _i64(ptr)
    b, c, h, wd = x.shape
    if tuple(geo[:4]) != (b, c, h, wd):
        raise ValueError(f"geo {tuple(geo[:4])} does not describe input planes {tuple(x.shape)}")
    rows, g = ptr.numel() - 1, _conv_geo(geo)
    out = x.new_empty(b, rows, geo[4], geo[5])
    if b:
        _conv_call(lib, "conv_bags", b * row.numel() * geo[4] * geo[9], threads, _ptr(x), _ptr(g), _ptr(row),
                   _ptr(shift), _ptr(ptr), _ptr(w), rows, _ptr(out))
    return out


def conv_dots(dy: Tensor, x: Tensor, geo: tuple[int, ...], row: Tensor, shift: Tensor, ptr: Tensor,
              threads: int | None = None) -> Tensor:
    """Dots over stacked planes summed over the images (see ``nm_conv_dots_f32``): ``(nnz,)`` float32.

    Every ``geo[12]`` images (whole chunks) get their own partial sums, added in order afterwards, so the
    result depends on the stacking, never on the thread split.

    Args:
        dy: ``(B, R, Ho, Wo)`` the output gradient.
        x: ``(B, C, H, W)`` the input planes; ``geo``, ``row``, ``shift``, ``ptr``: as :func:`conv_bags`.
    """
    lib = _require()
    dy, x = dy.contiguous(), x.contiguous()
    _f32(dy, x)
    row, shift, ptr = _i64(row), _i64(shift), _i64(ptr)
    b, rows, nnz = x.shape[0], ptr.numel() - 1, row.numel()
    if tuple(geo[:4]) != tuple(x.shape) or tuple(dy.shape) != (b, rows, geo[4], geo[5]):
        raise ValueError(f"geo {tuple(geo[:6])} does not describe x {tuple(x.shape)} and dy {tuple(dy.shape)}")
    chunks, g = -(-b // geo[12]), _conv_geo(geo)
    part = x.new_empty(chunks, nnz)
    if b:
        _conv_call(lib, "conv_dots", b * nnz * geo[4] * geo[9], threads, _ptr(dy), _ptr(x), _ptr(g), _ptr(row),
                   _ptr(shift), _ptr(ptr), rows, _ptr(part))
    out = x.new_empty(nnz)
    lib.nm_sum_rows_f32(_ptr(part), chunks, nnz, _ptr(out), 0, nnz)
    return out


def sampled_dot(
    a_tiles: Tensor, b_tiles: Tensor, tokens: int, idx: Tensor, off: Tensor, slot_mask: Tensor | None = None,
    threads: int | None = None,
) -> Tensor:
    """``out[p] = <a[r], b[idx[p]]>`` (over the ``T`` tokens) for the slots ``p in [off[r], off[r+1])``.

    Args:
        a_tiles: ``(rows_a, T)`` float32 (``dY^T``) in the tiled layout ``(n_tiles, rows_a, tw)``.
        b_tiles: ``(rows_b, T)`` float32 (``x^T``) in the same tiling.
        tokens: ``T``.
        idx: ``(nnz,)`` row of ``b`` of every slot (the weight's columns).
        off: ``(rows_a + 1,)`` slot offsets.
        slot_mask: optional bool per slot; False (padding) gives 0.

    Returns:
        ``(nnz,)`` float32.
    """
    lib = _require()
    _f32(a_tiles, b_tiles)
    if a_tiles.shape[0] != b_tiles.shape[0] or a_tiles.shape[2] != b_tiles.shape[2]:
        raise ValueError(f"token tilings differ: {tuple(a_tiles.shape)} vs {tuple(b_tiles.shape)}")
    idx, off, keep = _i64(idx), _i64(off), _keep(slot_mask)
    out = a_tiles.new_zeros(idx.numel())
    tw = a_tiles.shape[2]
    args = (_ptr(a_tiles), a_tiles.shape[1], _ptr(b_tiles), b_tiles.shape[1], tokens, tw, _ptr(idx), _ptr(off),
            _ptr(keep), _ptr(out))

    def run(r0: int, r1: int) -> None:
        lib.nm_sampled_dot_f32(*args, r0, r1)

    if tokens > 0:
        _run_split(run, off, off.numel() - 1, idx.numel() * tokens, threads)
    return out


def scatter_rows(
    vals: Tensor, idx: Tensor, off: Tensor, shape: tuple[int, int], slot_mask: Tensor | None = None,
    threads: int | None = None,
) -> Tensor:
    """A dense ``shape`` matrix, zero except ``dense[r, idx[p]] = vals[p]`` at (real) slots, in one pass."""
    lib = _require()
    _f32(vals)
    idx, off, keep = _i64(idx), _i64(off), _keep(slot_mask)
    dense = vals.new_empty(shape)
    args = (_ptr(vals), _ptr(idx), _ptr(off), _ptr(keep), _ptr(dense), shape[1], shape[1])

    def run(r0: int, r1: int) -> None:
        lib.nm_scatter_rows_f32(*args, r0, r1)

    _run_split(run, off, shape[0], shape[0] * shape[1] // 4, threads)
    return dense


def gather_rows(
    dense: Tensor, idx: Tensor, off: Tensor, slot_mask: Tensor | None = None, threads: int | None = None
) -> Tensor:
    """``out[p] = dense[r, idx[p]]`` at the slots of every row (0 at padding): ``(nnz,)``."""
    lib = _require()
    _f32(dense)
    idx, off, keep = _i64(idx), _i64(off), _keep(slot_mask)
    out = dense.new_empty(idx.numel())
    args = (_ptr(dense), dense.shape[1], _ptr(idx), _ptr(off), _ptr(keep), _ptr(out))

    def run(r0: int, r1: int) -> None:
        lib.nm_gather_rows_f32(*args, r0, r1)

    _run_split(run, off, dense.shape[0], idx.numel() * 4, threads)
    return out


def take(src: Tensor, idx: Tensor, threads: int | None = None) -> Tensor:
    """``src[idx]`` for a flat float32 ``src`` (``index_select`` split over threads): ``(len(idx),)``."""
    lib = _require()
    _f32(src)
    idx = _i64(idx)
    out = src.new_empty(idx.numel())
    count = idx.numel()

    def run(q0: int, q1: int) -> None:
        lib.nm_take_f32(src.data_ptr(), idx.data_ptr(), out.data_ptr(), q0, q1)

    _even_split(run, count, count * 8, threads)
    return out


# -- masks --------------------------------------------------------------------------------------------
#: Largest block size of :func:`topn_mask` (its pairwise comparisons grow with M^2).
TOPN_MAX_M = 32


def _check_topn(n: int, m: int) -> None:
    if not 0 < m <= TOPN_MAX_M or not 0 <= n <= m:
        raise ValueError(f"native top-N keeps 0..M of M <= {TOPN_MAX_M} per group, not {n} of {m}")


def topn_mask(scores: Tensor, n: int, magnitude: bool = False, threads: int | None = None) -> Tensor:
    """The N largest of every group along dim 1 of a contiguous float32 ``(G, M, R)`` tensor, as bool.

    The selection of :func:`bame.nm.topn_mask_grouped`: ties go to the lower index, NaN ranks above every
    number, -0.0 equals +0.0. With ``magnitude``, ``|scores|`` is ranked (without an ``abs`` copy).
    """
    lib = _require()
    _f32(scores)
    g, m, r = scores.shape
    _check_topn(n, m)
    out = torch.empty((g, m, r), dtype=torch.bool)
    if r > 0:
        _split_call(lib.nm_topn_mask_f32, (scores.data_ptr(), m, r, n, int(magnitude), out.data_ptr()), g,
                    scores.numel() * m // 4, threads)
    return out


def block_flips(old: Tensor, new: Tensor, threads: int | None = None) -> Tensor:
    """Entries that differ in every block of two contiguous bool ``(K, M)`` masks: int32 ``(K,)``."""
    lib = _require()
    if old.dtype != torch.bool or new.dtype != torch.bool or old.device.type != "cpu" or new.device.type != "cpu":
        raise NotImplementedError("native block_flips takes bool CPU masks")
    if old.shape != new.shape or old.dim() != 2 or not (old.is_contiguous() and new.is_contiguous()):
        raise ValueError("native block_flips needs two contiguous (K, M) masks of one shape")
    k, m = old.shape
    out = torch.empty(k, dtype=torch.int32)
    _split_call(lib.nm_block_flips_u8, (old.data_ptr(), new.data_ptr(), m, out.data_ptr()), k, old.numel() // 4,
                threads)
    return out


def lma_propose(weight: Tensor, grad: Tensor, old: Tensor, n: int, lr: float, threads: int | None = None) -> Tensor:
    """:func:`bame.lma.propose` in one pass: the top-N LMA scores of every block of contiguous float32
    ``(K, M)`` weight and gradient blocks and a bool ``(K, M)`` old mask; the same bool proposal."""
    lib = _require()
    k, m = _lma_blocks(weight, grad, old, "lma_propose")
    _check_topn(n, m)
    out = torch.empty((k, m), dtype=torch.bool)
    _split_call(lib.nm_lma_propose_f32, (weight.data_ptr(), grad.data_ptr(), old.data_ptr(), float(lr), m, n,
                                         out.data_ptr()), k, weight.numel() * m // 2, threads)
    return out


def lma_regrowth(weight: Tensor, grad: Tensor, old: Tensor, lr: float,
                 threads: int | None = None) -> tuple[Tensor, Tensor]:
    """Per block of contiguous float32 ``(K, M)`` weight and gradient blocks and a bool ``(K, M)`` old mask: the
    best pruned score ``lr * G**2`` (-inf where none) and the weakest kept score ``|G * W|`` (+inf where none),
    as :func:`bame.lma.regrowth` computes them from :func:`bame.lma.scores` (a NaN score makes its block's NaN)."""
    lib = _require()
    k, m = _lma_blocks(weight, grad, old, "lma_regrowth")
    best, weakest = torch.empty(k), torch.empty(k)
    _split_call(lib.nm_lma_regrowth_f32, (weight.data_ptr(), grad.data_ptr(), old.data_ptr(), float(lr), m,
                                          best.data_ptr(), weakest.data_ptr()), k, weight.numel(), threads)
    return best, weakest


def _lma_blocks(weight: Tensor, grad: Tensor, old: Tensor, name: str) -> tuple[int, int]:
    """``(K, M)`` of LMA's inputs, checked: float32 weight and gradient blocks and a contiguous bool mask."""
    _f32(weight, grad)
    k, m = weight.shape
    if grad.shape != (k, m) or old.shape != (k, m) or old.dtype != torch.bool or not old.is_contiguous():
        raise ValueError(f"native {name} needs (K, M) weight, gradient and bool mask blocks")
    return k, m


def top_pruned(grad: Tensor, slots: Tensor, p: int, threads: int | None = None) -> tuple[Tensor, Tensor]:
    """Per block of contiguous float32 ``(K, M)`` gradient blocks, the ``p`` entries of largest |G| among those
    the uint8 ``(K, N)`` slots do not hold (NaN as +inf, ties to the lower position): their positions (uint8
    ``(K, p)``) and gradients (``(K, p)``), largest first."""
    lib = _require()
    _f32(grad)
    k, m = grad.shape
    n = slots.shape[-1] if slots.dim() == 2 else 0
    if slots.shape != (k, n) or slots.dtype != torch.uint8 or not slots.is_contiguous() or m > 64:
        raise ValueError("native top_pruned needs (K, M) gradient blocks (M <= 64) and uint8 (K, N) slots")
    if not 0 < p <= m - n:
        raise ValueError(f"p = {p} outside 1..{m - n} (the pruned entries of a block)")
    idx, val = torch.empty((k, p), dtype=torch.uint8), torch.empty((k, p))
    _split_call(lib.nm_top_pruned_f32, (grad.data_ptr(), slots.data_ptr(), m, n, p, idx.data_ptr(), val.data_ptr()),
                k, grad.numel(), threads)
    return idx, val


def kth_smallest(values: Tensor, k: int) -> float:
    """The ``k``-th smallest (0-based) of a contiguous float32 CPU vector without NaN (radix select).

    The value ``torch.kthvalue(values, k + 1)`` gives, except that a zero is returned as +0.0.
    """
    lib = _require()
    _f32(values)
    if values.dim() != 1 or not 0 <= k < values.numel():
        raise ValueError(f"k = {k} outside a vector of {values.numel()}")
    x = float(lib.nm_kth_smallest_f32(values.data_ptr(), values.numel(), k))
    if math.isnan(x):  # no memory for its histogram
        return torch.kthvalue(values, k + 1).values.item()
    return x


def srste_decay_(grad: Tensor, weight: Tensor, mask: Tensor, lam: float, threads: int | None = None) -> None:
    """``grad += lam * (1 - mask) * weight`` in place (SR-STE's term), bitwise as
    ``grad.addcmul_(weight, 1 - mask.float(), value=lam)``; contiguous float32 tensors, a bool mask."""
    lib = _require()
    _f32(grad, weight)
    if mask.dtype != torch.bool or mask.device.type != "cpu" or not mask.is_contiguous():
        raise NotImplementedError("native srste_decay_ takes a contiguous bool CPU mask")
    if grad.shape != weight.shape or grad.shape != mask.shape:
        raise ValueError("gradient, weight and mask must have one shape")
    _split_call(lib.nm_srste_decay_f32, (grad.data_ptr(), weight.data_ptr(), mask.data_ptr(), float(lam)),
                grad.numel(), grad.numel(), threads)
