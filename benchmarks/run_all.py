"""Run every benchmark in this folder, one after another (`make benchmarks`).

Each bench_*.py measures ours against a reference in the same run and prints its figures;
benchmarks/README.md keeps the latest ones with the machine they ran on.
"""
import subprocess
import sys
from pathlib import Path

failed = []
for script in sorted(Path(__file__).parent.glob("bench_*.py")):
    print(f"== {script.name}", flush=True)
    if subprocess.run([sys.executable, str(script)]).returncode != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"failed: {', '.join(failed)}")
