"""Sessions: tests, lint, bench, demo. `nox -s tests` is the one command CI runs."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite over real sockets."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything, mypy (strict) over src/."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "src", "tests", "mocks", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "mocks", "bench", "noxfile.py")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Gateway vs. direct-to-backend benchmarks; writes bench/results/latest.md."""
    session.install("-e", ".")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Three mock backends and a gateway on 127.0.0.1:8000 until Ctrl-C."""
    session.install("-e", ".")
    session.run("ntonix", "demo", *session.posargs)
