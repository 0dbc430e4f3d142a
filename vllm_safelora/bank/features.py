"""Writing the SaLoRA-style safety features beside a bank, at build time or added later.

``safety_features.safetensors`` (``<module>.Vs``: d_out x r_s orthonormal
directions of the aligned model's outputs on harmful prompts with refusals, see
:mod:`vllm_safelora.bank.safety_features`) is described by the manifest's
``safety_features`` section. The features do not change the bank format or the
``bank_id`` (which stays the digest of ``bank.safetensors``); they have their own
``features_id`` (digest of their file), which policies that use them fold into
their policy id (:meth:`PolicyConfig.policy_id`), so rebuilding V_s changes the
cache key.

This module imports no vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from ..fsutil import atomic_file, replace_file, sha256_file
from .manifest import (
    MANIFEST_FILE,
    SAFETY_FEATURES_FILE,
    BankManifest,
    SafetyFeaturesManifest,
    manifest_json,
    now,
    read_manifest,
)

if TYPE_CHECKING:
    from .safety_features import SafetyFeatureSpec


def save_features(directory: Path, fname: str, features) -> SafetyFeaturesManifest:
    """Write ``features`` (a ComputedSafetyFeatures) to ``directory/fname`` and describe it."""
    save_file(features.tensors, str(directory / fname), metadata={"format": "vllm-safelora-safety-features"})
    digest = sha256_file(directory / fname)
    return SafetyFeaturesManifest(
        features_id=f"sf-{digest[:16]}", file=fname, tensors_sha256=digest, created_at=now(), **features.info
    )


def add_safety_features(
    bank_dir: Path,
    spec: SafetyFeatureSpec,
    *,
    model: str | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> BankManifest:
    """Compute safety features for an existing bank and attach them (replacing any earlier ones).

    ``model`` defaults to the bank's aligned model. The new features go to a file
    named after their digest, then the manifest is replaced atomically (both
    through :func:`vllm_safelora.fsutil.replace_file`: data and directory entry
    flushed), so a reader sees the old or the new features, never a mix. The
    bank_id does not change.
    """
    from .safety_features import compute_safety_features

    bank_dir = Path(bank_dir)
    manifest = read_manifest(bank_dir)
    features = compute_safety_features(
        model or manifest.aligned.ref,
        {m.name: m.shape for m in manifest.modules},
        spec,
        device=device,
        show_progress=show_progress,
    )
    tmp = bank_dir / f".{SAFETY_FEATURES_FILE}.tmp-{os.getpid()}"
    try:
        section = save_features(bank_dir, tmp.name, features)
        final = f"safety_features-{section.tensors_sha256[:16]}.safetensors"
        replace_file(tmp, bank_dir / final)
    finally:
        tmp.unlink(missing_ok=True)
    section = section.model_copy(update={"file": final})
    old = manifest.safety_features
    manifest = manifest.model_copy(update={"safety_features": section})
    with atomic_file(bank_dir / MANIFEST_FILE) as tmp_manifest:
        tmp_manifest.write_text(manifest_json(manifest))
    if old is not None and old.file != final:
        (bank_dir / old.file).unlink(missing_ok=True)
    return manifest
