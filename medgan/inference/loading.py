"""A trained generator ready to predict, from a checkpoint folder or an exported file.

Two forms hold a generator:

- ``CKPT_DIR`` as the trainer writes it (DESIGN.md; ``medgan.checkpointing`` reads it): the run's config,
  its training-data record and ``generator/<tag>/`` weights (the EMA when present).
- ``G.safetensors`` written by ``python -m medgan export`` (:meth:`LoadedGenerator.save`): fp32 weights
  with the run's config, the modality list, the training-data record and where the weights came from in
  the safetensors metadata, and the same as readable JSON in ``G.json`` beside it.

:func:`load_generator` accepts either; ``synthesize`` and ``evaluate`` use nothing else. It refuses a
generator trained on shards of another format or normalisation than data_prep makes now, or with no
record of them (:func:`check_training_data`): its inputs would arrive on another intensity scale.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from medgan.checkpointing import (
    CheckpointError,
    read_generator_weights,
    read_run,
    read_safetensors,
    resolve_tag,
)
from medgan.config import Config, ConfigError, build_config
from medgan.inference.provenance import weights_sha256
from medgan.models.context import predict_stack
from medgan.models.generator import GeneratorConfig, build_generator
from medgan.shards import format_problem

EXPORT_FORMAT = "medgan-ssm generator"
EXPORT_FORMAT_VERSION = "1"
# Which of a checkpoint folder's weights to load: the EMA (averaged) or DeepSpeed's own (raw) weights.
WEIGHT_SETS = ("ema", "raw")
# Scan paths that need a CUDA device (medgan.models.ssm); a checkpoint trained with one predicts on a CPU.
GPU_SCAN_BACKENDS = ("mamba", "triton")


@dataclass(slots=True)
class LoadedGenerator:
    """A generator ready for inference, and what it was trained to do.

    module: the network in eval mode, fp32, on its device; ``module(images [B, M, H, W] in [0, 1],
    available [B, M] bool, target_index [B]) -> [B, 1, H, W] in [0, 1]``.
    modalities: the M input channels, in order (``modalities[i]`` is channel i).
    trained_inputs / trained_target: the training task (``target == "any"``: every task; empty inputs
    with a fixed target: every other present contrast).
    training_data: what the run trained on (``dataset``: ``brats`` or ``ixi``, which selects data_prep's
    preparation; the shards' format version, modality order and normalisation); always the format and
    normalisation data_prep makes now (:func:`load_generator` refuses others, and records that lack it).
    source: one line saying which weights these are, for reports.
    weights_sha256: sha256 of the state_dict loaded into ``module`` (`provenance.weights_sha256`),
    so a synthesized file can name the exact weights that made it.
    """

    module: nn.Module
    config: Config
    modalities: list[str]
    trained_inputs: list[str]
    trained_target: str
    source: str
    training_data: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""

    @property
    def generator_config(self) -> GeneratorConfig:
        return self.config.model.generator

    @property
    def dataset(self) -> str | None:
        """``brats`` / ``ixi``: the data_prep preparation the training shards had, when recorded."""
        return self.training_data.get("dataset") or None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def serves(self, inputs: list[str], target: str) -> str | None:
        """None when the generator was trained for ``inputs -> target``, else a one-line reason."""
        if target not in self.modalities:
            return f"target {target!r} is not one of the checkpoint's contrasts {' '.join(self.modalities)}"
        unknown = [name for name in inputs if name not in self.modalities]
        if unknown:
            return (
                f"input {unknown[0]!r} is not one of the checkpoint's contrasts {' '.join(self.modalities)}"
            )
        if self.trained_target != "any" and target != self.trained_target:
            return f"the checkpoint was trained to synthesize {self.trained_target} only, not {target}"
        if self.trained_inputs and sorted(inputs) != sorted(self.trained_inputs):
            return (
                f"the checkpoint was trained on inputs {' '.join(self.trained_inputs)} only, "
                f"not {' '.join(inputs)}"
            )
        return None

    def predict(
        self,
        images: np.ndarray,
        inputs: list[str],
        target: str,
        batch_size: int = 8,
        progress: str | None = None,
    ) -> np.ndarray:
        """Synthesize ``target`` for a stack of slices.

        images: float32 ``[Z, M, H, W]`` in ``[0, 1]``, channels in ``modalities`` order (only the
        ``inputs`` channels are shown to the model), consecutive axial slices of one subject (a model
        with 2.5D context draws on the neighbours within the stack, ``medgan.models.context``).
        Returns float32 ``[Z, H, W]`` in ``[0, 1]``.
        progress: a tqdm description, or None for no bar.
        """
        channels = [self.modalities.index(name) for name in inputs]
        available = torch.zeros(len(self.modalities), dtype=torch.bool, device=self.device)
        available[channels] = True
        with torch.inference_mode():
            stack = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).float()
            predicted = predict_stack(
                self.module,
                stack,
                available,
                self.modalities.index(target),
                self.generator_config.context_slices,
                batch_size,
                lambda starts: tqdm(
                    starts, desc=progress, unit="batch", disable=None if progress else True, leave=False
                ),
            )
        return predicted[:, 0].float().cpu().numpy().astype(np.float32)

    def description(self) -> dict[str, Any]:
        """What an exported file says about this generator (stored as metadata and as JSON)."""
        return {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "modalities": self.modalities,
            "trained_task": {"inputs": self.trained_inputs, "target": self.trained_target},
            "training_data": self.training_data,
            "source": self.source,
            "config": self.config.to_dict(),
        }

    def save(self, out: Path) -> tuple[Path, Path]:
        """Write fp32 weights to ``out`` (.safetensors) and :meth:`description` to ``out`` with suffix
        ``.json``; :func:`load_generator` reads ``out`` back. Returns (weights path, JSON path)."""
        description = self.description()
        # safetensors metadata is str -> str, so structured values travel as JSON text.
        metadata = {
            key: value if isinstance(value, str) else json.dumps(value) for key, value in description.items()
        }
        state = {
            name: tensor.detach().float().contiguous().cpu()
            for name, tensor in self.module.state_dict().items()
        }
        json_path = out.with_suffix(".json")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out), metadata=metadata)
            json_path.write_text(json.dumps(description, indent=2) + "\n")
        except OSError as error:
            raise CheckpointError(f"--out {out}: cannot write ({error.strerror})") from None
        return out, json_path


def check_training_data(training_data: dict[str, Any], path: Path) -> None:
    """Refuse a generator trained on another shard format or normalisation than data_prep makes now (its
    inputs would arrive scaled differently), or with no record of it (checkpoints from before format 2,
    which were all trained on percentile-normalised shards): a CheckpointError, one line, what to do."""
    problem = format_problem(training_data)
    if problem:
        raise CheckpointError(
            f"{path}: trained on {problem}: retrain on shards made by python -m data_prep shard, "
            "or use the medgan version it was trained with"
        )


def _build(
    config: Config,
    state: dict[str, torch.Tensor],
    path: Path,
    source: str,
    training_data: dict[str, Any],
    device,
) -> LoadedGenerator:
    check_training_data(training_data, path)
    generator_config = config.model.generator
    if torch.device(device).type != "cuda" and generator_config.scan_backend in GPU_SCAN_BACKENDS:
        # The scan path a GPU run chose is a speed choice, not part of the model: off a GPU the same
        # weights run the chunked path instead of failing inside a CUDA kernel.
        generator_config = dataclasses.replace(generator_config, scan_backend="auto")
    module = build_generator(generator_config)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the generator its config describes ({first})"
        ) from None
    # Hashed as loaded into the module (fp32, the network's own names), before it moves to a device.
    digest = weights_sha256(module.state_dict())
    module.to(device).eval()
    return LoadedGenerator(
        module=module,
        config=config,
        modalities=list(config.model.generator.modalities),
        trained_inputs=list(config.data.input_modalities),
        trained_target=config.data.target_modality,
        source=source,
        training_data=training_data,
        weights_sha256=digest,
    )


def load_generator(
    path: str | Path,
    tag: str | None = None,
    device: str | torch.device = "cpu",
    weights: str | None = None,
) -> LoadedGenerator:
    """The generator in a checkpoint folder (``tag``: default best, else latest) or an exported file.

    weights: None for the EMA weights when the checkpoint folder has them, else DeepSpeed's raw weights;
    ``"ema"`` or ``"raw"`` to load that set (a CheckpointError naming the path when the folder lacks it).
    An exported file holds one set and takes None only.
    """
    path = Path(path)
    if weights not in (None, *WEIGHT_SETS):
        raise ValueError(f"weights={weights!r}: expected None, 'ema' or 'raw'")
    if path.is_file():
        if weights is not None:
            raise CheckpointError(
                f"{path}: an exported file holds one set of weights; for the {weights} weights "
                "give the checkpoint folder"
            )
        return _load_exported(path, device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    config, training_data = read_run(path)
    tag, why = resolve_tag(path, tag)
    state, kind = read_generator_weights(path, tag, weights)
    source = f"{'EMA' if kind == 'ema' else 'raw'} weights of {tag} ({why}) in {path}"
    return _build(config, state, path, source, training_data, device)


def _load_exported(path: Path, device) -> LoadedGenerator:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path}: a safetensors file without medgan's metadata (make it with python -m medgan export)"
        )
    try:
        config = build_config(json.loads(metadata["config"]), saved=True)
        training_data = json.loads(metadata.get("training_data", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"{path}: its stored config cannot be read ({error})") from None
    if not training_data and metadata.get("dataset"):
        # files exported before the training-data record carried the dataset kind alone
        training_data = {"dataset": metadata["dataset"]}
    source = f"{metadata.get('source', 'exported weights')}, exported to {path}"
    return _build(config, read_safetensors(path), path, source, training_data, device)
