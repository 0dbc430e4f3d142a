"""Loading a bank: verifying its files against the manifest and putting U, S (and the
safety features V_s, if any) on a device in one call, reporting the bytes.

This module imports no vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import BankError
from ..fsutil import sha256_file
from ..projection import Subspace
from .manifest import STORAGE_DTYPES, TENSORS_FILE, BankManifest, SafetyFeaturesManifest, read_manifest

# The bank's one logger (vllm_safelora.bank), as before the split into modules.
logger = logging.getLogger(__package__)


@dataclass
class AlignmentBank:
    """A bank resident on one device, ready for projection."""

    manifest: BankManifest
    subspaces: dict[str, Subspace]
    device: torch.device
    nbytes: int
    path: Path
    safety_features: dict[str, torch.Tensor] | None = None
    """SaLoRA-style V_s per module (d_out x r_s, float32, orthonormal columns), if the bank has them."""

    @property
    def bank_id(self) -> str:
        return self.manifest.bank_id

    @property
    def features_id(self) -> str | None:
        """Identity of the loaded safety features (None without them); not part of bank_id."""
        if self.safety_features is None or self.manifest.safety_features is None:
            return None
        return self.manifest.safety_features.features_id

    def require_safety_features(self, policy: str = "this policy") -> dict[str, torch.Tensor]:
        if self.safety_features is None:
            raise BankError(
                f"{policy} needs safety features (V_s), but bank {self.path} ({self.bank_id}) has none; build them with "
                "`vllm-safelora build-bank ... --safety-prompts FILE.jsonl [--safety-rank 32]` "
                "(or --features-only to add them to an existing bank)"
            )
        return self.safety_features

    def get(self, module: str) -> Subspace | None:
        return self.subspaces.get(module)

    @classmethod
    def described(cls, path: Path, manifest: BankManifest) -> AlignmentBank:
        """The bank as its manifest describes it, with no tensor loaded (empty subspaces and features).

        For checks of what a policy needs (``validate_bank``) without the memory of a
        load: ``vllm-safelora doctor`` on a 20 GiB bank. Never project with it.
        """
        section = manifest.safety_features
        features = {m.name: torch.empty(0) for m in section.modules} if section is not None else None
        return cls(
            manifest=manifest,
            subspaces={},
            device=torch.device("cpu"),
            nbytes=0,
            path=Path(path),
            safety_features=features,
        )


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise BankError(f"invalid device '{device}' (use auto, cpu or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BankError(f"device '{device}' requested but CUDA is not available in this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BankError(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise BankError(f"unsupported device '{device}' (use auto, cpu or cuda:N)")
    return dev


def _check_sha256(path: Path, expected: str, subject: str, fix: str) -> None:
    """The bank's one integrity check: raise BankError unless ``path`` has the sha256 the manifest records."""
    digest = sha256_file(path)
    if digest != expected:
        raise BankError(f"{subject} sha256 {digest[:16]}..., the manifest says {expected[:16]}...; {fix}")


def _tensors_path(bank_dir: Path) -> Path:
    path = Path(bank_dir) / TENSORS_FILE
    if not path.is_file():
        raise BankError(f"bank {bank_dir} has no {TENSORS_FILE}; rebuild it")
    return path


def verify_bank_tensors(bank_dir: Path, manifest: BankManifest) -> None:
    """Raise BankError unless bank.safetensors has the sha256 the manifest records."""
    _check_sha256(
        _tensors_path(bank_dir),
        manifest.tensors_sha256,
        f"bank {bank_dir} is corrupt: {TENSORS_FILE} has",
        "rebuild the bank",
    )


def verify_bank_files(bank_dir: Path, manifest: BankManifest) -> None:
    """Every file the manifest names has its recorded sha256; no tensor is loaded (``vllm-safelora doctor``)."""
    verify_bank_tensors(bank_dir, manifest)
    if manifest.safety_features is not None:
        _verify_features_file(Path(bank_dir), manifest.safety_features)


def _features_path(bank_dir: Path, section: SafetyFeaturesManifest) -> Path:
    path = bank_dir / section.file
    if Path(section.file).name != section.file or not path.is_file():
        raise BankError(
            f"bank {bank_dir}: the manifest names safety features {section.file!r}, which is missing; "
            "add them again with add_safety_features "
            "(`vllm-safelora build-bank --out DIR --features-only --safety-prompts FILE.jsonl`)"
        )
    return path


def _verify_features_file(bank_dir: Path, section: SafetyFeaturesManifest) -> None:
    _check_sha256(
        _features_path(bank_dir, section),
        section.tensors_sha256,
        f"bank {bank_dir}: safety features {section.file} have",
        "rebuild them",
    )


def load_bank(bank_dir: Path, device: str = "cpu", *, verify: bool = True) -> AlignmentBank:
    """Read a bank onto ``device`` ('cpu', 'cuda:N', 'auto'); verifies its hash by default."""
    bank_dir = Path(bank_dir)
    manifest = read_manifest(bank_dir)
    dev = resolve_device(device)
    tensors_path = _tensors_path(bank_dir)
    if verify:
        verify_bank_tensors(bank_dir, manifest)
    subspaces: dict[str, Subspace] = {}
    nbytes = 0
    try:
        with safe_open(str(tensors_path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for m in manifest.modules:
                for suffix in ("U", "S"):
                    if f"{m.name}.{suffix}" not in present:
                        raise BankError(f"bank {bank_dir} lacks tensor {m.name}.{suffix}; rebuild it")
            stacks = _stacked_storage(manifest, dev)
            for m in manifest.modules:
                U = f.get_tensor(f"{m.name}.U")
                S = f.get_tensor(f"{m.name}.S")
                if tuple(U.shape) != (m.shape[0], m.rank_kept) or tuple(S.shape) != (m.rank_kept,):
                    raise BankError(
                        f"bank {bank_dir}: {m.name} tensors have shapes {tuple(U.shape)}/{tuple(S.shape)}, "
                        f"the manifest says ({m.shape[0]}, {m.rank_kept}); rebuild it"
                    )
                slot = stacks[m.name]
                if U.dtype != slot.dtype:
                    raise BankError(
                        f"bank {bank_dir}: {m.name}.U is stored as {U.dtype}, the manifest says "
                        f"{manifest.storage_dtype}; rebuild it"
                    )
                slot.copy_(U)
                del U
                S = S.to(dev)
                nbytes += slot.numel() * slot.element_size() + S.numel() * S.element_size()
                subspaces[m.name] = Subspace(
                    U=slot, S=S, frobenius_norm=m.frobenius_norm, numerical_rank=min(m.numerical_rank, m.rank_kept)
                )
    except BankError:
        raise
    except Exception as exc:  # safetensors parse errors, OOM on device
        raise BankError(f"bank {bank_dir} could not be loaded onto {dev}: {exc}") from exc
    features = None
    if manifest.safety_features is not None:
        features = _load_safety_features(bank_dir, manifest, dev, verify=verify)
        nbytes += sum(t.numel() * t.element_size() for t in features.values())
    logger.info(
        "loaded alignment bank %s (%d modules, %.1f MiB) onto %s",
        manifest.bank_id,
        len(subspaces),
        nbytes / 2**20,
        dev,
    )
    return AlignmentBank(
        manifest=manifest, subspaces=subspaces, device=dev, nbytes=nbytes, path=bank_dir, safety_features=features
    )


def _stacked_storage(manifest: BankManifest, dev: torch.device) -> dict[str, torch.Tensor]:
    """One (n, d_out, k) tensor per U shape, in manifest order, and each module's U as a view of it.

    The projection scores the modules of one shape in a single batched product over
    such a stack with no copy (e.g. every layer's q_proj at a constant stride).
    Same bytes as one tensor per module, in the bank's storage dtype.
    """
    dtype = STORAGE_DTYPES[manifest.storage_dtype]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for m in manifest.modules:
        by_shape.setdefault((m.shape[0], m.rank_kept), []).append(m.name)
    slots: dict[str, torch.Tensor] = {}
    for (d_out, k), names in by_shape.items():
        stack = torch.empty((len(names), d_out, k), dtype=dtype, device=dev)
        slots.update({name: stack[i] for i, name in enumerate(names)})
    return slots


def _load_safety_features(
    bank_dir: Path, manifest: BankManifest, dev: torch.device, *, verify: bool
) -> dict[str, torch.Tensor]:
    section = manifest.safety_features
    assert section is not None
    path = _features_path(bank_dir, section)
    if verify:
        _verify_features_file(bank_dir, section)
    bank_modules = {m.name: m for m in manifest.modules}
    listed = {m.name: m for m in section.modules}
    if set(listed) != set(bank_modules):
        missing = sorted(set(bank_modules) - set(listed))[:5]
        raise BankError(
            f"bank {bank_dir}: safety features do not cover the bank's modules (missing e.g. {missing}); rebuild them"
        )
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            present = set(f.keys())
            for name, m in listed.items():
                key = f"{name}.Vs"
                if key not in present:
                    raise BankError(f"bank {bank_dir}: safety features lack {key}; rebuild them")
                Vs = f.get_tensor(key)
                if tuple(Vs.shape) != (bank_modules[name].shape[0], m.rank_kept):
                    raise BankError(
                        f"bank {bank_dir}: {key} has shape {tuple(Vs.shape)}, expected "
                        f"({bank_modules[name].shape[0]}, {m.rank_kept}); rebuild them"
                    )
                out[name] = Vs.to(device=dev, dtype=torch.float32)
    except BankError:
        raise
    except Exception as exc:
        raise BankError(f"bank {bank_dir}: safety features could not be loaded onto {dev}: {exc}") from exc
    return out


def dense_bank_bytes(manifest: BankManifest, bytes_per_element: int = 4) -> int:
    """What the reference keeps: one dense d_out x d_out C per module."""
    return sum(m.shape[0] * m.shape[0] * bytes_per_element for m in manifest.modules)
