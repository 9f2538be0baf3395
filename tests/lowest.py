"""The lowest versions requirements.txt admits, proven: install each range's floor into a
virtual environment of its own, then run the tests there.

    .venv/bin/python -m tests.lowest [pytest arguments]

The floors come from requirements.txt itself (`name>=X` installs `name==X`), so the file
cannot promise a version that is never tested. numpy, which pandas brings, gets the lowest
release its floor accepts on this Python. Only wheels are installed: a floor that would
need a compiler here is no floor a Raspberry Pi user meets either. The soak and the
year-long dashboard tests are left out (they prove nothing version-specific and take long).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lowest"
NUMPY_FLOOR = {(3, 11): "1.23.2", (3, 12): "1.26.0", (3, 13): "2.1.0"}  # the first numpy with wheels for each Python
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "pendulum>=3"]
LEFT_OUT = ["--deselect", "tests/test_soak.py", "--deselect", "tests/test_dashboard.py"]


def floors(requirements: str) -> list[str]:
    """`name==X` for each `name>=X` range of the requirements text."""
    pins = []
    for line in requirements.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        found = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][^,\s]*)(,.*)?", line)
        if not found:
            raise SystemExit(f"lowest: {line!r} has no >= floor to test")
        pins.append(f"{found[1]}=={found[2]}")
    return pins


def main(argv: list[str] | None = None) -> int:
    pins = floors((ROOT / "requirements.txt").read_text())
    pins.append(f"numpy=={NUMPY_FLOOR[sys.version_info[:2]]}")
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--only-binary=:all:", *pins, *TEST_TOOLS], check=True)
    installed = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.split()
    names = {pin.split("==")[0].lower() for pin in pins}
    print("lowest: " + ", ".join(p for p in installed if p.split("==")[0].lower() in names), flush=True)
    return subprocess.run([str(python), "-m", "pytest", *LEFT_OUT, *(argv or [])], cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
