"""Where `prepare`'s files go: per-channel part files, joined into train/validation/test.jsonl.

Everything is written into ``DIR.tmp-XXXX`` next to DIR (:class:`Staging`) and renamed into DIR's
place whole at the end (`slackdist.files.install_dir`), so an error, Ctrl-C or SIGTERM leaves nothing
behind and DIR never holds half-written files or a mix of two runs.

Each channel writes its own part files (``parts/<channel index>.<split>``, :class:`PartWriter`), so
channels can be processed in parallel and still be joined in channel order. A record whose split
is known when it is written (:meth:`Split.now`: by hash) goes straight into its split's part file;
the others (by time) go into a spool that is routed once every conversation's start is known.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from slackdist.data.interrupts import interrupts_deferred
from slackdist.data.provenance import PROVENANCE_FILE
from slackdist.data.records import SPLIT_NAMES, Split, group_of
from slackdist.errors import SlackdistError
from slackdist.files import install_dir, json_line


@dataclass
class SplitCounts:
    """Records per split as they are written, and the conversations whose split is decided at the end.

    Attributes:
        known: records written into each split (train, validation, test) so far.
        starts: conversation group -> its earliest start, for groups whose split waits (by time).
        pending: conversation group -> its records, for the same groups.
    """

    known: list[int] = field(default_factory=lambda: [0, 0, 0])
    starts: dict[str, float] = field(default_factory=dict)
    pending: Counter = field(default_factory=Counter)

    def merge(self, other: SplitCounts) -> None:
        """Add another channel's counts."""
        self.known = [a + b for a, b in zip(self.known, other.known, strict=True)]
        self.starts.update(other.starts)
        self.pending.update(other.pending)

    def totals(self, assign: dict[str, int]) -> list[int]:
        """Records per split once ``assign`` (:meth:`Split.assign` of ``starts``) has placed the pending ones."""
        totals = list(self.known)
        for group, n in self.pending.items():
            totals[assign[group]] += n
        return totals


class PartWriter:
    """Writes one channel's records: straight into its split, or into a spool when the split waits.

    On a dry run (``parts`` None) it only counts.
    """

    def __init__(self, parts: Path | None, index: int, split: Split) -> None:
        self.parts, self.index, self.split = parts, index, split
        self.counts = SplitCounts()
        self._group_split: dict[str, int | None] = {}
        self._files: dict[str, IO[bytes]] = {}

    def _file(self, suffix: str) -> IO[bytes] | None:
        if self.parts is None:
            return None
        fh = self._files.get(suffix)
        if fh is None:
            fh = self._files[suffix] = open(self.parts / f"{self.index:06d}.{suffix}", "wb")  # noqa: SIM115
        return fh

    def add(self, record: dict[str, Any], provenance: bytes | None = None) -> None:
        """Write one record (and its provenance line, which goes to the channel's ``.prov`` part)."""
        group = group_of(record)
        if group in self._group_split:
            split = self._group_split[group]
        else:
            split = self._group_split[group] = self.split.now(group)
        counts = self.counts
        if split is None:
            start = record["meta"]["start"]
            if start < counts.starts.get(group, float("inf")):
                counts.starts[group] = start
            counts.pending[group] += 1
            groups = self._file("groups")  # the join reads each line's group here, not by parsing the line
            if groups is not None:
                groups.write(group.encode("utf-8") + b"\n")
            suffix = "spool"
        else:
            counts.known[split] += 1
            suffix = SPLIT_NAMES[split]
        fh = self._file(suffix)
        if fh is not None:
            fh.write(json_line(record))
        if provenance is not None and (prov := self._file("prov")) is not None:
            prov.write(provenance)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


class Staging:
    """The temporary folder ``DIR.tmp-XXXX`` next to DIR, joined and moved into place by the caller.

    A context manager: leaving it with an exception (or without :meth:`install`) removes the
    temporary folder and any parent folder it had to create, so DIR is left as it was. With no DIR
    (a dry run) every method does nothing.

    Part files are appended to the split files in channel order: :meth:`join` as each channel's
    result arrives in order (while the workers are still busy, so the main process is not idle),
    :meth:`write_splits` for the spooled records and whatever is left.
    """

    def __init__(self, out: Path | None) -> None:
        """Checks ``out`` at once, before anything is read.

        Raises:
            SlackdistError: ``out`` exists and is a file.
        """
        if out is not None and out.exists() and not out.is_dir():
            raise SlackdistError(f"{out}: --out must be a folder, and this is a file")
        self.out = out
        self.folder: Path | None = None
        self._created: list[Path] = []
        self._outs: list[IO[bytes]] = []
        self._provenance: IO[bytes] | None = None
        self._joined = 0  # channels appended so far

    def __enter__(self) -> Staging:
        if self.out is None:
            return self
        try:
            with interrupts_deferred():  # so a Ctrl-C cannot leave a folder that `folder` does not name
                self.folder, self._created = _make_temp_dir(self.out)
            (self.folder / "parts").mkdir()
            self._outs = [open(self.folder / f"{name}.jsonl", "wb") for name in SPLIT_NAMES]  # noqa: SIM115
        except BaseException:
            self.__exit__()  # a `with` block whose __enter__ raises is never exited
            raise
        return self

    @property
    def parts(self) -> Path | None:
        """Where the channels write their part files (None on a dry run)."""
        return None if self.folder is None else self.folder / "parts"

    def begin_provenance(self, header: str) -> None:
        """Start provenance.jsonl with its header (before the first :meth:`join`); each channel's
        provenance lines are then appended in channel order, like its records."""
        if self.folder is None:
            return
        assert self._joined == 0 and self._provenance is None
        self._provenance = open(self.folder / PROVENANCE_FILE, "wb")  # noqa: SIM115
        self._provenance.write(header.encode("utf-8"))

    def join(self, index: int) -> None:
        """Channel ``index`` is done, and so is every channel before it: append its final part files."""
        if self.folder is None:
            return
        assert index == self._joined
        outs = list(zip(SPLIT_NAMES, self._outs, strict=True))
        if self._provenance is not None:
            outs.append(("prov", self._provenance))
        for name, out in outs:
            part = self.folder / "parts" / f"{index:06d}.{name}"
            if part.exists():  # bytes straight from the part file: no decoding and re-encoding
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                part.unlink()
        self._joined += 1

    def write_splits(self, n_channels: int, assign: dict[str, int]) -> None:
        """Route every spooled record by ``assign`` (group -> split), join what is left, close the files."""
        assert self.folder is not None
        parts = self.folder / "parts"
        for index in range(n_channels):
            spool = parts / f"{index:06d}.spool"
            if spool.exists():
                with open(spool, "rb") as f, open(parts / f"{index:06d}.groups", "rb") as g:
                    for line, group in zip(f, g, strict=True):
                        self._outs[assign[group[:-1].decode("utf-8")]].write(line)
        for index in range(self._joined, n_channels):
            self.join(index)
        self._close()
        shutil.rmtree(parts)

    def write(self, name: str, text: str) -> None:
        """Write one more file (the report) into the folder."""
        assert self.folder is not None
        (self.folder / name).write_text(text, encoding="utf-8")

    def install(self) -> None:
        """Rename the finished folder into DIR's place, replacing it whole (`slackdist.files.install_dir`):
        DIR holds every new file or every old one, never a mix."""
        assert self.folder is not None and self.out is not None
        with interrupts_deferred():
            install_dir(self.folder, self.out)
            self.folder = None

    def __exit__(self, *exc: object) -> None:
        if self.folder is None:
            return
        with interrupts_deferred():
            self._close()
            shutil.rmtree(self.folder, ignore_errors=True)
            for folder in self._created:
                shutil.rmtree(folder, ignore_errors=True)
            self.folder = None

    def _close(self) -> None:
        for fh in self._outs:
            fh.close()
        if self._provenance is not None:
            self._provenance.close()


def _make_temp_dir(out: Path) -> tuple[Path, list[Path]]:
    """``OUT.tmp-XXXX`` next to OUT; also returns the parent folders it had to create."""
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent)), created
