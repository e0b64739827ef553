"""Issue 16's generator design: blocks start near the identity, per-direction scan parameters, the step-size
init, per-token LayerNorm, positions in attention, the linear head, ``scan_off`` and the scan share."""

import math

import pytest
import torch
import torch.nn.functional as F

from medgan.models import blocks
from medgan.models.blocks import (
    DT_RANGE,
    LAYER_SCALE_INIT,
    ChannelLayerNorm,
    LayerScale,
    MultiDirectionS6,
    NonLocalAttention,
    SSMStage,
)
from medgan.models.generator import GeneratorConfig, build_generator, recording_scan_share

SMALL = dict(
    base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, ssm_expand=1, condition_dim=8, attention_heads=2
)


def make_batch(batch=2, height=16, width=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 5, height, width, generator=generator)
    available = torch.zeros(batch, 5, dtype=torch.bool)
    available[:, :2] = True
    return images, available, torch.full((batch,), 3, dtype=torch.long)


def feature_map(channels, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.group_norm(torch.randn(2, channels, size, size, generator=generator), 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SSMStage(16, (1, 2), d_state=4, expand=2, directions=4),
        lambda: SSMStage(16, (1,), d_state=4, expand=1, directions=2),
        lambda: NonLocalAttention(16, heads=4),
    ],
)
def test_residual_blocks_start_close_to_the_identity(make):
    torch.manual_seed(0)
    block = make()
    x = feature_map(16, 12)
    with torch.no_grad():
        change = (block(x) - x).norm() / x.norm()
    assert 0 < change < 0.05


def test_every_residual_branch_has_a_small_learned_per_channel_scale():
    stage = SSMStage(16, (1, 2), d_state=4, expand=1, directions=4)
    scales = [m for m in stage.modules() if isinstance(m, LayerScale)]
    assert len(scales) == 2
    assert LAYER_SCALE_INIT == 0.1  # the design's "small": a tenth of the branch at init
    x = feature_map(16, 5)
    for scale in scales:
        assert scale.gamma.shape == (16,) and scale.gamma.requires_grad
        # every channel starts at exactly the init, not somewhere below it
        assert torch.equal(scale.gamma.detach(), torch.full((16,), 0.1))
        with torch.no_grad():
            assert torch.allclose(scale(x), 0.1 * x)
            # per channel: a change to one channel's gamma scales that channel only
            scale.gamma[3] = 2.0
            scaled = scale(x)
        assert torch.allclose(scaled[:, 3], 2.0 * x[:, 3])
        assert torch.allclose(
            torch.cat([scaled[:, :3], scaled[:, 4:]], 1), 0.1 * torch.cat([x[:, :3], x[:, 4:]], 1)
        )
    attention = NonLocalAttention(16, heads=4)
    assert isinstance(attention.scale, LayerScale)
    assert torch.equal(attention.scale.gamma.detach(), torch.full((16,), 0.1))


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_each_direction_has_its_own_decay_skip_and_step_bias(directions):
    torch.manual_seed(0)
    block = MultiDirectionS6(8, d_state=4, expand=2, directions=directions)
    inner = 16
    assert block.A_log.shape == (directions * inner, 4)
    assert block.D.shape == (directions * inner,)
    assert block.delta_bias.shape == (directions * inner,)
    # each direction's step biases are drawn independently (not one vector repeated)
    biases = block.delta_bias.view(directions, inner)
    assert all(not torch.equal(biases[0], biases[k]) for k in range(1, directions))
    # and a change to one direction's D changes the output: it is used
    x = feature_map(8, 6)
    with torch.no_grad():
        before = block(x)
        block.D.view(directions, inner)[-1] += 1.0
        assert not torch.allclose(before, block(x))


def test_step_size_init_is_log_uniform_in_the_2d_range():
    torch.manual_seed(0)
    block = MultiDirectionS6(64, d_state=4, expand=2, directions=4)
    dt = F.softplus(block.delta_bias.detach())
    low, high = DT_RANGE
    assert float(dt.min()) >= low * (1 - 1e-5) and float(dt.max()) <= high * (1 + 1e-5)
    # log-uniform: the median sits near the geometric mean of the range
    assert math.isclose(float(dt.log().median()), 0.5 * (math.log(low) + math.log(high)), abs_tol=0.3)


def test_scan_output_is_layer_normalised_per_token():
    block = MultiDirectionS6(8, d_state=4, expand=2, directions=4)
    assert isinstance(block.out_norm, ChannelLayerNorm)
    x = torch.randn(2, 16, 5, 7) * 3 + 1
    y = block.out_norm(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 5, 7), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3)


def test_the_scan_term_is_not_negligible_at_init():
    torch.manual_seed(0)
    block = MultiDirectionS6(32, d_state=8, expand=2, directions=4)
    block.record_scan_share = True
    with torch.no_grad():
        block(feature_map(32, 16))
    assert 0.2 < block.scan_share < 5


def test_positions_make_attention_vary_over_a_uniform_map():
    torch.manual_seed(0)
    attention = NonLocalAttention(16, heads=4)
    uniform = torch.randn(1, 16, 1, 1).expand(1, 16, 6, 6).contiguous()
    with torch.no_grad():
        out = attention(uniform)
    change = out - uniform
    spread = (change - change.mean(dim=(2, 3), keepdim=True)).abs().amax()
    assert spread > 0.01 * change.abs().amax()
    # and a permutation of the tokens no longer just permutes the output
    x = feature_map(16, 6)[:1]
    permutation = torch.randperm(36)
    shuffled = x.flatten(2)[..., permutation].view_as(x)
    with torch.no_grad():
        assert not torch.allclose(
            attention(shuffled).flatten(2), attention(x).flatten(2)[..., permutation], atol=1e-6
        )


@pytest.mark.parametrize("arch", ["ssm", "unet"])
def test_head_is_unclamped_in_training_and_clamped_in_eval(arch):
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(arch=arch, **SMALL))
    with torch.no_grad():
        model.head.bias.fill_(0.9)
        model.head.weight.mul_(200)
        train_out = model.train()(*make_batch())
        eval_out = model.eval()(*make_batch())
    assert train_out.min() < 0 and train_out.max() > 1, "training sees values outside [0, 1]"
    assert torch.equal(eval_out, train_out.clamp(0, 1))


def test_both_generators_share_the_head_and_its_init():
    torch.manual_seed(0)
    heads = [build_generator(GeneratorConfig(arch=arch, **SMALL)).head for arch in ("ssm", "unet")]
    for head in heads:
        assert isinstance(head, torch.nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == 1
        assert float(head.weight.detach().std()) < 0.05 and not head.bias.any()


def test_scan_off_leaves_d_times_u_and_everything_else_unchanged(monkeypatch):
    torch.manual_seed(0)
    full = MultiDirectionS6(8, d_state=4, expand=2, directions=4)
    torch.manual_seed(0)
    off = MultiDirectionS6(8, d_state=4, expand=2, directions=4, scan_off=True)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), off.state_dict().values()))
    x = feature_map(8, 6)
    with torch.no_grad():
        with_scan = full(x)
        # the full block with a scan whose state term is zero: out = D * u
        monkeypatch.setattr(blocks, "selective_scan", lambda u, *args, D=None, **kwargs: u * D[:, None])
        expected = full(x)
        assert torch.allclose(off(x), expected, atol=1e-6)
    assert not torch.allclose(with_scan, expected, atol=1e-4), "the scan term is there without scan_off"


def test_scan_off_is_a_generator_switch():
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(**SMALL, scan_off=True))
    s6_blocks = [m for m in model.modules() if isinstance(m, MultiDirectionS6)]
    assert s6_blocks and all(block.scan_off for block in s6_blocks)
    out = model(*make_batch())
    out.mean().backward()
    with recording_scan_share(model) as shares:
        model(*make_batch())
    assert shares == {}


def test_scan_share_is_recorded_only_when_asked():
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(**SMALL)).eval()
    s6_blocks = {n: m for n, m in model.named_modules() if isinstance(m, MultiDirectionS6)}
    with torch.no_grad():
        plain = model(*make_batch())
        with recording_scan_share(model) as shares:
            recorded = model(*make_batch())
    assert set(shares) == set(s6_blocks) and all(0 < v < 10 for v in shares.values())
    assert torch.allclose(plain, recorded, atol=1e-6), "recording does not change the output"
    assert all(not b.record_scan_share and b.scan_share is None for b in s6_blocks.values())
