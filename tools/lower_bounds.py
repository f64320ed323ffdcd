"""Print pip constraints that pin every dependency of pyproject.toml (and the extras named on the
command line) to its declared lower bound: `make test-oldest` installs with them.

    python tools/lower_bounds.py test hub > .venv-oldest/constraints.txt

torch is left out: it is installed first, from TORCH_SPEC, like in every other target.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def lower_bounds(extras: list[str]) -> list[str]:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+).*", requirement)
        if match and match.group(1).lower() not in SKIP:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


if __name__ == "__main__":
    print("\n".join(lower_bounds(sys.argv[1:])))
