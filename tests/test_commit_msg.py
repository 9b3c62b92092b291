"""The commit-message check (.githooks/commit-msg): as git's hook on a message file, and over a range of
commits as `make lint` runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parents[1] / ".githooks" / "commit-msg"
BODY = "The why, and the numbers: README 709 -> 240 lines.\n"


def _check(tmp_path, message: str) -> subprocess.CompletedProcess:
    path = tmp_path / "COMMIT_EDITMSG"
    path.write_text(message)
    return subprocess.run([sys.executable, str(HOOK), str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "message",
    [
        "Move the benchmark figures to docs/benchmarks.md\n\n" + BODY,
        "Add a commit-msg check\n",
        "x" * 72 + "\n",
        "Merge branch 'readme' into main\n",
        "\n\nFix the gate's margin\n\n" + BODY,  # leading blank lines are dropped, as git does
        "Fix the gate's margin\n# Please enter the commit message for your changes.\n#\n\n" + BODY,
        "Fix the gate's margin\n\n# ------------------------ >8 ------------------------\nan overlong diff line " * 9,
        "",  # empty: git aborts the commit itself
    ],
)
def test_good_messages_pass(tmp_path, message):
    done = _check(tmp_path, message)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ("x" * 73 + "\n", "73 characters; at most 72"),
        ("Move the benchmark figures.\n\n" + BODY, "ends with a period"),
        ("Move the benchmark figures\n" + BODY, "second line is not blank"),
        ("y" * 80 + ".\nand a body\n", "81 characters"),
    ],
)
def test_bad_messages_fail_and_say_why(tmp_path, message, why):
    done = _check(tmp_path, message)
    assert done.returncode == 1 and why in done.stderr


def test_a_range_checks_every_commit_in_it(tmp_path):
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)

    def check(rev_range):
        return subprocess.run(
            [sys.executable, str(HOOK), "--range", rev_range], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "A subject that goes on and on " * 4)
    git("commit", "-q", "--allow-empty", "-m", "Add the base")
    base = git("rev-parse", "HEAD").stdout.strip()
    git("commit", "-q", "--allow-empty", "-m", "Add a step", "-m", BODY)
    assert check("HEAD").returncode == 0  # `make lint`'s default: HEAD's message alone
    assert check(f"{base}..HEAD").returncode == 0
    assert check("HEAD~2").returncode == 1  # the overlong first commit
    git("commit", "-q", "--allow-empty", "-m", "Add a step.")
    done = check(f"{base}..HEAD")
    assert done.returncode == 1 and "ends with a period" in done.stderr and "Add a step." in done.stderr
    assert check("nothing..HEAD").returncode == 2
