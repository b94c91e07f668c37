"""Progress without a terminal: a line every interval with counts, share, rate and ETA worked out by
hand from a clock the test moves; at a terminal, the bar and no lines."""

from __future__ import annotations

import io

from cir.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_interval_with_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("cir index", "embedding", 1000, "product", stream=out, every_s=30, tty=False, clock=clock)
    clock.now += 10
    progress.update(100)
    assert out.getvalue() == ""  # 10 s: not yet
    clock.now += 30
    progress.update(300)  # 400 done in 40 s: 10/s, 600 left: 60 s
    clock.now += 5
    progress.update(50)  # 5 s after the last line: none
    clock.now += 45
    progress.update(450)  # 900 in 90 s: 10/s, 100 left: 10 s
    clock.now += 10
    progress.update(100)
    progress.close()  # 1000 in 100 s
    assert out.getvalue().splitlines() == [
        "cir index: embedding 400/1000 products (40%), 10.0/s, ETA 1m00s",
        "cir index: embedding 900/1000 products (90%), 10.0/s, ETA 10s",
        "cir index: embedding 1000/1000 products (100%), 10.0/s, in 1m40s",
    ]


def test_an_unknown_total_shows_counts_and_rate_only() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress("cir search", "embedding the val gallery", None, "product", stream=out, every_s=1, tty=False,
                  clock=clock) as progress:
        clock.now += 4
        progress.update(10)
    assert out.getvalue().splitlines() == ["cir search: embedding the val gallery 10 products, 2.5/s",
                                           "cir search: embedding the val gallery 10 products, 2.5/s, in 4s"]


def test_a_job_shorter_than_one_interval_prints_nothing_without_a_terminal() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress("cir index", "embedding", 10, "product", stream=out, every_s=30, tty=False, clock=clock) as progress:
        clock.now += 29
        progress.update(10)
    assert out.getvalue() == ""


def test_a_terminal_gets_the_bar_and_no_lines() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress("cir index", "embedding", 10, "product", stream=out, every_s=0, tty=True, clock=clock) as progress:
        clock.now += 100
        progress.update(10)
    assert "cir index:" not in out.getvalue() and "10/10" in out.getvalue()  # tqdm's own bar
