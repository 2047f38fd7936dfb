from ntonix.core.restarts import Restart, RestartPolicy

POLICY = RestartPolicy(stable_after=10, first_backoff=0.5, max_backoff=2, give_up_after=5)


def test_a_worker_that_ran_a_while_is_replaced_at_once_and_starts_a_new_count() -> None:
    assert POLICY.after_death(in_a_row=3, lived=60) == Restart(1, 0.0)


def test_quick_deaths_back_off_doubling_up_to_the_cap_then_give_up() -> None:
    seen = []
    in_a_row = 0
    for _ in range(5):
        restart = POLICY.after_death(in_a_row, lived=0.2)
        seen.append(restart.delay)
        in_a_row = restart.in_a_row
    assert seen == [0.0, 0.5, 1.0, 2.0, None]
