"""WorkerGroup on real unix sockets in a real directory: what a worker answers for its
siblings when they are live, slow, stopped or killed (several groups share this process, as
several workers share a run's directory)."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import trio

from ntonix.core.figures import Figures
from ntonix.core.telemetry import Tallies
from ntonix.gathering import WorkerGroup


def _figures(requests: int, active: int = 0) -> Figures:
    tallies = Tallies(requests=Counter({("/v1/chat/completions", "a", "200", "miss"): requests}))
    tallies.active = active
    return Figures(
        workers=1,
        tallies=tallies,
        backends=(),
        pools={},
        cache=None,
        transitions=Counter(),
        access_log_dropped=0,
        queued=0,
        window=None,
    )


class Worker:
    """A sibling whose figures the test sets; counts how often it was asked for them."""

    def __init__(self, directory: Path, requests: int, active: int = 0) -> None:
        self.group = WorkerGroup(str(directory), peer_timeout=0.5)
        self.requests, self.active, self.asked = requests, active, 0

    def figures(self, window: bool) -> Figures:
        self.asked += 1
        return _figures(self.requests, self.active)

    async def start(self, nursery: trio.Nursery) -> trio.CancelScope:
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await self.group.serve(self.figures, task_status=task_status)

        await nursery.start(run)
        return scope


def _requests(figures: Figures) -> int:
    return figures.tallies.requests.total()


async def test_each_worker_answers_with_everyones_current_figures(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        one, two = Worker(tmp_path, 3, active=1), Worker(tmp_path, 5, active=2)
        scopes = [await one.start(nursery), await two.start(nursery)]
        one.requests = 4
        two.requests, two.active = 6, 1  # counted after its last file: asked, it writes again
        merged = await one.group.gather(one.figures(False))
        assert (merged.workers, _requests(merged), merged.tallies.active) == (2, 10, 2)
        assert two.asked == 2  # once when it started, once now
        merged = await two.group.gather(two.figures(False))
        assert (merged.workers, _requests(merged), merged.tallies.active) == (2, 10, 2)
        for scope in scopes:
            scope.cancel()


async def test_a_stopped_worker_keeps_its_counts_but_not_its_in_flight(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        live, stopping = Worker(tmp_path, 1), Worker(tmp_path, 7, active=3)
        live_scope = await live.start(nursery)
        (await stopping.start(nursery)).cancel()
        await trio.testing.wait_all_tasks_blocked()
        merged = await live.group.gather(_figures(1))
        assert (merged.workers, _requests(merged), merged.tallies.active) == (1, 8, 0)
        live_scope.cancel()


async def test_a_killed_worker_counts_as_its_last_file(tmp_path: Path) -> None:
    """SIGKILL leaves the socket file behind, and connecting to it is refused."""
    killed = WorkerGroup(str(tmp_path))
    killed.publish(_figures(9, active=4))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / f"{killed.name}.sock"))
    dead.close()
    merged = await WorkerGroup(str(tmp_path)).gather(_figures(1))
    assert (merged.workers, _requests(merged), merged.tallies.active) == (1, 10, 0)


async def test_a_worker_too_slow_to_answer_counts_as_its_last_file(tmp_path: Path) -> None:
    """Its event loop is blocked: the connection is queued, nobody answers."""
    slow = WorkerGroup(str(tmp_path))
    slow.publish(_figures(5, active=2))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(str(tmp_path / f"{slow.name}.sock"))
        stuck.listen(1)
        asker = WorkerGroup(str(tmp_path), peer_timeout=0.2)
        started = trio.current_time()
        merged = await asker.gather(_figures(1))
        assert trio.current_time() - started < 1.0
    assert (merged.workers, _requests(merged), merged.tallies.active) == (2, 6, 2)


async def test_an_unreadable_file_is_left_out_and_the_rest_is_summed(tmp_path: Path) -> None:
    (tmp_path / "123-deadbeef.json").write_text("{not json")
    merged = await WorkerGroup(str(tmp_path)).gather(_figures(2))
    assert (merged.workers, _requests(merged)) == (1, 2)


async def test_counters_shown_never_go_backwards_whoever_answers(tmp_path: Path) -> None:
    """Each answer is at least the one before, whichever worker gives it and whichever
    sibling is then slow, stopped or gone."""
    async with trio.open_nursery() as nursery:
        workers = [Worker(tmp_path, n) for n in (1, 2, 3)]
        scopes = [await worker.start(nursery) for worker in workers]
        shown: list[int] = []
        steps: list[Callable[[], None]] = [
            lambda: None,
            lambda: setattr(workers[1], "requests", 4),
            scopes[2].cancel,  # the third stops
            lambda: setattr(workers[0], "requests", 5),
        ]
        for step, asker in zip(steps, [0, 1, 0, 1], strict=True):
            step()
            await trio.testing.wait_all_tasks_blocked()
            own = workers[asker]
            shown.append(_requests(await own.group.gather(own.figures(False))))
        assert shown == sorted(shown) == [6, 8, 8, 12]
        for scope in scopes:
            scope.cancel()
