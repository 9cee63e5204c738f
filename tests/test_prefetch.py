"""stamp.data.prefetch: order kept, errors reach the consumer, a closed consumer stops the reader."""
import threading
import time

import pytest

from stamp.data.prefetch import prefetch


def test_order_and_end():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetch(iter([]))) == []


def test_reader_error_is_raised_at_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("corrupt shard")

    got = []
    with pytest.raises(ValueError, match="corrupt shard"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1, 2]


def test_closing_the_consumer_stops_the_reader():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    gen = prefetch(items(), depth=2, name="test-prefetch")
    assert next(gen) == 0
    gen.close()
    deadline = time.time() + 5
    while any(t.name == "test-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "test-prefetch" for t in threading.enumerate())
    assert len(produced) <= 5  # read ahead by at most depth (+ the one in hand), never the whole input
