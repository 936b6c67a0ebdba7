"""A checkpoint's manifest: every file with its size and hash, written last, and checked before resuming.

`manifest.json` in each `OUT/checkpoints/step-N/`:

    {"format": 1, "hash": "blake2b-16MiB-blocks", "step": 120, "backend": "fsdp1", "world_size": 2,
     "layout": "dcp", "files": {"adapter_model.safetensors": {"size": 61440152, "hash": "9f3c..."}, ...}}

The manifest is the last file written into the checkpoint's temporary folder, after every rank's
files, and the folder is renamed into place after it: a step folder whose files all match their
manifest entry is a complete, unchanged checkpoint. A missing, truncated, rewritten or extra-short
file, or a manifest that is not valid JSON, makes the checkpoint invalid; `--resume auto` then
takes the newest one that verifies (`slackdist.train.checkpoint.resume_point`).

Hash: BLAKE2b from the standard library (the GPU hosts need no extra package), over every byte.
A file is cut into 16 MiB blocks, the blocks are hashed in parallel threads (hashlib releases the
GIL while hashing), and the file's hash is the BLAKE2b of its block hashes in order, so a GiB
optimizer state hashes at the speed of a few cores rather than one.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slackdist.errors import SlackdistError, first_line
from slackdist.files import write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 1
HASH_NAME = "blake2b-16MiB-blocks"
BLOCK_BYTES = 16 * 2**20
_MAX_THREADS = 8


class InvalidCheckpoint(SlackdistError):
    """A checkpoint folder that does not match its manifest (the message says which file and how)."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    hash: str


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint holds and where it was written."""

    step: int
    """Optimizer steps done when it was saved."""
    backend: str
    """The `Topology.backend` that wrote it (single, ddp, fsdp1, fsdp2, deepspeed)."""
    world_size: int
    """Training processes that wrote it."""
    layout: str
    """How it holds the trained weights and optimizer state (`Topology.checkpoint_layout`)."""
    files: dict[str, FileEntry]
    """Every other file, by its path relative to the checkpoint folder (POSIX separators)."""


def _block_hash(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.blake2b(f.read(BLOCK_BYTES), digest_size=32).digest()


def hash_files(paths: list[Path]) -> dict[Path, str]:
    """The manifest hash of each file (module docstring), its blocks hashed on up to 8 threads.

    Raises:
        OSError: a file cannot be read.
    """
    jobs = [(path, offset) for path in paths for offset in range(0, max(path.stat().st_size, 1), BLOCK_BYTES)]
    threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(jobs)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        blocks = list(pool.map(lambda job: _block_hash(*job), jobs))
    by_file: dict[Path, list[bytes]] = {path: [] for path in paths}
    for (path, _), digest in zip(jobs, blocks, strict=True):
        by_file[path].append(digest)
    return {path: hashlib.blake2b(b"".join(d), digest_size=32).hexdigest() for path, d in by_file.items()}


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(
    folder: str | os.PathLike[str], *, step: int, backend: str, world_size: int, layout: str
) -> Manifest:
    """Hash every file of a finished checkpoint folder and write manifest.json last (atomically).

    Returns:
        The manifest written.
    """
    folder = Path(folder)
    files = _checkpoint_files(folder)
    hashes = hash_files(files)
    manifest = Manifest(
        step=step,
        backend=backend,
        world_size=world_size,
        layout=layout,
        files={
            p.relative_to(folder).as_posix(): FileEntry(size=p.stat().st_size, hash=hashes[p]) for p in files
        },
    )
    write_json_atomic(folder / MANIFEST, {"format": FORMAT, "hash": HASH_NAME, **asdict(manifest)})
    return manifest


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of a checkpoint folder, without checking the files.

    Raises:
        InvalidCheckpoint: no manifest.json, or one that is not a manifest this version wrote.
    """
    path = Path(folder) / MANIFEST
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidCheckpoint(
            f"{path}: missing (a checkpoint of an older slackdist, or one not written to the end)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpoint(f"{path}: not valid JSON ({first_line(e)})") from None
    try:
        if data["format"] != FORMAT or data["hash"] != HASH_NAME:
            raise ValueError(
                f"format {data['format']} / hash {data['hash']}, expected {FORMAT} / {HASH_NAME}"
            )
        return Manifest(
            step=int(data["step"]),
            backend=str(data["backend"]),
            world_size=int(data["world_size"]),
            layout=str(data["layout"]),
            files={
                str(name): FileEntry(size=int(entry["size"]), hash=str(entry["hash"]))
                for name, entry in data["files"].items()
            },
        )
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise InvalidCheckpoint(f"{path}: not a slackdist checkpoint manifest ({first_line(e)})") from None


def verify_checkpoint(folder: str | os.PathLike[str]) -> Manifest:
    """Check every file of a checkpoint folder against its manifest: present, same size, same hash.

    Returns:
        The manifest.

    Raises:
        InvalidCheckpoint: one line naming the first file that does not match and how (and how many
            more do not).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    present = []
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(
                f"{name}: {size:,} bytes, the manifest says {entry.size:,} (truncated or rewritten)"
            )
            continue
        present.append(path)
    if not problems:  # sizes first: a truncated file needs no hashing to be found
        hashes = hash_files(present)
        problems = [
            f"{p.relative_to(folder).as_posix()}: content differs from the manifest ({HASH_NAME} hash)"
            for p in present
            if hashes[p] != manifest.files[p.relative_to(folder).as_posix()].hash
        ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidCheckpoint(f"{folder}: {problems[0]}{more}")
    return manifest
