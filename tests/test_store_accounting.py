from concurrent.futures import ThreadPoolExecutor

from adaptflow.store import accounting, storage
from adaptflow.store.accounting import Work, stage_stats


def test_orchestration_share_is_the_wall_time_outside_every_task_interval():
    # two parallel tasks (0-4 s, 1-5 s) and one after them (6-8 s) in a 10 s stage: busy 7 s
    works = [
        Work(started_at=100, seconds=4, bytes_read=10),
        Work(started_at=101, seconds=4, bytes_written=5),
        Work(started_at=106, seconds=2, bytes_read=1),
    ]
    st = stage_stats(10.0, works, images=50)
    assert st["task_seconds"] == 7.0 and st["orchestration_share"] == 0.3
    assert (st["bytes_read"], st["bytes_written"], st["images_per_second"]) == (11, 5, 5.0)
    assert stage_stats(0.0, [], None)["orchestration_share"] is None


def test_meters_count_storage_bytes_on_their_thread_and_on_carried_pool_threads(memory_uri):
    storage.write_bytes(f"{memory_uri}/a", b"x" * 100)
    with accounting.measure() as meter:
        storage.write_bytes(f"{memory_uri}/b", b"y" * 10)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(accounting.carry(storage.read_bytes), [f"{memory_uri}/a"] * 3))
            list(pool.map(storage.read_bytes, [f"{memory_uri}/a"]))  # not carried: not counted
    work = meter.done()
    assert (work.bytes_read, work.bytes_written) == (300, 10) and work.seconds > 0
    assert not accounting.metering()
