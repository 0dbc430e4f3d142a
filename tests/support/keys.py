"""API keys for tests, issued by the real command line, as an operator issues them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def issue_key(keys_file: Path, name: str, admin: bool = False) -> str:
    cmd = [sys.executable, "-m", "vllm_safelora.cli", "issue-key", name, "--keys-file", str(keys_file)]
    if admin:
        cmd.insert(4, "--admin")
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
