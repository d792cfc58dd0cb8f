"""What the experiment runner records about the code that produced a cell."""

from pathlib import Path

import pytest

from ffa_jax.experiments.runner import git_commit
from ffa_jax.version import REPO_ROOT, git_state


def test_a_grid_file_outside_the_repository_still_records_the_code_commit(tmp_path):
    """Every cell records the commit of the code that ran it, also for a grid file kept
    outside the repository (git status over such a path fails as a whole)."""
    sha, _ = git_state()
    if sha is None:
        pytest.skip("not a git checkout")
    outside = tmp_path / "grid.yaml"
    outside.write_text("axes: {}\n")
    rec = git_commit(grid_file=outside)
    assert rec["commit"] == sha and rec["grid_file_in_repo"] is False
    inside = git_commit(grid_file=REPO_ROOT / Path("experiments/grids/privacy_evidence.yaml"))
    assert inside["commit"] == sha and "grid_file_in_repo" not in inside
