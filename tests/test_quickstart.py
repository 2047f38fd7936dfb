"""The README's quickstart and what CI runs are the same command.

`.ci/run` runs the README's test line as written (its --dry-run prints the line it would run);
this checks they agree and that both quickstart lines keep their shape: one line each, a
virtual environment the command makes itself (PEP 668: Debian's and Ubuntu's python3 refuse
`pip install` outside one), with the fallback for a Debian without python3-venv. The contract:
issue 10 item 1.
"""

from __future__ import annotations

import re
import subprocess

from tests.support import REPO_ROOT

# Makes .venv; without Debian's python3-venv (no ensurepip) the system pip puts pip into it.
MAKE_VENV = "(python3 -m venv .venv || python3 -m pip --python .venv/bin/python install pip)"


def quickstart() -> list[str]:
    """The command lines of the README's marked quickstart block."""
    readme = (REPO_ROOT / "README.md").read_text()
    after_marker = readme.split("\n<!-- quickstart:", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```$", after_marker, flags=re.MULTILINE | re.DOTALL)
    assert block is not None
    return block.group(1).splitlines()


def test_ci_runs_the_readme_test_command_as_written() -> None:
    printed = subprocess.run(
        [str(REPO_ROOT / ".ci" / "run"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (test_line,) = [line for line in quickstart() if "nox -s tests" in line]
    assert printed == test_line + "\n"


def test_the_quickstart_is_two_lines_that_make_their_own_venv() -> None:
    demo, tests = quickstart()
    assert demo == f"{MAKE_VENV} && .venv/bin/pip install '.[demo]' && .venv/bin/ntonix demo"
    assert tests == f"{MAKE_VENV} && .venv/bin/pip install nox && .venv/bin/nox -s tests"
