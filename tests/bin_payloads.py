"""Test data for verification ``.bin`` files: every historical pickle encoding of ``(images, issame)`` and pickles
that would run code if they were loaded carelessly."""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Callable

import numpy as np


def py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Protocol 2 as Python 2's cPickle writes a tuple of (list of str, list of bool): BINSTRING opcodes."""
    out = io.BytesIO()
    out.write(b"\x80\x02")  # PROTO 2
    out.write(b"]q\x00(")  # EMPTY_LIST, BINPUT 0, MARK
    for img in images:
        out.write(b"T" + struct.pack("<I", len(img)) + img)  # BINSTRING (a py2 str)
    out.write(b"e")  # APPENDS
    out.write(b"]q\x01(")
    for v in issame:
        out.write(b"\x88" if v else b"\x89")  # NEWTRUE / NEWFALSE
    out.write(b"e\x86q\x02.")  # APPENDS, TUPLE2, BINPUT 2, STOP
    return out.getvalue()


def _arrays(images: list[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(b, np.uint8) for b in images]


#: Every way a ``.bin`` has been written: name -> (images, issame) -> pickle bytes.
ENCODINGS: dict[str, Callable[[list[bytes], list[bool]], bytes]] = {
    "python2-str": py2_pickle,
    "python3-protocol2-bytes": lambda im, same: pickle.dumps((im, same), protocol=2),
    "python3-protocol4-bytes": lambda im, same: pickle.dumps((im, same), protocol=4),
    "numpy-uint8-and-bool-array": lambda im, same: pickle.dumps((_arrays(im), np.array(same)), protocol=3),
    "numpy-uint8-and-bool-list": lambda im, same: pickle.dumps((_arrays(im), same), protocol=2),
    "numpy-uint8-and-numpy-bools": lambda im, same: pickle.dumps((_arrays(im), [np.bool_(v) for v in same]), 2),
}


class Evil:
    """Unpickling it runs a shell command (``os.system``)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class EvalEvil:
    """Unpickling it evaluates Python code that creates the file ``x`` in the working folder."""

    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('x').touch()",))
