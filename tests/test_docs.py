"""Every Python example in docs/ and README.md runs, and the MkDocs site builds without warnings.

Conventions for ```python blocks (first line of the block):

- no marker: the block runs, on the local backend (``FUTURES_HPC_BACKEND=local``), after the
  page's earlier unmarked blocks, in one namespace per page (``__name__ == "__main__"``), in a
  fresh working directory;
- ``# requires: slurm`` (or ``sge``, ``pbs``, ``mpi``): the block runs on its own against that
  real batch system, under ``require`` (skipped locally when it is missing, failed in CI);
- ``# not run: <reason>``: never run (e.g. code of the tool being replaced). Keep these few.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.joinpath("docs").rglob("*.md"), ROOT / "README.md"])

FENCE_OPEN = re.compile(r"^(?P<indent>\s*)```(?:python|py)\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")
REQUIRES = re.compile(r"^#\s*requires:\s*(?P<what>[\w-]+)\s*$")
NOT_RUN = re.compile(r"^#\s*not run:\s*(?P<reason>.*)$")

#: ci/pbs.sh writes here the directory of SLURM's PBS wrappers (qsub, qstat, qdel).
PBS_WRAPPERS = Path("/opt/futures_hpc-pbs/PATHDIR")


def _pbs_environment(env: dict[str, str]) -> None:
    """PBS's qsub first on PATH, and no SGE_ROOT (Grid Engine's qsub is in /usr/bin)."""
    env["PATH"] = PBS_WRAPPERS.read_text().strip() + os.pathsep + env["PATH"]
    env.pop("SGE_ROOT", None)


#: How the environment changes for blocks that need one batch system.
ENVIRONMENTS = {"pbs": _pbs_environment}

#: What each ``# requires:`` name needs on this machine.
REQUIREMENTS = {
    "slurm": lambda: shutil.which("sbatch") is not None,
    "sge": lambda: bool(os.environ.get("SGE_ROOT")) and shutil.which("qsub") is not None,
    "pbs": lambda: PBS_WRAPPERS.is_file(),
    "mpi": lambda: shutil.which("mpirun") is not None,
}

#: Runs blocks in one namespace; a failure names the page and the block's first line.
RUNNER = textwrap.dedent(
    """
    import json
    import sys

    def main():
        blocks = json.load(open(sys.argv[1]))
        namespace = {"__name__": "__main__"}
        for block in blocks:
            code = compile(block["code"], block["where"], "exec")
            print(f"--- running {block['where']}", flush=True)
            exec(code, namespace)

    if __name__ == "__main__":
        main()
    """
)


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    code: str
    requires: str | None
    not_run_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples_of(page: Path) -> list[Example]:
    examples, current, indent, start = [], None, "", 0
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if current is None:
            opening = FENCE_OPEN.match(line)
            if opening:
                current, indent, start = [], opening["indent"], number + 1
        elif FENCE_CLOSE.match(line):
            code = "\n".join(current) + "\n"
            first = code.lstrip().splitlines()[0] if code.strip() else ""
            requires = REQUIRES.match(first)
            not_run = NOT_RUN.match(first)
            examples.append(Example(
                page, start, code,
                requires["what"] if requires else None,
                not_run["reason"].strip() if not_run else None,
            ))
            current = None
        else:
            current.append(line[len(indent):] if line.startswith(indent) else line)
    assert current is None, f"{page}: a ```python block is not closed"
    return examples


ALL_EXAMPLES = [example for page in PAGES for example in examples_of(page)]


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _run(examples: list[Example], tmp_path: Path, local: bool, timeout: float,
         requires: str | None = None) -> None:
    blocks = [{"where": example.where, "code": example.code} for example in examples]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("DASK_FUTURES_HPC") and name != "FUTURES_HPC_BACKEND"}
    env.update(
        DASK_FUTURES_HPC__DASHBOARD_ADDRESS="localhost:0",
        DASK_FUTURES_HPC__LOG_DIR=str(tmp_path / "logs"),
        DASK_FUTURES_HPC__DISCOVERY_DIR=str(tmp_path / "clusters"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    if local:
        env["FUTURES_HPC_BACKEND"] = "local"
    if requires in ENVIRONMENTS:
        ENVIRONMENTS[requires](env)
    completed = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert completed.returncode == 0, (
        f"an example failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    )
    ran = completed.stdout.count("--- running ")
    assert ran == len(blocks), completed.stdout


LOCAL_PAGES = [page for page in PAGES
               if any(e.requires is None and e.not_run_reason is None for e in examples_of(page))]


@pytest.mark.parametrize("page", LOCAL_PAGES, ids=_page_id)
def test_page_examples_run_locally(page, tmp_path):
    examples = [e for e in examples_of(page) if e.requires is None and e.not_run_reason is None]
    _run(examples, tmp_path, local=True, timeout=600)


CLUSTER_EXAMPLES = [e for e in ALL_EXAMPLES if e.requires is not None]


@pytest.mark.slurm
@pytest.mark.parametrize("example", CLUSTER_EXAMPLES, ids=lambda e: e.where)
def test_cluster_examples_run_on_the_real_scheduler(example, tmp_path):
    assert example.requires in REQUIREMENTS, (
        f"{example.where}: unknown '# requires: {example.requires}' "
        f"(known: {', '.join(REQUIREMENTS)})"
    )
    require(REQUIREMENTS[example.requires](),
            f"{example.where} needs {example.requires}, which is not running here")
    _run([example], tmp_path, local=False, timeout=600, requires=example.requires)


def test_examples_not_run_are_few_and_say_why():
    not_run = [e for e in ALL_EXAMPLES if e.not_run_reason is not None]
    for example in not_run:
        assert len(example.not_run_reason) >= 15, f"{example.where}: give a real reason"
    assert len(ALL_EXAMPLES) >= 30
    # Four show the code of the tools one migrates from, two need a real AWS account.
    assert len(not_run) <= max(6, len(ALL_EXAMPLES) // 10), [e.where for e in not_run]


def test_readme_gives_exactly_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert [command.strip() for command in commands] == [
        "pip install . && futures-hpc demo",
        "bash ci/test.sh",
    ]
    assert (ROOT / "ci" / "test.sh").is_file()
    python_examples = examples_of(ROOT / "README.md")
    assert len(python_examples) == 1
    assert len(python_examples[0].code.strip().splitlines()) <= 12


def test_mkdocs_build_is_clean(tmp_path):
    mkdocs = shutil.which("mkdocs")
    assert mkdocs, "mkdocs is not installed (pip install -e '.[docs]')"
    completed = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "migration" / "rios" / "index.html").is_file()
    # mkdocstrings rendered every ``:::`` directive of the API page, with its parameters.
    api_page = (tmp_path / "site" / "api" / "index.html").read_text()
    for directive in api_directives():
        assert f'id="{directive.target}"' in api_page, directive.target
    assert 'id="futures_hpc.HPCExecutor.map"' in api_page
    assert "chunksize" in api_page and "buffersize" in api_page


API_PAGE = ROOT / "docs" / "api.md"
DIRECTIVE = re.compile(r"^::: (?P<target>[\w.]+)\s*$")
#: Lines of prose a section of the API page may have besides its directives and examples.
API_PROSE_LINES = 6


@dataclass(frozen=True)
class Directive:
    section: str
    target: str
    members: object  # None: every public member; False: none; a list: those


def api_sections() -> dict[str, list[str]]:
    """The ``## `` sections of docs/api.md: title -> lines."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in API_PAGE.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
    return sections


def api_directives() -> list[Directive]:
    import yaml

    directives = []
    for title, lines in api_sections().items():
        for number, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if not match:
                continue
            block = []
            for option_line in lines[number + 1:]:
                if not option_line.startswith("    "):
                    break
                block.append(option_line[4:])
            options = (yaml.safe_load("\n".join(block)) or {}).get("options", {})
            directives.append(Directive(title, match["target"], options.get("members")))
    return directives


def test_api_page_is_generated_from_docstrings():
    """docs/api.md is ``:::`` directives (mkdocstrings), not a hand-written reference."""
    sections = api_sections()
    assert len(sections) >= 10, list(sections)
    for title, lines in sections.items():
        assert any(DIRECTIVE.match(line) for line in lines), (
            f"docs/api.md section {title!r} has no '::: module.name' directive: the API reference "
            "is generated from the docstrings; write the text there"
        )
        prose, in_code, in_options = [], False, False
        for line in lines:
            if line.startswith("```"):
                in_code = not in_code
            elif DIRECTIVE.match(line):
                in_options = True
            elif in_options and line.startswith("    "):
                continue
            elif not in_code and line.strip():
                in_options = False
                prose.append(line)
                assert not line.lstrip().startswith("|"), (
                    f"docs/api.md section {title!r} has a hand-written table: {line}"
                )
        assert len(prose) <= API_PROSE_LINES, (
            f"docs/api.md section {title!r} has {len(prose)} lines of prose; move them into the "
            "docstrings the section renders"
        )


def test_api_page_documents_every_public_name():
    """Every name of ``futures_hpc.__all__`` is rendered, by name or as a module's member."""
    import importlib

    import futures_hpc

    directives = api_directives()
    targets = {directive.target for directive in directives}
    modules = {}
    for directive in directives:
        if directive.members is False:
            continue
        try:
            modules[directive.target] = (importlib.import_module(directive.target),
                                         directive.members)
        except ImportError:
            continue  # a class or function, not a module

    def rendered_by(module, members, name, value):
        # mkdocstrings renders a module's own public members, and what its __all__ re-exports.
        if getattr(module, name, None) is not value:
            return False
        if members is not None:
            return name in members
        return (name in getattr(module, "__all__", ())
                or getattr(value, "__module__", None) == module.__name__)

    missing = []
    for name in futures_hpc.__all__:
        value = getattr(futures_hpc, name)
        if f"futures_hpc.{name}" not in targets and not any(
            rendered_by(module, members, name, value) for module, members in modules.values()
        ):
            missing.append(name)
    assert not missing, f"docs/api.md renders none of {missing} (add a '::: futures_hpc.X')"
    for module in ("futures_hpc.errors", "futures_hpc.tiles", "futures_hpc.integrations",
                   "futures_hpc.progress", "futures_hpc.option_table", "futures_hpc.engine",
                   "futures_hpc.provider", "futures_hpc.backends.batch"):
        assert module in modules, f"docs/api.md does not render {module}"
