"""A Captioner's life from start to end: closed from many threads at once, left open when the
script ends, carried into a forked child, collected by the garbage collector in any thread.

Each way of ending that could crash or hang runs in a Python process of its own, so a failure
is a return code here, not the end of the test run; the racy ones run a few times over.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from helpers import HANG_S

from caprl_local import Cancelled, Caption, Captioner, EngineError

#: Generous bound for a script that loads the tiny model, starts captions and ends: seconds on
#: an idle machine. Anything that exceeds it has hung.
SCRIPT_S = 180
#: Runs of each script whose outcome depends on where the threads happen to be.
RUNS = 3

LONG = {"max_tokens": 100_000, "ignore_eos": True}  # runs until cancelled (or the context is full)

HEAD = """\
import gc, os, sys, threading, weakref
from caprl_local import Cancelled, Captioner, EngineError
model, mmproj, image = sys.argv[1:4]
LONG = dict(max_tokens=100_000, ignore_eos=True)
"""


def run_script(body: str, tiny_model: tuple[Path, Path], image: Path) -> subprocess.CompletedProcess[str]:
    """Run HEAD + body with `python -c` (argv: model, mmproj, image); a hang fails the test."""
    model, mmproj = tiny_model
    try:
        return subprocess.run([sys.executable, "-c", HEAD + textwrap.dedent(body), str(model), str(mmproj), str(image)],
                              capture_output=True, text=True, timeout=SCRIPT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung (no exit within {SCRIPT_S} s); its stderr: {exc.stderr!s:.2000}")


def assert_clean(done: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-2000:]}"
    assert done.returncode == code, done.stderr[-2000:]
    assert "Fatal Python error" not in done.stderr and "Segmentation" not in done.stderr, done.stderr[-2000:]


def fresh(tiny_model: tuple[Path, Path], **options: object) -> Captioner:
    return Captioner(*tiny_model, threads=1, isolate=False, **options)


# -- closing, from any number of threads ------------------------------------------------------


@pytest.mark.parametrize("in_flight", [0, 2])
def test_close_from_eight_threads_at_once_frees_once_and_all_wait(tiny_model: tuple[Path, Path], images: Path,
                                                                   in_flight: int) -> None:
    for _ in range(RUNS):
        cap = fresh(tiny_model, parallel=2)
        handles = [cap.submit(images / "photo.jpg", **LONG) for _ in range(in_flight)]
        if handles:
            next(iter(handles[0]))  # generating: the loop is inside the handles
        assert close_at_once(cap, 8) == [True] * 8  # each returned once the model was freed
        for handle in handles:
            with pytest.raises(Cancelled):
                handle.result(timeout=HANG_S)
        cap.close()  # and once more, later


def close_at_once(cap: Captioner, n: int) -> list[bool]:
    """Call cap.close() from `n` threads at the same moment; whether the model was freed when each returned."""
    start = threading.Barrier(n)
    freed: list[bool] = []
    errors: list[BaseException] = []

    def close() -> None:
        try:
            start.wait()
            cap.close()
            freed.append(cap._session._ctx is None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=close) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert not errors
    return freed


def test_every_call_after_close_is_a_closed_error(tiny_model: tuple[Path, Path], images: Path) -> None:
    cap = fresh(tiny_model)
    assert cap.caption(images / "photo.jpg", max_tokens=4).text
    cap.close()
    photo = images / "photo.jpg"
    calls = [lambda: cap.caption(photo), lambda: cap.submit(photo), lambda: next(cap.stream(photo)),
             lambda: next(cap.caption_many([photo]))]
    for call in calls:
        with pytest.raises(EngineError, match="closed"):
            call()
    assert cap.activity().generating == 0  # a progress display may still look
    cap.cancel()


def test_captions_racing_close_end_in_a_caption_cancelled_or_closed(tiny_model: tuple[Path, Path],
                                                                    images: Path) -> None:
    for _ in range(RUNS):
        outcomes = race_close(fresh(tiny_model, parallel=2), images)
        assert outcomes.count("closed") == 3  # every caller ended on the closed error, nothing else


def race_close(cap: Captioner, images: Path) -> list[str]:
    """Three threads captioning over and over (caption, stream, submit) while this one closes."""
    outcomes: list[str] = []
    unexpected: list[BaseException] = []
    started = threading.Semaphore(0)

    def keep_captioning(kind: str) -> None:
        for i in range(1000):
            if i == 1:
                started.release()
            try:
                if kind == "caption":
                    assert isinstance(cap.caption(images / "alpha.png", max_tokens=6), Caption)
                elif kind == "stream":
                    assert isinstance("".join(cap.stream(images / "cmyk.jpg", max_tokens=6)), str)
                else:
                    assert isinstance(cap.submit(images / "photo.jpg", max_tokens=6).result(HANG_S), Caption)
                outcomes.append("caption")
            except Cancelled:
                outcomes.append("cancelled")
            except EngineError as exc:
                assert "closed" in str(exc), exc
                outcomes.append("closed")
                return
            except BaseException as exc:  # noqa: BLE001 - reported below
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=keep_captioning, args=(kind,)) for kind in ("caption", "stream", "submit")]
    for t in threads:
        t.start()
    for _ in threads:
        started.acquire(timeout=HANG_S)  # each has captioned at least once
    cap.close()
    for t in threads:
        t.join(HANG_S)
    assert not unexpected
    return outcomes


def test_close_inside_the_scheduler_thread_leaves_the_model_to_the_loop(tiny_model: tuple[Path, Path],
                                                                        images: Path) -> None:
    """A callback on the loop's own thread (here the test probe) closes the Captioner mid-step."""
    done = run_script("""
        cap = Captioner(model, mmproj, threads=1, isolate=False, parallel=2)
        scheduler = cap._live()
        def probe(request, step, logits):
            if step == 3:
                cap.close()  # returns at once; the decode step it came from goes on with live handles
        sample = scheduler._sample
        def watched(slots):
            for slot in slots:
                probe(slot.request, slot.n_gen, None)
            return sample(slots)
        scheduler._sample = watched
        handles = [cap.submit(image, **LONG) for _ in range(2)]
        for h in handles:
            try:
                h.result()
            except Cancelled:
                pass
        scheduler._thread.join()
        assert scheduler._released, "the loop did not free the model as it stopped"
        try:
            cap.caption(image)
        except EngineError as exc:
            assert "closed" in str(exc)
        else:
            raise AssertionError("captioned after close")
        print("ok")
    """, tiny_model, images / "photo.jpg")
    assert_clean(done)
    assert done.stdout.strip() == "ok"


def test_a_cancelled_prompt_stops_between_its_pieces(captioner: Captioner, images: Path) -> None:
    """A cancel (or close) does not wait for the rest of a large image's prompt."""
    session = captioner._live().session
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 1  # the first piece goes in, then the caption is cancelled

    rgb = captioner._budget.prepare(images / "photo.jpg")  # as caption() sizes it
    with pytest.raises(Cancelled):
        session.prompt(0, rgb, "Describe <image> please.", "photo.jpg", cancelled=cancelled)
    session.forget(0)
    assert len(asked) == 2
    assert captioner.caption(images / "photo.jpg", max_tokens=4).text  # the sequence is clean again


# -- the end of the script, with captions in flight and no close() ------------------------------

ENDINGS = {  # (what the script does after loading, its exit code); "submit and leave" is still in the prompt
    "falls-off-the-end-mid-prompt": ("h = cap.submit(image, **LONG)", 0),
    "falls-off-the-end-mid-generation": ("h = cap.submit(image, **LONG); next(iter(h))", 0),
    "sys-exit": ("h = cap.submit(image, **LONG); sys.exit(0)", 0),
    "uncaught-exception": ("h = cap.submit(image, **LONG); raise RuntimeError('the script failed')", 1),
    "two-in-flight": ("hs = [cap.submit(image, **LONG) for _ in range(2)]", 0),
    "two-generating-more-waiting": ("hs = [cap.submit(image, **LONG) for _ in range(5)]; next(iter(hs[0]))", 0),
    "caption-on-daemon-threads": ("""
        go = threading.Barrier(3)
        def work():
            go.wait()
            try:
                cap.caption(image, **LONG)
            except Cancelled:  # the exit hook cancels it
                pass
        for _ in range(2):
            threading.Thread(target=work, daemon=True).start()
        go.wait()
        """, 0),
    "captioner-dropped-in-a-function": ("""
        def start():
            c = Captioner(model, mmproj, threads=1, isolate=False, parallel=2)
            return [c.submit(image, **LONG) for _ in range(2)]
        hs = start()  # the Captioner is gone (finalized in this thread); its captions still run
        """, 0),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_script_that_ends_with_captions_in_flight_exits_cleanly(tiny_model: tuple[Path, Path], images: Path,
                                                                   ending: str) -> None:
    body, code = ENDINGS[ending]
    script = "cap = Captioner(model, mmproj, threads=1, isolate=False, parallel=2)\n" + textwrap.dedent(body)
    for _ in range(RUNS):
        assert_clean(run_script(script, tiny_model, images / "photo.jpg"), code)


def test_a_script_that_ends_with_the_default_options_exits_cleanly(tiny_model: tuple[Path, Path],
                                                                   images: Path) -> None:
    """The default options, the first-load check in a child process included."""
    for _ in range(RUNS):
        assert_clean(run_script("cap = Captioner(model, mmproj, threads=1)\nh = cap.submit(image, **LONG)\n",
                                tiny_model, images / "photo.jpg"))


# -- a fork -----------------------------------------------------------------------------------


def test_a_forked_child_gets_a_clear_error_and_the_parent_goes_on(tiny_model: tuple[Path, Path],
                                                                   images: Path) -> None:
    done = run_script("""
        cap = Captioner(model, mmproj, threads=1, isolate=False, parallel=2)
        first = cap.caption(image, max_tokens=8).text
        running = cap.submit(image, **LONG)
        next(iter(running))  # a decode may be in progress at the fork
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            failures = []
            calls = {
                "caption": lambda: cap.caption(image, max_tokens=4),
                "submit": lambda: cap.submit(image, max_tokens=4),
                "stream": lambda: next(cap.stream(image, max_tokens=4)),
                "caption_many": lambda: next(cap.caption_many([image], max_tokens=4)),
                "activity": cap.activity,
                "the parent's handle": lambda: running.result(),
                "iterating it": lambda: list(running),
            }
            for name, call in calls.items():
                try:
                    call()
                except EngineError as exc:
                    if f"created in another process (pid {parent})" not in str(exc):
                        failures.append(f"{name}: {exc}")
                except BaseException as exc:
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                else:
                    failures.append(f"{name}: no error")
            cap.cancel()
            running.cancel()
            cap.close()  # lets go only: the handles are the parent's
            cap.close()
            own = Captioner(model, mmproj, threads=1, isolate=False)  # what the error advises
            if own.caption(image, max_tokens=8).text != first:
                failures.append("a Captioner made in the child captions differently")
            own.close()
            sys.stderr.write("".join(f"child: {f}\\n" for f in failures))
            sys.stderr.flush()
            os._exit(1 if failures else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"the child failed ({status})"
        if os.fork() == 0:  # a child that ends as scripts do: exit hooks and finalization with the copy open
            sys.exit(0)
        _, status = os.waitpid(-1, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"the child did not exit cleanly ({status})"
        running.cancel()
        try:
            running.result()
        except Cancelled:
            pass
        assert cap.caption(image, max_tokens=8).text == first
        cap.close()
        print("ok")
    """, tiny_model, images / "photo.jpg")
    assert_clean(done)
    assert done.stdout.strip() == "ok"


# -- the garbage collector, in any thread --------------------------------------------------------


@pytest.mark.parametrize("used", [True, False])
def test_a_captioner_nobody_holds_is_collected_and_freed(tiny_model: tuple[Path, Path], images: Path,
                                                         used: bool) -> None:
    cap = fresh(tiny_model)
    if used:
        assert cap.caption(images / "photo.jpg", max_tokens=4).text  # its loop thread runs
    scheduler, gone = cap._live(), weakref.ref(cap)
    cap.self_ref = cap  # type: ignore[attr-defined]  # a reference cycle: only the collector frees it
    del cap
    gc.collect()
    assert gone() is None  # the loop thread did not keep it alive
    if scheduler._thread is not None:
        scheduler._thread.join(HANG_S)
    deadline = time.monotonic() + HANG_S
    while not scheduler._released and time.monotonic() < deadline:  # the closer thread frees it, soon
        time.sleep(0.01)
    assert scheduler._released


def test_a_captioner_collected_on_its_own_scheduler_thread(tiny_model: tuple[Path, Path], images: Path) -> None:
    """gc.collect() inside the decode loop collects the Captioner there, mid-step."""
    done = run_script("""
        gc.disable()  # only the collection below, on the loop thread
        cap = Captioner(model, mmproj, threads=1, isolate=False, parallel=2)
        cap.self_ref = cap
        scheduler, gone = cap._live(), weakref.ref(cap)
        def probe(request, step, logits):
            if step == 3 and gone() is not None:
                gc.collect()
        sample = scheduler._sample
        def watched(slots):
            for slot in slots:
                probe(slot.request, slot.n_gen, None)
            return sample(slots)
        scheduler._sample = watched
        handles = [cap.submit(image, **LONG) for _ in range(2)]
        del cap
        for h in handles:
            try:
                h.result()
            except Cancelled:
                pass
        assert gone() is None
        scheduler._thread.join()
        assert scheduler._released, "not freed after the collection"
        print("ok")
    """, tiny_model, images / "photo.jpg")
    assert_clean(done)
    assert done.stdout.strip() == "ok"


def test_captioners_in_cycles_with_the_collector_running_all_the_time(tiny_model: tuple[Path, Path],
                                                                       images: Path) -> None:
    """gc.set_threshold(1): finalizers run in whatever thread allocates next, at any point."""
    script = """
        gc.set_threshold(1)
        for round in range(3):
            cap = Captioner(model, mmproj, threads=1, isolate=False, parallel=2)
            cap.self_ref = cap
            handles = [cap.submit(image, max_tokens=40 if i else 100_000, ignore_eos=True) for i in range(3)]
            next(iter(handles[0]))
            del cap
            gc.collect()
            for h in handles:
                try:
                    h.result()
                except Cancelled:
                    pass
        left = Captioner(model, mmproj, threads=1, isolate=False)  # and one left open at the end
        left.self_ref = left
        h = left.submit(image, **LONG)
        print("ok")
    """
    for _ in range(RUNS):
        done = run_script(script, tiny_model, images / "photo.jpg")
        assert_clean(done)
        assert done.stdout.strip() == "ok"
