"""2.5D input: which slices are a slice's neighbours, how they are loaded, and synthesis through a stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transforms.context import (
    SliceContext,
    StackSliceContextd,
    centre_channel,
    context_indices,
    context_offsets,
    n_context_channels,
)
from transforms.errors import InputDataError
from transforms.synthesis import RandLiverAnomaly, RandLiverAnomalyd


def test_offsets_follow_the_spacing_in_mm():
    assert context_offsets(1, 3.0, 1.6).tolist() == [-2, 0, 2]   # IRCADb: 1.6 mm slices
    assert context_offsets(1, 3.0, 3.0).tolist() == [-1, 0, 1]
    assert context_offsets(1, 3.0, 5.0).tolist() == [-1, 0, 1]   # thicker than the context: the next slice
    assert context_offsets(2, 1.0, 1.0).tolist() == [-2, -1, 0, 1, 2]
    assert context_offsets(0, 3.0, 1.0).tolist() == [0]
    assert n_context_channels(2) == 5
    for bad in ((-1, 3.0, 1.0), (1, 0.0, 1.0), (1, 3.0, float("nan")), (1.5, 3.0, 1.0)):
        with pytest.raises(ValueError):
            context_offsets(*bad)


def test_neighbours_repeat_the_nearest_liver_slice_at_the_ends_and_in_gaps():
    rows = context_indices([3, 4, 5, 7, 8], [-2, 0, 2])
    assert rows.tolist() == [[3, 3, 5], [3, 4, 5], [3, 5, 7], [5, 7, 8], [7, 8, 8]]
    # input order is kept, the centre column is the input
    assert context_indices([8, 3], [-1, 0, 1]).tolist() == [[8, 8, 8], [3, 3, 3]]
    with pytest.raises(ValueError, match="distinct"):
        context_indices([1, 1], [0])


def test_slice_context_json_round_trip_and_checks():
    context = SliceContext(1, 2.5)
    assert SliceContext.from_json(context.to_json()) == context and context.channels == 3
    assert SliceContext.from_json(None) == SliceContext() and SliceContext().channels == 1
    assert SliceContext.from_json(context) is context
    with pytest.raises(ValueError, match="unknown"):
        SliceContext.from_json({"slices": 1, "spacing": 2})
    with pytest.raises(ValueError):
        SliceContext(1, -1.0)


def test_centre_channel():
    x = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    assert torch.equal(centre_channel(x), x[:, 1:2])
    one = np.zeros((1, 4, 4))
    assert centre_channel(one) is one
    with pytest.raises(ValueError, match="odd"):
        centre_channel(torch.zeros(2, 4, 4))


def _write_slices(folder, values):
    entries = []
    for z, value in enumerate(values):
        image = np.full((1, 8, 8), value, np.float32)
        label = np.zeros((1, 8, 8), np.uint8)
        label[0, : z + 1] = 1 + (z == 1)  # liver grows with z; slice 1's liver is lesion
        np.save(folder / f"s{z:04d}_image.npy", image)
        np.save(folder / f"s{z:04d}_label.npy", label)
        entries.append({"image": str(folder / f"s{z:04d}_image.npy"), "label": str(folder / f"s{z:04d}_label.npy")})
    return entries


def test_stack_loads_the_neighbours_in_order_with_their_own_livers(tmp_path):
    files = _write_slices(tmp_path, [0.1, 0.2, 0.3])
    out = StackSliceContextd()({"image": "centre", "context": [files[0], files[1], files[2]]})
    assert out["image"].shape == (3, 8, 8) and out["image"].dtype == torch.float32
    assert out["image"][:, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert out["context_liver"][:, :, 0].sum(dim=1).tolist() == [1, 2, 3]  # label > 0, lesion included
    assert StackSliceContextd()({"image": 1}) == {"image": 1}  # plain 2D entries pass through
    (tmp_path / "s0002_image.npy").write_bytes(b"not a numpy file")
    with pytest.raises(InputDataError, match="s0002_image.npy"):
        StackSliceContextd()({"context": files})


def test_synthesis_puts_one_anomaly_through_every_channel_inside_each_liver():
    rng = np.random.RandomState(0)
    image = rng.uniform(0.3, 0.6, (3, 32, 32)).astype(np.float32)
    liver = np.zeros((3, 32, 32), np.float32)
    liver[:, 4:28, 4:28] = 1
    liver[0, 4:28, 4:16] = 0  # the slice below has less liver
    synth = RandLiverAnomaly(prob=1.0, min_anomaly_pixels=8).set_random_state(3)
    augmented, mask, has = synth(image, liver)
    assert has == 1.0 and mask.shape == (1, 32, 32)
    changed = np.abs(augmented - image) > 1e-6
    assert changed[1].any() and not changed[1][mask[0] == 0].any()  # the middle slice: exactly the mask
    assert not changed[0][liver[0] == 0].any()                       # never outside a channel's own liver
    assert (changed[2] == changed[1]).mean() > 0.99                  # same liver: the same region
    # with the middle slice's liver only, the anomaly crosses every channel where the mask is
    augmented, mask, _ = RandLiverAnomaly(prob=1.0, min_anomaly_pixels=8).set_random_state(3)(image, liver[1:2])
    assert (np.abs(augmented - image) > 1e-6)[0][mask[0] > 0].mean() > 0.9


def test_dictionary_synthesis_of_a_stack_keeps_a_one_channel_mask():
    d = {"image": torch.rand(3, 16, 16) * 0.5, "context_liver": torch.ones(3, 16, 16)}
    t = RandLiverAnomalyd(keys="image", liver_key="context_liver", prob=0.0)
    out = t(d)
    assert out["anomaly_mask"].shape == (1, 16, 16) and out["image"].shape == (3, 16, 16)
    with pytest.raises(InputDataError, match="odd"):
        RandLiverAnomaly(prob=1.0)(np.zeros((2, 8, 8), np.float32), np.ones((1, 8, 8)))
    with pytest.raises(InputDataError, match="does not fit"):
        RandLiverAnomaly(prob=1.0)(np.zeros((3, 8, 8), np.float32), np.ones((2, 8, 8)))
