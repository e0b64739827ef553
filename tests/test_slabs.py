"""Slabs and 2.5D context in the training data path: whole subjects dealt to reading slots, slabs of
consecutive slices with one task, each slice's context windows, a deterministic order and exact resume on
small data with few shards, and the shard layout that makes it possible."""

import json

import numpy as np
import pytest
import torch
from conftest import take_batches as take

from data_prep.errors import DataError
from data_prep.manifest import LAYOUT_VERSION
from data_prep.shard_reader import ShardFolder, raw_samples, read_split
from data_prep.verify import verify_shards
from medgan.models.conditioning import MODALITIES
from medgan.shards import ChannelMap, subject_stacks
from medgan.training.loader import TaskSpec, make_loader
from medgan.training.slabs import SlabStream

CANONICAL = list(MODALITIES)


def slab_stream(split, **overrides):
    arguments = dict(
        canonical=CANONICAL,
        task=TaskSpec(),
        batch_size=8,
        slab_slices=4,
        context_slices=0,
        seed=0,
        rank=0,
        world_size=1,
        random_flips=True,
        shuffle_buffer=24,
    )
    arguments.update(overrides)
    return SlabStream(split, **arguments)


def slabs_of(batch, slab_slices):
    """(subject, first slice, task) of each slab of a batch, after checking it is one subject's
    consecutive slices with one task and one set of inputs."""
    slabs = []
    for start in range(0, len(batch["key"]), slab_slices):
        part = slice(start, start + slab_slices)
        subjects = set(batch["subject"][part])
        indices = batch["slice"][part].tolist()
        assert len(subjects) == 1, f"a slab mixes subjects {subjects}"
        assert indices == list(range(indices[0], indices[0] + slab_slices)), f"not consecutive: {indices}"
        assert len(set(batch["target_index"][part].tolist())) == 1, "one task per slab"
        assert (batch["available"][part] == batch["available"][start]).all()
        slabs.append((subjects.pop(), indices[0], int(batch["target_index"][start])))
    return slabs


def test_a_batch_counts_slices_and_holds_whole_slabs(phantom_shards):
    split = read_split(phantom_shards, "train")
    batch = take(make_loader(slab_stream(split), 0), 1)[0]
    assert batch["images"].shape == (8, len(CANONICAL), 64, 64)  # batch 8 slices = two slabs of 4
    assert len(slabs_of(batch, 4)) == 2
    for i in range(8):
        target = int(batch["target_index"][i])
        assert torch.equal(batch["target"][i, 0], batch["images"][i, target])
        assert not batch["available"][i, target]
    assert "context" not in batch


def test_slab_order_is_a_function_of_seed_epoch_and_rank(phantom_shards):
    split = read_split(phantom_shards, "train")

    def order(**overrides):
        return [slabs_of(b, 4) for b in take(make_loader(slab_stream(split, **overrides), 0), 6)]

    first = order()
    assert first == order()
    assert first != order(epoch=1)
    assert first != order(seed=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_slab_resume_skips_exactly_the_consumed_batches(phantom_shards, workers):
    split = read_split(phantom_shards, "train")
    assert len(split.shards) == 1  # fewer shards than reading slots: subjects are dealt within it
    options = dict(epoch=3, rank=1, world_size=2, context_slices=1)
    full = take(make_loader(slab_stream(split, **options), workers), 7)
    resumed = take(make_loader(slab_stream(split, skip_batches=4, **options), workers), 3)
    for a, b in zip(resumed, full[4:], strict=True):
        assert a["key"] == b["key"]
        for name in ("images", "context", "available", "target_index", "mask", "seg"):
            assert torch.equal(a[name], b[name]), name


def test_slots_get_whole_subjects_and_share_none(phantom_shards):
    split = read_split(phantom_shards, "train")
    per_rank = []
    for rank in range(2):
        batches = take(make_loader(slab_stream(split, rank=rank, world_size=2), 0), 12)
        per_rank.append({subject for b in batches for subject, _, _ in slabs_of(b, 4)})
    assert not per_rank[0] & per_rank[1], "a subject was dealt to two ranks"
    assert per_rank[0] | per_rank[1] == set(split.subjects)


@pytest.mark.parametrize(("count", "context"), [(19, 0), (19, 2), (4, 1), (3, 0)])
def test_a_subject_is_cut_into_non_overlapping_slabs_from_an_offset_below_s(phantom_shards, count, context):
    split = read_split(phantom_shards, "train")
    stream = slab_stream(split, context_slices=context)
    for seed in range(8):
        slabs = list(stream._slabs(list(range(count)), np.random.default_rng(seed)))
        starts = [raws[first] for raws, first in slabs]
        if count < 4:
            assert not slabs
            continue
        assert 0 <= starts[0] < 4 and starts[0] + 4 * len(starts) + 4 > count  # no room for one more slab
        assert starts == list(range(starts[0], starts[0] + 4 * len(starts), 4))
        for raws, first in slabs:  # the slab with up to `context` neighbours each side, clipped at the ends
            start = raws[first]
            assert raws == list(range(max(0, start - context), min(count, start + 4 + context)))


def test_context_windows_are_the_neighbours_within_the_subject(phantom_shards):
    split = read_split(phantom_shards, "train")
    channels = ChannelMap(split.modalities, CANONICAL, split.directory)
    stacks = {stack.subject: stack for stack in subject_stacks(split.shards, channels)}
    batches = take(make_loader(slab_stream(split, context_slices=2, random_flips=False), 0), 10)
    edge_seen = False
    for batch in batches:
        assert batch["context"].shape == (8, 5, len(CANONICAL), 64, 64)
        for i in range(8):
            stack = stacks[batch["subject"][i]]
            z = int(np.flatnonzero(stack.slices == int(batch["slice"][i]))[0])
            assert torch.equal(batch["context"][i, 2], batch["images"][i]), "the centre is the slice"
            for offset in range(-2, 3):
                neighbour = batch["context"][i, 2 + offset].numpy()
                if 0 <= z + offset < len(stack.slices):
                    np.testing.assert_array_equal(neighbour, stack.images[z + offset])
                else:
                    edge_seen = True
                    assert not neighbour.any(), "beyond the subject's slices the context is zero"
    assert edge_seen, "no slab reached a subject's end: the edge rule went untested"


def test_flips_flip_the_context_with_the_slice(phantom_shards):
    split = read_split(phantom_shards, "train")
    batches = take(make_loader(slab_stream(split, context_slices=1, seed=5), 0), 8)
    for batch in batches:
        assert torch.equal(batch["context"][:, 1], batch["images"])


def test_the_shuffle_buffer_counts_slices_and_margins_share_them(phantom_shards):
    split = read_split(phantom_shards, "train")
    assert slab_stream(split, shuffle_buffer=2000, slab_slices=8, batch_size=16).slabs_in_buffer == 250
    assert slab_stream(split, shuffle_buffer=3).slabs_in_buffer == 1
    stream = slab_stream(split, slab_slices=1, batch_size=4, context_slices=2)
    assert stream.slabs_in_buffer == 24
    subject = [{"slice": z} for z in range(10)]
    slabs = list(stream._slabs(subject, np.random.default_rng(0)))
    held = {id(raw) for raws, _ in slabs for raw in raws}
    assert len(slabs) == 10 and len(held) == 10, "margins are the neighbours' own samples, not copies"


def test_slabs_longer_than_every_subject_are_refused_in_one_line(phantom_shards):
    split = read_split(phantom_shards, "train")
    with pytest.raises(DataError, match="no slab of 64 slices"):
        take(make_loader(slab_stream(split, slab_slices=64, batch_size=64), 0), 1)


def test_layout_1_shards_are_refused_with_the_reshard_command(phantom_shards, tmp_path):
    old = tmp_path / "layout1"
    old.mkdir()
    for path in phantom_shards.iterdir():
        if path.name != "manifest.json":
            (old / path.name).symlink_to(path)
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    del manifest["layout_version"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    split = read_split(old, "train")
    assert split.layout_version == 1
    with pytest.raises(DataError, match=r"shard layout 1 .*data.slab_slices 4 needs layout 2.*-layout2"):
        slab_stream(split)
    # single slices still train on it, and inference only checks the scale
    assert ShardFolder.open(old).training_data()["format_version"] == 2


def test_shard_starts_a_new_tar_file_only_with_a_subject(phantom_subjects, tmp_path, monkeypatch):
    """With a small per-file count, the writer overshoots a file rather than split a subject; every
    subject then sits in one file, verify checks it, and the slab stream deals files to slots."""
    from data_prep import shard as shard_module

    monkeypatch.setattr(shard_module, "SAMPLES_PER_SHARD", 10)
    out = tmp_path / "many"
    config = shard_module.ShardConfig(
        dataset="brats", source=phantom_subjects, out=out, size=64, split_fractions=(0.75, 0.125, 0.125)
    )
    assert shard_module.shard_dataset(config) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout_version"] == LAYOUT_VERSION == 2
    files_of: dict[str, set[str]] = {}
    for shard in manifest["splits"]["train"]["shards"]:
        for raw in raw_samples([out / shard["file"]]):
            files_of.setdefault(json.loads(raw["json"])["subject"], set()).add(shard["file"])
    assert all(len(files) == 1 for files in files_of.values()), files_of
    assert len(manifest["splits"]["train"]["shards"]) == len(files_of) > 2
    assert verify_shards(out).startswith("OK")
    split = read_split(out, "train")
    per_rank = []
    for rank in range(2):  # 6 files for 2 slots: each slot reads its own files (2 batches: one cycle)
        batches = take(make_loader(slab_stream(split, rank=rank, world_size=2, shuffle_buffer=4), 0), 2)
        per_rank.append({subject for b in batches for subject, _, _ in slabs_of(b, 4)})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_verify_refuses_a_layout_2_folder_whose_subject_crosses_files(
    phantom_subjects, tmp_path, monkeypatch
):
    """A writer that rotates files mid-subject (as layout 1 did) under a manifest that claims layout 2."""
    from data_prep import shard as shard_module
    from data_prep.tar_shards import ShardSeries

    write = ShardSeries.write
    monkeypatch.setattr(ShardSeries, "write", lambda self, sample, may_start_shard=True: write(self, sample))
    monkeypatch.setattr(shard_module, "SAMPLES_PER_SHARD", 10)
    out = tmp_path / "crossing"
    config = shard_module.ShardConfig(
        dataset="brats", source=phantom_subjects, out=out, size=64, split_fractions=(0.75, 0.125, 0.125)
    )
    assert shard_module.shard_dataset(config) == 0
    with pytest.raises(DataError, match=r"train-000001.tar: .*: subject \S+ also in train-000000.tar"):
        verify_shards(out)
