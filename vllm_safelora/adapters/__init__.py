"""Read and validate a PEFT LoRA adapter directory; write a patched one.

Adapters are tenant uploads, so the reader trusts nothing (:mod:`.reader` says how):
every file is read once within a byte limit, every problem found goes into one
:class:`AdapterRefused`, and pickle files are refused by name, never opened.

One job per module, in the order a read goes through them:

* :mod:`.names`: the file names, and tensor names parsed as vLLM parses them;
* :mod:`.limits`: :class:`ReadLimits`, what a tenant can make the server read (problems are collected by :class:`vllm_safelora.errors.Problems`);
* :mod:`.directory`: where the reader opens files (a directory a source opened, or a trusted path);
* :mod:`.reader`: reading the two files within the limits, then parsing them;
* :mod:`.validate`: adapter_config.json checks and the mirror of vLLM's feature checks;
* :mod:`.header`: the safetensors header, checked before safetensors parses it;
* :mod:`.modules`: tensors mapped and paired into :class:`LoraModule` s of a :class:`LoraAdapter`;
* :mod:`.bounds`: whether each update stays finite in the dtype vLLM serves it in;
* :mod:`.writer`: serialising a patched adapter and writing it atomically.

This package imports no vLLM.
"""

from ..errors import AdapterRefused, RefusalReason
from .bounds import ACTIVATION_HEADROOM, max_abs_update, update_limit
from .limits import HEADER_BYTES_PER_TENSOR, HEADER_METADATA_BYTES, ConfigCheck, ModuleFilter, ReadLimits
from .modules import LoraAdapter, LoraModule, changed_update_problems, content_hash
from .names import (
    CONFIG_FILE,
    PICKLE_FILES,
    WEIGHTS_FILE,
    NameParser,
    canonical_name,
    is_canonical_name,
    parse_lora_name,
)
from .directory import AdapterDirectory, PathDirectory
from .reader import AdapterFiles, file_identity, parse_adapter, read_adapter, read_adapter_files
from .writer import (
    SerializedAdapter,
    config_excluding_modules,
    serialize_adapter,
    unchanged_files,
    write_adapter_dir,
    write_adapter_files,
)

__all__ = [
    "ACTIVATION_HEADROOM",
    "CONFIG_FILE",
    "HEADER_BYTES_PER_TENSOR",
    "HEADER_METADATA_BYTES",
    "PICKLE_FILES",
    "WEIGHTS_FILE",
    "AdapterDirectory",
    "AdapterFiles",
    "AdapterRefused",
    "ConfigCheck",
    "LoraAdapter",
    "LoraModule",
    "ModuleFilter",
    "NameParser",
    "PathDirectory",
    "ReadLimits",
    "RefusalReason",
    "SerializedAdapter",
    "canonical_name",
    "changed_update_problems",
    "config_excluding_modules",
    "content_hash",
    "file_identity",
    "is_canonical_name",
    "max_abs_update",
    "parse_adapter",
    "parse_lora_name",
    "read_adapter",
    "read_adapter_files",
    "serialize_adapter",
    "unchanged_files",
    "update_limit",
    "write_adapter_dir",
    "write_adapter_files",
]
