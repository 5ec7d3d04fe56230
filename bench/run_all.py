"""`make bench`: every benchmark, one after the other, printing measured numbers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

for script in ("stage_one.py", "stage_two.py", "finetune_kernel.py"):
    print(f"\n=== bench/{script} ===", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
