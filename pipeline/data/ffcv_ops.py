"""The FFCV decoder that replays the augmentation plan, and its numba kernels.

``PlanDecoder`` is the first operation of the image pipeline (a ``SimpleRGBImageDecoder`` so FFCV
takes it as the field's decoder). FFCV hands it the batch's sample indices: the rows of the
``.beton`` are the samples of the dataset index in order, so a row number IS the sample index.
For each sample it reads that sample's geometry (``backends.Geometry``: region, resize target,
window, flip — drawn from the plan in Python for the epoch's view, or the eval transform) from a
table shared with Python, decodes the image and renders the geometry into the output slot.

Both steps are made to give PIL's pixels, so the FFCV backend matches the torchvision backend
bit for bit where the stored image is the original:

- JPEG decoding calls libjpeg-turbo's ``tjDecompress2`` with the accurate integer IDCT and fancy
  chroma upsampling, PIL's defaults (FFCV's own ``imdecode`` uses the fast IDCT);
- ``render`` reimplements Pillow's ``ImagingResample`` for the bilinear filter: the same double
  precision coefficients, the same 22-bit fixed-point rounding, the two passes in Pillow's order,
  each rounded to uint8 — only the output window is computed. The passes read the decoded buffer
  in place and write the output slot (flip included) directly; both are vectorised (the
  horizontal one on a transposed copy of strips of rows, see ``_hpass``).

The table is an int32 (N, 9) numpy array that Python refills each epoch; compiled code reads it
through its address (numba would otherwise freeze a captured array as a constant).

Importing this module patches FFCV's memory managers (``_fix_ffcv_state_types``): as shipped they
turn every 1-D uint8 array of the process read-only for numba, which compiled code writing such
arrays (``_hpass``...) cannot live with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from dataclasses import replace
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

_TORCH_THREADS = torch.get_num_threads()  # importing FFCV sets torch's thread count to 1
from ffcv.fields.rgb_image import SimpleRGBImageDecoder  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)


def _fix_ffcv_state_types() -> None:
    """FFCV's memory managers declare their state read-only by setting ``mutable = False`` on
    numba's interned types (``nb.uint8[::1]``...): from then on every 1-D uint8 array of the
    process is typed read-only (``np.empty`` results included, which compiled code then may not
    write) and dispatchers that already hold the type as a key fail (KeyError). Same
    declarations (and the OS cache's reader), on fresh read-only types."""
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager

    def readonly(dtype: Any, ndim: int) -> Any:
        return nbtypes.Array(dtype, ndim, "C", readonly=True)

    os_state = nbtypes.Tuple([readonly(nbtypes.uint8, 1), nbtypes.uint64[::1],
                              nbtypes.uint64[::1]])
    process_state = nbtypes.Tuple([readonly(nbtypes.uint8, 2), readonly(nbtypes.uint64, 1),
                                   readonly(nbtypes.uint64, 1), readonly(nbtypes.uint32, 1)])
    OSCacheManager.state_type = property(lambda self: os_state)  # type: ignore[assignment]

    def compile_reader(self: Any) -> Any:  # FFCV's, returning the read-only type it meant
        def read(address, mem_state):  # noqa: ANN001, ANN202
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address : address + size]

        return Compiler.compile(read, readonly(nbtypes.uint8, 1)(nbtypes.uint64, os_state))

    OSCacheManager.compile_reader = compile_reader  # type: ignore[method-assign]
    ProcessCacheManager.state_type = property(lambda self: process_state)  # type: ignore[assignment]


_fix_ffcv_state_types()

GEOMETRY_COLUMNS = 9  # x, y, w, h, resized_w, resized_h, window_x, window_y, flip
MODE_JPEG, MODE_RAW = 0, 1  # FFCV's RGBImageField storage modes
_BITS = 22  # Pillow's PRECISION_BITS (32 - 8 - 2)
_TJPF_RGB = 0


def _turbojpeg() -> ctypes.CDLL:
    name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    try:
        return ctypes.CDLL(name)
    except OSError as err:
        raise ImportError(
            f"libturbojpeg ({name}) is missing: apt-get install libturbojpeg0-dev"
        ) from err


_TJ = _turbojpeg()
_tj_init = _TJ.tjInitDecompress
_tj_init.argtypes, _tj_init.restype = [], ctypes.c_void_p
_tj_decompress = _TJ.tjDecompress2
_tj_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
_tj_decompress.restype = ctypes.c_int
_tj_destroy = _TJ.tjDestroy
_tj_destroy.argtypes, _tj_destroy.restype = [ctypes.c_void_p], ctypes.c_int


def _decode_jpeg(data: np.ndarray, out: np.ndarray, width: int, height: int) -> int:
    """Decode JPEG ``data`` into ``out`` (height·width·3 uint8) as PIL does; 0 on success."""
    handle = _tj_init()
    status = _tj_decompress(handle, data.ctypes.data, data.size, out.ctypes.data,
                            width, 0, height, _TJPF_RGB, 0)
    _tj_destroy(handle)
    return status


# Two dispatchers of the same code: one for Python callers (the writer, tests, benchmark), one
# called only from FFCV's compiled pipeline: sharing one failed (KeyError in the dispatcher's
# overloads) before ``_fix_ffcv_state_types``, which removed the cause; kept as a safeguard.
decode_jpeg = numba.njit(nogil=True)(_decode_jpeg)
_decode_jpeg_compiled = numba.njit(nogil=True)(_decode_jpeg)


@numba.njit(nogil=True, cache=True)
def pil_coeffs(
    in_size: int, out_size: int, first: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for ``count`` output
    positions from ``first`` of a resize ``in_size`` → ``out_size``: (bounds, fixed-point kernel).
    """
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((count, 2), dtype=np.int64)
    kk = np.zeros((count, ksize), dtype=np.int64)
    weights = np.zeros(ksize, dtype=np.float64)
    ss = 1.0 / filterscale
    for i in range(count):
        center = (first + i + 0.5) * scale
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        ww = 0.0
        for x in range(xmax):
            t = (x + xmin - center + 0.5) * ss
            if t < 0.0:
                t = -t
            w = 1.0 - t if t < 1.0 else 0.0
            weights[x] = w
            ww += w
        for x in range(xmax):
            k = weights[x] / ww if ww != 0.0 else weights[x]
            kk[i, x] = int(-0.5 + k * (1 << _BITS)) if k < 0 else int(0.5 + k * (1 << _BITS))
        bounds[i, 0] = xmin
        bounds[i, 1] = xmax
    return bounds, kk


@intrinsic
def _copy4(typingctx: Any, dst: Any, dst_at: Any, src: Any, src_at: Any) -> Any:
    """Copy the 4 bytes ``src[src_at:src_at+4]`` to ``dst[dst_at:dst_at+4]`` (1-D uint8 arrays;
    unaligned, unchecked): one load and one store where a 3-byte pixel takes three of each."""
    sig = nbtypes.void(dst, nbtypes.intp, src, nbtypes.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        target = context.make_array(signature.args[0])(context, builder, args[0])
        source = context.make_array(signature.args[2])(context, builder, args[2])
        at = builder.bitcast(builder.gep(source.data, [args[3]]), i32.as_pointer())
        value = builder.load(at, align=1, typ=i32)
        to = builder.bitcast(builder.gep(target.data, [args[1]]), i32.as_pointer())
        builder.store(value, to, align=1)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _clip8(v: int) -> int:
    v = v >> _BITS
    return 0 if v < 0 else (255 if v > 255 else v)


_STRIP = 32  # rows per strip of the horizontal pass: its transposed copy stays in L1


@numba.njit(nogil=True, cache=True)
def _hpass(src: np.ndarray, at: int, stride: int, rows: int, cols: int, bounds: np.ndarray,
           kk: np.ndarray, c0: int, out: np.ndarray, out_at: int, out_stride: int,
           step: int) -> None:
    """Pillow's horizontal 8-bit pass over ``rows`` × ``cols`` pixels of ``src`` (flat RGB,
    pixel (r, c) at ``at + r·stride + 3c``; column 0 is the source column ``c0``), writing output
    pixel (r, j) at ``out_at + r·out_stride + j·step`` (``step`` -3 mirrors the row).

    Per strip of rows, the columns are first copied into rows (a transposed copy), so that each
    output column is a weighted sum of a few contiguous rows, which vectorises; the results are
    transposed back. Both transposes move 4 bytes per pixel (``_copy4``): the spare byte lands in
    the next pixel's slot, written after it, or in a padding byte — so copies go in increasing
    address order and the last pixel of a row is copied bytewise. Integer sums fit in int32 as in
    Pillow (bilinear weights are positive and sum to 2**22).
    """
    n = bounds.shape[0]
    pitch = _STRIP * 3 + 1
    columns = np.empty((cols, pitch), dtype=np.uint8)
    result = np.empty((n, pitch), dtype=np.uint8)
    flat_columns, flat_result = columns.reshape(-1), result.reshape(-1)
    acc = np.empty(_STRIP * 3, dtype=np.int32)
    for top in range(0, rows, _STRIP):
        lanes = min(_STRIP, rows - top) * 3
        for r3 in range(0, lanes, 3):
            line = at + (top + r3 // 3) * stride
            for c in range(cols - 1):
                _copy4(flat_columns, c * pitch + r3, src, line + 3 * c)
            for ch in range(3):
                columns[cols - 1, r3 + ch] = src[line + 3 * (cols - 1) + ch]
        for j in range(n):
            lo, cnt = bounds[j, 0] - c0, bounds[j, 1]
            acc[:lanes] = 1 << (_BITS - 1)
            for t in range(cnt):
                k = np.int32(kk[j, t])
                column = columns[lo + t]
                for q in range(lanes):
                    acc[q] += np.int32(column[q]) * k
            res = result[j]
            for q in range(lanes):
                v = acc[q] >> _BITS
                res[q] = 0 if v < 0 else (255 if v > 255 else v)
        for r3 in range(0, lanes, 3):
            line = out_at + (top + r3 // 3) * out_stride
            for m in range(n - 1):
                j = m if step > 0 else n - 1 - m
                _copy4(out, line + j * step, flat_result, j * pitch + r3)
            j = n - 1 if step > 0 else 0
            for ch in range(3):
                out[line + j * step + ch] = result[j, r3 + ch]


@numba.njit(nogil=True, cache=True)
def _vpass(src: np.ndarray, at: int, stride: int, cols: int, bounds: np.ndarray,
           kk: np.ndarray, r0: int, out: np.ndarray, out_at: int, out_stride: int,
           flip: bool) -> None:
    """Pillow's vertical 8-bit pass over ``cols`` pixels of every row of ``src`` (flat RGB,
    pixel (r, c) at ``at + r·stride + 3c``; row 0 is the source row ``r0``), writing output row
    i at ``out_at + i·out_stride``, mirrored if ``flip``. Rows are contiguous: it vectorises."""
    n, lanes = bounds.shape[0], cols * 3
    acc = np.empty(lanes, dtype=np.int32)
    for i in range(n):
        lo, cnt = bounds[i, 0] - r0, bounds[i, 1]
        acc[:] = 1 << (_BITS - 1)
        for t in range(cnt):
            k = np.int32(kk[i, t])
            row = src[at + (lo + t) * stride : at + (lo + t) * stride + lanes]
            for q in range(lanes):
                acc[q] += np.int32(row[q]) * k
        res = out[out_at + i * out_stride : out_at + i * out_stride + lanes]
        if flip:
            for j in range(cols):
                for ch in range(3):
                    res[(cols - 1 - j) * 3 + ch] = _clip8(acc[j * 3 + ch])
        else:
            for q in range(lanes):
                res[q] = _clip8(acc[q])


@numba.njit(nogil=True, cache=True)
def _copy(src: np.ndarray, at: int, stride: int, rows: int, cols: int, out: np.ndarray,
          out_at: int, out_stride: int, flip: bool) -> None:
    """``rows`` × ``cols`` pixels of ``src`` to ``out`` (flat RGB, as ``_vpass``), mirrored if
    ``flip``."""
    for i in range(rows):
        line, first = at + i * stride, out_at + i * out_stride
        res = out[first : first + 3 * cols]
        if flip:
            for j in range(cols):
                for ch in range(3):
                    res[(cols - 1 - j) * 3 + ch] = src[line + j * 3 + ch]
        else:
            res[:] = src[line : line + 3 * cols]


@numba.njit(nogil=True, cache=True)
def render_flat(img: np.ndarray, height: int, width: int, geo: np.ndarray, dst: np.ndarray,
                vertical_first: bool, valid: bool) -> None:
    """``render`` of ``img`` given flat (``height``·``width``·3 or more bytes, row-major RGB).

    ``dst`` must be C-contiguous. Each pass reads its input in place (the region is never
    copied) and the last one writes into ``dst``; the flip is folded into the horizontal pass
    (whichever runs, as mirroring columns commutes with the vertical pass).
    """
    s = dst.shape[0]
    out = dst.reshape(-1)
    x0, y0, w, h = geo[0], geo[1], geo[2], geo[3]
    rw, rh, wx, wy, flip = geo[4], geo[5], geo[6], geo[7], geo[8] != 0
    inside = x0 >= 0 and y0 >= 0 and x0 + w <= width and y0 + h <= height
    ox0, ox1 = max(0, -wx), min(s, rw - wx)  # visible window columns and rows
    oy0, oy1 = max(0, -wy), min(s, rh - wy)
    if not valid or w <= 0 or h <= 0 or not inside or ox1 <= ox0 or oy1 <= oy0:
        out[:] = 0
        return
    if ox0 > 0 or oy0 > 0 or ox1 < s or oy1 < s:
        out[:] = 0
    nx, ny = ox1 - ox0, oy1 - oy0
    resize_x, resize_y = rw != w, rh != h
    hb, hk = pil_coeffs(w, rw, wx + ox0, nx if resize_x else 0)
    vb, vk = pil_coeffs(h, rh, wy + oy0, ny if resize_y else 0)
    # The source columns and rows the window depends on.
    if resize_x:
        c0, c1 = hb[0, 0], hb[nx - 1, 0] + hb[nx - 1, 1]
    else:
        c0, c1 = wx + ox0, wx + ox1
    if resize_y:
        r0, r1 = vb[0, 0], vb[ny - 1, 0] + vb[ny - 1, 1]
    else:
        r0, r1 = wy + oy0, wy + oy1
    stride, out_stride = width * 3, s * 3
    at = (y0 + r0) * stride + (x0 + c0) * 3
    # Output column j goes to ox0 + j, or to s - 1 - (ox0 + j) if flip: the written span of
    # each row starts at column ox0 or s - ox0 - nx; the horizontal pass mirrors (its j = 0 at
    # the span's right end), the others write mid, which the horizontal pass mirrored, as is.
    out_at = oy0 * out_stride + (s - ox0 - nx if flip else ox0) * 3
    h_at = out_at + (nx - 1) * 3 if flip else out_at
    h_step = -3 if flip else 3
    cols, rows = c1 - c0, r1 - r0
    if resize_x and resize_y:
        if vertical_first and h - rh > 0 and h - rh > (w - rw) * 2:
            mid = np.empty(ny * cols * 3, dtype=np.uint8)
            _vpass(img, at, stride, cols, vb, vk, r0, mid, 0, cols * 3, False)
            _hpass(mid, 0, cols * 3, ny, cols, hb, hk, c0, out, h_at, out_stride, h_step)
        else:
            mid = np.empty(rows * nx * 3, dtype=np.uint8)
            _hpass(img, at, stride, rows, cols, hb, hk, c0, mid, (nx - 1) * 3 if flip else 0,
                   nx * 3, h_step)
            _vpass(mid, 0, nx * 3, nx, vb, vk, r0, out, out_at, out_stride, False)
    elif resize_x:
        _hpass(img, at, stride, rows, cols, hb, hk, c0, out, h_at, out_stride, h_step)
    elif resize_y:
        _vpass(img, at, stride, cols, vb, vk, r0, out, out_at, out_stride, flip)
    else:
        _copy(img, at, stride, rows, cols, out, out_at, out_stride, flip)


@numba.njit(nogil=True, cache=True)
def render(
    img: np.ndarray, geo: np.ndarray, dst: np.ndarray, vertical_first: bool, valid: bool
) -> None:
    """Apply one geometry row to ``img`` (H, W, 3) into ``dst`` (S, S, 3), PIL-exact.

    The region ``img[y:y+h, x:x+w]`` is resized to (resized_w, resized_h) with Pillow's
    bilinear filter (skipped along an axis whose size does not change; two passes in the order
    Pillow picks), the S×S window at (window_x, window_y) of the result is written (zeros
    outside it), mirrored if flip. Only the window's pixels are computed. An empty region (a bad
    sample's row), or ``valid`` False (the image could not be decoded), gives zeros.
    ``vertical_first``: the installed Pillow's pass order rule (``PILLOW_VERTICAL_FIRST``).
    Both arrays must be C-contiguous.
    """
    render_flat(img.reshape(-1), img.shape[0], img.shape[1], geo, dst, vertical_first, valid)


def _pillow_vertical_first() -> bool:
    """Whether this Pillow runs the vertical pass first when the height shrinks much more than
    the width (Pillow 13 does; older ones always go horizontal first)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (89, 72, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    both = np.asarray(im.resize((57, 57), Image.Resampling.BILINEAR))
    h_first = np.asarray(im.resize((57, 89), Image.Resampling.BILINEAR)
                         .resize((57, 57), Image.Resampling.BILINEAR))
    return not np.array_equal(both, h_first)


PILLOW_VERTICAL_FIRST = _pillow_vertical_first()


@intrinsic
def _as_voidptr(typingctx: Any, address: Any) -> Any:
    """An integer address as a void pointer (to view a Python-owned buffer from compiled code)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nbtypes.voidptr(nbtypes.intp), codegen


class PlanDecoder(SimpleRGBImageDecoder):
    """Decode each sample and render its row of ``table`` (int32 (N, 9)) at ``size``×``size``.

    ``table`` must outlive the loader and keep its buffer: Python rewrites its rows in place.
    """

    def __init__(self, table: np.ndarray, size: int) -> None:
        super().__init__()
        if table.dtype != np.int32 or table.ndim != 2 or table.shape[1] != GEOMETRY_COLUMNS:
            raise ValueError(f"expected an int32 (N, {GEOMETRY_COLUMNS}) table, found "
                             f"{table.dtype} {table.shape}")
        if not table.flags.c_contiguous:
            raise ValueError("expected a C-contiguous geometry table")
        self.table = table
        self.size = int(size)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        if len(self.metadata) != len(self.table):
            raise ValueError(f"expected a .beton of {len(self.table)} samples, found "
                             f"{len(self.metadata)}")
        shape = (self.size, self.size, 3)
        dtype = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                AllocationQuery(shape, dtype))

    def generate_code(self) -> Any:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        address, rows = self.table.ctypes.data, self.table.shape[0]
        jpeg = MODE_JPEG
        vertical_first = PILLOW_VERTICAL_FIRST

        def decode(batch_indices, destination, metadata, storage_state):  # noqa: ANN001, ANN202
            table = numba.carray(_as_voidptr(address), (rows, GEOMETRY_COLUMNS), np.int32)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                row, dst = table[source_ix], destination[dst_ix]
                # Two calls, not one on a shared variable: the decoded buffer and the stored
                # (read-only) bytes are different types.
                if field["mode"] == jpeg:
                    buf = np.empty(height * width * 3, dtype=np.uint8)
                    # Never fails for files the writer checked; zeros if it does.
                    valid = _decode_jpeg_compiled(data, buf, width, height) == 0
                    render_flat(buf, height, width, row, dst, vertical_first, valid)
                else:
                    render_flat(data, height, width, row, dst, vertical_first, True)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
