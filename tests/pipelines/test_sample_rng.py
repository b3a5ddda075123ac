"""pipelines/data/sample_rng.py: a sample's draws depend on (seed, epoch, position) only."""
import pickle

import numpy as np

from pipelines.data.sample_rng import SampleRng


def test_a_samples_draws_do_not_depend_on_what_was_drawn_before():
    a, b = SampleRng(7), SampleRng(7)
    first = a(3, 41).random(5)
    a(3, 40).random(100)  # another sample's draws in between (another worker's order)
    b(0, 0).integers(0, 10, 17)
    assert np.array_equal(a(3, 41).random(5), first) and np.array_equal(b(3, 41).random(5), first)
    assert np.array_equal(pickle.loads(pickle.dumps(a))(3, 41).random(5), first)  # spawned workers


def test_seed_epoch_and_position_each_change_the_draws():
    rng = SampleRng(7)
    draws = {tuple(rng(e, g).random(4)) for e in range(3) for g in range(200)}
    draws |= {tuple(SampleRng(8)(e, g).random(4)) for e in range(3) for g in range(200)}
    assert len(draws) == 1200
    u = np.array([SampleRng(1)(0, g).random() for g in range(4000)])
    assert abs(u.mean() - 0.5) < 0.02 and abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.05  # neighbours unrelated
