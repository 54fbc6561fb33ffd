"""One decode loop for every caption: requests from many threads batched together, each on its own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import HANG_S, each_step, same_but_near_ties

from caprl_local import Cancelled, Captioner, EngineError

NAMES = ["photo.jpg", "alpha.png", "cmyk.jpg", "palette.png"]


@pytest.fixture(scope="module")
def four(tiny_model: tuple[Path, Path]):
    with Captioner(*tiny_model, threads=1, parallel=4) as cap:
        yield cap


def test_threads_calling_caption_get_what_each_gets_alone(four: Captioner, images: Path) -> None:
    alone = {n: four.caption(images / n, max_tokens=24).text for n in NAMES}
    widths: list[int] = []
    with each_step(four._live(), lambda request, step, row: widths.append(len(four._live()._active))), \
            ThreadPoolExecutor(4) as pool:
        together = dict(zip(NAMES, pool.map(lambda n: four.caption(images / n, max_tokens=24).text, NAMES),
                            strict=True))
    assert same_but_near_ties(together, alone)
    assert max(widths) > 1  # batched into shared decode steps, not serialised


def test_cancelling_one_request_leaves_the_others_intact(four: Captioner, images: Path) -> None:
    alone = {n: four.caption(images / n, max_tokens=30).text for n in NAMES[1:]}
    victim = four.submit(images / NAMES[0], max_tokens=4000, ignore_eos=True)
    others = {n: four.submit(images / n, max_tokens=30) for n in NAMES[1:]}
    next(iter(victim))  # it is generating
    victim.cancel()
    with pytest.raises(Cancelled):
        victim.result(timeout=HANG_S)
    assert same_but_near_ties({n: h.result(timeout=HANG_S).text for n, h in others.items()}, alone)
    assert four.caption(images / NAMES[0], max_tokens=8).text  # its slot is free again


def test_a_request_joins_the_running_loop(four: Captioner, images: Path) -> None:
    long = four.submit(images / "photo.jpg", max_tokens=3000, ignore_eos=True)
    pieces = iter(long)
    next(pieces)  # mid-generation
    late = four.submit(images / "alpha.png", max_tokens=5)
    first = next(iter(late))  # the late request's first token ...
    assert first and not long.done()  # ... arrives while the earlier one still generates
    assert late.result(timeout=HANG_S).generated_tokens <= 5
    assert not long.done()
    long.cancel()
    with pytest.raises(Cancelled):
        long.result(timeout=HANG_S)


def test_requests_beyond_the_slots_wait_their_turn(tiny_model: tuple[Path, Path], images: Path) -> None:
    with Captioner(*tiny_model, threads=1, parallel=2) as two:
        alone = [two.caption(images / n, max_tokens=12).text for n in NAMES]
        handles = [two.submit(images / n, max_tokens=12) for n in NAMES]
        assert [h.result(timeout=HANG_S).text for h in handles] == alone


def test_cancel_stops_everything_and_later_calls_work(four: Captioner, images: Path) -> None:
    handles = [four.submit(images / n, max_tokens=4000, ignore_eos=True) for n in NAMES]
    next(iter(handles[0]))
    four.cancel()
    for h in handles:
        with pytest.raises(Cancelled):
            h.result(timeout=HANG_S)
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
    deadline = time.monotonic() + HANG_S
    while four._live()._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not four._live()._active


def test_result_timeout(four: Captioner, images: Path) -> None:
    handle = four.submit(images / "photo.jpg", max_tokens=4000, ignore_eos=True)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.01)
    handle.cancel()


def test_close_cancels_what_is_in_flight(tiny_model: tuple[Path, Path], images: Path) -> None:
    cap = Captioner(*tiny_model, threads=1, parallel=2)
    handle = cap.submit(images / "photo.jpg", max_tokens=4000, ignore_eos=True)
    next(iter(handle))
    cap.close()
    with pytest.raises(Cancelled):
        handle.result(timeout=HANG_S)
    with pytest.raises(EngineError, match="closed"):
        cap.submit(images / "photo.jpg")


def test_a_half_read_stream_blocks_no_other_call(tiny_model: tuple[Path, Path], images: Path) -> None:
    """One slot, a stream read to its first piece and left: other calls still finish, and close() ends it."""
    with Captioner(*tiny_model, threads=1, parallel=1) as one:
        stream = one.stream(images / "photo.jpg", max_tokens=200)
        next(stream)
        assert one.caption(images / "alpha.png", max_tokens=6).text  # the stream's caption ran on meanwhile
        other = one.stream(images / "cmyk.jpg", max_tokens=4000, ignore_eos=True)
        next(other)
    # Left the block with `other` unread: close() cancelled it instead of waiting for it.
    with pytest.raises(Cancelled):
        list(other)


def test_streamed_pieces_add_up_to_the_caption(four: Captioner, images: Path) -> None:
    """No leading space, no trailing newline: what a GUI shows while streaming is the final text."""
    for name in NAMES:
        pieces = list(four.stream(images / name, max_tokens=40))
        assert "".join(pieces) == four.caption(images / name, max_tokens=40).text
        assert pieces and pieces[0] == pieces[0].lstrip() and pieces[-1] == pieces[-1].rstrip()


def test_caption_many_streams_each_images_text_and_reports_progress(
        four: Captioner, images: Path) -> None:
    paths = [images / n for n in NAMES]
    texts: dict[str, list[str]] = {str(p): [] for p in paths}
    seen: list[tuple[int, int | None]] = []
    callers: set[int] = set()

    def on_text(image: str, piece: str) -> None:
        texts[image].append(piece)
        callers.add(threading.get_ident())

    results = list(four.caption_many(paths, on_text=on_text, progress=lambda d, t: seen.append((d, t)),
                                     max_tokens=30))
    assert [r.image for r in results] == [str(p) for p in paths]
    assert all("".join(texts[r.image]) == r.text for r in results)
    assert callers == {threading.get_ident()}  # in the caller's thread
    assert [d for d, _ in seen] == [1, 2, 3, 4] and {t for _, t in seen} == {4}


def test_activity_counts_captions_and_tokens(four: Captioner, images: Path) -> None:
    before = four.activity()
    handle = four.submit(images / "photo.jpg", max_tokens=8, ignore_eos=True)
    handle.result(timeout=HANG_S)
    after = four.activity()
    assert after.tokens - before.tokens == 8 and after.generating == 0 and after.waiting == 0


def test_stop_strings_end_the_caption_before_them(four: Captioner, images: Path) -> None:
    full = four.caption(images / "alpha.png", max_tokens=40)
    middle = len(full.text) // 2
    stop = full.text[middle:middle + 3]
    cut = four.caption(images / "alpha.png", max_tokens=40, stop=[stop, "never in it"])
    assert cut.text == full.text[:full.text.find(stop)].rstrip() and cut.finish_reason == "stop"
    assert cut.generated_tokens < full.generated_tokens
    assert "".join(four.stream(images / "alpha.png", max_tokens=40, stop=(stop,))) == cut.text
    assert four.caption(images / "alpha.png", max_tokens=40, stop=["never in it"]).text == full.text


def test_the_loop_guard_ends_a_repeating_caption_at_its_first_round(four: Captioner, images: Path) -> None:
    """The random tiny model falls into loops readily: what a small captioner does now and then."""
    free = four.caption(images / "photo.jpg", max_tokens=300, loop_guard=False)
    guarded = four.caption(images / "photo.jpg", max_tokens=300)
    assert free.finish_reason == "length" and free.generated_tokens == 300
    assert guarded.finish_reason == "repetition" and guarded.generated_tokens < 150
    assert free.text.startswith(guarded.text) and len(guarded.text) < len(free.text) / 3
    assert free.text.count(guarded.text.split()[-1]) > 3 * guarded.text.count(guarded.text.split()[-1])
    for name in NAMES:  # shorter than any loop the guard acts on: untouched, byte for byte
        assert four.caption(images / name, max_tokens=60).text == four.caption(images / name, max_tokens=60,
                                                                               loop_guard=False).text
    forced = four.caption(images / "photo.jpg", max_tokens=300, ignore_eos=True)  # benchmarks: a fixed length
    assert forced.generated_tokens == 300 and forced.finish_reason == "length"
