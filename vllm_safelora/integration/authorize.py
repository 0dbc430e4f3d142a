"""Which adapters a caller may name, enforced where vLLM looks a model name up.

Every generation and pooling route asks ``_check_model`` whether a model name is served
before anything else; ``/v1/models`` lists through ``show_available_models``; and every
request that reaches the engine passes ``AsyncLLM.add_request`` (patches.py checks there
again, for routes that skip ``_check_model``). A name the caller may not use is answered
exactly as vLLM answers a name that exists nowhere, decided from the name alone before
any lookup: a tenant cannot tell another tenant's adapter from a missing one.
"""

from __future__ import annotations

import functools
from http import HTTPStatus

from ..serving.access import may_use_in
from . import auth, state


def allowed(name: str | None, settings=None) -> bool:
    settings = settings if settings is not None else state.settings()
    return not name or may_use_in(auth.current(settings), name, settings)


def not_found_message(serving, model: str) -> str:
    """vLLM's own text for an unknown model (serve/engine/serving.py ``_check_model``)."""
    served_names = ", ".join(model.name for model in serving.models.base_model_paths)
    return f"The model `{model}` does not exist. Valid aliases: {served_names}."


def _wrap_engine_check_model(cls) -> None:
    """vLLM: serve/engine/serving.py:BaseServing._check_model answers 404 for a name that is
    neither the base model, a loaded adapter nor resolvable. Wrapped so a name of another
    namespace gets that same 404 before the loaded-adapter table or the resolver is consulted."""
    original = cls._check_model

    @functools.wraps(original)
    async def _check_model(self, request):
        model = getattr(request, "model", None)
        if model and not self._is_model_supported(model) and not allowed(model):
            return self.create_error_response(
                message=not_found_message(self, model),
                err_type="NotFoundError",
                status_code=HTTPStatus.NOT_FOUND,
                param="model",
            )
        return await original(self, request)

    cls._check_model = _check_model


def _wrap_pooling_check_model(cls) -> None:
    """vLLM: pooling/base/serving.py:PoolingBaseServing._check_model returns None for an unknown name
    and lets ``_maybe_get_adapters`` raise VLLMNotFoundError. Wrapped to raise that same error
    for a name of another namespace."""
    original = cls._check_model

    @functools.wraps(original)
    async def _check_model(self, request):
        model = getattr(request, "model", None)
        if model and not self._is_model_supported(model) and not allowed(model):
            from vllm.exceptions import VLLMNotFoundError

            raise VLLMNotFoundError(f"The model `{model}` does not exist.")
        return await original(self, request)

    cls._check_model = _check_model


def _wrap_show_available_models(cls) -> None:
    """vLLM: openai/models/serving.py:OpenAIServingModels.show_available_models lists the base
    model and every loaded adapter, each adapter's ``root`` being the path vLLM loaded it from.
    Wrapped to list only what the caller may use, and to show a tenant its adapter's name as
    the root: with the plugin that path is a cache entry, the server's layout, not the tenant's."""
    original = cls.show_available_models

    @functools.wraps(original)
    async def show_available_models(self):
        listing = await original(self)
        listing.data = [card for card in listing.data if self.is_base_model(card.id) or allowed(card.id)]
        if not auth.current(state.settings()).admin:
            for card in listing.data:
                if not self.is_base_model(card.id):
                    card.root = card.id
        return listing

    cls.show_available_models = show_available_models


def install() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing

    _wrap_engine_check_model(BaseServing)
    _wrap_show_available_models(OpenAIServingModels)
    try:
        from vllm.entrypoints.pooling.base.serving import PoolingBaseServing
    except ImportError:  # a vLLM without pooling routes has nothing to guard there
        return
    _wrap_pooling_check_model(PoolingBaseServing)
