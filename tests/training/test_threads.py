"""``--threads``: validating, setting and recording torch's thread count, and resuming with it."""

import pytest
import torch

from layerhessians.errors import UserError
from layerhessians.training.threads import check_threads, resume_threads, set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_applies_and_returns_the_count(restore_threads):
    assert set_threads(2) == 2 == torch.get_num_threads()
    assert set_threads(1) == 1 == torch.get_num_threads()
    assert set_threads(None) == 1 == torch.get_num_threads()  # None keeps what is set


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_counts_are_refused(bad, restore_threads):
    before = torch.get_num_threads()
    with pytest.raises(UserError, match="--threads must be a positive integer"):
        set_threads(bad)
    assert torch.get_num_threads() == before


def test_check_threads():
    assert check_threads(None) is None and check_threads(3) == 3


def test_resume_keeps_the_recorded_count_unless_told_otherwise():
    assert resume_threads(4, None) == (4, None)
    assert resume_threads(4, 4) == (4, None)
    assert resume_threads(None, None) == (None, None)
    threads, warning = resume_threads(4, 1)
    assert threads == 1 and "not bit-identical" in warning and "threads=4" in warning
    threads, warning = resume_threads(None, 2)
    assert threads == 2 and "bit-identical" in warning
    with pytest.raises(UserError):
        resume_threads(4, 0)
