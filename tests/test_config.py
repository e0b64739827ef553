"""The config tree: YAML + seed flags + dotted overrides, typed, validated with one-line errors."""

from pathlib import Path

import pytest
import yaml

from medgan.config import Config, ConfigError, build_config, config_from_cli, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "brats.yaml", "brats_hybrid.yaml", "demo_hybrid.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)
    assert config.model.generator.modalities == ["t1", "t1ce", "t2", "flair", "pd"]


def test_seed_flags_and_dotted_overrides_land_in_the_tree():
    config = config_from_cli(
        [
            "--config", str(CONFIGS / "demo.yaml"),
            "--local_rank=1",
            "--batch_size", "7",
            "--lr_g", "1e-3",
            "--input_modalities", "t1", "t2",
            "--target_modality", "FLAIR",
            "--checkpoint_dir", "/tmp/x",
            "--deepspeed.zero_stage", "3",
            "--model.generator.use_attention", "false",
            "--model.generator.scales", "1", "2", "4",
        ]
    )  # fmt: skip
    assert config.data.batch_size == 7
    assert config.training.lr_g == pytest.approx(1e-3)
    assert config.data.input_modalities == ["t1", "t2"]
    assert config.data.target_modality == "flair"
    assert config.checkpoint.dir == "/tmp/x"
    assert config.deepspeed.zero_stage == 3
    assert config.model.generator.use_attention is False
    assert config.model.generator.scales == [1, 2, 4]
    # untouched keys keep the YAML's values
    assert config.training.epochs == load_config(CONFIGS / "demo.yaml").training.epochs


def test_brats_2023_names_map_onto_canonical_modalities():
    config = config_from_cli(["--input_modalities", "t1n", "t2w", "--target_modality", "t2f"])
    assert config.data.input_modalities == ["t1", "t2"]
    assert config.data.target_modality == "flair"


def test_round_trip_through_yaml(tmp_path):
    config = config_from_cli(["--config", str(CONFIGS / "demo.yaml"), "--training.seed", "5"])
    path = tmp_path / "config.yaml"
    config.save(path)
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["training"]["seed"] == 5


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--deepspeed.zero_stage", "4"], "deepspeed.zero_stage: 4"),
        (["--deepspeed.precision", "fp8"], "deepspeed.precision: 'fp8'"),
        (["--training.lr_g", "-1"], "training.lr_g: -1.0"),
        (["--training.tumour_l1_weight", "-2"], "training.tumour_l1_weight: -2.0 must be >= 0"),
        (["--training.adversarial_weight", "-1"], "training.adversarial_weight: -1.0 must be >= 0"),
        (["--training.cpu_budget_seconds", "-5"], "training.cpu_budget_seconds: -5.0 must be >= 0"),
        (["--model.generator.ssm_directions", "3"], "model.generator.ssm_directions: 3 must be 1, 2 or 4"),
        (["--training.lr_g", "fast"], "training.lr_g: 'fast' is not a number"),
        (["--data.batch_size", "2.5"], "data.batch_size: '2.5' is not an integer"),
        (["--model.generator.use_ssm", "maybe"], "model.generator.use_ssm: 'maybe' is not a boolean"),
        (["--model.generator.arch", "transformer"], "model.generator.arch: 'transformer'"),
        (["--model.generator.wings", "2"], "model.generator.wings: unknown config key"),
        (["--trainig.epochs", "2"], "trainig: unknown config key"),
        (["--target_modality", "dwi"], "data.target_modality: 'dwi'"),
        (["--input_modalities", "t1", "--target_modality", "t1"], "also an input modality"),
        (["--input_modalities", "t1"], "fixed inputs need a fixed --target_modality"),
        (["--batchsize", "3"], "--batchsize: unknown flag"),
        (["--data.batch_size"], "--data.batch_size: needs a value"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_key(argv, fragment):
    with pytest.raises(ConfigError) as error:
        config_from_cli(argv)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_yaml_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml' is not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_a_config_file_starts_from_its_base_and_overrides_it_section_by_section(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("data:\n  batch_size: 4\n  num_workers: 3\ntraining:\n  lr_g: 0.1\n")
    (tmp_path / "sub" / "middle.yaml").write_text("base: ../root.yaml\ndata:\n  batch_size: 8\n")
    (tmp_path / "leaf.yaml").write_text("base: sub/middle.yaml\ntraining:\n  lr_d: 0.2\n")
    config = load_config(tmp_path / "leaf.yaml", {"data": {"num_workers": 1}})
    assert (config.data.batch_size, config.data.num_workers) == (8, 1)
    assert (config.training.lr_g, config.training.lr_d) == (0.1, 0.2)
    assert "base" not in config.to_dict()

    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan.yaml': its base 'gone.yaml' does not exist"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"form a cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "listed.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base must be a file name"):
        load_config(tmp_path / "listed.yaml")


def test_one_config_error_for_the_model_configs_and_the_tree():
    """A bad model config value is the same UserError whether a model config or the tree finds it."""
    from data_prep.errors import UserError
    from medgan.models.generator import GeneratorConfig

    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    with pytest.raises(UserError, match=r"^model\.generator\.depth: 0 must be in 1\.\.6$") as direct:
        GeneratorConfig(depth=0)
    with pytest.raises(ConfigError) as through_the_tree:
        build_config({"model": {"generator": {"depth": 0}}})
    assert type(through_the_tree.value) is type(direct.value) is ConfigError
    assert str(through_the_tree.value) == str(direct.value)


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="training: expected a mapping"):
        build_config({"training": 3})


@pytest.mark.parametrize("empty", ["[]", "none", "null", ""])
def test_a_command_line_clears_a_list(empty):
    # demo.yaml fixes the inputs; clearing them switches it to one model for every task
    config = config_from_cli(
        ["--config", "configs/demo.yaml", "--data.input_modalities", empty, "--target_modality", "any"]
    )
    assert config.data.input_modalities == [] and config.data.target_modality == "any"
    assert config_from_cli(["--data.input_modalities=" + empty]).data.input_modalities == []


def test_a_cpu_budget_refuses_dataloader_workers_whose_cpu_time_it_cannot_count():
    # demo.yaml reads with one worker: a budget then would leave that worker's CPU time out
    with pytest.raises(ConfigError) as error:
        config_from_cli(["--config", str(CONFIGS / "demo.yaml"), "--training.cpu_budget_seconds", "60"])
    message = str(error.value)
    assert "training.cpu_budget_seconds: 60 needs data.num_workers 0 (got 1)" in message
    assert "\n" not in message
    allowed = ["--training.cpu_budget_seconds", "60", "--data.num_workers", "0"]
    assert config_from_cli(["--config", str(CONFIGS / "demo.yaml"), *allowed]).data.num_workers == 0
    assert config_from_cli(["--config", str(CONFIGS / "demo.yaml")]).data.num_workers == 1
