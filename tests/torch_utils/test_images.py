"""The one model-space <-> uint8 convention (torch_utils.images)."""

import numpy as np
import torch

from torch_utils.images import to_model_space, to_uint8


def test_to_uint8_inverts_to_model_space_and_clips():
    u = torch.arange(256, dtype=torch.uint8)
    x = u.to(torch.float32) / 127.5 - 1 # The loader's scaling, written out.
    assert torch.equal(to_model_space(u), x)
    assert torch.equal(to_uint8(x), u)
    q = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]))
    assert q.tolist() == [0, 0, 128, 255, 255]
    assert q.dtype == torch.uint8


def test_vectors_pass_through_model_space_unchanged():
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch.equal(to_model_space(v), torch.from_numpy(v))
