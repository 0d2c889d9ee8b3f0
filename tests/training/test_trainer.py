"""The trainer's pieces that do not need a task: the batch split."""

import pytest

from training.trainer import split_batch


@pytest.mark.parametrize('world', [1, 2, 3, 4])
def test_split_batch_matches_a_brute_force_search(world):
    for batch in range(1, 25):
        for batch_gpu in [None, *range(1, 27)]:
            # Brute force: the per-rank batch is batch / world; a round takes min(batch_gpu, per-rank) items and
            # the rounds must cover the per-rank batch exactly.
            per_rank = batch / world
            round_size = per_rank if batch_gpu is None else min(batch_gpu, per_rank)
            ok = per_rank == int(per_rank) and (per_rank / round_size) == int(per_rank / round_size)
            if not ok:
                with pytest.raises(ValueError, match='--batch=' + str(batch)):
                    split_batch(batch, batch_gpu, world)
                continue
            assert split_batch(batch, batch_gpu, world) == (batch, int(round_size), int(per_rank / round_size))


def test_split_batch_errors_name_the_fix():
    with pytest.raises(ValueError, match=r'--batch=10 is not divisible by the number of processes \(4\); use a multiple of 4'):
        split_batch(10, None, 4)
    with pytest.raises(ValueError, match=r'--batch-gpu=3 does not divide; choose a --batch-gpu dividing 8'):
        split_batch(16, 3, 2)
