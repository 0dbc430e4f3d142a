"""The integration's pure functions, without vLLM: the HTTP status of a refusal and the version gate.

Both decide what a client or an operator sees, and neither needs a server to check.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import pytest

from vllm_safelora.errors import AdapterRefused, ConfigError, Overloaded, RefusalReason
from vllm_safelora.integration import compat
from vllm_safelora.integration.http_errors import http_status

SPECIFIC = {
    RefusalReason.NOT_FOUND: HTTPStatus.NOT_FOUND,
    RefusalReason.TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    RefusalReason.ADMISSION: HTTPStatus.FORBIDDEN,
    RefusalReason.NAME_IN_USE: HTTPStatus.CONFLICT,
}


@pytest.mark.parametrize("reason", list(RefusalReason))
def test_every_refusal_is_the_clients_error(reason):
    """A refused adapter is the tenant's to fix: a 4xx, never a 5xx a client or balancer would retry."""
    status = http_status(AdapterRefused(reason, "detail", "t/a"))
    assert 400 <= status < 500, (reason, status)
    assert status == SPECIFIC.get(reason, HTTPStatus.BAD_REQUEST)


def test_overloaded_is_a_retryable_503():
    """Busy preparing other adapters: 503, the status load balancers and SDKs retry (as vLLM's queue overflow)."""
    assert http_status(Overloaded("3 preparing", retry_after_s=1.0)) == HTTPStatus.SERVICE_UNAVAILABLE


def _no_hook_check(monkeypatch):
    monkeypatch.setattr(compat, "installed_hook_problems", lambda: pytest.fail("the installed hooks were checked"))


def test_qualified_versions_pass_without_checking_hooks(monkeypatch, caplog):
    _no_hook_check(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="vllm_safelora"):
        for version in compat.QUALIFIED_VLLM_VERSIONS:
            compat.check_vllm_version(version, allow_untested=False)
            compat.check_vllm_version(version, allow_untested=True)
    assert caplog.text == ""


@pytest.mark.parametrize("version", ["0.31.0", "0.32.1", "0.32", "0.33.0rc1", "1.0.0"])
def test_other_versions_are_refused_with_the_way_out(monkeypatch, version):
    """Exact match only (a patch release may move a hook), and the message says what to do."""
    _no_hook_check(monkeypatch)
    with pytest.raises(ConfigError) as info:
        compat.check_vllm_version(version, allow_untested=False)
    message = str(info.value)
    assert f"this is vLLM {version}" in message
    assert all(v in message for v in compat.QUALIFIED_VLLM_VERSIONS)
    assert "VLLM_SAFELORA_ALLOW_UNTESTED_VLLM=true" in message and "vllm_safelora.integration.qualify" in message


def test_override_refuses_when_hooks_do_not_match(monkeypatch):
    monkeypatch.setattr(compat, "installed_hook_problems", lambda: ["LLMEngine.add_lora: parameters changed"])
    with pytest.raises(ConfigError, match="cannot help.*LLMEngine.add_lora: parameters changed"):
        compat.check_vllm_version("0.34.0", allow_untested=True)


def test_override_with_matching_hooks_only_warns(monkeypatch, caplog):
    monkeypatch.setattr(compat, "installed_hook_problems", lambda: [])
    with caplog.at_level(logging.WARNING, logger="vllm_safelora"):
        compat.check_vllm_version("0.34.0", allow_untested=True)
    assert "UNTESTED vLLM VERSION" in caplog.text and "this is vLLM 0.34.0" in caplog.text
