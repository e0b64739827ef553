#!/usr/bin/env bash
# `make demo`: the CPU demo. For now a model smoke run on the demo config; the data and training steps
# extend it into the full pipeline (phantom -> shards -> 2-rank DeepSpeed training -> evaluation -> report).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY - <<'PY'
import time

import torch

from medgan.config import load_config
from medgan.models.conditioning import condition_stack
from medgan.models.discriminator import PatchDiscriminator
from medgan.models.generator import build_generator, count_parameters

config = load_config("configs/demo.yaml")
torch.manual_seed(config.training.seed)
generator = build_generator(config.model.generator)
discriminator = PatchDiscriminator(config.model.discriminator, len(config.model.generator.modalities))
images = torch.rand(2, len(config.model.generator.modalities), 128, 128)
available = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
target = torch.tensor([3, 3])
start = time.perf_counter()
synthesized = generator(images, available, target)
logits = discriminator(condition_stack(images, available, target), synthesized)
(synthesized.mean() + logits.mean()).backward()
elapsed = time.perf_counter() - start
print(f"generator: {count_parameters(generator):,} parameters, discriminator: {count_parameters(discriminator):,}")
print(f"forward+backward of a 2x5x128x128 batch: {elapsed:.2f} s, output {tuple(synthesized.shape)}")
PY
