"""vLLM integration: plugin entry point, resolver, load-path guards, audit routes.

Nothing here does math; everything here calls :mod:`vllm_safelora.serving.service`.
Importing this package must stay cheap and must not import vLLM: vLLM imports
plugin entry points in every process and silently skips one whose import fails.
"""
