"""Helpers for the hardening suite: adapter generation, the hostile catalogue, cache checks.

Imported by ``tests/hardening/conftest.py`` and the test modules (pytest puts this
directory on ``sys.path``; the module name is unique across the test tree). Servers,
their environment and /metrics come from ``tests/support/server.py``.
Nothing here is committed as binary data: every adapter, valid or hostile, is
generated from a real PEFT adapter made by :func:`vllm_safelora.tiny.make_tiny_adapter`.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import blake3
import torch
from support.server import MAX_LORA_RANK

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# The catalogue server refuses adapters above this; every valid adapter here is ~29 KB.
SMALL_MAX_ADAPTER_BYTES = 256 * 1024
# The update cap (ReadLimits.max_update_abs) the catalogue's float32 server enforces; the
# isolation test admits an adapter just under it.
HOSTILE_MAX_UPDATE = 65536.0


# ----------------------------------------------------------------------------- adapters


def load_template(template: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((Path(template) / CONFIG).read_text())
    return config, load_file(str(Path(template) / WEIGHTS))


def random_tensors(template: dict[str, torch.Tensor], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Same names, shapes and dtypes as ``template``, new values (distinct content per seed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(template):
        t = template[k]
        std = float(t.float().std()) or 0.02
        out[k] = (torch.randn(t.shape, generator=g) * std * scale).to(t.dtype)
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt", **(metadata or {})})


def raw_safetensors(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    """Hand-made safetensors bytes: u64 header length + JSON header + data (nothing checked)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def ordered_safetensors(items: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """safetensors bytes with the tensors in exactly this header order (``save`` sorts them)."""
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for name, t in items:
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    return raw_safetensors(header, b"".join(blobs))


def write_adapter(
    out: Path,
    config: dict | bytes | None,
    weights: dict[str, torch.Tensor] | bytes | None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        data = config if isinstance(config, bytes) else (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        (out / CONFIG).write_bytes(data)
    if weights is not None:
        data = weights if isinstance(weights, bytes) else safetensors_bytes(weights)
        (out / WEIGHTS).write_bytes(data)
    for name, data in (extra or {}).items():
        (out / name).write_bytes(data)
    return out


def make_valid_adapter(out: Path, template: Path, seed: int, *, scale: float = 1.0) -> Path:
    """A valid adapter with the template's config and new random weights (distinct per seed)."""
    config, tensors = load_template(template)
    return write_adapter(out, config, random_tensors(tensors, seed, scale))


def content_id(adapter_dir: Path) -> str:
    """The adapter's content hash as the plugin computes it (config bytes + weights bytes)."""
    from vllm_safelora.adapters import content_hash

    d = Path(adapter_dir)
    return content_hash((d / CONFIG).read_bytes(), (d / WEIGHTS).read_bytes())


# ----------------------------------------------------------------------------- the catalogue


class _Trap:
    """Unpickling this creates ``marker``: proof that something unpickled the upload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        code = f"open({self.marker!r}, 'w').write('unpickled')"
        return (exec, (code,))


def booby_trapped_pickle(marker: Path) -> bytes:
    return pickle.dumps({"base_model.model.x.lora_A.weight": _Trap(marker)})


@dataclass
class DirCase:
    """A hostile adapter directory, refused with ``reason`` (HTTP ``status``)."""

    name: str
    reason: str
    fragment: str  # a piece of the message that says what is wrong
    status: int = 400
    note: str = ""
    path: Path | None = None  # set by build_catalogue
    load_path: str | None = None  # what POST /v1/load_lora_adapter sends (default: str(path))
    load_reason: str | None = None
    load_fragment: str | None = None


@dataclass
class NameCase:
    """A hostile name or path sent through one load path ("resolver" or "load")."""

    name: str
    via: str
    model: str | None = None  # resolver: the request's model
    lora_name: str | None = None  # load endpoint
    lora_path: str | None = None
    reason: str = "invalid_name"
    status: int = 400
    fragment: str = ""


@dataclass
class Catalogue:
    root: Path  # the server's adapter_dirs root
    outside: Path  # files and adapters outside it
    marker: Path  # created if anything ever unpickles the booby-trapped .bin
    dir_cases: list[DirCase]
    name_cases: list[NameCase]
    good_dir: Path  # a valid adapter under root, named GOOD_NAME

    def resolver_name(self, case: DirCase) -> str:
        return f"hostile/{case.name}"


GOOD_NAME = "good/base"


def build_catalogue(root: Path, outside: Path, template: Path, aligned_model: str) -> Catalogue:
    """Generate every hostile adapter under ``root/hostile`` (and helpers under ``outside``)."""
    root, outside = Path(root), Path(outside)
    hostile = root / "hostile"
    hostile.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    cfg0, t0 = load_template(template)
    cfg0 = {**cfg0, "base_model_name_or_path": aligned_model}
    tensors0 = random_tensors(t0, seed=1000)
    st0 = safetensors_bytes(tensors0)
    a_key = sorted(k for k in tensors0 if ".q_proj.lora_A" in k)[0]
    b_key = a_key.replace("lora_A", "lora_B")
    marker = outside / "UNPICKLED-MARKER"

    good_dir = make_valid_adapter(root / GOOD_NAME, template, seed=999)
    (good_dir / CONFIG).write_text(json.dumps(cfg0, indent=2, sort_keys=True))
    outside_adapter = write_adapter(outside / "evil-adapter", cfg0, random_tensors(t0, seed=1001))
    outside_file = outside / "secret.safetensors"
    outside_file.write_bytes(st0)

    def cfg(**kw) -> dict:
        out = dict(cfg0)
        for k, v in kw.items():
            if v is _DELETE:
                out.pop(k, None)
            else:
                out[k] = v
        return out

    def tens(edit: Callable[[dict], None]) -> dict:
        t = {k: v.clone() for k, v in tensors0.items()}
        edit(t)
        return t

    def header_of(data: bytes) -> tuple[dict, bytes]:
        (n,) = struct.unpack("<Q", data[:8])
        return json.loads(data[8 : 8 + n]), data[8 + n :]

    hdr0, body0 = header_of(st0)
    names = sorted(k for k in hdr0 if k != "__metadata__")

    def hdr(edit: Callable[[dict], None]) -> bytes:
        h = json.loads(json.dumps(hdr0))
        edit(h)
        return raw_safetensors(h, body0)

    cases: list[tuple[DirCase, Callable[[Path], None]]] = []

    def case(name, reason, fragment, build, status=400, note="", **kw):
        cases.append((DirCase(name, reason, fragment, status, note, **kw), build))

    def files(config=cfg0, weights=st0, extra=None):
        return lambda d: write_adapter(d, config, weights, extra)

    # -- adapter_config.json
    case("config-missing", "invalid_config", "adapter_config.json is missing", files(config=None))
    case("config-empty", "invalid_config", "not valid JSON", files(config=b""))
    case("config-invalid-json", "invalid_config", "not valid JSON", files(config=b"{'r': 8, "))
    case("config-not-object", "invalid_config", "must hold a JSON object", files(config=b"[8, 16]"))
    case("config-not-utf8", "invalid_config", "not valid JSON", files(config=b"\xff\xfe{\x00\x00"))
    case("config-r-string", "invalid_config", "r must be a positive integer", files(config=cfg(r="8")))
    case("config-r-bool", "invalid_config", "r must be a positive integer", files(config=cfg(r=True)))
    case(
        "config-alpha-nan",
        "invalid_config",
        "lora_alpha must be a finite number",
        files(config=json.dumps(cfg(lora_alpha=math.nan)).encode()),
    )
    case("config-huge", "too_large", "the limit is", files(config=b"{" + b" " * (2 << 20) + b"}"), status=413)
    case("peft-type-ia3", "not_lora", "peft_type is 'IA3'", files(config=cfg(peft_type="IA3")))
    case("peft-type-missing", "not_lora", "peft_type is None", files(config=cfg(peft_type=_DELETE)))
    case(
        "base-model-other",
        "base_model_mismatch",
        "/models/some-other-llama",
        files(config=cfg(base_model_name_or_path="/models/some-other-llama")),
    )
    case(
        "base-model-absent",
        "base_model_mismatch",
        "no base_model_name_or_path",
        files(config=cfg(base_model_name_or_path=_DELETE)),
    )
    case(
        "rank-pattern-redos",
        "invalid_config",
        "rank_pattern",
        files(config=cfg(rank_pattern={"(.|.)*Z": 8})),
        note="catastrophic-backtracking regex key (hung a projection thread before the fix)",
    )
    case("dora-config", "unsupported_feature", "DoRA", files(config=cfg(use_dora=True)))
    case(
        "modules-to-save",
        "unsupported_feature",
        "modules_to_save",
        files(config=cfg(modules_to_save=["lm_head"])),
        note="full modules cannot be projected: refused (documented)",
    )
    case("trained-bias", "unsupported_feature", "biases", files(config=cfg(bias="all")))
    case("fan-in-fan-out", "unsupported_feature", "fan_in_fan_out", files(config=cfg(fan_in_fan_out=True)))

    # -- tensors: pairing, ranks, shapes
    case(
        "unknown-module",
        "unknown_module",
        "is not in the alignment bank",
        files(weights=safetensors_bytes({k.replace("layers.0.", "layers.7."): v for k, v in tensors0.items()})),
    )
    case(
        "lora-a-without-b",
        "missing_tensor",
        "has no lora_B",
        files(weights=safetensors_bytes(tens(lambda t: t.pop(b_key)))),
    )
    case(
        "rank-mismatch-a-b",
        "rank_mismatch",
        "lora_B has rank 4",
        files(weights=safetensors_bytes(tens(lambda t: t.__setitem__(b_key, t[b_key][:, :4].clone())))),
    )
    case("rank-mismatch-config", "rank_mismatch", "declares 4", files(config=cfg(r=4)))
    case("rank-pattern-mismatch", "rank_mismatch", "declares 4", files(config=cfg(rank_pattern={"q_proj": 4})))
    case(
        "shape-vs-model",
        "shape_mismatch",
        "the model's weight is",
        files(weights=safetensors_bytes(tens(lambda t: t.__setitem__(a_key, torch.randn(8, 96))))),
    )
    case(
        "tensor-3d",
        "shape_mismatch",
        "must be 2-D",
        files(weights=safetensors_bytes(tens(lambda t: t.__setitem__(a_key, t[a_key].unsqueeze(-1).clone())))),
    )

    def rank16(t):
        for k in list(t):
            t[k] = torch.randn(16, t[k].shape[1]) * 0.02 if ".lora_A." in k else torch.randn(t[k].shape[0], 16) * 0.02

    case(
        "rank-above-max",
        "rank_too_large",
        "at most 8",
        files(config=cfg(r=16, lora_alpha=32), weights=safetensors_bytes(tens(rank16))),
    )
    case(
        "zero-sized",
        "empty",
        "zero-sized",
        files(
            weights=safetensors_bytes(
                tens(lambda t: (t.__setitem__(a_key, torch.zeros(0, 128)), t.__setitem__(b_key, torch.zeros(128, 0))))
            )
        ),
    )
    case("no-tensors", "empty", "holds no LoRA weights", files(weights=safetensors_bytes({})))
    case("weights-missing", "missing_tensor", "adapter_model.safetensors is missing", files(weights=None))
    case(
        "unexpected-tensor",
        "unexpected_tensor",
        "not a LoRA A/B weight",
        files(
            weights=safetensors_bytes(tens(lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(4, 128))))
        ),
    )
    case(
        "dora-magnitude",
        "unsupported_feature",
        "DoRA magnitude",
        files(
            weights=safetensors_bytes(
                tens(lambda t: t.__setitem__(a_key.replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(128)))
            )
        ),
    )
    case(
        "embedding-lora",
        "unsupported_feature",
        "embedding LoRA",
        files(
            weights=safetensors_bytes(
                tens(
                    lambda t: (
                        t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(8, 64)),
                        t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_B", torch.zeros(128, 8)),
                    )
                )
            )
        ),
        note="embedding LoRA is refused (documented)",
    )

    # -- values and dtypes
    case(
        "nan",
        "non_finite",
        "NaN or Inf",
        files(weights=safetensors_bytes(tens(lambda t: t[b_key].__setitem__((0, 0), math.nan)))),
    )
    case(
        "inf",
        "non_finite",
        "NaN or Inf",
        files(weights=safetensors_bytes(tens(lambda t: t[a_key].__setitem__((1, 1), -math.inf)))),
    )
    case(
        "dtype-int32",
        "bad_dtype",
        "dtype I32",
        files(weights=safetensors_bytes({k: (v * 100).to(torch.int32) for k, v in tensors0.items()})),
    )
    case(
        "dtype-bool",
        "bad_dtype",
        "dtype BOOL",
        files(weights=safetensors_bytes({k: v > 0 for k, v in tensors0.items()})),
    )
    case(
        "dtype-float64",
        "bad_dtype",
        "dtype F64",
        files(weights=safetensors_bytes({k: v.double() for k, v in tensors0.items()})),
    )
    case(
        "dtype-mixed",
        "bad_dtype",
        "lora_A is torch.float16",
        files(weights=safetensors_bytes(tens(lambda t: t.__setitem__(a_key, t[a_key].half())))),
    )

    # -- the safetensors container itself
    case("st-truncated", "malformed_tensors", "do not fit", files(weights=st0[:-64]))
    case("st-too-short", "malformed_tensors", "too short", files(weights=st0[:5]))
    case(
        "st-header-gigabytes",
        "malformed_tensors",
        "header claims 8000000000 bytes",
        files(weights=struct.pack("<Q", 8_000_000_000) + st0[8:]),
    )
    bad_json = b'{"a": [1, 2,,,}'
    case(
        "st-header-invalid-json",
        "malformed_tensors",
        "header is not valid JSON",
        files(weights=struct.pack("<Q", len(bad_json)) + bad_json + body0),
    )
    case("st-header-not-object", "malformed_tensors", "not a JSON object", files(weights=raw_safetensors([], b"")))  # type: ignore[arg-type]
    case(
        "st-offsets-overlap",
        "malformed_tensors",
        "overlap",
        files(
            weights=hdr(
                lambda h: h[names[1]].__setitem__(
                    "data_offsets",
                    [
                        h[names[0]]["data_offsets"][0],
                        h[names[0]]["data_offsets"][0]
                        + h[names[1]]["data_offsets"][1]
                        - h[names[1]]["data_offsets"][0],
                    ],
                )
            )
        ),
    )
    case(
        "st-offsets-out-of-range",
        "malformed_tensors",
        "do not fit",
        files(
            weights=hdr(
                lambda h: h[names[-1]].__setitem__(
                    "data_offsets", [10**12, 10**12 + h[names[-1]]["data_offsets"][1] - h[names[-1]]["data_offsets"][0]]
                )
            )
        ),
    )
    case(
        "st-negative-shape",
        "malformed_tensors",
        "negative or non-integer",
        files(weights=hdr(lambda h: h[names[0]].__setitem__("shape", [-8, -128]))),
    )
    case(
        "st-entry-no-dtype",
        "malformed_tensors",
        "invalid header entry",
        files(weights=hdr(lambda h: h[names[0]].pop("dtype"))),
    )

    def duplicate(d: Path) -> None:
        # json.dumps cannot write a duplicate key: splice a second entry for names[0] into the text.
        text = json.dumps(hdr0, separators=(",", ":"))
        entry = json.dumps({names[0]: hdr0[names[0]]}, separators=(",", ":"))[1:-1]
        text = text[:-1] + "," + entry + "}"
        raw = text.encode() + b" " * (-len(text) % 8)
        write_adapter(d, cfg0, struct.pack("<Q", len(raw)) + raw + body0)

    case("st-duplicate-names", "malformed_tensors", "names tensors twice", duplicate)
    case(
        "too-large",
        "too_large",
        f"the limit is {SMALL_MAX_ADAPTER_BYTES}",
        files(weights=safetensors_bytes(tensors0, metadata={"padding": "x" * (SMALL_MAX_ADAPTER_BYTES + 4096)})),
        status=413,
    )

    # -- pickles (never opened: the marker file must never appear)
    trap = booby_trapped_pickle(marker)
    case("pickle-only", "pickle_only", "pickle is never loaded", files(weights=None, extra={"adapter_model.bin": trap}))
    case("bin-beside-safetensors", "pickle_only", "sits beside", files(extra={"adapter_model.bin": trap}))

    # -- files that are not what they claim to be
    def weights_symlink(d: Path) -> None:
        write_adapter(d, cfg0, None)
        os.symlink(outside_file, d / WEIGHTS)

    case("weights-symlink-outside", "outside_namespace", "points outside the tenant's namespace", weights_symlink)

    def dir_symlink(d: Path) -> None:
        os.symlink(outside_adapter, d, target_is_directory=True)

    case("dir-symlink-outside", "outside_namespace", "points outside the tenant's namespace", dir_symlink)

    def fifo(d: Path) -> None:
        write_adapter(d, cfg0, None)
        os.mkfifo(d / WEIGHTS)

    case("weights-fifo", "invalid_name", "not a regular file", fifo, note="a FIFO would block a naive reader forever")

    def weights_dir(d: Path) -> None:
        write_adapter(d, cfg0, None)
        (d / WEIGHTS).mkdir()

    case("weights-is-directory", "invalid_name", "not a regular file", weights_dir)

    # -- names as vLLM reads them (one tensor per module and half)
    bare_a = a_key.removeprefix("base_model.model.")
    q_module = a_key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")

    def ordered(*extra: tuple[str, torch.Tensor], first: bool = False) -> bytes:
        """The template's tensors plus ``extra``, in this header order (``first``: extra first)."""
        items = list(tensors0.items())
        return ordered_safetensors([*extra, *items] if first else [*items, *extra])

    case(
        "names-prefixed-and-bare-a",
        "duplicate_module",
        "whichever it reads last",
        files(weights=ordered((bare_a, tensors0[a_key] * 50))),
        note="vLLM serves the last one it reads: the unchecked copy",
    )
    case(
        "names-bare-first-a",
        "duplicate_module",
        "whichever it reads last",
        files(weights=ordered((bare_a, tensors0[a_key] * 50), first=True)),
    )
    case(
        "names-prefixed-and-bare-b",
        "duplicate_module",
        "whichever it reads last",
        files(weights=ordered((b_key.removeprefix("base_model.model."), tensors0[b_key] * 50))),
    )
    case(
        "names-double-prefix",
        "duplicate_module",
        "whichever it reads last",
        files(weights=ordered(("base_model.model." + a_key, tensors0[a_key]))),
        note="vLLM removes every 'base_model.model.', not only the first",
    )
    case(
        "names-inner-prefix",
        "duplicate_module",
        "whichever it reads last",
        files(weights=ordered((b_key.replace("model.layers.", "model.base_model.model.layers.", 1), tensors0[b_key]))),
    )
    case(
        "names-rebuilt-prefix",
        "unexpected_tensor",
        "would land on another module",
        files(
            weights=ordered(
                (
                    a_key.replace("base_model.model.", "base_model.model.base_model.base_model.model.", 1),
                    tensors0[a_key],
                )
            )
        ),
        note="with the model's weights mapper vLLM re-adds the prefix: a module the model lacks",
    )
    case(
        "names-peft-adapter-name",
        "unexpected_tensor",
        "vLLM can map",
        files(
            weights=ordered((a_key.replace(".lora_A.weight", ".lora_A.default.weight"), tensors0[a_key])),
        ),
        note="'.lora_A.default.weight' (unsaved PEFT state dict): vLLM cannot map it",
    )
    case(
        "names-no-module",
        "unexpected_tensor",
        "names no module",
        files(weights=ordered(("base_model.model.lora_A.weight", tensors0[a_key]))),
    )
    case(
        "names-lm-head-lora",
        "unknown_module",
        "lm_head",
        files(
            weights=ordered(
                ("base_model.model.lm_head.lora_A.weight", torch.zeros(8, 128)),
                ("base_model.model.lm_head.lora_B.weight", torch.zeros(512, 8)),
            )
        ),
    )
    case(
        "names-score-head",
        "unsupported_feature",
        "full 'score' module",
        files(weights=ordered(("base_model.model.score.weight", torch.zeros(2, 128)))),
    )
    case(
        "names-base-layer-weight",
        "unexpected_tensor",
        "vLLM can map",
        files(weights=ordered(("base_model.model.model.embed_tokens.base_layer.weight", torch.zeros(4, 128)))),
        note="vLLM skips it; nothing it skips may ride along",
    )

    # -- class 2: the update must run finitely in the served dtype; alpha and patterns bounded
    def spike(module_key: str, a: float, b: float, dtype=torch.float32) -> dict:
        """The template's tensors with ``module_key``'s A/B made rank-one: max|B A| = a * b exactly."""
        t = {k: v.clone().to(dtype) for k, v in tensors0.items()}
        A, B = torch.zeros_like(t[module_key]), torch.zeros_like(t[module_key.replace("lora_A", "lora_B")])
        A[0, 0], B[0, 0] = a, b
        t[module_key], t[module_key.replace("lora_A", "lora_B")] = A, B
        return t

    s0 = cfg0["lora_alpha"] / cfg0["r"]
    case(
        "alpha-1e30",
        "update_overflow",
        "lora_alpha is 1e+30",
        files(config=cfg(lora_alpha=1e30)),
        note="finite tensors, infinite update: NaN for the whole batch before the fix",
    )
    case("alpha-negative-1e30", "update_overflow", "lora_alpha is -1e+30", files(config=cfg(lora_alpha=-1e30)))
    case("alpha-just-over", "update_overflow", "lora_alpha is 4097", files(config=cfg(lora_alpha=4097)))
    case(
        "alpha-pattern-1e30",
        "update_overflow",
        "alpha_pattern['v_proj']",
        files(config=cfg(alpha_pattern={"v_proj": 1e30})),
    )
    case(
        "alpha-pattern-layer",
        "update_overflow",
        "alpha_pattern['layers.1.self_attn.q_proj']",
        files(config=cfg(alpha_pattern={"layers.1.self_attn.q_proj": 5e3})),
    )
    case(
        "f32-overflows-16bit",
        "update_overflow",
        q_module,
        files(weights=safetensors_bytes(spike(a_key, 1.0, 3.0e38))),
        note="3e38: Inf in fp16/bf16, and over the 65536 update cap in fp32",
    )
    case(
        "update-just-over-cap",
        "update_overflow",
        "the update s*B*A reaches",
        files(weights=safetensors_bytes(spike(a_key, 1.0, 1.02 * HOSTILE_MAX_UPDATE / s0))),
    )
    case(
        "update-huge-a-tiny-b",
        "update_overflow",
        "|lora_A| reaches",
        files(weights=safetensors_bytes(spike(a_key, 1e6, 1e-9))),
        note="x @ lora_A^T is computed first: it overflows however small lora_B is",
    )
    case(
        "rslora-pushes-over",
        "update_overflow",
        f"s = {cfg0['lora_alpha'] / math.sqrt(cfg0['r']):g}",
        files(config=cfg(use_rslora=True), weights=safetensors_bytes(spike(a_key, 1.0, 0.6 * HOSTILE_MAX_UPDATE / s0))),
        note="admitted without rslora; alpha / sqrt(r) scales it over the cap",
    )
    case("rslora-not-bool", "invalid_config", "use_rslora must be true or false", files(config=cfg(use_rslora="yes")))
    case(
        "rank-pattern-over-max",
        "rank_too_large",
        "rank_pattern['nothing_matches'] is 16",
        files(config=cfg(rank_pattern={"nothing_matches": 16})),
        note="vLLM checks every value, used or not",
    )
    case(
        "alpha-pattern-not-number",
        "invalid_config",
        "must be a finite number",
        files(config=cfg(alpha_pattern={"q_proj": "x"})),
    )

    # -- class 5: the cost of reading is bounded before parsing (the catalogue server: <= 56 tensors)
    def zero_size(n: int) -> bytes:
        return raw_safetensors(
            {f"t{i}": {"dtype": "F32", "shape": [0, 128], "data_offsets": [0, 0]} for i in range(n)}, b""
        )

    case(
        "st-100k-zero-size-tensors",
        "too_large",
        "the limit is",
        files(weights=zero_size(100_000)),
        status=413,
        note="7 MB: refused by size in < 1 ms (took seconds and hundreds of MB before)",
    )
    case(
        "st-1300-zero-size-tensors",
        "too_large",
        "holds 1300 tensors",
        files(weights=zero_size(1300)),
        status=413,
        note="inside the byte limits: refused by a byte count before the header JSON is parsed",
    )
    case(
        "st-header-over-limit",
        "too_large",
        "header is",
        files(weights=raw_safetensors({**hdr0, "__metadata__": {"pad": "x" * 120_000}}, body0)),
        status=413,
    )
    case(
        "st-tensor-elements",
        "too_large",
        "131072 elements",
        files(
            weights=raw_safetensors(
                {"t": {"dtype": "U8", "shape": [8, 16384], "data_offsets": [0, 131072]}}, b"\0" * 131072
            )
        ),
        status=413,
    )
    case(
        "config-deep-json",
        "invalid_config",
        "nests JSON",
        files(config=b"[" * 100_000 + b"]" * 100_000),
        note="RecursionError inside json.loads used to escape as a 500",
    )

    # -- class 6: what vLLM's PEFTHelper refuses is refused first (nothing projected, cached or listed)
    for init in ("pissa", "olora", "corda", "loftq"):
        case(
            f"init-{init}",
            "unsupported_feature",
            f"init_lora_weights='{init}'",
            files(config=cfg(init_lora_weights=init)),
        )
    case("alora", "unsupported_feature", "aLoRA", files(config=cfg(alora_invocation_tokens=[1, 2, 3])))
    case("layer-replication", "unsupported_feature", "layer_replication", files(config=cfg(layer_replication=[[0, 2]])))
    case("qalora", "unsupported_feature", "QALoRA", files(config=cfg(use_qalora=True)))
    case("bdlora", "unsupported_feature", "BD-LoRA", files(config=cfg(use_bdlora={"nblocks": 2})))
    case("lora-bias", "unsupported_feature", "lora_bias", files(config=cfg(lora_bias=True)))
    case("no-target-modules", "invalid_config", "target_modules is missing", files(config=cfg(target_modules=_DELETE)))
    case("no-lora-alpha", "invalid_config", "lora_alpha is missing", files(config=cfg(lora_alpha=_DELETE)))
    case(
        "bias-null",
        "vllm_unsupported",
        "Adapter bias is not supported",
        files(config=cfg(bias=None)),
        note="only vLLM's own PEFTHelper catches this one (null is not 'none' to it)",
    )

    dir_cases = []
    for c, build in cases:
        c.path = hostile / c.name
        build(c.path)
        dir_cases.append(c)

    long_rel = "/".join(["a" * 200] * 30)  # ~6 KB: longer than PATH_MAX, each part > NAME_MAX
    name_cases = [
        # resolver: the request's "model" is the adapter name
        NameCase("dotdot", "resolver", model="../outside/evil-adapter", fragment="invalid adapter name"),
        NameCase("dotdot-inner", "resolver", model="hostile/..", fragment="contains '..'"),
        NameCase("absolute", "resolver", model="/etc/passwd", fragment="absolute path"),
        NameCase("url-encoded", "resolver", model="%2e%2e/%2e%2e/etc", fragment="never URL-decoded"),
        NameCase("url-encoded-slash", "resolver", model="good%2Fbase", fragment="never URL-decoded"),
        NameCase("nul-byte", "resolver", model="good/base\x00.txt", fragment="control characters"),
        NameCase("newline", "resolver", model="good/base\nX-Injected: 1", fragment="control characters"),
        NameCase("backslash", "resolver", model="..\\..\\etc", fragment="backslash"),
        NameCase("hidden", "resolver", model=".hidden/x", fragment="must start with a letter or digit"),
        NameCase("three-parts", "resolver", model="a/b/c", fragment="more than one '/'"),
        NameCase("very-long", "resolver", model="x" * 5000, fragment="characters long"),
        NameCase(
            "fullwidth-unicode", "resolver", model="ｇｏｏｄ/ｂａｓｅ", fragment="must start with a letter or digit"
        ),
        NameCase(
            "symlinked-dir",
            "resolver",
            model="hostile/dir-symlink-outside",
            reason="outside_namespace",
            fragment="points outside the tenant's namespace",
        ),
        # load endpoint: lora_path is a path, lora_name a served name
        NameCase(
            "path-dotdot",
            "load",
            lora_name="p-dotdot",
            lora_path=str(root / ".." / outside.name / "evil-adapter"),
            fragment="outside the configured adapter_dirs",
        ),
        NameCase(
            "path-absolute-outside",
            "load",
            lora_name="p-abs",
            lora_path=str(outside_adapter),
            fragment="outside the configured adapter_dirs",
        ),
        NameCase(
            "path-etc", "load", lora_name="p-etc", lora_path="/etc", fragment="outside the configured adapter_dirs"
        ),
        NameCase(
            "path-root", "load", lora_name="p-root", lora_path="/", fragment="outside the configured adapter_dirs"
        ),
        NameCase(
            "path-url-encoded",
            "load",
            lora_name="p-url",
            lora_path="%2e%2e%2f%2e%2e%2fetc",
            reason="not_found",
            status=404,
            fragment="hub sources are disabled",
        ),
        NameCase(
            "path-file-url",
            "load",
            lora_name="p-file-url",
            lora_path="file:///etc/passwd",
            reason="not_found",
            status=404,
            fragment="not a local directory",
        ),
        NameCase(
            "path-hub",
            "load",
            lora_name="p-hub",
            lora_path="hub:evil/repo",
            reason="not_found",
            status=404,
            fragment="not a local directory",
        ),
        NameCase(
            "path-nul",
            "load",
            lora_name="p-nul",
            lora_path=str(good_dir) + "\x00/../../etc",
            fragment="control characters",
        ),
        NameCase(
            "path-nul-relative", "load", lora_name="p-nul-rel", lora_path="good\x00base", fragment="control characters"
        ),
        NameCase("path-very-long", "load", lora_name="p-long", lora_path=long_rel, fragment="too long"),
        NameCase(
            "path-very-long-abs",
            "load",
            lora_name="p-long-abs",
            lora_path=str(root) + "/" + long_rel,
            fragment="too long",
        ),
        NameCase(
            "path-long-component",
            "load",
            lora_name="p-long-comp",
            lora_path="b" * 300,
            reason="not_found",
            status=404,
            fragment="hub sources are disabled",
        ),
        NameCase(
            "path-long-component-abs",
            "load",
            lora_name="p-long-comp-abs",
            lora_path=str(root / ("b" * 300)),
            fragment="not a plain name",
        ),
        NameCase(
            "path-is-file",
            "load",
            lora_name="p-file",
            lora_path=str(good_dir / CONFIG),
            reason="not_found",
            status=404,
            fragment="not a directory",
        ),
        NameCase(
            "path-symlinked-dir",
            "load",
            lora_name="p-symlink",
            lora_path=str(hostile / "dir-symlink-outside"),
            reason="outside_namespace",
            fragment="points outside the tenant's namespace",
        ),
        NameCase("name-nul", "load", lora_name="evil\x00name", lora_path=str(good_dir), fragment="control characters"),
        NameCase(
            "name-newline",
            "load",
            lora_name="evil\nINFO fake log line",
            lora_path=str(good_dir),
            fragment="control characters",
        ),
        NameCase("name-very-long", "load", lora_name="n" * 5000, lora_path=str(good_dir), fragment="characters long"),
    ]
    return Catalogue(
        root=root, outside=outside, marker=marker, dir_cases=dir_cases, name_cases=name_cases, good_dir=good_dir
    )


class _Delete:
    def __repr__(self) -> str:
        return "<delete>"


_DELETE = _Delete()


def served_read_limits(model: Path, max_adapter_bytes: int, dtype: str = "float32"):
    """The ReadLimits a catalogue server (``server_args``) derives from its vLLM config, built
    in-process from the same vLLM config classes (no engine, no plugin), so the in-process
    catalogue refuses exactly as the server does (vLLM's parser, PEFTHelper, dtype, bounds)."""
    import types

    from vllm.config import ModelConfig
    from vllm.config.lora import LoRAConfig

    from vllm_safelora.config import SafeLoRASettings
    from vllm_safelora.integration.vllm_rules import read_limits_for

    model_config = ModelConfig(model=str(model), dtype=dtype, max_model_len=256)
    lora_config = LoRAConfig(max_lora_rank=MAX_LORA_RANK, max_loras=2)
    lora_config.verify_with_model_config(model_config)
    vllm_config = types.SimpleNamespace(model_config=model_config, lora_config=lora_config)
    return read_limits_for(vllm_config, SafeLoRASettings.model_construct(max_adapter_bytes=max_adapter_bytes))


# ----------------------------------------------------------------------------- cache checks


def verify_entry_dir(path: Path) -> str | None:
    """Independent check of one cache entry: None if intact, else what is wrong.

    Re-implements the manifest contract (files listed = files present, sizes, blake3)
    instead of calling the cache, so a bug there cannot hide a torn entry.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / "cache_entry.json").read_bytes())
        files = manifest["files"]
        present = set(os.listdir(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"manifest unreadable: {exc}"
    if present != set(files) | {"cache_entry.json"}:
        return f"files {sorted(present)} != manifest {sorted(files)}"
    if manifest.get("digest") != path.name:
        return "digest != directory name"
    for name, meta in files.items():
        data = (path / name).read_bytes()
        if len(data) != meta["size"] or blake3.blake3(data).hexdigest() != meta["blake3"]:
            return f"{name} does not match its manifest record"
    return None


def entry_dirs(cache_dir: Path) -> set[str]:
    d = Path(cache_dir) / "entries"
    return set(os.listdir(d)) if d.is_dir() else set()


def corrupted_entries(cache_dir: Path) -> dict[str, str]:
    bad = {}
    for name in sorted(entry_dirs(cache_dir)):
        why = verify_entry_dir(Path(cache_dir) / "entries" / name)
        if why is not None:
            bad[name] = why
    return bad


def cache_consistency(cache_dir: Path) -> tuple[int, list[str]]:
    """(number of entries, problems) using the cache's own API: entries() + entry_at()."""
    from vllm_safelora.cache import PatchedAdapterCache

    cache = PatchedAdapterCache(cache_dir, 10 << 30)
    listed = cache.entries()
    problems = []
    on_disk = entry_dirs(cache_dir)
    if {e.digest for e in listed} != on_disk:
        problems.append(f"entries() lists {len(listed)} of {len(on_disk)} directories")
    for e in listed:
        if cache.entry_at(e.path) is None:
            problems.append(f"entry {e.digest[:16]} does not verify")
    problems += [f"{k[:16]}: {v}" for k, v in corrupted_entries(cache_dir).items()]
    return len(on_disk), problems


# ----------------------------------------------------------------------------- reporting


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def shown(s: object, limit: int = 48) -> str:
    text = repr(s) if not isinstance(s, str) or not s.isprintable() else s
    return text if len(text) <= limit else text[: limit - 3] + "..."
