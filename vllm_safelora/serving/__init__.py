"""The serving stage: turn a name a request carries into a verified, policy-applied cache entry.

``preparer`` runs one adapter through source -> validation -> tenant policy -> cache, with the
refusal memory and the preparation throttle in front; ``registry`` remembers what vLLM was
handed. ``startup`` builds the sources and checks the bank; ``client_input`` checks names and
paths a client sends. Imports no vLLM: :mod:`vllm_safelora.integration` calls into here.
"""
