"""The repository stands alone: a clone with nothing beside it has what its tests, docs and code
need, and CI runs exactly the test command the README gives."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        # CI tests a copy of the tracked files without .git: every file there, but the venv
        skip = {".venv", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}
        return [f for f in REPO.rglob("*")
                if f.is_file() and not skip & set(f.relative_to(REPO).parts)
                and ".egg-info" not in str(f)]
    return [REPO / name for name in out.stdout.decode().split("\0") if name]


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    # the fenced block right after the sentence that promises what .ci/run runs
    match = re.search(r"`\.ci/run` runs exactly this command[^`]*```bash\n(.+?)\n```", readme, re.S)
    assert match, "README.md must give the test command that .ci/run runs"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command_word_for_word():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    pattern = re.compile(r"\.\./shared|\bSPEC section|shared folder")
    for path in _tracked_files():
        if path.suffix.lower() in {".mp4", ".png", ".jpg", ".onnx", ".pth"} or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                      if pattern.search(line)]
    assert not offenders, f"these lines point outside the repository: {offenders[:10]}"


def test_docs_cited_by_the_code_exist():
    """Every `docs/NAME.md §N` cited in the code names a file and a section that exist."""
    cited: set[tuple[str, str]] = set()
    for path in _tracked_files():
        if path.suffix == ".py" and path.is_file():
            cited |= set(re.findall(r"docs/([\w-]+\.md) §(\d+)", path.read_text(encoding="utf-8")))
    assert cited, "the code cites no documentation section"
    for name, section in cited:
        doc = REPO / "docs" / name
        assert doc.is_file(), f"docs/{name} is cited but missing"
        assert re.search(rf"^## §{section}\b", doc.read_text(encoding="utf-8"), re.M), (
            f"docs/{name} has no section §{section}"
        )
