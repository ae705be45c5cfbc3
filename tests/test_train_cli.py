"""``spine-train``: every subcommand is mounted and answers --help."""

from __future__ import annotations

import pytest

from training import cli


@pytest.mark.parametrize("name", [s[0] for s in cli.SUBCOMMANDS])
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"spine-train {name}" in out
    assert "unavailable" not in out


def test_parser_lists_all_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name, _, _ in cli.SUBCOMMANDS:
        assert name in out


def test_method_defaults_on_the_command_line() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["classifier", "--arch", "tf_efficientnetv2_s", "--data", "d", "--out", "o"]
    )
    from training.train_classifier import config_from_args

    cfg = config_from_args(args)
    assert (cfg.lr, cfg.weight_decay, cfg.t_max, cfg.epochs, cfg.patience) == (
        1e-4,
        1e-4,
        60,
        60,
        10,
    )
    assert cfg.batch_size == 24 and cfg.name == "efficientnet"
    args = parser.parse_args(["detector", "--data", "d", "--out", "o"])
    from training.train_detector import config_from_args as det_config

    d = det_config(args)
    assert (d.epochs, d.batch, d.nbs, d.close_mosaic, d.lr0, d.momentum, d.weight_decay) == (
        55,
        12,
        48,
        30,
        0.01,
        0.9,
        5e-4,
    )
    assert (d.box, d.cls, d.dfl, d.mixup, d.scale_range) == (7.5, 0.5, 1.5, 0.1, (480, 768))
    assert (d.hsv_h, d.hsv_s, d.hsv_v, d.fliplr, d.model) == (0.015, 0.7, 0.4, 0.5, "yolo11l.yaml")
