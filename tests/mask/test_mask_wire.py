"""Issue 10, "more of the same kind": a FishMask sent between ranks (fishkern.distributed.masks) is
validated like a mask file — bounded JSON, every field checked, a checksum over all of it."""
import json

import pytest
import torch

from fishkern import FishMask
from fishkern.distributed import DistributedError
from fishkern.distributed.masks import mask_from_tensors, mask_to_tensors


@pytest.fixture
def wire():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    mask = FishMask.random(model.named_parameters(), 0.5, seed=0, force="1.bias")
    meta, idx = mask_to_tensors(mask)
    return mask, json.loads(bytes(meta.numpy())), idx


def test_round_trip_keeps_everything(wire):
    mask, meta, idx = wire
    back = mask_from_tensors(json.dumps(meta).encode(), idx)
    assert back == mask and back.forced == mask.forced and back.provenance == mask.provenance


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda m, i: m.__setitem__("forced", []), "checksum"),
        (lambda m, i: m["provenance"].__setitem__("seed", 99), "checksum"),
        (lambda m, i: m.__setitem__("shapes", {"0.weight": [5, 7]}), "'shapes' must be a list"),
        (lambda m, i: m["shapes"][0].__setitem__(1, ["5", 7]), "non-negative integers"),
        (lambda m, i: m["counts"][0].__setitem__(1, -3), "must be an integer >= 0"),
        (lambda m, i: m["counts"][0].__setitem__(1, 10**30), "indices for"),
        (lambda m, i: m.__setitem__("counts", [["nope", 1]]), "naming parameters of 'shapes'"),
        (lambda m, i: m.__setitem__("format", "other"), "'format'"),
        (lambda m, i: i.__setitem__(0, 10**6), "checksum"),
    ],
)
def test_damaged_masks_are_refused(wire, mutate, match):
    mask, meta, idx = wire
    idx = idx.clone()
    mutate(meta, idx)
    with pytest.raises(DistributedError, match=match):
        mask_from_tensors(json.dumps(meta).encode(), idx)


def test_deep_or_huge_json_is_refused(wire):
    _, _, idx = wire
    deep = b'{"format": "fishkern.mask.wire", "shapes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(DistributedError, match="nested more than"):
        mask_from_tensors(deep, idx)
    with pytest.raises(DistributedError, match="bytes of JSON"):
        mask_from_tensors(b" " * (65 << 20), idx)
