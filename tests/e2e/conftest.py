"""End-to-end fixtures: a real vLLM OpenAI server (subprocess) with the safelora plugin.

Builds on the session fixtures of ``tests/conftest.py`` (tiny models, bank, adapter
factory) and adds, all session-scoped:

``e2e_world``      :class:`E2EWorld`: an ``adapter_dirs`` root with one adapter per test
                   scenario (distinct contents, so cache hits/misses of one test never come
                   from another), an offline-projected copy made with ``vllm-safelora project``,
                   refused adapters (NaN, other base model) and a mixed adapter for admission.
``peft_reference`` :class:`PeftReference`: greedy next-token logprobs / greedy continuations
                   computed in-process with transformers + peft on the tiny aligned model
                   (the ground truth the served adapters are compared against).
``vllm_server_factory``  starts servers (``tests/support/server.py``, the one harness of the tests
                   and benchmarks); every server it started is stopped (whole process tree) at
                   the end of the session.

``e2e``            a namespace of helpers (completions through the openai client or plain HTTP,
                   returning token ids and top logprobs; Prometheus parsing; process helpers),
                   so test modules never import this conftest.

Server logs are files in the servers' work directory; start-up failures print their tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import pytest
import torch
from support.server import (
    MAX_LORA_RANK,
    PROMPT_TEXT,
    Metrics,
    Server,
    free_port,
    new_server,
    plugin_env,
    run_to_exit,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each scenario gets its own adapter content (seed), so cache hits in one test never
# come from another test's loads. "random" adapters have low Safe LoRA cosines (about
# 0.1-0.2) and are projected by the threshold policy, and their projection keeps a
# visible part of the update (it moves next-token logprobs by ~0.07 from the plain
# model): "projected", "unprojected" and "no adapter at all" are all told apart.
# "orthogonal" adapters (cosines ~0.01) project to almost nothing: served, they behave
# like the plain aligned model.
ADAPTERS = {
    # name under adapter_dirs: (direction, seed)
    "acme/aligned": ("aligned", 0),  # high cosine: served unchanged
    "globex/ortho": ("orthogonal", 0),  # lowest cosine: projected (resolver path, audit)
    "globex/random": ("random", 0),  # low cosine: projected (resolver path)
    "loadme/lora": ("random", 1),  # load endpoint path
    "static/lora": ("random", 2),  # --lora-modules path
    "cachet/one": ("random", 3),  # cache: same content under two names ...
    "cachet2/one": ("random", 3),  # ... (a copy of the directory)
    "swap/lora": ("random", 5),  # re-uploaded with other content (SWAP_REPLACEMENT) after unload
    "metrics/lora": ("random", 7),  # a fresh projection observed by the metrics test
    "offline/raw": ("random", 8),  # the offline LLM run's raw adapter
    "admit/ortho": ("orthogonal", 9),  # admission server: 100% of modules projected -> refused
}
# Names whose CLI-projected copy (`vllm-safelora project`) is placed under adapter_dirs.
CLI_PROJECTED = ("globex/ortho", "globex/random")
SWAP_REPLACEMENT = ("random", 6)


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def vllm_server_factory(tmp_path_factory):
    """``start(name, model, config, extra_args=(), env=None)`` -> a running ``support.server.Server``;
    every server it started is stopped (whole process tree) at teardown."""
    started: list[Server] = []
    root = tmp_path_factory.mktemp("vllm_servers")

    def start(
        name: str, model: Path, config: Path | None, extra_args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> Server:
        server = new_server(name, model, config, root, extra_args, env)
        started.append(server)
        return server.start().wait_ready()

    yield start
    for server in started:
        server.stop()


# ----------------------------------------------------------------------------- the world


@dataclass
class E2EWorld:
    root: Path
    aligned: Path  # served model
    base: Path
    bank: Path
    adapter_root: Path  # the configured adapter_dirs entry
    outside_root: Path  # adapters NOT under adapter_dirs
    adapters: dict[str, Path]  # name -> raw adapter dir under adapter_root
    cli_projected: dict[str, Path]  # name -> `vllm-safelora project` output, under adapter_root
    swap_replacement: Path  # other content for swap/ortho (outside adapter_root until swapped in)
    outside_adapter: Path  # a valid adapter outside adapter_dirs
    nan_name: str
    other_base_name: str
    mixed_name: str  # q_proj random + v_proj aligned: 50% of modules projected
    other_bank: Path  # a bank for another tiny model (seed 1)
    token_ids: list[int]  # prompt (BOS included)
    policy: dict = field(default_factory=lambda: {"select": "threshold", "threshold": 0.35})

    def config(self, path: Path, cache_dir: Path, *, admission: dict | None = None, bank: Path | None = None) -> Path:
        import yaml

        doc = {
            "bank": str(bank or self.bank),
            "adapter_dirs": [str(self.adapter_root)],
            "cache_dir": str(cache_dir),
            "device": "cpu",
            "policy": dict(self.policy),
            "admission": admission or {"max_projected_fraction": None, "min_cosine": None},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def load_bank(self):
        from vllm_safelora.bank import load_bank

        return load_bank(self.bank, "cpu")

    def projected(self, name: str, src: Path | None = None) -> Path:
        """adapters[name] projected with the Python API (same bank and policy as the servers),
        written once to ``root/projected/<name>`` (outside adapter_dirs)."""
        from vllm_safelora.adapters import read_adapter
        from vllm_safelora.apply_policy import project_adapter, write_projected
        from vllm_safelora.policies import SafeLoRAConfig

        out = self.root / "projected" / name
        if not out.exists():
            adapter = read_adapter(src or self.adapters[name], name=name)
            outcome = project_adapter(adapter, self.load_bank(), SafeLoRAConfig(**self.policy), name=name)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_projected(outcome, out)
        return out

    def offline_report(self, name: str):
        """What the offline engine says about adapters[name] (same bank, same policy)."""
        from vllm_safelora.adapters import read_adapter
        from vllm_safelora.apply_policy import project_adapter
        from vllm_safelora.policies import SafeLoRAConfig

        adapter = read_adapter(self.adapters[name], name=name)
        return project_adapter(adapter, self.load_bank(), SafeLoRAConfig(**self.policy), name=name).report


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("vllm-safelora")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm_safelora.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def _rewrite_tensors(src: Path, dest: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    st = dest / "adapter_model.safetensors"
    tensors = load_file(str(st))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(st), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="session")
def e2e_world(tiny_models, tiny_bank_dir, tiny_adapter_factory, tmp_path_factory) -> E2EWorld:
    from transformers import AutoTokenizer

    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("e2e_world")
    adapter_root = root / "adapters"
    outside_root = root / "outside"
    adapter_root.mkdir()
    outside_root.mkdir()
    adapters: dict[str, Path] = {}
    for name, (direction, seed) in ADAPTERS.items():
        adapters[name] = tiny_adapter_factory.copy_to(adapter_root / name, direction, seed=seed)

    direction, seed = SWAP_REPLACEMENT
    swap_replacement = tiny_adapter_factory.copy_to(outside_root / "swap-replacement", direction, seed=seed)
    outside_adapter = tiny_adapter_factory.copy_to(outside_root / "evil", "random", seed=0)

    # Refused adapters.
    def poison(tensors):
        key = sorted(k for k in tensors if "lora_B" in k)[0]
        tensors[key][0, 0] = float("nan")

    nan_name = "bad/nan"
    adapters[nan_name] = _rewrite_tensors(tiny_adapter_factory("random", seed=10), adapter_root / nan_name, poison)
    other_base_name = "bad/otherbase"
    other = tiny_adapter_factory.copy_to(adapter_root / other_base_name, "random", seed=11)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/models/some-other-llama"
    (other / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    adapters[other_base_name] = other

    # Mixed adapter: q_proj from a random adapter (projected), v_proj from an aligned
    # one (kept): 2 of 4 modules projected, exactly at an admission limit of 0.5.
    mixed_name = "admit/mixed"
    aligned_src = tiny_adapter_factory("aligned", seed=12)
    from safetensors.torch import load_file

    aligned_tensors = load_file(str(aligned_src / "adapter_model.safetensors"))

    def mix(tensors):
        for k in list(tensors):
            if ".v_proj." in k:
                tensors[k] = aligned_tensors[k].clone()

    adapters[mixed_name] = _rewrite_tensors(tiny_adapter_factory("random", seed=12), adapter_root / mixed_name, mix)

    # Offline-projected copies made by the CLI, placed under adapter_dirs so the load
    # endpoint accepts their paths.
    cli_projected = {name: adapter_root / "offline-projected" / name.replace("/", "-") for name in CLI_PROJECTED}
    with ThreadPoolExecutor(max_workers=len(cli_projected)) as pool:  # the CLI runs in subprocesses
        runs = list(
            pool.map(
                lambda item: _cli(
                    "project",
                    str(adapters[item[0]]),
                    "--bank",
                    str(tiny_bank_dir),
                    "--out",
                    str(item[1]),
                    "--select",
                    "threshold",
                    "--threshold",
                    "0.35",
                ),
                cli_projected.items(),
            )
        )
    for res in runs:
        assert res.returncode == 0, f"vllm-safelora project failed:\n{res.stdout}\n{res.stderr}"

    # A bank for another model (different seed), for the fail-closed start-up test.
    from vllm_safelora.bank import build_bank
    from vllm_safelora.tiny import make_tiny_models

    others = make_tiny_models(root / "other_models", seed=1)
    other_bank = root / "other_bank"
    build_bank(str(others.base), str(others.aligned), other_bank, progress=None)

    tok = AutoTokenizer.from_pretrained(str(tiny_models.aligned))
    token_ids = list(tok(PROMPT_TEXT)["input_ids"])
    assert token_ids[0] == tok.bos_token_id
    print(f"\n[e2e] adapters, CLI projections and the second bank built in {time.monotonic() - t0:.1f}s")

    return E2EWorld(
        root=root,
        aligned=tiny_models.aligned,
        base=tiny_models.base,
        bank=tiny_bank_dir,
        adapter_root=adapter_root,
        outside_root=outside_root,
        adapters=adapters,
        cli_projected=cli_projected,
        swap_replacement=swap_replacement,
        outside_adapter=outside_adapter,
        nan_name=nan_name,
        other_base_name=other_base_name,
        mixed_name=mixed_name,
        other_bank=other_bank,
        token_ids=token_ids,
    )


# ----------------------------------------------------------------------------- reference


class PeftReference:
    """Ground truth from transformers + peft on the aligned model (float32, CPU)."""

    def __init__(self, model_dir: Path, token_ids: list[int]):
        from transformers import AutoModelForCausalLM

        self.model_dir = model_dir
        self.token_ids = token_ids
        self.base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self._cache: dict[tuple, object] = {}

    def _model(self, adapter: Path | None):
        from peft import PeftModel

        if adapter is None:
            return contextlib.nullcontext(self.base)

        @contextlib.contextmanager
        def cm():
            peft_model = PeftModel.from_pretrained(self.base, str(adapter), is_trainable=False).eval()
            try:
                yield peft_model
            finally:
                # Detach the LoRA layers again so self.base stays the plain model.
                self.base = peft_model.unload()

        return cm()

    def next_token_logprobs(self, adapter: Path | None) -> torch.Tensor:
        """log_softmax of the next-token logits after the prompt (vocab,), float64."""
        key = ("lp", str(adapter))
        if key not in self._cache:
            with self._model(adapter) as model, torch.no_grad():
                logits = model(input_ids=torch.tensor([self.token_ids])).logits[0, -1].double()
            self._cache[key] = torch.log_softmax(logits, dim=-1)
        return self._cache[key]

    def greedy(self, adapter: Path | None, max_tokens: int = 8) -> list[int]:
        key = ("greedy", str(adapter), max_tokens)
        if key not in self._cache:
            ids = list(self.token_ids)
            with self._model(adapter) as model, torch.no_grad():
                for _ in range(max_tokens):
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                    ids.append(int(torch.argmax(logits)))
            self._cache[key] = ids[len(self.token_ids) :]
        return self._cache[key]


@pytest.fixture(scope="session")
def peft_reference(e2e_world) -> PeftReference:
    return PeftReference(e2e_world.aligned, e2e_world.token_ids)


# ----------------------------------------------------------------------------- completions


def parse_token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.split(":", 1)[1])


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    top_logprobs: list[dict[int, float]]  # per generated position: token id -> logprob

    @property
    def first_top(self) -> dict[int, float]:
        return self.top_logprobs[0]


def complete(
    server: Server, model: str, prompt_ids: list[int], *, max_tokens: int = 8, logprobs: int = 5
) -> Completion:
    """Greedy completion through the real openai client; tokens returned as ids."""
    resp = server.openai().completions.create(
        model=model,
        prompt=prompt_ids,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=logprobs,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    return Completion(
        token_ids=[parse_token_id(t) for t in lp.tokens],
        text=choice.text,
        top_logprobs=[{parse_token_id(t): v for t, v in top.items()} for top in lp.top_logprobs],
    )


def complete_http(
    server: Server,
    model: str,
    prompt_ids: list[int],
    *,
    max_tokens: int = 8,
    logprobs: int = 5,
    headers: dict[str, str] | None = None,
):
    """The same through plain HTTP (requests); returns the response object. ``headers``: instead of the
    server's own (a router's routing key)."""
    return server.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": logprobs,
            "return_tokens_as_token_ids": True,
            "ignore_eos": True,
        },
        **({} if headers is None else {"headers": headers}),
    )


def completion_from_json(body: dict) -> Completion:
    choice = body["choices"][0]
    lp = choice["logprobs"]
    return Completion(
        token_ids=[parse_token_id(t) for t in lp["tokens"]],
        text=choice["text"],
        top_logprobs=[{parse_token_id(t): v for t, v in top.items()} for top in lp["top_logprobs"]],
    )


def max_logprob_gap(top: dict[int, float], reference: torch.Tensor) -> float:
    """Largest |served - reference| over the served top-k tokens."""
    return max(abs(v - float(reference[t])) for t, v in top.items())


def assert_matches_reference(top: dict[int, float], reference: torch.Tensor, tol: float = 1e-3, what: str = "") -> None:
    ref_top = torch.topk(reference, k=len(top)).indices.tolist()
    assert set(top) == set(ref_top), f"{what}: served top tokens {sorted(top)} != reference {sorted(ref_top)}"
    gap = max_logprob_gap(top, reference)
    assert gap < tol, f"{what}: served logprobs differ from the reference by {gap:.2e} (tolerance {tol})"


def run_in_log_dir(cmd: Sequence[str], env: dict, log: Path, timeout_s: float) -> tuple[int | None, str]:
    """launcher.run_to_exit with the log's directory as the working directory."""
    return run_to_exit(cmd, env, log, timeout_s, cwd=Path(log).parent)


def cache_entries(cache_dir: Path) -> set[str]:
    d = Path(cache_dir) / "entries"
    return set(os.listdir(d)) if d.is_dir() else set()


class E2EHelpers:
    """Namespace handed to tests (so test modules need not import conftest)."""

    complete = staticmethod(complete)
    complete_http = staticmethod(complete_http)
    completion_from_json = staticmethod(completion_from_json)
    assert_matches_reference = staticmethod(assert_matches_reference)
    max_logprob_gap = staticmethod(max_logprob_gap)
    cache_entries = staticmethod(cache_entries)
    run_to_exit = staticmethod(run_in_log_dir)
    plugin_env = staticmethod(plugin_env)
    free_port = staticmethod(free_port)
    Metrics = Metrics
    MAX_LORA_RANK = MAX_LORA_RANK


@pytest.fixture(scope="session")
def e2e() -> type[E2EHelpers]:
    return E2EHelpers
