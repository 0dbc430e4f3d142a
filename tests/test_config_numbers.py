"""Every numeric adapter_config.json field is checked without raising: integers of any length,
floats (JSON's 1e400 is inf), bools, strings where a number belongs. Offline (the reader's
defaults, and ``vllm-safelora project``) and with the served limits alike, a refusal names the
field and no other exception escapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_safelora.adapters import CONFIG_FILE, ReadLimits, read_adapter
from vllm_safelora.cli import EXIT_REFUSED, main
from vllm_safelora.errors import AdapterRefused, RefusalReason

BIG = 10**400  # 401 digits
# JSON text of each value (what a tenant writes), not Python objects: 1e400 and NaN only exist as text.
VALUES = {
    "401-digit": str(BIG),
    "minus-401-digit": str(-BIG),
    "2^64": str(2**64),
    "1e400": "1e400",
    "-1e400": "-1e400",
    "NaN": "NaN",
    "Infinity": "Infinity",
    "true": "true",
    "false": "false",
    "float-rank": "8.0",
    "string": '"8"',
    "zero": "0",
    "negative": "-1",
    "null": "null",
    "list": "[8]",
}
# field -> where it sits in the config, and the values it accepts (everything else is refused)
FIELDS = {
    "r": (("r",), {"float-rank": False}),
    "lora_alpha": (("lora_alpha",), {"float-rank": True, "zero": True, "negative": True}),
    "alpha_pattern": (("alpha_pattern", "q_proj"), {"float-rank": True, "zero": True, "negative": True}),
    "rank_pattern": (("rank_pattern", "q_proj"), {}),
    "use_rslora": (("use_rslora",), {"true": None, "false": True}),
}


def _config_text(template: Path, path: tuple[str, ...], value_text: str) -> bytes:
    """The template's config with ``path`` set to the raw JSON ``value_text``."""
    config = json.loads((template / CONFIG_FILE).read_text())
    marker = "__NUMBER_UNDER_TEST__"
    if len(path) == 1:
        config[path[0]] = marker
    else:
        config[path[0]] = {path[1]: marker}
    return json.dumps(config).replace(f'"{marker}"', value_text).encode()


def _adapter(tmp_path: Path, template: Path, field: str, value: str) -> Path:
    d = tmp_path / f"{field}-{value}"
    d.mkdir()
    for f in template.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / CONFIG_FILE).write_bytes(_config_text(template, FIELDS[field][0], VALUES[value]))
    return d


@pytest.mark.parametrize("limits", [ReadLimits(), ReadLimits(max_rank=8)], ids=["offline", "served"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("field", list(FIELDS))
def test_a_numeric_field_is_refused_by_name_never_raised(tmp_path, tiny_adapter_random, field, value, limits):
    accepted = FIELDS[field][1].get(value, False)
    d = _adapter(tmp_path, tiny_adapter_random, field, value)
    try:
        read_adapter(d, limits=limits)
    except AdapterRefused as exc:
        assert accepted is not True, f"{field}={value} should be accepted: {exc}"
        assert field in exc.detail, exc.detail
        assert exc.reason in (
            RefusalReason.INVALID_CONFIG,
            RefusalReason.RANK_TOO_LARGE,
            RefusalReason.UPDATE_OVERFLOW,
            RefusalReason.RANK_MISMATCH,
        ), exc
        assert len(exc.detail) < 2000 and str(BIG)[:40] not in exc.detail, "the message echoes the huge number"
    else:
        # use_rslora: true is a valid config (it only changes the scale), rank 8 stays in range
        assert accepted is not False, f"{field}={value} was accepted"


def test_project_refuses_a_401_digit_alpha_offline(tmp_path, tiny_adapter_random, tiny_bank_dir, capsys):
    d = _adapter(tmp_path, tiny_adapter_random, "lora_alpha", "401-digit")
    code = main(["project", str(d), "--bank", str(tiny_bank_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_REFUSED, err
    assert "lora_alpha" in err and "update_overflow" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
