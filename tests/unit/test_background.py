"""Background: the value or the error of a function run on a helper thread reaches the caller."""

from __future__ import annotations

import threading

import pytest

from mixer.background import Background


def test_the_result_is_the_functions_value_computed_on_another_thread() -> None:
    caller = threading.get_ident()
    job = Background(lambda a, b: (a + b, threading.get_ident()), 2, 3, name="adder")
    total, thread = job.result()
    assert total == 5 and thread != caller


def test_the_functions_error_is_raised_in_the_caller() -> None:
    def fails() -> None:
        raise ValueError("data/cifar100: modified since dvc.lock recorded it")

    with pytest.raises(ValueError, match="modified since dvc.lock"):
        Background(fails).result()
