"""Where adapters come from: turn a tenant-supplied adapter name into a local directory.

A source only *locates* files; it never parses them (that is the adapter reader's job)
and never trusts the name. Two rules hold for every source:

* the name is validated before it touches the filesystem or the network, and an illegal
  name is refused with ``RefusalReason.INVALID_NAME`` (never silently mapped to something);
* "this source does not have it" is ``None``, so several sources can be searched in order;
  anything else that goes wrong is an ``AdapterRefused`` with a message, never a stack trace.

vLLM's own filesystem resolver joins the name onto its directory unchecked and lets the
worker fetch any non-local ``lora_path`` from the hub; this package is the replacement.

One job per module:

* :mod:`.names`: the legal local names, and how an untrusted name is shown in messages;
* :mod:`.base`: the :class:`AdapterSource` interface and the :class:`Location` it returns;
* :mod:`.local`: :class:`LocalDirSource`, adapters under a local root;
* :mod:`.hub`: :class:`HubSource`, allowed Hugging Face hub repositories;
* :mod:`.s3`: :class:`S3Source`, adapters in S3-compatible object storage (boto3 imported on use);
* :mod:`.locate`: finding an adapter among the sources, by name or by ``lora_path``.
"""

from .base import AdapterSource, Location
from .hub import HUB_ALLOW_PATTERNS, HubSource
from .local import LocalDirSource
from .locate import locate, locate_adapter, locate_path
from .names import MAX_NAME_LENGTH, shown_name, validate_adapter_name
from .s3 import S3Source

__all__ = [
    "HUB_ALLOW_PATTERNS",
    "MAX_NAME_LENGTH",
    "AdapterSource",
    "HubSource",
    "LocalDirSource",
    "Location",
    "S3Source",
    "locate",
    "locate_adapter",
    "locate_path",
    "shown_name",
    "validate_adapter_name",
]
