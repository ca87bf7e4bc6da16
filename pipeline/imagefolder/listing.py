"""Listing an image dataset: a folder ``ROOT/<identity>/<image>`` or a list file of ``relative/path label`` lines.

A listing holds every image in key order as a few numpy arrays (about 30 bytes an image, whatever the number of
images): the relative paths (UTF-8, concatenated), the labels, the byte sizes, the modification times and, for a
list file, the line numbers. Every file is checked to be a regular file inside the root (a symlink leading out of
it is refused) with one ``lstat``; the images themselves are read only when they are written.

A folder's identities are its subfolders, sorted by name (code point order); an identity's label is its rank,
its images are its ``.jpg``/``.jpeg``/``.png`` files sorted by name. Hidden entries (a leading ``.``) and files
directly in ROOT are ignored. A list file's labels are integers, stored as their ranks among the distinct labels
given (labels already ``0..K-1`` stay as they are).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from facetool.pipeline.align import relative_name
from facetool.pipeline.errors import FacetoolError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_LINE_BYTES = 16384  # a list line (a path and a label) longer than this is refused, not read into memory
ON_ERROR = ("fail", "skip")


@dataclass(frozen=True)
class ListingProblem:
    """An entry left out under ``on_error="skip"``: its path (relative to the root) and the one-line error."""

    entry: str
    error: str

    def as_skipped(self) -> dict:
        """The entry as the manifest lists a skipped record."""
        return {"file": self.entry, "error": self.error}


@dataclass(eq=False)
class ImageListing:
    """The images of a dataset in key order (key ``i`` is image ``i``), and the identities their labels name."""

    root: Path
    names: np.ndarray  # uint8: the relative paths, UTF-8, concatenated
    ends: np.ndarray  # int64: where path i ends in ``names``
    labels: np.ndarray  # int32
    sizes: np.ndarray  # int64: bytes, as listed
    mtimes: np.ndarray  # int64: modification times (ns), as listed
    lines: np.ndarray | None  # int64: the list file's line of each image (None for a folder)
    list_file: Path | None
    identities: list[str]  # label -> identity (folder name, or the label the list gave)
    problems: list[ListingProblem]

    def __len__(self) -> int:
        return int(self.ends.size)

    def name(self, i: int) -> str:
        """Image ``i``'s path relative to the root."""
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.names[start : int(self.ends[i])].tobytes().decode()

    def where(self, i: int) -> str:
        """Image ``i`` as an error message names it: its file (and the list file's line)."""
        path = self.root / self.name(i)
        return f"{self.list_file} line {int(self.lines[i])}: {path}" if self.lines is not None else str(path)

    def digest(self) -> str:
        """A sha256 of the listing (paths, labels, sizes, modification times, identities): a resumed conversion
        proves with it that the files are the ones it was planned from."""
        h = hashlib.sha256()
        for a in (self.ends, self.labels, self.sizes, self.mtimes):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        h.update(self.names.tobytes())
        h.update("\0".join(self.identities).encode())
        return h.hexdigest()


class _Builder:
    """Collects a listing entry by entry in compact buffers; checks each file (inside the root, a regular file)."""

    def __init__(self, root: Path, on_error: str, list_file: Path | None = None) -> None:
        self.root, self.on_error, self.list_file = root, on_error, list_file
        self.real_root = os.path.realpath(root)
        self.names, self.ends = bytearray(), array("q")
        self.labels, self.sizes, self.mtimes, self.lines = array("q"), array("q"), array("q"), array("q")
        self.problems: list[ListingProblem] = []
        self._real_dirs: dict[str, str] = {}

    def problem(self, entry: str, error: str) -> None:
        """A file that cannot be used: an error, or (``skip``) left out and listed."""
        if self.on_error != "skip":
            raise FacetoolError(error)
        self.problems.append(ListingProblem(entry, error))

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def check_file(self, rel: str, where: str) -> os.stat_result | None:
        """The stat of ``root/rel`` when it is a regular file inside the root (symlinks resolved), else a problem."""
        path = os.path.join(self.root, rel)
        parent = os.path.dirname(path)
        if parent not in self._real_dirs:
            self._real_dirs[parent] = os.path.realpath(parent)
        try:
            st = os.lstat(path)
            if not self._inside(self._real_dirs[parent]) or (
                stat.S_ISLNK(st.st_mode) and not self._inside(os.path.realpath(path))
            ):
                return self.problem(rel, f"{where}: lies outside {self.root} (through a symbolic link)")
            if stat.S_ISLNK(st.st_mode):
                st = os.stat(path)
        except OSError as err:
            what = "not found" if isinstance(err, FileNotFoundError) else f"cannot read ({err.strerror})"
            return self.problem(rel, f"{where}: {what}")
        if not stat.S_ISREG(st.st_mode):
            return self.problem(rel, f"{where}: not a regular file")
        return st

    def add(self, rel: str, label: int, st: os.stat_result, line: int = 0) -> None:
        self.names += rel.encode()
        self.ends.append(len(self.names))
        self.labels.append(label)
        self.sizes.append(st.st_size)
        self.mtimes.append(st.st_mtime_ns)
        self.lines.append(line)

    def finish(self, identities: list[str], where: Path) -> ImageListing:
        """The listing (labels as added); no image at all is an error naming ``where``."""
        if not self.ends:
            raise FacetoolError(f"{where}: no images to convert")
        return ImageListing(
            root=self.root,
            names=np.frombuffer(bytes(self.names), dtype=np.uint8),
            ends=np.frombuffer(self.ends, dtype=np.int64).copy(),
            labels=np.frombuffer(self.labels, dtype=np.int64).astype(np.int32),
            sizes=np.frombuffer(self.sizes, dtype=np.int64).copy(),
            mtimes=np.frombuffer(self.mtimes, dtype=np.int64).copy(),
            lines=np.frombuffer(self.lines, dtype=np.int64).copy() if self.list_file is not None else None,
            list_file=self.list_file,
            identities=identities,
            problems=self.problems,
        )


def _decoded(name: bytes, folder: str | os.PathLike, builder: _Builder) -> str | None:
    """A file name from the file system as text; a name that is not UTF-8 is a problem naming it."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        shown = os.path.join(os.fsencode(folder), name).decode("utf-8", "backslashreplace")
        return builder.problem(shown, f"{shown}: the name is not UTF-8 text; rename it")


def _entries(folder: Path, builder: _Builder) -> list[tuple[str, os.DirEntry]]:
    """The visible entries of a folder, as (name, entry) sorted by name."""
    try:
        with os.scandir(os.fsencode(folder)) as it:
            raw = [e for e in it if not e.name.startswith(b".")]
    except OSError as err:
        raise FacetoolError(f"{folder}: cannot list ({err.strerror})") from None
    named = [(n, e) for e in raw if (n := _decoded(e.name, folder, builder)) is not None]
    return sorted(named, key=lambda p: p[0])


def is_image_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like ``ROOT/<identity>/<image>``: some visible subfolder holds a .jpg/.png file."""
    try:
        for sub in folder.iterdir():
            if not sub.name.startswith(".") and sub.is_dir():
                if any(f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") for f in sub.iterdir()):
                    return True
    except OSError:
        return False
    return False


def list_folder(root: str | os.PathLike, on_error: str = "fail") -> ImageListing:
    """Every image of ``ROOT/<identity>/<image>``, identity by identity in name order. A file that is not a
    regular .jpg/.jpeg/.png inside ROOT, or an identity folder without images, is an error naming it
    (``on_error="skip"``: left out and listed in ``problems``; an empty identity gets no label)."""
    root = Path(root)
    builder = _Builder(root, on_error)
    identities: list[str] = []
    for ident, entry in _entries(root, builder):
        if not entry.is_dir():
            continue  # files beside the identity folders (a README, a list) are not images of anyone
        start = len(builder.ends)
        for name, _ in _entries(root / ident, builder):
            rel, where = f"{ident}/{name}", str(root / ident / name)
            if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
                builder.problem(rel, f"{where}: not a .jpg, .jpeg or .png image file")
            elif (st := builder.check_file(rel, where)) is not None:
                builder.add(rel, len(identities), st)
        if len(builder.ends) == start:
            builder.problem(f"{ident}/", f"{root / ident}: identity folder without images")
        else:
            identities.append(ident)
    return builder.finish(identities, root)


def _list_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of a list file, each at most ``MAX_LINE_BYTES`` long."""
    try:
        with open(path, "rb") as f:
            for lineno in itertools.count(1):
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES:
                    raise FacetoolError(f"{path} line {lineno}: longer than {MAX_LINE_BYTES} bytes")
                yield lineno, line
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror})") from None


def _parse_line(line: bytes, where: str) -> tuple[str, int] | None:
    """``(relative path, label)`` of a list line; None for a blank line or a ``#`` comment."""
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise FacetoolError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text or text.startswith("#"):
        return None
    fields = text.rsplit(None, 1)  # the label is the last field; the path may hold spaces
    if len(fields) != 2:
        raise FacetoolError(f"{where}: expected 'relative/path label', got {text!r:.80}")
    label = fields[1]
    if not (label.isascii() and label.isdigit()) or int(label) > 2**31 - 1:
        raise FacetoolError(f"{where}: label {label!r:.40} is not an integer in [0, 2^31)")
    return str(relative_name(fields[0], where)), int(label)


def read_list(
    list_file: str | os.PathLike, root: str | os.PathLike | None = None, on_error: str = "fail"
) -> ImageListing:
    """Every image of a list file (``relative/path label`` lines; blank lines and ``#`` comments skipped), paths
    relative to ``root`` (default: the list's folder), in the list's order; labels become their ranks among the
    distinct labels given. A malformed line, a path out of the root or listed twice is an error naming the line;
    a missing or unusable file too, unless ``on_error="skip"`` (left out and listed in ``problems``)."""
    list_file = Path(list_file)
    builder = _Builder(Path(root) if root is not None else list_file.parent, on_error, list_file)
    for lineno, line in _list_lines(list_file):
        where = f"{list_file} line {lineno}"
        parsed = _parse_line(line, where)
        if parsed is not None:
            rel, label = parsed
            if (st := builder.check_file(rel, f"{where}: {builder.root / rel}")) is not None:
                builder.add(rel, label, st, lineno)
    listing = builder.finish([], list_file)
    _refuse_duplicates(listing)
    distinct, ranks = np.unique(listing.labels, return_inverse=True)
    listing.labels = ranks.astype(np.int32)
    listing.identities = [str(v) for v in distinct.tolist()]
    return listing


def _refuse_duplicates(listing: ImageListing) -> None:
    """A path listed twice would put its image in the shards twice: an error naming both lines. Found by sorting
    64-bit hashes of the paths (8 bytes an image), each candidate pair then compared by name."""
    hashes = np.fromiter((hash(listing.name(i)) for i in range(len(listing))), np.int64, len(listing))
    order = np.argsort(hashes, kind="stable")
    for j in np.flatnonzero(np.diff(hashes[order]) == 0).tolist():
        a, b = sorted((int(order[j]), int(order[j + 1])))
        if listing.name(a) == listing.name(b):
            raise FacetoolError(
                f"{listing.list_file} line {int(listing.lines[b])}: {listing.name(b)!r} is listed twice (also on "
                f"line {int(listing.lines[a])})"
            )
