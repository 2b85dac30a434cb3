"""The shard split of a training stream (uniinst/data/stream_plan.py) against a naive
image-by-image reference: pieces, the shards each rank reads, positions across epochs and a
resize in the middle of an epoch."""

from __future__ import annotations

import numpy as np
import pytest

from uniinst.data.stream_plan import Segment, StreamPlan, StreamPosition, shuffle_buffer


def _plan(sizes, **kwargs) -> StreamPlan:
    ids = iter(range(10_000))
    return StreamPlan([[next(ids) for _ in range(n)] for n in sizes], **kwargs)


def test_shuffle_buffer_is_a_bounded_reproducible_permutation():
    items = list(range(100))
    out = list(shuffle_buffer(items, 8, np.random.default_rng(3)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(items, 8, np.random.default_rng(3)))
    # Held back at most 8: the item at output position p entered at most 8 items later.
    assert all(item <= p + 8 for p, item in enumerate(out))
    assert list(shuffle_buffer(items, 1, np.random.default_rng(3))) == items


def test_ranks_take_contiguous_pieces_of_the_epochs_shard_order():
    plan = _plan([3, 2, 4], seed=1, shuffle_buffer_size=2)  # 9 images
    images = plan.epoch_images(0)
    assert sorted(images) == list(range(9))
    shard_of = {i: s for s, ids in enumerate(plan.kept) for i in ids}
    position = plan.start(StreamPosition(), 2)
    parts = [plan.rank_epoch(position, r) for r in range(2)]
    assert parts[0].piece == images[:4] and parts[1].piece == images[4:8]  # the 9th rests this epoch
    for part in parts:
        assert sorted(part.order) == sorted(part.piece) and part.done == 0 and part.todo == part.order
        assert part.shards == list(dict.fromkeys(shard_of[i] for i in part.piece))
    assert plan.epoch_images(1) != images  # another shard order


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_rank_reads_at_most_one_shard_more_than_its_share(world):
    rng = np.random.default_rng(world)
    sizes = rng.integers(1, 12, size=16).tolist()
    plan = _plan(sizes, seed=world)
    for epoch in range(3):
        position = plan.start(StreamPosition(epoch), world)
        parts = [plan.rank_epoch(position, r) for r in range(world)]
        reads = sum(len(p.shards) for p in parts)
        assert reads <= len(sizes) + world - 1
        trained = [i for p in parts for i in p.order]
        assert len(trained) == len(set(trained)) == world * (sum(sizes) // world)


def test_positions_advance_as_image_by_image_steps():
    plan = _plan([3, 2, 4])  # 9 images: 4 per rank of 2, an epoch is 4 images a rank
    start = plan.start(StreamPosition(), 2)
    assert start == StreamPosition(0, (Segment(2, 0),))
    assert plan.advance(start, 5) == StreamPosition(1, (Segment(2, 1),))
    assert plan.advance(start, 8) == StreamPosition(2, (Segment(2, 0),))
    stepped = start
    for _ in range(11):
        stepped = plan.advance(stepped, 1)
    assert stepped == plan.advance(start, 11)
    assert StreamPosition.from_dict(stepped.to_dict()) == stepped
    with pytest.raises(ValueError, match="too few for 10 ranks"):
        plan.start(StreamPosition(), 10)


def _trained(plan: StreamPlan, position: StreamPosition, world: int, images: int) -> list[int]:
    """What each rank of the group trains on in its next ``images`` images, within the epoch."""
    parts = [plan.rank_epoch(position, r) for r in range(world)]
    return [i for p in parts for i in p.todo[:images]]


def test_a_resized_group_finishes_the_epoch_on_what_the_old_one_left():
    plan = _plan([5, 7, 6, 6], seed=3, shuffle_buffer_size=4)  # 24 images
    three = plan.start(StreamPosition(), 3)  # 8 images a rank
    before = _trained(plan, three, 3, 5)
    stopped = plan.advance(three, 5)
    assert stopped == StreamPosition(0, (Segment(3, 5),))

    two = plan.start(StreamPosition.from_dict(stopped.to_dict()), 2)
    assert two == StreamPosition(0, (Segment(3, 5), Segment(2, 0)))
    after = _trained(plan, two, 2, 100)
    assert len(after) == 2 * (9 // 2)  # 9 left: 4 a rank, one rests
    assert not set(before) & set(after)
    assert set(before) | set(after) <= set(plan.epoch_images(0))
    left = [i for i in plan.epoch_images(0) if i not in before]
    assert after and set(after) <= set(left)
    # The remainder is split in the epoch's order: rank 0's piece comes before rank 1's.
    parts = [plan.rank_epoch(two, r) for r in range(2)]
    assert parts[0].piece + parts[1].piece == left[:8]

    # Two more images a rank, then a third size: the epoch's rest is split again.
    again = plan.start(plan.advance(two, 2), 4)
    assert again.segments == (Segment(3, 5), Segment(2, 2), Segment(4, 0))
    first_two = [i for p in parts for i in p.order[:2]]
    last = _trained(plan, again, 4, 100)
    assert len(last) == 4  # 4 left, one each
    assert not set(last) & (set(before) | set(first_two))
    # After the epoch the next starts whole, with the group's size.
    assert plan.advance(again, 1) == StreamPosition(1, (Segment(4, 0),))
