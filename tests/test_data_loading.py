"""The shard loader: canonical channels, tasks, a deterministic order, exact resume, rank/worker splits."""

import json

import numpy as np
import pytest
import torch
from conftest import take_batches as take

from data_prep.errors import DataError
from data_prep.shard_reader import raw_samples, read_split
from medgan.models.conditioning import MODALITIES
from medgan.training.loader import SliceStream, TaskSpec, make_loader

CANONICAL = list(MODALITIES)


def stream(split, **overrides):
    arguments = dict(
        canonical=CANONICAL,
        task=TaskSpec(),
        batch_size=4,
        seed=0,
        rank=0,
        world_size=1,
        train=True,
        random_flips=True,
        shuffle_buffer=16,
    )
    arguments.update(overrides)
    return SliceStream(split, **arguments)


def signature(batches):
    return [
        (tuple(b["key"]), tuple(b["target_index"].tolist()), b["available"].int().sum().item())
        for b in batches
    ]


def test_batches_hold_canonical_channels_and_a_valid_task(phantom_shards):
    split = read_split(phantom_shards, "train")
    batch = take(make_loader(stream(split), 0), 1)[0]
    assert batch["images"].shape == (4, len(CANONICAL), 64, 64)
    assert batch["images"].dtype == torch.float32
    assert batch["images"].min() >= 0 and batch["images"].max() <= 1
    pd = CANONICAL.index("pd")
    assert not batch["images"][:, pd].any(), "BraTS has no PD: its canonical channel stays zero"
    for i in range(4):
        target = int(batch["target_index"][i])
        assert not batch["available"][i, target], "the target is never an input"
        assert batch["available"][i].any(), "at least one input"
        assert not batch["available"][i, pd] and target != pd
        assert torch.equal(batch["target"][i, 0], batch["images"][i, target])
    assert batch["mask"].shape == (4, 1, 64, 64)


def test_order_is_a_function_of_seed_and_epoch(phantom_shards):
    split = read_split(phantom_shards, "train")
    first = signature(take(make_loader(stream(split), 0), 6))
    again = signature(take(make_loader(stream(split), 0), 6))
    other_epoch = signature(take(make_loader(stream(split, epoch=1), 0), 6))
    other_seed = signature(take(make_loader(stream(split, seed=1), 0), 6))
    assert first == again
    assert first != other_epoch
    assert first != other_seed


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_exactly_the_consumed_batches(phantom_shards, workers):
    split = read_split(phantom_shards, "train")
    full = take(make_loader(stream(split, epoch=2), workers), 9)
    resumed = take(make_loader(stream(split, epoch=2, skip_batches=5), workers), 4)
    assert signature(resumed) == signature(full[5:])
    for a, b in zip(resumed, full[5:]):
        assert torch.equal(a["images"], b["images"])
        assert torch.equal(a["available"], b["available"])


def test_ranks_share_one_shard_without_overlap(phantom_shards):
    split = read_split(phantom_shards, "train")
    assert len(split.shards) == 1  # fewer shards than ranks x workers: the loader must still cope
    per_rank = []
    for rank in range(2):
        share = (split.samples - rank + 1) // 2  # one pass over this rank's every-other sample
        batches = take(make_loader(stream(split, rank=rank, world_size=2, batch_size=1), 0), share)
        per_rank.append({key for b in batches for key in b["key"]})
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == split.samples


def test_training_stream_never_runs_dry(phantom_shards):
    split = read_split(phantom_shards, "train")
    batches = take(make_loader(stream(split, rank=1, world_size=2), 0), split.samples)  # 4 passes' worth
    assert len(batches) == split.samples


def test_validation_visits_every_slice_once_across_ranks(phantom_shards):
    split = read_split(phantom_shards, "val")
    keys = []
    for rank in range(3):
        loader = make_loader(stream(split, rank=rank, world_size=3, train=False, batch_size=4), 0)
        keys += [key for batch in loader for key in batch["key"]]
    assert len(keys) == len(set(keys)) == split.samples


def _validation_tasks(split, world_size: int) -> dict[str, tuple[int, tuple[bool, ...]]]:
    """key -> (target, available) of every val sample, read by ``world_size`` ranks."""
    tasks = {}
    for rank in range(world_size):
        loader = make_loader(stream(split, rank=rank, world_size=world_size, train=False, batch_size=3), 0)
        for batch in loader:
            for i, key in enumerate(batch["key"]):
                tasks[key] = (int(batch["target_index"][i]), tuple(batch["available"][i].tolist()))
    return tasks


def test_each_validation_sample_gets_the_same_task_on_any_world_size(phantom_shards):
    split = read_split(phantom_shards, "val")
    one_rank = _validation_tasks(split, 1)
    assert _validation_tasks(split, 2) == one_rank == _validation_tasks(split, 3)
    # the targets still spread over the contrasts the slices hold
    assert len({target for target, _ in one_rank.values()}) > 1


def test_fixed_task_uses_exactly_the_requested_contrasts(phantom_shards):
    split = read_split(phantom_shards, "train")
    task = TaskSpec.from_names(["t1", "t2"], "flair", CANONICAL)
    for batch in take(make_loader(stream(split, task=task), 0), 3):
        assert (batch["target_index"] == CANONICAL.index("flair")).all()
        expected = torch.zeros(len(CANONICAL), dtype=torch.bool)
        expected[[CANONICAL.index("t1"), CANONICAL.index("t2")]] = True
        assert (batch["available"] == expected).all()


def test_read_split_errors_name_the_folder(tmp_path, phantom_shards):
    with pytest.raises(DataError, match="no manifest.json"):
        read_split(tmp_path, "train")
    with pytest.raises(DataError, match="no split 'holdout'"):
        read_split(phantom_shards, "holdout")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_split(broken, "train")
    missing = tmp_path / "missing"
    missing.mkdir()
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    (missing / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="is listed but missing"):
        read_split(missing, "train")


def test_training_flips_are_left_right(phantom_shards):
    # slices are [H = canonical x (left-right), W = canonical y (front-back)]; only left-right is plausible
    split = read_split(phantom_shards, "train")
    plain = {}
    for batch in take(make_loader(stream(split, random_flips=False), 0), 6):
        plain.update(zip(batch["key"], batch["images"]))
    flipped = 0
    for batch in take(make_loader(stream(split, random_flips=True), 0), 6):
        for key, images in zip(batch["key"], batch["images"]):
            if key not in plain:
                continue
            if not torch.equal(images, plain[key]):
                assert torch.equal(images, plain[key].flip(-2)), f"{key}: not a left-right flip"
                flipped += 1
    assert flipped > 0


def test_segmentation_travels_with_the_images_and_flips_with_them(phantom_shards):
    split = read_split(phantom_shards, "train")
    plain = {}
    for batch in take(make_loader(stream(split, random_flips=False), 0), 6):
        assert batch["seg"].dtype == torch.uint8 and batch["seg"].shape == batch["mask"].shape
        plain.update(zip(batch["key"], zip(batch["images"], batch["seg"])))
    assert any(seg.any() for _, seg in plain.values()), "the phantom's tumour reaches the batches"
    flipped = 0
    for batch in take(make_loader(stream(split, random_flips=True), 0), 6):
        for key, images, seg in zip(batch["key"], batch["images"], batch["seg"]):
            if key not in plain:
                continue
            plain_images, plain_seg = plain[key]
            if torch.equal(images, plain_images):
                assert torch.equal(seg, plain_seg)
            else:
                assert torch.equal(seg, plain_seg.flip(-2)), f"{key}: seg not flipped with the images"
                flipped += plain_seg.any()
    assert flipped > 0


def test_validation_batches_carry_the_segmentation(phantom_shards):
    split = read_split(phantom_shards, "val")
    batches = list(make_loader(stream(split, train=False, random_flips=False), 0))
    seg = torch.cat([b["seg"] for b in batches])
    assert seg.dtype == torch.uint8 and seg.shape == torch.cat([b["mask"] for b in batches]).shape


def test_a_slice_without_segmentation_gets_an_all_zero_seg(phantom_shards):
    split = read_split(phantom_shards, "val")
    raw = next(iter(raw_samples(list(split.shards))))
    raw.pop("seg.npy", None)
    sample = stream(split, train=False, random_flips=False)._convert(raw, np.random.default_rng(0))
    assert sample["seg"].dtype == np.uint8 and sample["seg"].shape == sample["mask"].shape
    assert not sample["seg"].any()
