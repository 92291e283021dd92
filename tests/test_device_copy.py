"""Host <-> device copies: a step's arrays go up as one buffer and come apart as views of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.engine.device_copy import unpack, upload


@pytest.mark.parametrize("shapes", [[(4,), (0,), (2, 3), (1,)], [(0, 5), (3,)], [()], [(2, 2), (2, 2)]])
def test_unpack_gives_each_array_back_as_a_view_of_the_whole(shapes):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-9, 9, shape) for shape in shapes]
    whole = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
    parts = unpack(whole, [a.shape for a in arrays])
    assert [tuple(p.shape) for p in parts] == [tuple(s) for s in shapes]
    for part, array in zip(parts, arrays):
        assert torch.equal(part, torch.from_numpy(array))
        if part.numel():
            assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()  # no copy


def test_upload_on_the_cpu_keeps_values_shapes_and_dtype():
    got = upload([[1, 2, 3], np.arange(6).reshape(2, 3), []], torch.int32, torch.device("cpu"))
    assert [g.dtype for g in got] == [torch.int32] * 3
    assert got[0].tolist() == [1, 2, 3] and got[1].tolist() == [[0, 1, 2], [3, 4, 5]] and got[2].numel() == 0
