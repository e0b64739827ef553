"""``python -m medgan export``: a checkpoint folder's generator as one portable ``.safetensors`` file.

The file holds fp32 weights (the EMA when the checkpoint has them) with the run's config, modality list and
training-data record as metadata, plus the same description as ``.json`` beside it. Its format belongs to
``medgan.inference.loading``, which reads it back; this module only exports.
"""

from __future__ import annotations

from pathlib import Path

from medgan.checkpointing import CheckpointError
from medgan.inference.loading import LoadedGenerator, load_generator


def export_generator(
    checkpoint_dir: str | Path, out: str | Path, tag: str | None = None
) -> tuple[Path, Path, LoadedGenerator]:
    """Write the generator of ``checkpoint_dir`` (EMA weights when present) to ``out`` (.safetensors)
    and its description to ``out`` with suffix ``.json``. Returns (weights path, JSON path, generator)."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if checkpoint_dir.is_file():
        raise CheckpointError(f"{checkpoint_dir}: export needs a checkpoint folder, not a file")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: the exported file's name must end in .safetensors")
    loaded = load_generator(checkpoint_dir, tag)
    weights, description = loaded.save(out)
    return weights, description, loaded
