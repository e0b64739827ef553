"""Crash-safe checkpoints in DESIGN.md's layout, written and read through DeepSpeed's own engine API.

```
CKPT_DIR/generator/step_000500/   DeepSpeed's per-rank shards + ema.safetensors
CKPT_DIR/generator/latest         the newest complete tag
CKPT_DIR/discriminator/...        the same for D
CKPT_DIR/best                     the tag with the best validation PSNR (never pruned)
CKPT_DIR/config.yaml              the run's full config
```
DeepSpeed would write ``latest`` from rank 0 before the other ranks finish their shards; here it is turned
off and written after a barrier by atomic rename, so a crash mid-save leaves ``latest`` on the last
complete tag.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from medgan.distributed import DistributedContext, barrier

TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:06d}"


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_tag(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def provenance(manifest_sha256: str) -> dict[str, Any]:
    """Enough to reproduce a run: code commit, package versions, the exact data."""
    import deepspeed
    import torch

    import medgan

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(medgan.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "git_commit": commit or "unknown",
        "medgan": medgan.__version__,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "manifest_sha256": manifest_sha256,
    }


class CheckpointManager:
    """Save and resume both engines and the EMA; prune all but the last ``keep_last`` tags and the best."""

    def __init__(self, directory: str | Path, keep_last: int, context: DistributedContext) -> None:
        self.directory = Path(directory)
        self.generator_dir = self.directory / "generator"
        self.discriminator_dir = self.directory / "discriminator"
        self.keep_last = keep_last
        self.context = context

    def latest_tag(self) -> str | None:
        return read_tag(self.generator_dir / "latest")

    def best_tag(self) -> str | None:
        return read_tag(self.directory / "best")

    def save(self, step: int, g_engine, d_engine, ema, client_state: dict[str, Any]) -> str:
        """Write tag ``step_NNNNNN`` on every rank, then point ``latest`` at it. Collective."""
        tag = tag_for_step(step)
        g_engine.save_checkpoint(
            str(self.generator_dir), tag=tag, client_state=client_state, save_latest=False
        )
        d_engine.save_checkpoint(str(self.discriminator_dir), tag=tag, save_latest=False)
        if self.context.is_main and ema is not None:
            ema.save(self.generator_dir / tag / "ema.safetensors")
        barrier()
        if self.context.is_main:
            write_atomically(self.generator_dir / "latest", tag)
            write_atomically(self.discriminator_dir / "latest", tag)
            self._prune()
        barrier()
        return tag

    def mark_best(self, tag: str) -> None:
        if self.context.is_main:
            write_atomically(self.directory / "best", tag)

    def load(self, g_engine, d_engine, ema) -> dict[str, Any] | None:
        """Restore the latest complete tag into both engines and the EMA; None when there is none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = g_engine.load_checkpoint(str(self.generator_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.generator_dir / tag}: DeepSpeed could not load this checkpoint")
        d_path, _ = d_engine.load_checkpoint(str(self.discriminator_dir), tag=tag)
        if d_path is None:
            raise RuntimeError(f"{self.discriminator_dir / tag}: DeepSpeed could not load this checkpoint")
        ema_path = self.generator_dir / tag / "ema.safetensors"
        if ema is not None and ema_path.is_file():
            ema.load(ema_path)
        return {**client_state, "tag": tag}

    def _prune(self) -> None:
        keep = {self.best_tag(), self.latest_tag()}
        for folder in (self.generator_dir, self.discriminator_dir):
            tags = sorted(
                (int(m.group(1)), p.name)
                for p in folder.iterdir()
                if p.is_dir() and (m := TAG_PATTERN.match(p.name))
            )
            for _, name in tags[: max(0, len(tags) - self.keep_last)]:
                if name not in keep:
                    shutil.rmtree(folder / name, ignore_errors=True)
