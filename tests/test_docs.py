"""The README and docs link only to files that are in the repository (a fresh clone shows every figure)."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def _tracked():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(listed.splitlines())


def _local_links(markdown):
    for match in LINK.finditer(markdown.read_text()):
        target = (match.group(1) or match.group(2)).split("#")[0]
        if target and not re.match(r"[a-z]+:", target):
            yield (markdown.parent / target).resolve().relative_to(REPO).as_posix()


def test_every_local_link_of_the_readme_and_docs_is_a_tracked_file():
    tracked = _tracked()
    pages = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    links = {page.name: list(_local_links(page)) for page in pages}
    assert links["README.md"], "the README links no local file: the parser found nothing"
    missing = {page: [t for t in targets if t not in tracked and not any(f.startswith(t + "/") for f in tracked)]
               for page, targets in links.items()}
    assert not any(missing.values()), f"linked but not in git: {missing}"


def test_result_files_of_default_runs_are_not_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "docs/results/exp01_shutdown_baseline.json"], cwd=REPO)
    assert ignored.returncode == 1, "docs/results/ is hidden by .gitignore"
