"""The README and docs/: the options pages are config.py's, every linked page exists, the own-data snippet runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import option_docs  # noqa: E402  (scripts/ is not a package)


def test_the_options_pages_are_generated_from_config():
    for command, config_class in option_docs.COMMANDS.items():
        page = REPO / "docs" / "options" / f"{command}.md"
        assert page.read_text(encoding="utf-8") == option_docs.page(command, config_class), (
            f"{page.name} is stale: run uv run python scripts/option_docs.py")


def test_every_linked_page_exists_and_the_readme_stays_short():
    readme = REPO / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) < 300
    pages = [readme, REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    linked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"
                linked += 1
    assert linked >= 10  # the README's own links to docs/ alone are more


def test_the_readmes_own_data_snippet_runs_verbatim(tmp_path):
    """The snippet, as written, in an empty directory beside the checkout's src/ (its model path), with
    ``uv run X`` meaning this environment's X."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    [snippet] = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[:1]
    (tmp_path / "src").symlink_to(REPO / "src")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", 'uv() { shift; "$@"; }; set -eo pipefail\n' + snippet], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "my-study" / "results"
    assert (results / "report.html").exists()
    influences = pd.read_csv(results / "influences.csv")
    best = influences.sort_values("influence_cosine", ascending=False).iloc[0]
    assert (best["query_id"], best["train_id"]) == ("q1", "t1")  # the query's own sentence comes first
    assert list(pd.read_csv(results / "train.csv")["source"]) == ["wiki", "forum", "wiki"]  # extra fields kept
