"""The alignment bank: V = W_aligned - W_base per module, stored as its SVD.

On disk a bank is a directory with ``bank.safetensors`` (``<module>.U``:
d_out x k left singular vectors, ``<module>.S``: k singular values) and
``manifest.json`` (:class:`BankManifest`). Building streams one module at a
time; loading puts U and S on a device in one call and reports the bytes.
Optionally a bank also carries SaLoRA-style *safety features* (V_s).

One job per module:

* :mod:`.manifest`: file names, the manifest schema, reading a manifest;
* :mod:`.build`: the streamed SVD build (``build-bank``);
* :mod:`.features`: writing safety features, at build time or added later;
* :mod:`.load`: verifying the files and loading a bank onto a device.

This package imports no vLLM.
"""

from .build import (
    DEFAULT_MODULE_SUFFIXES,
    ProgressFactory,
    Truncation,
    build_bank,
    decompose_module,
    select_bank_modules,
)
from .features import add_safety_features
from .load import (
    AlignmentBank,
    dense_bank_bytes,
    load_bank,
    resolve_device,
    verify_bank_files,
    verify_bank_tensors,
)
from .manifest import (
    BANK_FORMAT_VERSION,
    MANIFEST_FILE,
    SAFETY_FEATURES_FILE,
    TENSORS_FILE,
    BankManifest,
    BankModule,
    SafetyFeatureModule,
    SafetyFeaturesManifest,
    SourceIdentity,
    StorageDType,
    read_manifest,
)

__all__ = [
    "BANK_FORMAT_VERSION",
    "DEFAULT_MODULE_SUFFIXES",
    "MANIFEST_FILE",
    "SAFETY_FEATURES_FILE",
    "TENSORS_FILE",
    "AlignmentBank",
    "BankManifest",
    "BankModule",
    "ProgressFactory",
    "SafetyFeatureModule",
    "SafetyFeaturesManifest",
    "SourceIdentity",
    "StorageDType",
    "Truncation",
    "add_safety_features",
    "build_bank",
    "decompose_module",
    "dense_bank_bytes",
    "load_bank",
    "read_manifest",
    "resolve_device",
    "select_bank_modules",
    "verify_bank_files",
    "verify_bank_tensors",
]
