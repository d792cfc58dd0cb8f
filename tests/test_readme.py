"""The README's two set-up commands stay the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_readme_quickstart_command_runs_the_quickstart_config():
    readme = (ROOT / "README.md").read_text()
    quick = next(
        b.strip() for b in _bash_blocks(readme) if "ffa-jax train" in b and "pip install" in b
    )
    assert quick.endswith("ffa-jax train --overwrite")
    assert (ROOT / "configs" / "quickstart.yaml").is_file()
