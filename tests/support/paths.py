"""Where tests may read from: the repository and its tests/data, nothing else."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
DATA = TESTS / "data"
EXAMPLES = REPO / "examples" / "tenants"
TEMPLATES = REPO / "postfix-templates"
