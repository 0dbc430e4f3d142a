"""Every piece of vLLM the plugin wraps, calls or mirrors, and what it relies on in each.

One list, read by two users:

* ``python -m vllm_safelora.integration.qualify`` checks a vLLM release's Python
  sources against it (from a downloaded wheel, without installing or importing it)
  before the release is added to ``compat.QUALIFIED_VLLM_VERSIONS``;
* the version gate (``compat.check_vllm_version``) runs the same check on the
  installed vLLM when an operator overrides the gate for an unqualified version,
  so a vLLM that lacks a hook is refused even then.

A hook is identified by its source file (relative to site-packages) and qualified
name. What is checked: it exists; its parameters (the whole list where our wrapper
has a fixed signature, a prefix or a few names where the wrapper passes
``*args, **kwargs`` through); async or not; the names its body must reference
(the call sites our design depends on, e.g. that ``load_lora_adapter`` still goes
through ``engine_client.add_lora``); and, for code the plugin re-implements line for
line, a digest of its tokens (any edit means our copy must be reviewed).

When vLLM changes a hook, update this list together with the wrapper, then
re-qualify (README: "vLLM versions").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    path: str
    """source file relative to site-packages, e.g. vllm/lora/resolver.py"""
    qualname: str
    """Class, Class.method, function, or a module-level name"""
    why: str
    """what the plugin does with it (shown when it fails)"""
    params: tuple[str, ...] | None = None
    """the exact parameter list (self included), where our wrapper's signature is fixed"""
    leading: tuple[str, ...] = ()
    """parameters that must come first, in this order"""
    has: tuple[str, ...] = ()
    """parameters that must exist somewhere"""
    is_async: bool | None = None
    refs: tuple[str, ...] = ()
    """dotted names the body must reference (call sites we depend on)"""
    fields: tuple[str, ...] = ()
    """class-level fields that must exist (for classes)"""
    digest: str | None = None
    """token digest of code we mirror line for line (qualify.body_digest)"""

    @property
    def key(self) -> str:
        return f"{self.path.removeprefix('vllm/').removesuffix('.py')}:{self.qualname}"


_SERVING = "vllm/entrypoints/openai/models/serving.py"
_INPUT = "vllm/v1/engine/input_processor.py"

HOOKS: tuple[Hook, ...] = (
    # ---- resolver (plugin.py, resolver.py)
    Hook(
        "vllm/lora/resolver.py",
        "LoRAResolver.resolve_lora",
        "our resolver implements it",
        params=("self", "base_model_name", "lora_name"),
        is_async=True,
    ),
    Hook("vllm/lora/resolver.py", "LoRAResolverRegistry", "plugin.py registers the resolver in this singleton"),
    Hook(
        "vllm/lora/resolver.py",
        "_LoRAResolverRegistry",
        "plugin.py reorders .resolvers to put ours first",
        fields=("resolvers",),
    ),
    Hook(
        "vllm/lora/resolver.py",
        "_LoRAResolverRegistry.register_resolver",
        "plugin.py registers our resolver",
        params=("self", "resolver_name", "resolver"),
    ),
    Hook(
        "vllm/lora/resolver.py",
        "_LoRAResolverRegistry.get_supported_resolvers",
        "plugin.py: registered once",
        params=("self",),
    ),
    Hook(
        _SERVING,
        "OpenAIServingModels.__init__",
        "the serving layer copies the registry at start-up, in order",
        refs=("LoRAResolverRegistry.get_supported_resolvers", "LoRAResolverRegistry.get_resolver"),
    ),
    Hook(
        _SERVING,
        "OpenAIServingModels.resolve_lora",
        "resolved adapters are loaded through engine add_lora; wrapped: unloads names dropped from the bounded listing",
        params=("self", "lora_name"),
        is_async=True,
        refs=("self.engine_client.add_lora",),
    ),
    Hook(
        _SERVING,
        "OpenAIServingModels._check_load_lora_adapter_request",
        "the load wrapper runs vLLM's own checks before projecting",
        params=("self", "request"),
        is_async=True,
    ),
    # ---- load endpoint and static --lora-modules (patches.py)
    Hook(
        _SERVING,
        "OpenAIServingModels.load_lora_adapter",
        "wrapped: projects, answers refusals with a 4xx",
        params=("self", "request", "base_model_name"),
        is_async=True,
        refs=("self.engine_client.add_lora",),
    ),
    Hook(
        _SERVING,
        "OpenAIServingModels.unload_lora_adapter",
        "wrapped: forgets the adapter",
        params=("self", "request"),
        is_async=True,
    ),
    Hook(
        _SERVING,
        "OpenAIServingModels.init_static_loras",
        "--lora-modules go through load_lora_adapter; wrapped: their labels are the operator's",
        is_async=True,
        refs=("self.load_lora_adapter",),
    ),
    # ---- who may name which adapter (authorize.py)
    Hook(
        "vllm/entrypoints/serve/engine/serving.py",
        "BaseServing._check_model",
        "wrapped: another tenant's adapter gets vLLM's own 404 before the adapter table or the resolver is asked",
        params=("self", "request"),
        is_async=True,
        refs=("self.models.resolve_lora", "self._is_model_supported"),
    ),
    Hook(
        "vllm/entrypoints/pooling/base/serving.py",
        "PoolingBaseServing._check_model",
        "wrapped: the same for pooling routes",
        params=("self", "request"),
        is_async=True,
    ),
    Hook(
        _SERVING,
        "OpenAIServingModels.show_available_models",
        "wrapped: /v1/models lists what the caller may use",
        params=("self",),
        is_async=True,
    ),
    # ---- engines (patches.py)
    Hook(
        "vllm/v1/engine/async_llm.py",
        "AsyncLLM.add_lora",
        "wrapped: every explicit online load",
        params=("self", "lora_request"),
        is_async=True,
    ),
    Hook(
        "vllm/v1/engine/llm_engine.py",
        "LLMEngine.add_lora",
        "wrapped: every explicit offline load",
        params=("self", "lora_request"),
        is_async=False,
    ),
    Hook(
        "vllm/v1/engine/async_llm.py",
        "AsyncLLM.add_request",
        "wrapped: checks (rebuilds) every online request's adapter off the event loop; then process_inputs",
        leading=("self",),
        has=("lora_request", "prompt"),
        is_async=True,
        refs=("self.input_processor.process_inputs",),
    ),
    Hook(
        "vllm/v1/engine/async_llm.py",
        "AsyncLLM.generate",
        "wrapped: a request whose entry the worker removed mid-request fails instead of answering without the adapter",
        leading=("self",),
        has=("lora_request", "request_id"),
        is_async=True,
        refs=("self.add_request",),
    ),
    Hook(
        "vllm/v1/engine/async_llm.py",
        "AsyncLLM.remove_lora",
        "add_request wrapper: reload a rebuilt entry",
        params=("self", "lora_id"),
        is_async=True,
    ),
    Hook(
        "vllm/v1/engine/llm_engine.py",
        "LLMEngine.add_request",
        "offline requests pass process_inputs",
        refs=("self.input_processor.process_inputs",),
    ),
    Hook(
        _INPUT,
        "InputProcessor.__init__",
        "wrapped: starts the service once the served model is known",
        leading=("self", "vllm_config"),
        is_async=False,
        refs=("self.process_inputs",),
    ),
    Hook(
        _INPUT,
        "InputProcessor.process_inputs",
        "wrapped: rewrites lora_path to the verified cache entry",
        leading=("self",),
        has=("lora_request",),
        is_async=False,
    ),
    # ---- worker guard (patches.py)
    Hook(
        "vllm/lora/worker_manager.py",
        "WorkerLoRAManager._load_adapter",
        "wrapped: only intact cache entries load",
        params=("self", "lora_request"),
        is_async=False,
        refs=("PEFTHelper.from_local_dir", "self._lora_model_cls.from_local_checkpoint"),
    ),
    Hook(
        "vllm/lora/lora_model.py",
        "LoRAModel.from_local_checkpoint",
        "worker guard: its safetensors.safe_open "
        "of the entry's weights is answered from the bytes the guard verified (verified_read.py)",
        leading=("cls", "lora_dir"),
        is_async=False,
        refs=("safetensors.safe_open", "f.get_tensor", "f.keys"),
    ),
    Hook(
        "vllm/lora/worker_manager.py",
        "WorkerLoRAManager.set_active_adapters",
        "wrapped: marks lazy loads inside execute_model, where the guard must not raise",
        leading=("self",),
        is_async=False,
        refs=("self._apply_adapters",),
    ),
    Hook(
        "vllm/lora/model_manager.py",
        "LoRAModelManager.create_dummy_lora",
        "an altered entry inside execute_model loads vLLM's zero-initialised adapter instead of raising",
        leading=("self", "lora_id", "rank"),
    ),
    Hook(
        "vllm/lora/ops/torch_ops/lora_ops.py",
        "bgmv_shrink",
        "lora_isolation zeroes rows with index -1",
        leading=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"),
    ),
    Hook(
        "vllm/lora/ops/torch_ops/lora_ops.py",
        "bgmv_expand",
        "lora_isolation zeroes rows with index -1",
        leading=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"),
    ),
    Hook(
        "vllm/lora/ops/torch_ops/lora_ops.py",
        "bgmv_expand_slice",
        "lora_isolation zeroes rows with index -1",
        leading=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"),
    ),
    Hook(
        "vllm/distributed/parallel_state.py",
        "get_tensor_model_parallel_rank",
        "worker guard logs each verified load with its tensor-parallel rank",
        params=(),
    ),
    # ---- what the reader asks vLLM (integration/vllm_rules.py) or mirrors (adapters/)
    Hook(
        "vllm/lora/peft_helper.py",
        "PEFTHelper.from_dict",
        "vllm_rules: vLLM's own adapter_config checks",
        params=("cls", "config_dict"),
    ),
    Hook(
        "vllm/lora/peft_helper.py",
        "PEFTHelper.validate_legal",
        "vllm_rules: vLLM's own adapter_config checks",
        params=("self", "lora_config"),
    ),
    Hook(
        "vllm/lora/peft_helper.py",
        "PEFTHelper._validate_features",
        "adapters/validate.py refuses what vLLM refuses",
        params=("self",),
        digest="fb8b0865f7cbc1c8",
    ),
    Hook(
        "vllm/lora/utils.py",
        "parse_fine_tuned_lora_name",
        "adapters/names.py maps tensor names as vLLM does",
        params=("name", "weights_mapper"),
        digest="16c2139ed37dfeee",
    ),
    Hook(
        "vllm/lora/utils.py",
        "is_in_target_modules",
        "vllm_rules: --lora-target-modules filter",
        params=("module_name", "target_modules", "packed_modules_mapping"),
    ),
    Hook(
        "vllm/model_executor/model_loader/__init__.py",
        "get_model_architecture",
        "vllm_rules: the model's weights mapper",
    ),
    Hook(
        "vllm/lora/request.py",
        "LoRARequest",
        "patches.py rewrites lora_path (msgspec struct)",
        fields=("lora_name", "lora_int_id", "lora_path"),
    ),
    # ---- errors (integration/http_errors.py)
    Hook("vllm/exceptions.py", "GracefulHTTPError", "refusals keep their status and message"),
    Hook(
        "vllm/entrypoints/serve/exception_handling/error_response.py",
        "create_error_response",
        "load endpoint refusals as ErrorResponse",
        leading=("message",),
    ),
)
