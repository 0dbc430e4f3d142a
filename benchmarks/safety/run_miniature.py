"""``.venv/bin/python benchmarks/safety/run_miniature.py [--smoke]``: same as ``python -m benchmarks.safety.miniature``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.safety.miniature import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
