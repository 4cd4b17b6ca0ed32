"""The worker's heap trim (`runtime.worker_heap`): the preloaded thread, the signal, the env.

Real processes throughout: a Python child whose heap is fragmented on purpose
(64 KiB blocks, below glibc's mmap threshold, every other one freed) and real
`worker_binary` processes started by `workers.start_worker_process`.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from experiments.process_stats import anon_rss
from fedprune.runtime import contexts, memory, worker_heap, workers

pytestmark = pytest.mark.skipif(worker_heap.trim_library() is None,
                                reason="needs Linux, glibc and a C compiler")

_FRAGMENT = textwrap.dedent("""
    import sys, time
    blocks = [bytearray(65536) for _ in range(int(sys.argv[1]))]
    del blocks[::2]  # half of them free, between live ones: only a trim returns them
    print("ready", flush=True)
    time.sleep(120)
""")


def _anon_mib(pid: int) -> float:
    return anon_rss(psutil.Process(pid)) / 2**20


@pytest.fixture
def fragmented_child():
    children = []

    def start(*, preload: bool, blocks: int = 2000):
        env = dict(os.environ)
        if preload:
            env.update(worker_heap.worker_preload_environment(env))
        child = subprocess.Popen([sys.executable, "-c", _FRAGMENT, str(blocks)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        children.append(child)
        assert child.stdout.readline() == "ready\n"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait(timeout=10)


def test_release_hands_back_the_free_pages_between_live_blocks(fragmented_child):
    child = fragmented_child(preload=True)  # 2000 x 64 KiB = 125 MiB, half of it free
    assert worker_heap.trim_count(child.pid) == 0
    before = _anon_mib(child.pid)
    assert worker_heap.release_worker_heaps([child.pid], wait_s=10.0) == 1
    after = _anon_mib(child.pid)
    assert worker_heap.trim_count(child.pid) == 1
    assert before - after > 50, (before, after)  # ~62 MiB of free blocks
    assert child.poll() is None
    # Each release is one more trim; nothing more to hand back the second time.
    assert worker_heap.release_worker_heaps([child.pid], wait_s=10.0) == 1
    assert worker_heap.trim_count(child.pid) == 2
    assert abs(_anon_mib(child.pid) - after) < 5


@pytest.mark.parametrize("gaps, asked", [
    ((0.0, 0.5, 0.99), [1, 0, 0]),  # within the interval of the first: skipped
    ((0.0, 1.0, 1.5, 2.0), [1, 1, 0, 1]),  # counted from the last trim asked for
])
def test_min_interval_skips_a_worker_asked_recently(fragmented_child, monkeypatch, gaps, asked):
    child = fragmented_child(preload=True, blocks=10)
    clock = iter(gaps)
    monkeypatch.setattr(worker_heap, "_asked", memory.Pacer(clock=lambda: next(clock)))
    got = [worker_heap.release_worker_heaps([child.pid], min_interval_s=1.0) for _ in gaps]
    assert got == asked
    for _ in range(1000):  # the trims run in the child, beside this test: up to 10 s
        if worker_heap.trim_count(child.pid) >= 1:
            break
        time.sleep(0.01)
    # SIGUSR2s sent in quick succession may merge into one trim; skipped ones send none.
    assert 1 <= worker_heap.trim_count(child.pid) <= sum(asked)


def test_a_process_without_the_thread_is_not_signalled(fragmented_child):
    # SIGUSR2's default action would end it.
    child = fragmented_child(preload=False, blocks=10)
    assert worker_heap.trim_count(child.pid) is None
    assert worker_heap.release_worker_heaps([child.pid, 2**22 + 12345], wait_s=1.0) == 0
    assert child.poll() is None


@pytest.mark.parametrize("mode, has_thread", [("fedprune", True), ("glibc", False)])
def test_workers_fedprune_starts_have_the_trim_thread(monkeypatch, mode, has_thread):
    monkeypatch.setenv(workers.WORKER_MALLOC_ENV, mode)
    worker = workers.start_worker_process(workers.pick_unused_port())
    try:
        assert worker.pid in workers.started_worker_pids()
        assert (worker_heap.trim_count(worker.pid) == 0) is has_thread
        assert worker_heap.release_worker_heaps([worker.pid], wait_s=10.0) == int(has_thread)
        assert worker_heap.trim_count(worker.pid) == (1 if has_thread else None)
        assert worker.poll() is None
    finally:
        workers.stop_popen(worker, workers.STOP_GRACE_S)
    assert worker.pid not in workers.started_worker_pids()


def test_preload_environment_puts_the_library_first_once():
    library = worker_heap.trim_library()
    assert worker_heap.worker_preload_environment({}) == {"LD_PRELOAD": library}
    assert worker_heap.worker_preload_environment({"LD_PRELOAD": f"/x.so {library} /y.so"}) == {
        "LD_PRELOAD": f"{library} /x.so /y.so"}
    assert worker_heap.worker_preload_environment({memory.TRIM_ENV: "0"}) == {}
    assert "LD_PRELOAD" not in workers.worker_environment({workers.WORKER_MALLOC_ENV: "glibc"})


def test_without_a_compiler_there_is_no_library_and_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(worker_heap, "_cache_dirs", lambda: [tmp_path])
    monkeypatch.setattr(worker_heap.shutil, "which", lambda name: None)
    worker_heap.trim_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=worker_heap.__name__):
            assert worker_heap.trim_library() is None
        assert worker_heap.worker_preload_environment({}) == {}
        assert "no C compiler" in caplog.text
    finally:
        worker_heap.trim_library.cache_clear()


def test_a_library_others_can_write_is_not_loaded(monkeypatch, tmp_path):
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir()
    shared.chmod(0o777)
    name = os.path.basename(worker_heap.trim_library())
    (shared / name).write_bytes(b"planted by someone else")
    monkeypatch.setattr(worker_heap, "_cache_dirs", lambda: [shared, own])
    worker_heap.trim_library.cache_clear()
    try:
        assert worker_heap.trim_library() == str(own / name)  # built afresh, in `own`
        assert (own.stat().st_mode & 0o777, (own / name).stat().st_mode & 0o777) == (0o700, 0o755)
    finally:
        worker_heap.trim_library.cache_clear()


def test_the_library_is_built_once_per_source_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(worker_heap, "_cache_dirs", lambda: [tmp_path / "ro", tmp_path / "rw"])
    (tmp_path / "ro").write_text("a file where a directory should be")  # unwritable
    worker_heap.trim_library.cache_clear()
    try:
        library = worker_heap.trim_library()
        assert library is not None and library.startswith(str(tmp_path / "rw"))
        assert [p.name for p in (tmp_path / "rw").iterdir()] == [os.path.basename(library)]
        worker_heap.trim_library.cache_clear()
        assert worker_heap.trim_library() == library  # found, not rebuilt
    finally:
        worker_heap.trim_library.cache_clear()


def _longest_rise(samples_mib, step_mib: float) -> int:
    """The most consecutive samples that each rose by more than `step_mib` over the one before."""
    longest = run = 0
    for before, after in itertools.pairwise(samples_mib):
        run = run + 1 if after - before > step_mib else 0
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("batch_size, piles_up", [
    (contexts.DISPOSE_BATCH_SIZE, False),  # fedprune's: freed within a call or two
    (20, True),  # TFF's default: the arguments of five or six calls pile up
])
def test_the_worker_frees_call_arguments_instead_of_piling_them_up(monkeypatch, batch_size,
                                                                    piles_up):
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    monkeypatch.setattr(contexts, "DISPOSE_BATCH_SIZE", batch_size)
    contexts.set_local_context()
    try:
        size = 4 * 2**20  # float32: 16 MiB an argument

        @tff.tensorflow.computation(tff.TensorType(np.float32, [size]))
        def total(x):
            return tf.reduce_sum(x)

        (pid,) = workers.started_worker_pids()
        held = []  # the worker's anonymous RSS after each call, less its free pages (MiB)
        for i in range(12):
            assert total(np.full([size], i, np.float32)) == size * i
            worker_heap.release_worker_heaps([pid], wait_s=10.0)
            held.append(_anon_mib(pid))
        # Measured: TFF's default rose 69 -> 117 -> ... -> 309 MiB over six calls, then
        # fell back; fedprune's stayed within 21-117 MiB and rose at most twice in a row
        # (a call's arguments freed a call late on a loaded machine: 67 -> 83 -> 115 MiB).
        rises = _longest_rise(held, step_mib=8)
        assert (rises >= 4) if piles_up else (rises <= 2), [round(h) for h in held]
    finally:
        workers.stop_workers()
