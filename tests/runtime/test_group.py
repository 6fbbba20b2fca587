from functools import partial

import pytest

from rollflow.runtime.backend import InlineBackend, Resources, WorkerStartError
from rollflow.runtime.group import Mode, WorkerGroup, chunks, dispatch
from rollflow.runtime.ray_backend import RayBackend


@pytest.mark.parametrize("n_items, n_chunks", [(10, 3), (9, 3), (2, 3), (0, 2), (7, 1), (5, 5)])
def test_chunks_are_contiguous_and_near_equal(n_items, n_chunks):
    items = list(range(n_items))
    parts = chunks(items, n_chunks)
    assert len(parts) == n_chunks
    assert [x for p in parts for x in p] == items  # order preserved, nothing lost
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger chunks come first


def test_chunks_hand_example():
    assert chunks(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]


class FakeWorker:
    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.calls: list[tuple] = []

    @dispatch(Mode.SPLIT)
    def scale(self, items, factor=1):
        self.calls.append(("scale", list(items), factor))
        return [(self.idx, x * factor) for x in items]

    @dispatch(Mode.BROADCAST)
    def ping(self, message):
        self.calls.append(("ping", message))
        return f"{self.idx}:{message}"

    @dispatch(Mode.FIRST)
    def train(self, batch):
        self.calls.append(("train", batch))
        return {"worker": self.idx, "n": len(batch)}

    def plain(self):
        return "not dispatched"


@pytest.fixture
def group():
    return WorkerGroup("fake", [FakeWorker(i) for i in range(3)])


def test_split_concatenates_results_in_order(group):
    out = group.scale(list(range(7)), factor=10)
    assert [x for _, x in out] == [0, 10, 20, 30, 40, 50, 60]
    assert [w for w, _ in out] == [0, 0, 0, 1, 1, 2, 2]  # chunks of 3, 2, 2
    assert [w.calls for w in group.workers] == [
        [("scale", [0, 1, 2], 10)],
        [("scale", [3, 4], 10)],
        [("scale", [5, 6], 10)],
    ]


def test_split_skips_workers_with_an_empty_chunk(group):
    assert group.scale([5]) == [(0, 5)]
    assert [len(w.calls) for w in group.workers] == [1, 0, 0]


def test_broadcast_returns_one_result_per_worker(group):
    assert group.ping("hi") == ["0:hi", "1:hi", "2:hi"]
    assert all(w.calls == [("ping", "hi")] for w in group.workers)


def test_first_calls_only_worker_zero(group):
    assert group.train([1, 2]) == {"worker": 0, "n": 2}
    assert [len(w.calls) for w in group.workers] == [1, 0, 0]


@pytest.mark.parametrize("name", ["plain", "missing"])
def test_non_dispatch_method_is_an_attribute_error_naming_it(group, name):
    with pytest.raises(AttributeError, match=rf"FakeWorker\.{name} is not a @dispatch method of group 'fake'"):
        getattr(group, name)


def test_group_needs_a_worker():
    with pytest.raises(ValueError, match="worker group 'empty' needs at least one worker"):
        WorkerGroup("empty", [])


# --- workers that cannot be built ------------------------------------------------------------------------------


def build_worker(idx: int) -> FakeWorker:
    if idx == 1:
        raise_from_user_code()
    return FakeWorker(idx)


def raise_from_user_code():
    raise RuntimeError("CUDA is not available on this node")


def driver_only_module():
    raise ModuleNotFoundError("No module named 'only_on_the_driver'")


class ImportableOnlyInTheDriver:
    """Unpickling it fails as a reference to a module the worker lacks would: before the worker's constructor runs."""

    def __reduce__(self):
        return driver_only_module, ()


def test_inline_factory_error_names_the_worker_and_its_cause():
    with pytest.raises(WorkerStartError, match=r"^worker fake/1 failed to start: RuntimeError: CUDA is not available "
                       r"on this node \(at .*test_group\.py:\d+, in raise_from_user_code\)$") as info:
        WorkerGroup.spawn(InlineBackend(), "fake", FakeWorker, [partial(build_worker, i) for i in range(3)], Resources())
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.fixture(scope="module")
def ray_backend():
    backend = RayBackend(num_cpus=2)  # a private Ray: its workers import this module through the driver's path
    yield backend
    backend.shutdown()


def test_ray_factory_error_stops_the_spawn_naming_the_worker_and_its_cause(ray_backend):
    group = WorkerGroup.spawn(ray_backend, "fake", FakeWorker, [partial(build_worker, i) for i in range(2)], Resources(0))
    with pytest.raises(WorkerStartError, match=r"^worker fake/1 failed to start: RuntimeError: CUDA is not available "
                       r"on this node \(at .*test_group\.py:\d+, in raise_from_user_code\)$"):
        ray_backend.wait_started(group.workers)
    with pytest.raises(WorkerStartError, match=r"worker fake/1 failed to start"):  # as is every later call on it
        ray_backend.result(group.submit(1, "ping", "hi"))
    assert ray_backend.result(group.submit(0, "ping", "hi")) == "0:hi"  # the others were built


def test_ray_worker_whose_arguments_cannot_be_unpickled_is_named(ray_backend):
    factory = partial(FakeWorker, ImportableOnlyInTheDriver())
    [worker] = WorkerGroup.spawn(ray_backend, "rollout", FakeWorker, [factory], Resources(0)).workers
    with pytest.raises(WorkerStartError,
                       match=r"^worker rollout/0 failed to start: ModuleNotFoundError: No module named 'only_on_the_driver'$"):
        ray_backend.wait_started([worker])
