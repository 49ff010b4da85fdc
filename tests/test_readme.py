"""The commands of README.md and docs/ stay true: each bash block's command lines are parsed by the CLI they name (a
renamed flag or key fails here), ``pretrain train`` ones resolve their config (``--print-config``), scripts exist,
and each Python block runs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from typing import List

import pytest
from test_train_engine import ROOT

from data_prep.cli import build_parser
from pretrain.__main__ import _parser as pretrain_parser
from pretrain.__main__ import main as pretrain_main

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str) -> List[tuple]:
    """(document, block text) of every fenced block in ``language``."""
    found = []
    for path in DOCUMENTS:
        for body in re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S):
            found.append((path.relative_to(ROOT), body))
    return found


def commands(body: str) -> List[List[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            out.append(words[:end])
            words = words[end + 1:]
    return out


def after(words: List[str], marker: List[str]) -> List[str]:
    start = next(i for i in range(len(words)) if words[i:i + len(marker)] == marker)
    return words[start + len(marker):]


def check(words: List[str], capsys) -> None:
    while re.match(r"^[A-Z_]+=", words[0]):  # an environment assignment before the command
        words = words[1:]
    program = words[0]
    if program == "bash":
        assert (ROOT / words[1]).is_file(), words
    elif program == "sbatch":
        script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
        assert (ROOT / words[script]).is_file()
        config, *overrides = words[script + 1:]
        assert pretrain_main(["train", "--config", config, *overrides, "--print-config"]) == 0, words
    elif "pretrain" in words and "-m" in words:
        args = after(words, ["-m", "pretrain"])
        if args[0] == "train":
            assert pretrain_main([*args, "--print-config"]) == 0, (words, capsys.readouterr().err)
        else:
            pretrain_parser().parse_args(args)
    elif "data_prep" in words:
        build_parser().parse_args(after(words, ["-m", "data_prep"]))
    elif program == "python" and words[1].endswith(".py"):
        done = subprocess.run([sys.executable, words[1], "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
        assert done.returncode == 0, done.stderr
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in done.stdout, (words, flag)
    else:
        raise AssertionError(f"a command this test does not know how to check: {words}")


BASH = blocks("bash")


@pytest.mark.parametrize("document, body", BASH, ids=[f"{d}:{i}" for i, (d, _) in enumerate(BASH)])
def test_each_command_of_the_docs_is_accepted_by_its_cli(document, body, capsys):
    found = commands(body)
    assert found
    for words in found:
        check(words, capsys)


@pytest.mark.parametrize("document, body", blocks("python"), ids=[str(d) for d, _ in blocks("python")])
def test_each_python_example_of_the_docs_runs(document, body):
    exec(compile(body, str(document), "exec"), {})


def test_the_readme_keeps_two_set_up_commands_and_links_what_exists():
    readme = (ROOT / "README.md").read_text()
    set_up = readme.split("## Set up", 1)[1].split("##", 1)[0]
    assert commands(re.search(r"```bash\n(.*?)```", set_up, re.S).group(1)) == [["bash", "scripts/main.sh"],
                                                                               ["bash", "scripts/test.sh"]]
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert link.startswith("http") or (ROOT / link).exists(), link
