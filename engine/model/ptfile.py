"""Read PyTorch `.pt` files (the zip format of `torch.save`) without torch and without running their code.

PersonaPlex ships its voices as `.pt` files. Loading them with `torch.load` would make torch a runtime
dependency, and a plain unpickler would execute whatever callable the pickle names. A `.pt` file is a zip:
`<root>/data.pkl` (a pickle of the object tree, with tensors as references to storages), `<root>/data/<key>`
(each storage's raw bytes), `<root>/byteorder`. Here the pickle is read by an unpickler that knows only the
few names `torch.save` writes for plain tensors (`torch._utils._rebuild_tensor_v2`, the typed storage
classes, `collections.OrderedDict`) and maps them to numpy-building functions of our own; any other name is
refused. Tensors come back as numpy arrays; bfloat16 (which numpy lacks) comes back as float32, exactly.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

__all__ = ["PtFileError", "read_pt"]


class PtFileError(ValueError):
    """A `.pt` file that is not a readable plain-tensor `torch.save` zip; the message names the file."""


# torch storage class name -> (numpy dtype of the stored bytes, bytes per element)
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 when a tensor is built
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


# The pickle of a dict of tensors is a few hundred bytes; anything this big is not one.
_MAX_PICKLE_BYTES = 16 << 20


class _StorageType:
    """Stands in for a torch storage class inside the pickle: it only carries the element type."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """One storage's elements, as a flat numpy array (bfloat16 kept as its raw uint16 bits)."""

    def __init__(self, data: np.ndarray, bfloat16: bool):
        self.data = data
        self.bfloat16 = bfloat16


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: shifting the 16 bits up gives the same value exactly.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_ignored: Any) -> np.ndarray:
    # requires_grad, backward hooks and metadata mean nothing to a numpy array
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor refers to something that is not a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError(f"tensor with invalid size {size} / stride {stride} / offset {offset}")
    flat = storage.data
    count = int(np.prod(size, dtype=np.int64))
    if count > flat.size:
        # torch.save writes whole storages; more elements than stored means overlapping strides: refuse
        # rather than allocate whatever the file asks for
        raise pickle.UnpicklingError(f"tensor of size {size} has more elements than its storage ({flat.size})")
    if count == 0:
        out = np.zeros(size, dtype=flat.dtype)
    else:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= flat.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size} / stride {stride} / offset {offset} reads past its storage "
                f"of {flat.size} elements"
            )
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
        )
        out = np.array(view)  # own the memory: the zip's bytes are not kept
    return _bfloat16_to_float32(out) if storage.bfloat16 else out


def _rebuild_parameter(data: np.ndarray, *_ignored: Any) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, tuples, numbers, strings and tensors — nothing else."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str, big_endian: bool):
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._root = root
        self._big_endian = big_endian
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        fn = self._ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain tensors are read")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent reference {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {stype!r}")
        key = str(key)
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        member = f"{self._root}data/{key}"
        # looked up again by name: a pickle could BUILD new attributes onto the stand-in object
        base = _STORAGE_DTYPES.get(getattr(stype, "name", None))
        if base is None:
            raise pickle.UnpicklingError(f"storage {member} of unknown type")
        dtype = base.newbyteorder(">") if self._big_endian else base
        need = int(numel) * dtype.itemsize
        try:
            with self._zf.open(member) as f:
                raw = f.read(need)  # never more than the pickle promised: a lying member cannot balloon
        except KeyError:
            raise pickle.UnpicklingError(f"storage {member} is missing") from None
        if len(raw) < need:
            raise pickle.UnpicklingError(f"storage {member} holds {len(raw)} bytes, {need} expected")
        data = np.frombuffer(raw, dtype=dtype, count=int(numel)).astype(dtype.newbyteorder("="))
        storage = _Storage(data, bfloat16=base is _STORAGE_DTYPES["BFloat16Storage"])
        self._storages[key] = storage
        return storage


def read_pt(source: str | os.PathLike | bytes, name: str | None = None) -> Any:
    """The object saved by `torch.save`, with every tensor as a numpy array (bfloat16 -> float32).

    `source` is a path or the file's bytes (`name` then says what to call it in errors). Raises
    `PtFileError` naming the file for anything that is not a plain-tensor `torch.save` zip.
    """
    label = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise PtFileError(f"{label}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise PtFileError(f"{label}: not a torch.save zip file ({e})") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise PtFileError(f"{label}: expected one <root>/data.pkl in the zip, found {len(pkls)}")
        root = pkls[0][: -len("data.pkl")]
        try:
            order = zf.read(root + "byteorder").decode("ascii").strip()
        except KeyError:
            order = "little"  # files from before torch recorded it were little-endian
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
            raise PtFileError(f"{label}: unreadable byteorder record ({e})") from None
        if order not in ("little", "big"):
            raise PtFileError(f"{label}: unknown byteorder {order!r}")
        try:
            if zf.getinfo(pkls[0]).file_size > _MAX_PICKLE_BYTES:
                raise PtFileError(f"{label}: {pkls[0]} is over {_MAX_PICKLE_BYTES} bytes; not a tensor file")
            data = zf.read(pkls[0])
            return _RestrictedUnpickler(data, zf, root, big_endian=order == "big").load()
        except PtFileError:
            raise
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError,
                AttributeError, IndexError, KeyError, MemoryError) as e:
            raise PtFileError(f"{label}: {e}") from None
