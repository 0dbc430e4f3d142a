"""adapter_config.json: parsed within limits, its scaling fields checked, and the PEFT
features vLLM refuses mirrored so that offline tools refuse them too.

This module imports no vLLM.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from collections.abc import Mapping

from ..errors import RefusalReason
from ..errors import Problems
from .limits import ReadLimits
from .names import CONFIG_FILE

# rank_pattern / alpha_pattern keys: module names or suffixes only (see _check_pattern).
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_MAX_PATTERN_KEYS = 1024


def parse_json(data: bytes, what: str, max_depth: int, reason: RefusalReason, problems: Problems, **kw) -> Any:
    """json.loads that refuses instead of raising: RecursionError ('[' * 10**5) is not a ValueError."""
    try:
        value = json.loads(data.decode("utf-8"), **kw)
    except (UnicodeDecodeError, ValueError) as exc:
        problems.add(reason, f"{what} is not valid JSON ({exc})")
        return None
    except RecursionError:
        problems.add(reason, f"{what} nests JSON too deeply")
        return None
    if _json_depth(value, max_depth) > max_depth:
        problems.add(reason, f"{what} nests JSON more than {max_depth} levels deep")
        return None
    return value


def _json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, walked iteratively and cut off just past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_config(data: bytes, limits: ReadLimits, problems: Problems) -> dict[str, Any] | None:
    config = parse_json(data, CONFIG_FILE, limits.max_config_depth, RefusalReason.INVALID_CONFIG, problems)
    if config is None:
        return None
    if not isinstance(config, dict):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE} must hold a JSON object")
        return None
    return config


# r and rank_pattern values where the served --max-lora-rank is not known (offline tools):
# no LoRA rank exceeds a model's width, and this keeps sqrt(r) (rsLoRA) and alpha / r in float range.
MAX_RANK_ANY = 1 << 16


def _is_number(value: Any) -> bool:
    """A finite JSON number, never a bool. Integers are not converted to float: JSON integers
    have any length (a 401-digit one overflows ``math.isfinite``), and comparing them is exact."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def shown_value(value: Any) -> str:
    """A config value for a message: bounded, and an integer too long to print is described."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_config(config: Mapping[str, Any], limits: ReadLimits, problems: Problems) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.add(
            RefusalReason.NOT_LORA, f"{CONFIG_FILE}: peft_type is {shown_value(peft_type)}, only 'LORA' is served"
        )
    _check_scaling_fields(config, limits, problems)
    _check_vllm_features(config, problems)
    if config.get("fan_in_fan_out"):
        problems.add(
            RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: fan_in_fan_out=true (Conv1D layers) is not supported"
        )
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    if limits.check_config is not None and not problems.items:
        # The served vLLM's own validation (PEFTHelper), so the list follows vLLM.
        for problem in limits.check_config(config):
            problems.add(RefusalReason.VLLM_UNSUPPORTED, f"{CONFIG_FILE}: {problem}")


def _check_scaling_fields(config: Mapping[str, Any], limits: ReadLimits, problems: Problems) -> None:
    """r, lora_alpha, use_rslora, rank_pattern, alpha_pattern: what s = alpha / r is made of.

    vLLM requires r and lora_alpha (PEFTHelper has no default for them); PEFT always saves both.
    """
    r = config.get("r")
    max_rank = limits.max_rank if limits.max_rank is not None else MAX_RANK_ANY
    if not _is_rank(r):
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: r must be a positive integer, got {shown_value(r)}")
    elif r > max_rank:
        problems.add(
            RefusalReason.RANK_TOO_LARGE, f"{CONFIG_FILE}: r is {shown_value(r)}, at most {max_rank} is allowed"
        )
    if "lora_alpha" not in config:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: lora_alpha is missing (vLLM requires it)")
    else:
        _check_alpha("lora_alpha", config["lora_alpha"], limits, problems)
    if not isinstance(config.get("use_rslora", False), bool):
        problems.add(
            RefusalReason.INVALID_CONFIG,
            f"{CONFIG_FILE}: use_rslora must be true or false, got {shown_value(config['use_rslora'])}",
        )
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {key} must be an object")
        elif value:
            _check_pattern(key, value, limits, problems)


def _check_alpha(where: str, alpha: Any, limits: ReadLimits, problems: Problems) -> bool:
    if not _is_number(alpha):
        problems.add(
            RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: {where} must be a finite number, got {shown_value(alpha)}"
        )
        return False
    if abs(alpha) > limits.max_lora_alpha:
        problems.add(
            RefusalReason.UPDATE_OVERFLOW,
            f"{CONFIG_FILE}: {where} is {shown_value(alpha)}; this server allows |alpha| <= {limits.max_lora_alpha:g} "
            "(the update is scaled by alpha / r)",
        )
        return False
    return True


# init_lora_weights values that only set initial weights (vLLM's PEFTHelper._init_is_supported).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def _check_vllm_features(config: Mapping[str, Any], problems: Problems) -> None:
    """The PEFT features vLLM 0.32's PEFTHelper refuses, mirrored so offline tools refuse them too.

    At serve time ``ReadLimits.check_config`` runs PEFTHelper itself; this mirror is the
    vLLM-free floor and may only be stricter (tests/test_adapters.py checks both).
    """
    refuse = lambda what: problems.add(RefusalReason.UNSUPPORTED_FEATURE, f"{CONFIG_FILE}: {what}")  # noqa: E731
    if "target_modules" not in config:
        problems.add(RefusalReason.INVALID_CONFIG, f"{CONFIG_FILE}: target_modules is missing (vLLM requires it)")
    if config.get("use_dora"):
        refuse("DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save={shown_value(config['modules_to_save'])} trains full modules that cannot be projected")
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        refuse("trained biases are not supported (bias must be 'none', lora_bias false)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        refuse(
            f"init_lora_weights={shown_value(init)} (PiSSA, OLoRA, CorDA, LoftQ) changes the base weights when PEFT loads it; "
            "convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion"
        )
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            refuse(f"{what} ({key}) is not supported by vLLM")


def _check_pattern(key: str, pattern: Mapping[str, Any], limits: ReadLimits, problems: Problems) -> None:
    """rank_pattern / alpha_pattern keys are matched as regexes (PEFT's rule); a tenant's regex
    could backtrack for hours (``(.|.)*Z``), so only module names / suffixes are accepted."""
    if len(pattern) > _MAX_PATTERN_KEYS:
        problems.add(
            RefusalReason.INVALID_CONFIG,
            f"{CONFIG_FILE}: {key} has {len(pattern)} entries (at most {_MAX_PATTERN_KEYS})",
        )
        return
    for k, v in pattern.items():
        if not _PATTERN_KEY.fullmatch(k):
            problems.add(
                RefusalReason.INVALID_CONFIG,
                f"{CONFIG_FILE}: {key} key {k[:80]!r} must be a module name or suffix (letters, digits, '_', '.', '-', "
                "at most 256 characters); regular-expression operators are not accepted",
            )
            return
        if key == "alpha_pattern":
            if not _check_alpha(f"alpha_pattern[{k!r}]", v, limits, problems):
                return
            continue
        if not _is_rank(v):
            problems.add(
                RefusalReason.INVALID_CONFIG,
                f"{CONFIG_FILE}: rank_pattern[{k!r}] must be a positive integer, got {shown_value(v)}",
            )
            return
        # vLLM checks every rank_pattern value against --max-lora-rank, used or not.
        max_rank = limits.max_rank if limits.max_rank is not None else MAX_RANK_ANY
        if v > max_rank:
            problems.add(
                RefusalReason.RANK_TOO_LARGE,
                f"{CONFIG_FILE}: rank_pattern[{k!r}] is {shown_value(v)}, at most {max_rank} is allowed",
            )
            return


def pattern_value(pattern: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rule: a key matches a module whose path ends with it (as a regex)."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default
