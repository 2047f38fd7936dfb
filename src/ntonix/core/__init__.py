"""Pure decision logic: no I/O, no trio, httpx or hypercorn imports; time and randomness come in."""
