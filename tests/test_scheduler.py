"""One decode loop for every caption: requests from many threads batched together, each on its own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from caprl_local import Cancelled, Captioner, EngineError

NAMES = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png"]


@pytest.fixture(scope="module")
def four(tiny_model: tuple[Path, Path]):
    with Captioner(*tiny_model, threads=2, parallel=4) as cap:
        yield cap


def test_threads_calling_caption_get_what_each_gets_alone(four: Captioner, images: Path) -> None:
    alone = {n: four.caption(images / n, max_tokens=24).text for n in NAMES}
    widths: list[int] = []
    four._live().probe = lambda request, step, row: widths.append(len(four._live()._active))
    try:
        with ThreadPoolExecutor(4) as pool:
            together = dict(zip(NAMES, pool.map(lambda n: four.caption(images / n, max_tokens=24).text, NAMES),
                                strict=True))
    finally:
        four._live().probe = None
    assert together == alone
    assert max(widths) > 1  # batched into shared decode steps, not serialised


def test_cancelling_one_request_leaves_the_others_intact(four: Captioner, images: Path) -> None:
    alone = {n: four.caption(images / n, max_tokens=30).text for n in NAMES[1:]}
    victim = four.submit(images / NAMES[0], max_tokens=4000, ignore_eos=True)
    others = {n: four.submit(images / n, max_tokens=30) for n in NAMES[1:]}
    next(iter(victim))  # it is generating
    victim.cancel()
    with pytest.raises(Cancelled):
        victim.result(timeout=120)
    assert {n: h.result(timeout=120).text for n, h in others.items()} == alone
    assert four.caption(images / NAMES[0], max_tokens=8).text  # its slot is free again


def test_a_request_joins_the_running_loop(four: Captioner, images: Path) -> None:
    long = four.submit(images / "photo.jpg", max_tokens=3000, ignore_eos=True)
    pieces = iter(long)
    next(pieces)  # mid-generation
    late = four.submit(images / "alpha.png", max_tokens=5)
    first = next(iter(late))  # the late request's first token ...
    assert first and not long.done()  # ... arrives while the earlier one still generates
    assert late.result(timeout=120).generated_tokens <= 5
    assert not long.done()
    long.cancel()
    with pytest.raises(Cancelled):
        long.result(timeout=120)


def test_requests_beyond_the_slots_wait_their_turn(tiny_model: tuple[Path, Path], images: Path) -> None:
    with Captioner(*tiny_model, threads=2, parallel=2) as two:
        alone = [two.caption(images / n, max_tokens=12).text for n in NAMES]
        handles = [two.submit(images / n, max_tokens=12) for n in NAMES]
        assert [h.result(timeout=120).text for h in handles] == alone


def test_cancel_stops_everything_and_later_calls_work(four: Captioner, images: Path) -> None:
    handles = [four.submit(images / n, max_tokens=4000, ignore_eos=True) for n in NAMES]
    next(iter(handles[0]))
    four.cancel()
    for h in handles:
        with pytest.raises(Cancelled):
            h.result(timeout=120)
    assert four.caption(images / "photo.jpg", max_tokens=6).text


def test_cancel_from_another_thread_ends_caption_many(four: Captioner, images: Path) -> None:
    paths = [images / NAMES[i % 4] for i in range(12)]
    done: list[object] = []
    timer = threading.Timer(0.5, four.cancel)
    timer.start()
    with pytest.raises(Cancelled):
        for result in four.caption_many(paths, max_tokens=4000, ignore_eos=True):
            done.append(result)
    timer.join()
    assert len(done) < 12
    assert not four._live()._active and not four._live()._waiting  # nothing left running
    assert {r.image for r in done} <= {str(p) for p in paths}  # with gaps, results are matched by image


def test_stream_abandoned_early_frees_its_slot(four: Captioner, images: Path) -> None:
    stream = four.stream(images / "photo.jpg", max_tokens=4000, ignore_eos=True)
    next(stream)
    stream.close()  # the caller lost interest
    deadline = time.monotonic() + 120
    while four._live()._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not four._live()._active


def test_result_timeout(four: Captioner, images: Path) -> None:
    handle = four.submit(images / "photo.jpg", max_tokens=4000, ignore_eos=True)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.01)
    handle.cancel()


def test_close_cancels_what_is_in_flight(tiny_model: tuple[Path, Path], images: Path) -> None:
    cap = Captioner(*tiny_model, threads=2, parallel=2)
    handle = cap.submit(images / "photo.jpg", max_tokens=4000, ignore_eos=True)
    next(iter(handle))
    cap.close()
    with pytest.raises(Cancelled):
        handle.result(timeout=120)
    with pytest.raises(EngineError, match="closed"):
        cap.submit(images / "photo.jpg")


def test_a_half_read_stream_blocks_no_other_call(tiny_model: tuple[Path, Path], images: Path) -> None:
    """One slot, a stream read to its first piece and left: other calls still finish, and close() ends it."""
    with Captioner(*tiny_model, threads=2, parallel=1) as one:
        stream = one.stream(images / "photo.jpg", max_tokens=200)
        next(stream)
        assert one.caption(images / "alpha.png", max_tokens=6).text  # the stream's caption ran on meanwhile
        other = one.stream(images / "cmyk.jpg", max_tokens=4000, ignore_eos=True)
        next(other)
    # Left the block with `other` unread: close() cancelled it instead of waiting for it.
    with pytest.raises(Cancelled):
        list(other)
