"""Progress: a tqdm bar on a terminal, otherwise a log line at least every interval (fake clock)."""

import io
import logging
import time

import pytest

from layerhessians.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Lines(logging.Handler):
    """Collects (clock time, message) of each record."""

    def __init__(self, clock):
        super().__init__(logging.INFO)
        self.clock, self.records = clock, []

    def emit(self, record):
        self.records.append((self.clock(), record.getMessage()))


@pytest.fixture
def logged():
    clock = FakeClock()
    logger = logging.getLogger("test.progress")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Lines(clock)
    logger.addHandler(handler)
    yield clock, logger, handler.records
    logger.removeHandler(handler)


def test_format_duration():
    assert [format_duration(s) for s in (0, 45.9, 125, 3720)] == ["0s", "45s", "2m05s", "1h02m"]


def test_a_line_at_least_every_interval_with_estimate(logged):
    clock, logger, records = logged
    steps = [7.0, 12.0, 3.0, 25.0, 1.0, 9.0, 29.0, 4.0] * 5  # uneven steps, each < 30 s
    with Progress(total=len(steps), desc="Lanczos (full)", unit="step", logger=logger, clock=clock,
                  stream=io.StringIO(), heartbeat=False) as bar:
        for step in steps:
            clock.now += step
            bar.update()
    times = [0.0] + [t for t, _ in records[:-1]] + [sum(steps)]
    assert times[1] >= 30 and max(b - a for a, b in zip(times, times[1:])) < 30 + max(steps)
    assert all(b - a >= 30 for a, b in zip(times[1:-2], times[2:-1]))  # and not more often
    assert len(records) >= sum(steps) // (30 + max(steps))
    t, first = records[0]
    done = [i + 1 for i in range(len(steps)) if sum(steps[:i + 1]) == t][0]
    left = format_duration(t / done * (len(steps) - done))
    assert first == (f"Lanczos (full): {done}/{len(steps)} steps ({100 * done / len(steps):.0f}%), "
                     f"{format_duration(t)} elapsed, about {left} left")
    assert records[-1][1] == f"Lanczos (full): done, {len(steps)} steps in {format_duration(sum(steps))}"


def test_short_loops_stay_silent_and_unknown_totals_have_no_estimate(logged):
    clock, logger, records = logged
    with Progress(total=10, logger=logger, clock=clock, stream=io.StringIO(), heartbeat=False) as bar:
        for _ in range(10):
            clock.now += 1.0
            bar.update()
    assert records == []
    with Progress(desc="epoch 2", unit="batch", logger=logger, clock=clock, interval=5,
                  stream=io.StringIO(), heartbeat=False) as bar:
        clock.now += 6.0
        bar.set_postfix(loss="0.1234")
        bar.update(3)
    assert records[0][1] == "epoch 2: 3 batchs, 6s elapsed [loss=0.1234]"


def test_initial_units_do_not_count_towards_the_rate(logged):
    clock, logger, records = logged
    with Progress(total=10, initial=5, desc="epochs", unit="epoch", logger=logger, clock=clock,
                  stream=io.StringIO(), heartbeat=False) as bar:
        clock.now += 40.0
        bar.update()
    assert records[0][1] == "epochs: 6/10 epochs (60%), 40s elapsed, about 2m40s left"


def test_without_handlers_lines_go_to_the_stream():
    clock, stream = FakeClock(), io.StringIO()
    bare = logging.getLogger("progress-test-bare")
    bare.propagate = False  # no handlers anywhere up the chain
    assert not bare.hasHandlers()
    with Progress(total=4, desc="x", logger=bare, clock=clock, stream=stream, heartbeat=False) as bar:
        clock.now += 31
        bar.update()
    assert stream.getvalue().splitlines()[0].startswith("x: 1/4 its (25%), 31s elapsed")


def test_terminal_gets_a_bar_and_disable_silences(logged, monkeypatch):
    clock, logger, records = logged

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert Progress(stream=Terminal(), logger=logger, heartbeat=False).mode == "bar"
    quiet = io.StringIO()
    with Progress(total=3, disable=True, logger=logger, clock=clock, stream=quiet) as bar:
        clock.now += 100
        bar.update()
    assert bar.mode == "off" and records == [] and quiet.getvalue() == ""


def test_heartbeat_logs_while_a_step_runs_long(logged):
    _, logger, records = logged
    bar = Progress(total=2, desc="slow", logger=logger, interval=0.05, stream=io.StringIO())
    time.sleep(0.5)  # one long step: no update() call
    bar.close()
    count = len(records)
    assert count >= 3 and records[0][1].startswith("slow: 0/2 its (0%)")
    assert "time left unknown yet" in records[0][1]
    time.sleep(0.15)
    assert len(records) == count  # stopped on close


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        Progress(interval=0)
