"""Time `data_prep shard` against just decoding its NIfTI files, and shard reading against a per-slice loader.

    python bench/data_prep.py [--subjects 4] [--shape 240 240 155] [--ixi-subjects 2] [--workers 1]
                              [--baseline-slices 24] [--repeats 2] [--data DIR] [--quick]

(a) Sharding, on a BraTS-layout phantom of full BraTS size (4 contrasts + seg, int16 like the real files):
the floor is nibabel decoding every file of every subject (``np.asarray(nib.load(path).dataobj)``: gzip,
native dtype, nothing else); the shard row is the whole ``shard`` command run in this process (prepare,
write the tar shards, hash them, manifest) with ``--workers`` processes. Target: shard CPU per subject
within 2x the floor's. An IXI-layout phantom (T1 registered onto T2) is timed apart, with the time spent
in ``register_rigid`` shown on its own row; it has no target.

(b) Reading, on the shards of (a): the baseline is the original MedGAN-SSM loader's way, one slice at a
time, each loading every modality's whole volume with nibabel (``seed_style_slice``); against it a plain
webdataset pipeline decoding ``img.npy`` to float32, and medgan's training loader (``SliceStream``, one
validation-style pass, batches of 16) over the same shards. Target: >= 50x the baseline's slices/s.

Clocks: CPU is user + system time of this process and its reaped children (``resource.getrusage``), the
meaningful figure on a shared, loaded machine; wall is ``time.perf_counter``. Each row is the best of
``--repeats`` (the rest measure other jobs' load). Peak RSS is this process's ``VmHWM`` during the row,
reset before it (Linux); worker processes' memory is not in it. Phantoms are made once and kept under
``--data`` (full size takes minutes); ``--quick`` is a smaller, faster run for checking the bench itself.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_prep.volumes  # noqa: E402
from data_prep.discovery import discover  # noqa: E402
from data_prep.shard import ShardConfig, shard_dataset  # noqa: E402

BRATS_SHAPE = (240, 240, 155)
SHARD_TARGET_RATIO = 2.0
READ_TARGET_SPEEDUP = 50.0
READ_BATCH = 16


@dataclass(slots=True)
class Measurement:
    """One timed run: CPU and wall seconds, peak RSS in MiB, and how many items it handled."""

    cpu_s: float
    wall_s: float
    peak_mib: float
    items: int

    @property
    def cpu_per_item(self) -> float:
        return self.cpu_s / self.items

    @property
    def wall_per_item(self) -> float:
        return self.wall_s / self.items


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _vm_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(run: Callable[[], int], repeats: int) -> Measurement:
    """Best of `repeats` runs of `run` (which returns how many items it handled), by CPU time."""
    best = None
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        cpu, wall = _cpu_seconds(), time.perf_counter()
        items = run()
        done = Measurement(_cpu_seconds() - cpu, time.perf_counter() - wall, _vm_kib("VmHWM") / 1024, items)
        if best is None or done.cpu_s < best.cpu_s:
            best = done
    return best


def ensure_phantom(data: Path, layout: str, subjects: int, shape: tuple[int, int, int] | None) -> Path:
    """A phantom dataset under `data`, made once (into a temporary name, renamed when complete)."""
    name = f"{layout}-{subjects}" + (f"-{'x'.join(map(str, shape))}" if shape else "-default")
    folder = data / name
    if folder.is_dir():
        return folder
    staging = data / f".{name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "data_prep", "phantom", "--layout", layout, "--subjects", str(subjects)]
    command += ["--out", str(staging)] + (["--shape", *map(str, shape)] if shape else [])
    print(f"making the phantom {folder} (once; full size takes minutes)", file=sys.stderr)
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
    staging.rename(folder)
    return folder


def decode_floor(source: Path, dataset: str) -> int:
    """Decode every NIfTI file of every subject with nibabel and nothing else; returns the subject count."""
    subjects = discover(source, dataset).subjects
    for subject in subjects:
        for path in subject.files.values():
            np.asarray(nib.load(path).dataobj)
    return len(subjects)


def shard(source: Path, dataset: str, out: Path, workers: int) -> int:
    """The whole `shard` command, in this process (and `workers` pool processes when > 1); `out` must not
    exist (removing an earlier output would be timed too)."""
    config = ShardConfig(dataset=dataset, source=source, out=out, workers=workers)
    if shard_dataset(config) != 0:
        raise RuntimeError(f"shard {source} failed")
    return len(json.loads((out / "manifest.json").read_text())["subjects"])


def _no_work(task):
    return task


def _start_pool(workers: int) -> int:
    """Start `data_prep.parallel`'s pool of spawned workers, as `shard --workers` does, with no work."""
    from data_prep.parallel import ordered_map

    return len(list(ordered_map(_no_work, range(workers), workers))) or 1


class RegistrationClock:
    """Wraps `data_prep.volumes.register_rigid` (looked up at call time) to add up its CPU seconds."""

    def __init__(self):
        self.cpu_s = 0.0
        self.calls = 0
        self._original = data_prep.volumes.register_rigid

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.cpu_s += time.process_time() - start
                self.calls += 1

        data_prep.volumes.register_rigid = timed
        return self

    def __exit__(self, *exc):
        data_prep.volumes.register_rigid = self._original


def seed_style_slice(files: dict[str, Path], slice_index: int) -> np.ndarray:
    """The baseline, as the original MedGAN-SSM loader reads a sample: every modality's whole volume loaded
    with nibabel for one axial slice, scaled by its maximum. float32 [M, X, Y]."""
    slices = []
    for path in files.values():
        volume = nib.load(path).get_fdata(dtype=np.float32)
        slices.append(volume[:, :, slice_index] / max(float(volume.max()), 1e-8))
    return np.stack(slices)


def read_seed_style(source: Path, count: int) -> int:
    """`count` slices through `seed_style_slice`, spread over subjects and the middle of their volumes."""
    subjects = discover(source, "brats").subjects
    for index in range(count):
        files = {m: p for m, p in subjects[index % len(subjects)].files.items() if m != "seg"}
        depth = nib.load(next(iter(files.values()))).shape[2]
        seed_style_slice(files, depth // 4 + (index * 7) % (depth // 2))
    return count


def _all_shards(shards: Path) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [str(shards / s["file"]) for split in manifest["splits"].values() for s in split["shards"]]


def read_webdataset(shards: Path) -> int:
    """Every sample of every shard through a plain webdataset pipeline, `img.npy` decoded to float32."""
    import webdataset as wds

    pipeline = wds.WebDataset(_all_shards(shards), shardshuffle=False, empty_check=False).map(
        lambda sample: np.load(io.BytesIO(sample["img.npy"]), allow_pickle=False).astype(np.float32)
    )
    return sum(1 for _ in pipeline)


def read_slice_stream(shards: Path) -> int:
    """Every sample of every split through medgan's training loader (validation-style pass, batches of 16)."""
    from data_prep.shard_reader import read_split
    from medgan.training.loader import SliceStream, TaskSpec

    count = 0
    splits = json.loads((shards / "manifest.json").read_text())["splits"]
    for split in (name for name, entry in splits.items() if entry["samples"]):
        shard_split = read_split(shards, split)
        stream = SliceStream(
            shard_split,
            list(shard_split.modalities),
            TaskSpec(),
            READ_BATCH,
            seed=0,
            rank=0,
            world_size=1,
            train=False,
        )
        count += sum(len(batch["key"]) for batch in stream)
    return count


def _row(what, measurement, unit, per_second, ratio, target, met) -> list[str]:
    return [
        what,
        f"{measurement.cpu_per_item * 1e3:.1f} / {measurement.wall_per_item * 1e3:.1f} ms {unit}",
        f"{per_second:.2f} {unit}s/s" if per_second < 100 else f"{per_second:.0f} {unit}s/s",
        ratio,
        target,
        met,
        f"{measurement.peak_mib:.0f}",
    ]


def print_table(rows: list[list[str]]) -> None:
    header = ["what", "CPU / wall per item", "throughput (CPU)", "ratio to baseline", "target", "met?"]
    header.append("peak RSS MiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=4, help="BraTS-layout phantom subjects")
    parser.add_argument("--shape", type=int, nargs=3, default=BRATS_SHAPE, metavar=("X", "Y", "Z"))
    parser.add_argument("--ixi-subjects", type=int, default=2, help="IXI-layout phantom subjects (0: none)")
    parser.add_argument("--workers", type=int, default=1, help="shard --workers")
    parser.add_argument("--baseline-slices", type=int, default=24, help="slices read by the baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "medgan-bench-data")
    parser.add_argument("--quick", action="store_true", help="2 half-size subjects, 1 IXI, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.shape, args.ixi_subjects = 2, (120, 120, 78), 1
        args.baseline_slices, args.repeats = 8, 1
    # Imported here, before any timing (torch's import is start-up, not sharding or reading), and not at
    # the top: `--workers` pool processes are spawned and import this module, which should stay light.
    import webdataset  # noqa: F401

    import medgan.training.loader  # noqa: F401

    args.data.mkdir(parents=True, exist_ok=True)
    brats = ensure_phantom(args.data, "brats", args.subjects, tuple(args.shape))
    ixi = ensure_phantom(args.data, "ixi", args.ixi_subjects, None) if args.ixi_subjects else None

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as scratch:
        shards = Path(scratch) / "brats-0"
        floor = measure(lambda: decode_floor(brats, "brats"), args.repeats)
        runs = iter(range(2 * args.repeats))
        sharded = measure(
            lambda: shard(brats, "brats", Path(scratch) / f"brats-{next(runs)}", args.workers), args.repeats
        )
        ratio = sharded.cpu_per_item / floor.cpu_per_item
        shape = "x".join(map(str, args.shape))
        rows.append(
            _row(
                f"decode floor, BraTS {shape} (baseline)",
                floor,
                "subject",
                1 / floor.cpu_per_item,
                "1",
                "",
                "",
            )
        )
        rows.append(
            _row(
                f"shard --format brats --workers {args.workers}",
                sharded,
                "subject",
                1 / sharded.cpu_per_item,
                f"{ratio:.2f}x the time",
                f"<= {SHARD_TARGET_RATIO:g}x",
                "yes" if ratio <= SHARD_TARGET_RATIO else "no",
            )
        )
        if args.workers > 1:
            # A pool of spawned processes costs each one a Python start-up and data_prep's imports, once
            # per run: on a handful of subjects that is most of the extra. Measured apart and taken off.
            startup = measure(lambda: _start_pool(args.workers), args.repeats)
            cpu, wall = sharded.cpu_s - startup.cpu_s, sharded.wall_s - startup.wall_s
            steady = Measurement(cpu, wall, sharded.peak_mib, sharded.items)
            steady_ratio = steady.cpu_per_item / floor.cpu_per_item
            rows.append(
                [
                    f"  pool start-up ({args.workers} processes, once a run)",
                    f"{startup.cpu_s * 1e3:.0f} / {startup.wall_s * 1e3:.0f} ms",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            rows.append(
                _row(
                    "  shard without the pool start-up",
                    steady,
                    "subject",
                    1 / steady.cpu_per_item,
                    f"{steady_ratio:.2f}x the time",
                    f"<= {SHARD_TARGET_RATIO:g}x",
                    "yes" if steady_ratio <= SHARD_TARGET_RATIO else "no",
                )
            )
        if ixi is not None:
            ixi_floor = measure(lambda: decode_floor(ixi, "ixi"), args.repeats)
            with RegistrationClock() as registration:
                ixi_sharded = measure(
                    lambda: shard(ixi, "ixi", Path(scratch) / f"ixi-{next(runs)}", args.workers), args.repeats
                )
            rows.append(
                _row(
                    "decode floor, IXI phantom", ixi_floor, "subject", 1 / ixi_floor.cpu_per_item, "1", "", ""
                )
            )
            rows.append(
                _row(
                    f"shard --format ixi --workers {args.workers}",
                    ixi_sharded,
                    "subject",
                    1 / ixi_sharded.cpu_per_item,
                    f"{ixi_sharded.cpu_per_item / ixi_floor.cpu_per_item:.2f}x the time",
                    "(none)",
                    "",
                )
            )
            if args.workers == 1:
                per_subject = registration.cpu_s / registration.calls
                rows.append(
                    [
                        "  of which T1 registration",
                        f"{per_subject * 1e3:.1f} ms CPU / subject",
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )

        baseline = measure(lambda: read_seed_style(brats, args.baseline_slices), args.repeats)
        rows.append(
            _row(
                "per-slice loader, seed style (baseline)",
                baseline,
                "slice",
                1 / baseline.cpu_per_item,
                "1",
                "",
                "",
            )
        )
        for what, reader in (
            ("webdataset pipeline, img.npy", read_webdataset),
            (f"medgan SliceStream, batch {READ_BATCH}", read_slice_stream),
        ):
            read = measure(lambda reader=reader: reader(shards), args.repeats)
            speedup = baseline.cpu_per_item / read.cpu_per_item
            rows.append(
                _row(
                    what,
                    read,
                    "slice",
                    1 / read.cpu_per_item,
                    f"{speedup:.0f}x faster",
                    f">= {READ_TARGET_SPEEDUP:g}x",
                    "yes" if speedup >= READ_TARGET_SPEEDUP else "no",
                )
            )

    print(f"# python bench/data_prep.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"# {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"best of {args.repeats}; CPU = user + system of this process and reaped workers"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
