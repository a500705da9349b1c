"""A restricted unpickler for feature files downloaded from the internet.

``pickle.load`` runs whatever callable a file names, so a tampered ``aligned_50.pkl`` could execute code. The
MMSA and MulT files only hold dicts, lists, strings and numpy arrays, so anything else is refused before it
is looked up.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

# What numpy arrays and numpy scalars pickle to (numpy 1.x names and numpy 2.x names).
_NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}
# Plain data constructors; eval/exec/getattr/__import__/open and friends stay out.
_BUILTIN_GLOBALS = {
    ("builtins", name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "complex", "bool", "slice", "range")
} | {("_codecs", "encode")}  # how protocol-2 pickles spell bytes
ALLOWED_GLOBALS = frozenset(_NUMPY_GLOBALS | _BUILTIN_GLOBALS)


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a callable outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy arrays, numpy scalars and plain builtins only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"refusing to load '{module}.{name}': only numpy arrays and plain Python "
                                    f"builtins are allowed in a feature file")
        return super().find_class(module, name)


def safe_load(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; errors name the file.

    ``encoding="latin1"`` lets Python 2 pickles of numpy arrays load and does not change Python 3 pickles.
    Raises ``FileNotFoundError`` or ``UnsafePickleError``/``pickle.UnpicklingError`` with the path in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, MemoryError) as e:
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
