"""LoRA resolver: a request naming an unknown model -> the patched adapter from the configured sources."""

from __future__ import annotations

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from ..errors import AdapterRefused, Overloaded, RefusalReason
from . import state
from .http_errors import to_http_error

RESOLVER_NAME = "safelora"


class SafeLoRAResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        svc = state.service()
        if svc is None:
            return None
        try:
            prepared = await state.off_loop(svc.prepare, lora_name)
        except AdapterRefused as exc:
            if exc.reason is RefusalReason.NOT_FOUND:
                return None  # vLLM answers 404 "model does not exist"
            raise to_http_error(exc) from None
        except Overloaded as exc:
            raise to_http_error(exc) from None
        # vLLM assigns the real lora_int_id after we return.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(prepared.path))
