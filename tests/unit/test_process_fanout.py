"""The output fan-out policy of envd's processes (pure asyncio, small limits)."""

from __future__ import annotations

import asyncio

import pytest

from wrenn.core.errors import ResourceExhausted
from wrenn.envd.process.fanout import Chunk, ExitStatus, Fanout, Subscriber

END = ExitStatus(0, True, "exit status 0", None)


async def drain(sub: Subscriber, delay_s: float = 0.0) -> tuple[bytes, ExitStatus]:
    out = b""
    while True:
        item = await sub.get(timeout_s=30)
        if isinstance(item, Chunk):
            out += item.data
            if delay_s:
                await asyncio.sleep(delay_s)
        elif isinstance(item, ExitStatus):
            return out, item


async def produce(fanout: Fanout, chunks: list[bytes]) -> None:
    for data in chunks:
        await fanout.publish(Chunk("stdout", data))
    fanout.finish(END)


async def test_a_single_slow_subscriber_paces_the_producer_and_loses_nothing() -> None:
    fanout = Fanout("t", soft_limit_bytes=8, hard_limit_bytes=16, stall_s=30)
    sub = fanout.subscribe()
    chunks = [b"%04d" % i for i in range(200)]
    producer = asyncio.create_task(produce(fanout, chunks))
    out, end = await drain(sub, delay_s=0.001)
    await producer
    assert out == b"".join(chunks)
    assert end == END
    assert sub.pending_bytes == 0


async def test_an_idle_subscriber_is_cut_off_and_the_fast_one_gets_everything() -> None:
    fanout = Fanout("t", soft_limit_bytes=8, hard_limit_bytes=32, stall_s=30)
    fast = fanout.subscribe()
    idle = fanout.subscribe()
    chunks = [b"%04d" % i for i in range(100)]
    producer = asyncio.create_task(produce(fanout, chunks))
    out, _ = await drain(fast)
    await producer
    assert out == b"".join(chunks)
    received = b""
    with pytest.raises(ResourceExhausted, match="fell more than 32 bytes behind"):
        while True:
            item = await idle.get(timeout_s=30)
            assert isinstance(item, Chunk)
            received += item.data
    assert out.startswith(received)
    assert 32 <= len(received) <= 36


async def test_a_stalled_only_subscriber_releases_the_producer() -> None:
    fanout = Fanout("t", soft_limit_bytes=8, hard_limit_bytes=64, stall_s=0.05)
    stuck = fanout.subscribe()
    await produce(fanout, [b"x" * 4] * 100)  # completes although nobody reads
    with pytest.raises(ResourceExhausted):
        while True:
            await stuck.get(timeout_s=30)


async def test_without_subscribers_output_is_dropped() -> None:
    fanout = Fanout("t", soft_limit_bytes=1, hard_limit_bytes=8, stall_s=30)
    await fanout.publish(Chunk("stdout", b"unseen"))
    late = fanout.subscribe()
    await fanout.publish(Chunk("stderr", b"seen"))
    fanout.finish(END)
    assert await late.get(timeout_s=1) == Chunk("stderr", b"seen")
    assert await late.get(timeout_s=1) == END


async def test_subscribing_after_the_end_yields_the_end() -> None:
    fanout = Fanout("t")
    fanout.finish(END)
    assert await fanout.subscribe().get(timeout_s=1) == END


async def test_idle_get_times_out_for_keepalives() -> None:
    fanout = Fanout("t")
    assert await fanout.subscribe().get(timeout_s=0.01) is None


async def test_adjacent_chunks_of_one_kind_are_merged_in_order() -> None:
    fanout = Fanout("t")
    sub = fanout.subscribe()
    for kind, data in [("stdout", b"a"), ("stdout", b"b"), ("stderr", b"c"), ("stdout", b"d")]:
        await fanout.publish(Chunk(kind, data))  # type: ignore[arg-type]
    fanout.finish(END)
    items = [await sub.get(timeout_s=1) for _ in range(4)]
    assert items == [Chunk("stdout", b"ab"), Chunk("stderr", b"c"), Chunk("stdout", b"d"), END]


async def test_a_closed_subscriber_no_longer_paces() -> None:
    fanout = Fanout("t", soft_limit_bytes=4, hard_limit_bytes=1 << 20, stall_s=30)
    gone = fanout.subscribe()
    await fanout.publish(Chunk("stdout", b"full"))
    blocked = asyncio.create_task(fanout.publish(Chunk("stdout", b"more")))
    await asyncio.sleep(0)
    assert not blocked.done()
    gone.close()
    await blocked
    assert fanout.subscriber_count == 0
