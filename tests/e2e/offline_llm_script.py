"""Run by tests/e2e/test_offline.py in a subprocess with the plugin's environment.

argv: a JSON file with the inputs; writes its results as JSON to the "out" path given
there. Every step records what happened instead of stopping, so the test can report
all of it.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out: dict = {}

    def save() -> None:
        Path(spec["out"]).write_text(json.dumps(out, indent=2))

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=spec["model"],
        enable_lora=True,
        max_lora_rank=spec["max_lora_rank"],
        max_loras=2,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    prompt = {"prompt_token_ids": spec["token_ids"]}

    def generate(lora_request):
        result = llm.generate([prompt], params, lora_request=lora_request, use_tqdm=False)[0].outputs[0]
        return {
            "token_ids": list(result.token_ids),
            "first_top": {str(t): lp.logprob for t, lp in result.logprobs[0].items()},
        }

    # 4. a raw adapter path (under adapter_dirs) in an offline request
    raw = LoRARequest("offline/raw", 1, spec["raw_adapter"])  # served under its location
    out["generate"] = generate(raw)
    out["request_path_after"] = raw.lora_path  # the caller's object is left alone
    from vllm_safelora.integration import state

    loaded = state.service().loaded()
    out["service_loaded"] = {name: str(p.path) for name, p in loaded.items()}
    save()

    def attempt(key, call):
        try:
            value = call()
            out[key] = {"ok": True, "value": repr(value)}
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            out[key] = {
                "ok": False,
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc()[-2000:],
            }
        save()

    # 10a. the front end refuses an unverified path outside adapter_dirs
    attempt("add_lora_outside", lambda: llm.llm_engine.add_lora(LoRARequest("evil", 2, spec["outside_adapter"])))
    # 10b. straight to the engine core (skipping the front end): the worker refuses a
    #      path that is not a cache entry, even one under adapter_dirs
    attempt(
        "core_add_lora_raw", lambda: llm.llm_engine.engine_core.add_lora(LoRARequest("raw", 3, spec["raw_adapter"]))
    )
    # 10c. a forged entry: a copy of a real cache entry outside the cache
    entry = Path(out["service_loaded"]["offline/raw"])
    forged = Path(spec["workdir"]) / "forged-entry" / entry.name
    shutil.copytree(entry, forged)
    attempt("core_add_lora_forged", lambda: llm.llm_engine.engine_core.add_lora(LoRARequest("forged", 4, str(forged))))
    # 10d. a real cache entry altered on disk after it was verified
    weights = entry / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    attempt(
        "core_add_lora_tampered", lambda: llm.llm_engine.engine_core.add_lora(LoRARequest("tampered", 5, str(entry)))
    )
    out["tampered_entry_removed"] = not entry.exists()  # the worker removed it; the front end rebuilds it
    attempt("list_loras", lambda: sorted(llm.llm_engine.list_loras()))
    out["loaded_ids"] = sorted(llm.llm_engine.list_loras())

    # The engine still serves after the refusals.
    out["generate_again"] = generate(LoRARequest("offline/raw", 1, spec["raw_adapter"]))
    out["done"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
