"""A trained generator and everything needed to run it, from a checkpoint folder or an exported file.

Two forms hold a generator:

- ``CKPT_DIR`` as the trainer writes it (DESIGN.md): ``config.yaml`` plus ``generator/<tag>/``, where the
  weights are ``ema.safetensors`` (the EMA, used when present) or DeepSpeed's own shards (consolidated
  with ``zero_to_fp32`` under ZeRO, read from ``mp_rank_00_model_states.pt`` otherwise).
- ``G.safetensors`` written by :func:`export_generator`: fp32 weights, with the run's config, the model's
  modality list and where the weights came from in the safetensors metadata, and the same as readable
  JSON in ``G.json`` beside it.

:func:`load_generator` accepts either and returns a :class:`LoadedGenerator`; ``synthesize`` and
``evaluate`` use nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data_prep.errors import UserError
from medgan.config import Config, ConfigError, build_config, load_config
from medgan.models.generator import GeneratorConfig, build_generator

EXPORT_FORMAT = "medgan-ssm generator"
EXPORT_FORMAT_VERSION = "1"
EMA_FILE = "ema.safetensors"


class CheckpointError(UserError):
    """A checkpoint path a user gave cannot be used; the one-line message names the path and why."""


@dataclass(slots=True)
class LoadedGenerator:
    """A generator ready for inference, and what it was trained to do.

    module: the network in eval mode, fp32, on ``device``; ``module(images [B, M, H, W] in [0, 1],
    available [B, M] bool, target_index [B]) -> [B, 1, H, W] in [0, 1]``.
    modalities: the M input channels, in order (``modalities[i]`` is channel i).
    trained_inputs / trained_target: the training task (``target == "any"``: every task; empty inputs
    with a fixed target: every other present contrast).
    dataset: ``brats`` or ``ixi`` when the training shards said so (selects data_prep's preparation), else
    None. source: one line saying which weights these are, for reports.
    """

    module: nn.Module
    config: Config
    modalities: list[str]
    trained_inputs: list[str]
    trained_target: str
    dataset: str | None
    source: str

    @property
    def generator_config(self) -> GeneratorConfig:
        return self.config.model.generator

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


def resolve_tag(checkpoint_dir: Path, tag: str | None = None) -> tuple[str, str]:
    """(tag, why this one): the given tag, else ``best`` (best validation PSNR), else ``latest``."""
    generator_dir = checkpoint_dir / "generator"
    if tag:
        if not (generator_dir / tag).is_dir():
            raise CheckpointError(f"{generator_dir / tag}: no such checkpoint tag")
        return tag, "as requested"
    for pointer, why in (
        (checkpoint_dir / "best", "best validation PSNR"),
        (generator_dir / "latest", "latest"),
    ):
        if pointer.is_file():
            named = pointer.read_text().strip()
            if (generator_dir / named).is_dir():
                return named, why
    raise CheckpointError(
        f"{checkpoint_dir}: not a checkpoint folder (no generator/latest; expected the layout of DESIGN.md)"
    )


def checkpoint_state_dict(checkpoint_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], str]:
    """The generator's full fp32 state_dict at ``tag`` and which weights they are (``ema`` or ``raw``)."""
    tag_dir = checkpoint_dir / "generator" / tag
    if (tag_dir / EMA_FILE).is_file():
        return _read_safetensors(tag_dir / EMA_FILE), "ema"
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / "generator"), tag=tag)
        return {name: tensor.float() for name, tensor in state.items()}, "raw"
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        raise CheckpointError(f"{tag_dir}: holds neither {EMA_FILE} nor DeepSpeed model states")
    # DeepSpeed's own file: it pickles optimizer and RNG state, so weights_only loading cannot read it.
    state = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in state.items()}, "raw"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def _training_dataset(config: Config) -> str | None:
    """``brats`` / ``ixi`` from the training shards' manifest, when it is still where the run read it."""
    manifest = Path(config.data.data_path) / "manifest.json"
    try:
        dataset = json.loads(manifest.read_text()).get("dataset")
    except (OSError, json.JSONDecodeError):
        return None
    return dataset if dataset in ("brats", "ixi") else None


def _build(
    config: Config, state: dict[str, torch.Tensor], path: Path, source: str, dataset: str | None, device
) -> LoadedGenerator:
    module = build_generator(config.model.generator)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the generator its config describes ({first})"
        ) from None
    module.to(device).eval()
    return LoadedGenerator(
        module=module,
        config=config,
        modalities=list(config.model.generator.modalities),
        trained_inputs=list(config.data.input_modalities),
        trained_target=config.data.target_modality,
        dataset=dataset,
        source=source,
    )


def load_generator(
    path: str | Path, tag: str | None = None, device: str | torch.device = "cpu"
) -> LoadedGenerator:
    """The generator in a checkpoint folder (``tag``: default best, else latest) or an exported file."""
    path = Path(path)
    if path.is_file():
        return _load_exported(path, device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.yaml (not a checkpoint folder written by medgan)")
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    tag, why = resolve_tag(path, tag)
    state, weights = checkpoint_state_dict(path, tag)
    source = f"{'EMA' if weights == 'ema' else 'raw'} weights of {tag} ({why}) in {path}"
    return _build(config, state, path, source, _training_dataset(config), device)


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
        config = build_config(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"{path}: its stored config cannot be read ({error})") from None
    state = _read_safetensors(path)
    dataset = metadata.get("dataset") or None
    return _build(
        config,
        state,
        path,
        f"{metadata.get('source', 'exported weights')}, exported to {path}",
        dataset,
        device,
    )


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
    description: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "modalities": loaded.modalities,
        "trained_task": {"inputs": loaded.trained_inputs, "target": loaded.trained_target},
        "dataset": loaded.dataset or "",
        "source": loaded.source,
        "config": loaded.config.to_dict(),
    }
    # safetensors metadata is str -> str, so structured values travel as JSON text.
    metadata = {
        key: value if isinstance(value, str) else json.dumps(value) for key, value in description.items()
    }
    state = {
        name: tensor.detach().float().contiguous().cpu()
        for name, tensor in loaded.module.state_dict().items()
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out), metadata=metadata)
        json_path = out.with_suffix(".json")
        json_path.write_text(json.dumps(description, indent=2) + "\n")
    except OSError as error:
        raise CheckpointError(f"--out {out}: cannot write ({error.strerror})") from None
    return out, json_path, loaded
