"""Read an adapter directory's two files once, within byte limits, and parse them.

Adapters are tenant uploads, so the reader trusts nothing: it reads each file
once, with a byte limit, hashes exactly the bytes it parses, checks the
safetensors header itself before handing the bytes to safetensors (which
never unpickles anything), and collects every problem it finds into one
:class:`AdapterRefused`. Pickle files (``adapter_model.bin``) are refused by
name and never opened.

This module imports no vLLM.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch
from safetensors.torch import load as load_safetensors_bytes

from ..errors import AdapterRefused, Problems, RefusalReason
from ..fsutil import FileIdentity
from .directory import AdapterDirectory, PathDirectory, as_directory
from .header import FLOAT_CODES, check_safetensors_header, refuse_oversized_header
from .limits import ReadLimits
from .modules import LoraAdapter, map_tensor_names, pair_modules, content_hash
from .names import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, canonical_name
from .validate import parse_config, validate_config


def _read_regular_file(
    directory: AdapterDirectory,
    name: str,
    limit: int,
    adapter: str,
    head: tuple[int, Callable[[bytes, int], None]] | None = None,
) -> tuple[bytes, os.stat_result]:
    """The file's bytes within ``limit``. ``head`` = (n, check): the first n bytes are read
    first and ``check(head, file_size)`` may refuse them before the rest is read (a huge file with a hostile
    header costs n bytes, not the file)."""
    fd = directory.open_file(name, adapter)
    if fd is None:
        raise AdapterRefused(
            RefusalReason.CHANGED_WHILE_READING, f"{name} vanished while the adapter was read", adapter
        )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterRefused(RefusalReason.INVALID_NAME, f"{name} is not a regular file", adapter)
        if st.st_size > limit:
            raise AdapterRefused(
                RefusalReason.TOO_LARGE, f"{name} is {st.st_size} bytes, the limit is {limit}", adapter
            )
        chunks, total = [], 0
        if head is not None:
            first = _read_up_to(fd, min(head[0], limit + 1))
            head[1](first, st.st_size)
            chunks, total = [first], len(first)
        while True:
            block = os.read(fd, min(1 << 24, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > limit:
                raise AdapterRefused(
                    RefusalReason.TOO_LARGE, f"{name} grew past the limit of {limit} bytes while read", adapter
                )
        data = b"".join(chunks)
        if len(data) != st.st_size:
            raise AdapterRefused(RefusalReason.CHANGED_WHILE_READING, f"{name} changed size while it was read", adapter)
        return data, st
    except OSError as exc:  # EIO, or a file that went away under a network file system
        raise AdapterRefused(
            RefusalReason.CHANGED_WHILE_READING, f"{name} could not be read: {exc.strerror}", adapter
        ) from None
    finally:
        os.close(fd)


def _read_up_to(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = os.read(fd, n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _same_file(before: os.stat_result, directory: AdapterDirectory, name: str, adapter: str) -> bool:
    """The file is still the one read: same identity, ctime included (any write moves it)."""
    try:
        fd = directory.open_file(name, adapter)
    except AdapterRefused:
        return False
    if fd is None:
        return False
    try:
        now = os.fstat(fd)
    finally:
        os.close(fd)
    return FileIdentity.of(now) == FileIdentity.of(before)


def directory_identity(directory: AdapterDirectory) -> FileIdentity | None:
    identity = getattr(directory, "identity", None)
    return identity() if identity is not None else None


def file_identity(directory: AdapterDirectory, adapter: str) -> tuple | None:
    """The identity of the directory and of its two files (:class:`~vllm_safelora.fsutil.FileIdentity`,
    ctime included) without reading them; None if any cannot be had."""
    out = [directory_identity(directory)]
    if out[0] is None:
        return None
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            fd = directory.open_file(name, adapter)
        except AdapterRefused:
            return None
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        out.append(FileIdentity.of(st))
    return tuple(out)


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's files as read (once, within limits), before any parsing."""

    path: Path
    name: str
    config_bytes: bytes
    weights_bytes: bytes
    identity: tuple | None = None
    """What :func:`file_identity` said of these files while they were read (unchanged from before the
    first byte to after the last), or None where nothing can be trusted about them."""
    read_at_ns: int = 0
    """When reading began: an identity not older than this by a timestamp tick proves nothing."""

    @functools.cached_property
    def content_hash(self) -> str:
        """blake3 content hash of exactly these bytes (the ones parsed); computed once."""
        return content_hash(self.config_bytes, self.weights_bytes)


def read_adapter_files(
    path: AdapterDirectory | Path,
    *,
    name: str | None = None,
    limits: ReadLimits = ReadLimits(),
    confine_to: Path | None = None,
) -> AdapterFiles:
    """Read an adapter directory's two files within the byte limits, parsing nothing.

    Split from :func:`parse_adapter` so that a caller can recognise content it has
    already refused (by :attr:`AdapterFiles.content_hash`) before paying for parsing.
    ``path`` is an :class:`AdapterDirectory` a source opened (files read relative to it),
    or a path the caller trusts (:class:`PathDirectory`, links bounded by ``confine_to``).
    """
    directory = as_directory(path, confine_to)
    who = name or str(directory.path)
    read_at, before = time.time_ns(), directory_identity(directory)
    if isinstance(directory, PathDirectory):
        directory.check(who)
    if not directory.lexists(CONFIG_FILE):
        raise AdapterRefused(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE} is missing", who)
    pickles = [p for p in PICKLE_FILES if directory.lexists(p)]
    if not directory.lexists(WEIGHTS_FILE):
        if pickles:
            raise AdapterRefused(
                RefusalReason.PICKLE_ONLY,
                f"only pickle weights ({', '.join(pickles)}) were found; pickle is never loaded here. "
                "Re-save the adapter with save_pretrained(..., safe_serialization=True)",
                who,
            )
        raise AdapterRefused(RefusalReason.MISSING_TENSOR, f"{WEIGHTS_FILE} is missing", who)
    if pickles:
        raise AdapterRefused(
            RefusalReason.PICKLE_ONLY,
            f"{', '.join(pickles)} sits beside {WEIGHTS_FILE}; which weights are meant is ambiguous. "
            "Upload only the safetensors file",
            who,
        )

    config_bytes, config_stat = _read_regular_file(directory, CONFIG_FILE, limits.max_config_bytes, who)
    weights_bytes, weights_stat = _read_regular_file(
        directory,
        WEIGHTS_FILE,
        limits.max_bytes,
        who,
        head=(8 + limits.max_header_bytes, functools.partial(refuse_oversized_header, limits=limits, adapter=who)),
    )
    if not (
        _same_file(config_stat, directory, CONFIG_FILE, who) and _same_file(weights_stat, directory, WEIGHTS_FILE, who)
    ):
        raise AdapterRefused(
            RefusalReason.CHANGED_WHILE_READING,
            "the adapter's files were replaced while they were read; upload it again",
            who,
        )
    identity = None
    if before is not None and directory_identity(directory) == before:
        identity = (before, FileIdentity.of(config_stat), FileIdentity.of(weights_stat))
    return AdapterFiles(
        path=directory.path,
        name=who,
        config_bytes=config_bytes,
        weights_bytes=weights_bytes,
        identity=identity,
        read_at_ns=read_at,
    )


def read_adapter(
    path: AdapterDirectory | Path,
    *,
    name: str | None = None,
    limits: ReadLimits = ReadLimits(),
    confine_to: Path | None = None,
) -> LoraAdapter:
    """Read, validate and hash a PEFT LoRA adapter directory, or refuse it.

    ``name`` is how errors name the adapter (its served name); ``confine_to``
    is a directory every file must resolve into (the source's root).
    """
    return parse_adapter(read_adapter_files(path, name=name, limits=limits, confine_to=confine_to), limits=limits)


def parse_adapter(files: AdapterFiles, *, limits: ReadLimits = ReadLimits()) -> LoraAdapter:
    """Validate and parse files read by :func:`read_adapter_files`, or refuse them.

    Every tensor name is mapped to its module the way the served vLLM maps it, and
    refused unless each module gets exactly one lora_A and one lora_B, *before* any
    tensor is materialised. The returned adapter's tensors are keyed by their
    canonical names (:func:`canonical_name`), which is all the writer writes.
    """
    path, who = files.path, files.name
    config_bytes, weights_bytes = files.config_bytes, files.weights_bytes
    problems = Problems(who)
    config = parse_config(config_bytes, limits, problems)
    if config is not None:
        validate_config(config, limits, problems)
    problems.raise_if_any()
    assert config is not None

    header = check_safetensors_header(weights_bytes, limits, problems)
    problems.raise_if_any()
    assert header is not None
    names = [k for k in header if k != "__metadata__"]
    for tname in names:
        if header[tname]["dtype"] not in FLOAT_CODES:
            problems.add(
                RefusalReason.BAD_DTYPE,
                f"tensor {tname} has dtype {header[tname]['dtype']}; LoRA weights must be F16, BF16 or F32",
            )
    slots = map_tensor_names(names, limits, problems)
    problems.raise_if_any()
    try:
        tensors = load_safetensors_bytes(weights_bytes)
    except Exception as exc:  # safetensors' own validation
        raise AdapterRefused(RefusalReason.MALFORMED_TENSORS, f"{WEIGHTS_FILE} cannot be parsed: {exc}", who) from exc
    metadata = header.get("__metadata__") or {}

    modules = pair_modules(tensors, slots, config, limits, problems)
    problems.raise_if_any()
    canonical = {canonical_name(slots[k].peft_module, slots[k].which): t for k, t in tensors.items()}
    dtypes = {t.dtype for t in tensors.values()}
    return LoraAdapter(
        path=path,
        config=config,
        config_bytes=config_bytes,
        weights_bytes=weights_bytes,
        tensors=canonical,
        modules=modules,
        content_hash=files.content_hash,  # the bytes just parsed, hashed once
        nbytes=len(config_bytes) + len(weights_bytes),
        dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
        canonical_names=set(canonical) == set(tensors),
        limits=limits,
    )
