"""Shared fixtures: the tiny models, their alignment bank, and PEFT adapters made for them.

Everything here is session-scoped and built once per test run (about 7 s in all on two
cores): other test files, the end-to-end vLLM tests included, should reuse these rather
than make their own models.

Fixtures
--------
``tiny_models``            :class:`vllm_safelora.tiny.TinyModels` (``.base``, ``.aligned``: HF Llama
                           checkpoint directories, float32, hidden 128, 2 layers, 1 KV head so k/v
                           are 64 x 128, MLP 256).
``tiny_deltas``            ``{module: V}`` with V = W_aligned - W_base in float32 for every linear module
                           (the dense ground truth the bank stores as an SVD).
``tiny_bank_dir``          a full (untruncated) bank built from ``tiny_models`` over the default modules
                           q/k/v/o/gate/up/down_proj. Read-only: copy it before corrupting it.
``tiny_bank``              that bank loaded on CPU (:class:`vllm_safelora.bank.AlignmentBank`).
``tiny_adapter_factory``   :class:`TinyAdapterFactory`: ``factory(direction=..., dtype=..., ...)`` returns
                           the directory of a real PEFT adapter for ``tiny_models.aligned`` (made by
                           :func:`vllm_safelora.tiny.make_tiny_adapter`, cached per argument set, shared:
                           never modify it). ``factory.copy_to(dest, ...)`` gives a private, writable copy.
``tiny_adapter_random`` / ``tiny_adapter_aligned`` / ``tiny_adapter_orthogonal``
                           float32, rank 8, alpha 16, q_proj + v_proj adapters (shared, read-only).
                           "aligned": lora_B inside the top alignment directions (high Safe LoRA cosine,
                           kept by the default threshold 0.35); "orthogonal"/"random": low cosine
                           (projected by the default threshold).

Adapters' ``base_model_name_or_path`` is ``str(tiny_models.aligned)``, which the bank protects.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from collections.abc import Sequence

import pytest
import torch

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTN_MODULES + ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny base + aligned Llama checkpoints (see module docstring)."""
    from vllm_safelora.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_deltas(tiny_models) -> dict[str, torch.Tensor]:
    """{module name: W_aligned - W_base (float32)} for every linear module."""
    from vllm_safelora.tiny import alignment_deltas

    return alignment_deltas(tiny_models.aligned, tiny_models.base)


@pytest.fixture(scope="session")
def tiny_bank_dir(tiny_models, tmp_path_factory) -> Path:
    """Directory of a full (untruncated, float32) bank for the tiny models. Do not modify."""
    from vllm_safelora.bank import build_bank

    out = tmp_path_factory.mktemp("tiny_bank") / "bank"
    build_bank(str(tiny_models.base), str(tiny_models.aligned), out, progress=None)
    return out


@pytest.fixture(scope="session")
def tiny_bank(tiny_bank_dir):
    """The tiny bank loaded on CPU."""
    from vllm_safelora.bank import load_bank

    return load_bank(tiny_bank_dir, "cpu")


class TinyAdapterFactory:
    """Makes PEFT adapters for the tiny aligned model; one directory per argument set.

    ``__call__`` returns a shared cached directory (read-only by convention);
    ``copy_to(dest, ...)`` copies it to ``dest`` for tests that edit files.
    Arguments are those of :func:`vllm_safelora.tiny.make_tiny_adapter`.
    """

    def __init__(self, models, root: Path):
        self.models = models
        self.root = root
        self._cache: dict[tuple, Path] = {}
        self._lock = threading.Lock()

    def __call__(
        self,
        direction: str = "random",
        *,
        dtype: torch.dtype = torch.float32,
        rank: int = 8,
        alpha: float = 16,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        use_rslora: bool = False,
        rank_pattern: dict | None = None,
        alpha_pattern: dict | None = None,
        seed: int = 0,
        scale: float = 1.0,
    ) -> Path:
        from vllm_safelora.tiny import make_tiny_adapter

        key = (
            direction,
            str(dtype),
            rank,
            float(alpha),
            tuple(target_modules),
            use_rslora,
            tuple(sorted((rank_pattern or {}).items())),
            tuple(sorted((alpha_pattern or {}).items())),
            seed,
            float(scale),
        )
        with self._lock:
            if key not in self._cache:
                out = self.root / f"adapter-{len(self._cache):03d}-{direction}"
                make_tiny_adapter(
                    self.models.aligned,
                    out,
                    seed=seed,
                    rank=rank,
                    alpha=alpha,
                    target_modules=tuple(target_modules),
                    dtype=dtype,
                    direction=direction,
                    base_dir=self.models.base,
                    use_rslora=use_rslora,
                    rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern,
                    scale=scale,
                )
                self._cache[key] = out
            return self._cache[key]

    def copy_to(self, dest: Path, direction: str = "random", **kwargs) -> Path:
        """A private copy of the adapter ``self(direction, **kwargs)`` at ``dest``."""
        src = self(direction, **kwargs)
        dest = Path(dest)
        shutil.copytree(src, dest)
        return dest


@pytest.fixture(scope="session")
def tiny_adapter_factory(tiny_models, tmp_path_factory) -> TinyAdapterFactory:
    return TinyAdapterFactory(tiny_models, tmp_path_factory.mktemp("tiny_adapters"))


@pytest.fixture(scope="session")
def tiny_adapter_random(tiny_adapter_factory) -> Path:
    return tiny_adapter_factory("random")


@pytest.fixture(scope="session")
def tiny_adapter_aligned(tiny_adapter_factory) -> Path:
    return tiny_adapter_factory("aligned")


@pytest.fixture(scope="session")
def tiny_adapter_orthogonal(tiny_adapter_factory) -> Path:
    return tiny_adapter_factory("orthogonal")


@pytest.fixture
def aws_credentials(monkeypatch):
    """The test store's credentials in the standard AWS variables, as a plugin server finds them."""
    from support.s3 import aws_env

    for k, v in aws_env().items():
        monkeypatch.setenv(k, v)
