"""Draw docs/images/hybrid_scan_orders.png and docs/images/hybrid_layout.png from the code itself.

    .venv/bin/python docs/figures.py [--config configs/brats.yaml]

The scan orders are read from ``SlabS6.sequences`` on a small slab whose tokens carry their own position,
so the picture shows what the model scans, not what the docs say it scans. The layout is drawn from the
config's ``depth`` and ``ssm_levels`` or ``--levels`` (where the hybrid's branches sit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medgan.models.slab_scan import SLAB_ORDERS, SlabS6  # noqa: E402

IMAGES = REPO / "docs" / "images"


def scan_positions(slices: int, height: int, width: int) -> list[torch.Tensor]:
    """Per forward order of SlabS6 (rows, columns, slices), ``[S, h, w]``: each token's place in the
    sequence (0 first)."""
    tokens = torch.arange(slices * height * width, dtype=torch.float32)
    u = tokens.reshape(slices, 1, height, width)  # one channel: the token's own index
    sequences = SlabS6(1, d_state=1, expand=1).sequences(u, slices)[0, :3, 0]  # [3, L]
    positions = []
    for order in sequences:
        place = torch.empty_like(order)
        place[order.long()] = torch.arange(len(order), dtype=torch.float32)
        positions.append(place.reshape(slices, height, width))
    return positions


def draw_scan_orders(path: Path, slices: int = 3, size: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = scan_positions(slices, size, size)
    figure, axes = plt.subplots(3, slices, figsize=(2.2 * slices, 6.6))
    for row, (name, place) in enumerate(zip(SLAB_ORDERS[:3], positions)):
        for z in range(slices):
            axis = axes[row, z]
            axis.imshow(place[z].numpy(), cmap="viridis", vmin=0, vmax=place.max().item())
            for y in range(size):
                for x in range(size):
                    axis.text(x, y, int(place[z, y, x]), ha="center", va="center", color="white", fontsize=11)
            axis.set_xticks([])
            axis.set_yticks([])
            if z == 0:
                axis.set_ylabel(name, fontsize=12)
            if row == 0:
                axis.set_title(f"slice z = {z}")
    figure.suptitle(
        "SlabS6: each token's place in the scanned sequence (3 slices of 3 x 3 tokens)\n"
        "each order is also scanned in reverse; the three outputs of both directions are summed",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_layout(path: Path, depth: int, levels: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    step = 1.2
    figure, axis = plt.subplots(figsize=(9, 1.4 + 0.9 * (depth + 1)))
    axis.set_xlim(0, 10)
    axis.set_ylim(-step * depth - 0.6, 1.0)
    axis.axis("off")

    def box(x: float, y: float, text: str, colour: str, width: float = 1.9) -> None:
        axis.add_patch(
            FancyBboxPatch((x - width / 2, y - 0.3), width, 0.6, boxstyle="round,pad=0.04", color=colour)
        )
        axis.text(x, y, text, ha="center", va="center", fontsize=8.5)

    def arrow(start: tuple[float, float], end: tuple[float, float]) -> None:
        axis.annotate("", end, start, arrowprops=dict(arrowstyle="->", color="grey", lw=1))

    trunk, branch = "#cfe2f3", "#f9cb9c"
    for level in range(depth):
        y = -step * level
        box(1.5, y, f"encoder level {level}", trunk)
        box(8.5, y, f"decoder level {level}", trunk)
        if level in levels:
            box(4.0, y, "+ scale x SlabS6", branch)
            arrow((2.45, y), (3.05, y))
            arrow((4.95, y), (7.55, y))
        else:
            arrow((2.45, y), (7.55, y))
        axis.text(6.2, y + 0.1, "skip", fontsize=8, color="grey")
        # the next level (downsampled) takes what goes into the skip: after the branch where there is one
        arrow((4.0, y - 0.3) if level in levels else (1.5, y - 0.3), (1.5, y - step + 0.3))
        arrow((8.5, y - step + 0.3), (8.5, y - 0.3))
    y = -step * depth
    box(1.5, y, "bottleneck", trunk)
    box(4.0, y, "+ scale x SlabS6", branch)
    arrow((2.45, y), (3.05, y))
    arrow((4.95, y), (7.55, y))
    box(8.5, y, f"upsampled into\ndecoder level {depth - 1}", "#eeeeee")
    axis.text(
        0.0,
        0.65,
        f"hybrid: the U-Net trunk (depth {depth}, blue); a state-space branch (orange) beside encoder "
        f"levels {levels} and the bottleneck,\neach x + scale * SlabS6(LayerNorm(x)) with a per-channel "
        "scale that starts at 0, scanning every token of the slab",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "brats.yaml"))
    parser.add_argument(
        "--levels", type=int, nargs="*", help="branch levels (default: the config's ssm_levels)"
    )
    args = parser.parse_args(argv)
    generator = yaml.safe_load(Path(args.config).read_text())["model"]["generator"]
    levels = args.levels if args.levels is not None else list(generator["ssm_levels"])
    IMAGES.mkdir(parents=True, exist_ok=True)
    draw_scan_orders(IMAGES / "hybrid_scan_orders.png")
    draw_layout(IMAGES / "hybrid_layout.png", generator["depth"], levels)
    print(f"wrote {IMAGES / 'hybrid_scan_orders.png'} and {IMAGES / 'hybrid_layout.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
