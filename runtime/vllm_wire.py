"""vLLM's NCCL weight-transfer wire, as pure functions (no torch, no group): what the trainer sends and in
which order, so that a stock vLLM 0.33 engine reads every byte where it expects it.

- dtypes: unpacked, an engine receives only the dtypes its NCCL binding maps (`UNPACKED_DTYPES`); packed,
  every dtype it can view a byte slice as (`PACKED_DTYPES`); a tensor of another dtype is refused before
  any request or byte (`check_dtypes`).
- the packed wire: tensors in `update_info` order, each `numel * itemsize` bytes, back to back with no
  padding; a chunk closes right after the tensor that makes its running total strictly greater than the
  buffer size B; the iterator's end flushes the last partial chunk (one made only of 0-byte tensors is
  still one 0-byte broadcast); an empty list sends nothing (`chunks`).
- alignment: the engine views each tensor's slice of a chunk as its dtype, which fails unless the slice's
  offset inside the chunk is a multiple of the dtype's itemsize; `wire_order` picks an order where every
  offset is, keeping the given (layer) order wherever that already holds.
- `update_info`: names, dtype names (`bfloat16`, never `torch.bfloat16`) and shapes, in wire order; three
  empty lists mean "the same tensors as the last update" to the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightsync.runtime.packing import TensorSpec

#: dtype name -> itemsize of every dtype vLLM 0.33's worker receives as a broadcast of its own (unpacked: its
#: NCCL dtype map, int8, uint8, int32, int64, float16, float32, float64, bfloat16 and float8_e4m3fn).
UNPACKED_DTYPES: dict[str, int] = {
    "int8": 1, "uint8": 1, "float8_e4m3fn": 1,
    "float16": 2, "bfloat16": 2,
    "int32": 4, "float32": 4,
    "int64": 8, "float64": 8,
}
#: ... and packed, where the worker resolves `getattr(torch, name)` and views its slice of a uint8 chunk as
#: that dtype: every dtype above and these (the NCCL dtype map is not consulted).
PACKED_DTYPES: dict[str, int] = {
    **UNPACKED_DTYPES,
    "bool": 1, "float8_e5m2": 1,
    "int16": 2, "uint16": 2,
    "uint32": 4,
    "uint64": 8, "complex64": 8,
    "complex128": 16,
}


def dtype_name(dtype: object) -> str:
    """The name vLLM resolves with `getattr(torch, name)`: `str(dtype)` without the `torch.` prefix."""
    return str(dtype).split(".")[-1]


def check_dtypes(specs: Sequence[TensorSpec], packed: bool) -> None:
    """Raise ValueError naming every tensor whose dtype a vLLM engine cannot receive on this wire."""
    receivable = PACKED_DTYPES if packed else UNPACKED_DTYPES
    bad = [f"{s.name!r} ({s.dtype})" for s in specs if s.dtype not in receivable]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        wire = "packed" if packed else "unpacked (WEIGHTSYNC_PACKED=false)"
        hint = "" if packed else "; packed, it also takes " + ", ".join(sorted(set(PACKED_DTYPES) - set(receivable)))
        raise ValueError(f"a vLLM engine cannot receive {shown} {wire}: it takes only "
                         f"{', '.join(receivable)}{hint}; convert them before sending")


def chunks(sizes: Sequence[int], buffer_bytes: int) -> list[list[int]]:
    """The packed chunks of tensors of `sizes` bytes sent in this order: lists of their indices.

    A chunk closes right after the tensor that makes its running total strictly greater than
    `buffer_bytes`; whatever is left at the end is the last chunk, even when it holds only 0-byte tensors.
    """
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        current.append(i)
        total += size
        if total > buffer_bytes:
            out.append(current)
            current, total = [], 0
    if current:
        out.append(current)
    return out


def chunk_bytes(sizes: Sequence[int], buffer_bytes: int) -> list[int]:
    """The byte count of every packed broadcast of tensors of `sizes` in this order."""
    return [sum(sizes[i] for i in chunk) for chunk in chunks(sizes, buffer_bytes)]


def misaligned(specs: Sequence[TensorSpec], buffer_bytes: int) -> list[tuple[str, int]]:
    """(name, offset in its chunk) of every tensor an engine could not view as its dtype, in this order."""
    out = []
    for chunk in chunks([s.nbytes for s in specs], buffer_bytes):
        offset = 0
        for i in chunk:
            if offset % specs[i].itemsize:
                out.append((specs[i].name, offset))
            offset += specs[i].nbytes
    return out


def _size_alignment(nbytes: int, cap: int) -> int:
    """The largest power of two dividing `nbytes`, at most `cap` (the largest itemsize); `cap` for 0 bytes."""
    return min(nbytes & -nbytes, cap) if nbytes else cap


def wire_order(specs: Sequence[TensorSpec], buffer_bytes: int) -> list[int]:
    """An order of `specs` (their indices) in which every tensor's offset inside its packed chunk is a
    multiple of its itemsize, as close to the given order (layer by layer, as the engine's layer-wise
    reload wants it) as that allows.

    Chunk by chunk: the tensors the given order would put into the next chunk keep that order when they
    are all aligned there. Otherwise they go by the alignment of their byte size (the largest power of two
    dividing it, at most 8, or 16 in a set with complex128), largest first and stably: every offset is then
    a sum of sizes that are multiples of the tensor's own size alignment, which is a multiple of its
    itemsize (itemsizes are powers of two). Tensors whose size is a multiple of 8 bytes (nearly all) keep
    their order; only odd sizes (an fp8 [3, 5], a 3-element bf16) move towards the end of the chunk. The
    chunk may then close earlier; what did not fit opens the next chunk, in the given order. Within a chunk
    the order costs nothing (the engine loads a chunk's tensors in one call); a tensor of an odd size can
    only end a chunk, so it may move on to a later one (at worst to the last)."""
    remaining = list(range(len(specs)))
    order: list[int] = []
    cap = max([8, *(s.itemsize for s in specs)])
    while remaining:
        # The next chunk as the given order would fill it.
        total, end = 0, len(remaining)
        for k, i in enumerate(remaining):
            total += specs[i].nbytes
            if total > buffer_bytes:
                end = k + 1
                break
        candidates = remaining[:end]
        offset, aligned = 0, True
        for i in candidates:
            if offset % specs[i].itemsize:
                aligned = False
                break
            offset += specs[i].nbytes
        if aligned:
            order += candidates
            remaining = remaining[end:]
            continue
        by_alignment = sorted(candidates, key=lambda i: -_size_alignment(specs[i].nbytes, cap))
        total, placed = 0, 0
        for i in by_alignment:
            order.append(i)
            placed += 1
            total += specs[i].nbytes
            if total > buffer_bytes:
                break
        taken = set(by_alignment[:placed])
        remaining = [i for i in candidates if i not in taken] + remaining[end:]
    return order


def update_info(specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The `update_info` of one `POST /update_weights` sending `specs` in this order."""
    return {"names": [s.name for s in specs], "dtype_names": [s.dtype for s in specs],
            "shapes": [list(s.shape) for s in specs]}


def same_as_last() -> dict[str, Any]:
    """The `update_info` telling an engine to reuse the tensor list of its previous update."""
    return {"names": [], "dtype_names": [], "shapes": []}


#: The store key where vLLM's TCP-store form reads the NCCL unique id: rank 0's first `broadcast_obj`.
UNIQUE_ID_KEY = "broadcast_from/0/0"
#: The class a vLLM worker's unpickling must yield: it passes the value by value to ncclCommInitRank.
UNIQUE_ID_MODULE = "vllm.distributed.device_communicators.pynccl_wrapper"
UNIQUE_ID_CLASS = "ncclUniqueId"
UNIQUE_ID_BYTES = 128


def unique_id_pickle(unique_id: bytes) -> bytes:
    """What vLLM's TCP-store form expects under `UNIQUE_ID_KEY`: the protocol-4 pickle of vLLM's ctypes
    `ncclUniqueId` holding `unique_id` (`_ctypes._unpickle(<that class>, ({}, <128 bytes>))`), byte for byte
    as CPython 3.11/3.12 writes it. Assembled here (the trainer needs no vLLM and never unpickles); the
    engines unpickle it, which is the cost of this form (docs/runtime.md)."""
    if len(unique_id) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw + b"\x94"  # SHORT_BINUNICODE, MEMOIZE

    body = (text("_ctypes") + text("_unpickle") + b"\x93\x94"  # STACK_GLOBAL, MEMOIZE
            + text(UNIQUE_ID_MODULE) + text(UNIQUE_ID_CLASS) + b"\x93\x94"
            + b"}\x94"  # EMPTY_DICT
            + b"C" + bytes([UNIQUE_ID_BYTES]) + unique_id + b"\x94"  # SHORT_BINBYTES
            + b"\x86\x94\x86\x94R\x94.")  # TUPLE2, TUPLE2, REDUCE, STOP
    return b"\x80\x04\x95" + len(body).to_bytes(8, "little") + body  # PROTO 4, FRAME
