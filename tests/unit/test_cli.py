"""`mixer ...`: one call per command; expected failures are one line on stderr and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixer.cli import main

PARAMS = str(Path(__file__).resolve().parents[2] / "params.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--params", PARAMS])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_parameters_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "parameters 121,060" in out and "forward FLOPs per image 17.6 M" in out


def test_a_bad_param_stops_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "train", "train.lr=0", f"train.models_dir={tmp_path / 'models'}")
    assert code == 2 and out == ""
    assert err == "mixer train: error: train.lr: must be > 0, got 0\n"
    assert not (tmp_path / "models").exists()


def test_ingest_then_a_wrong_checksum_keeps_the_prepared_data(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              synthetic_archive: tuple[Path, str]) -> None:
    archive, md5 = synthetic_archive
    out_dir = tmp_path / "cifar100"
    code, out, _ = run(capsys, "ingest", f"data.url={archive}", f"data.md5={md5}", f"data.out_dir={out_dir}")
    assert code == 0 and '"train": 1800' in out
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    code, _, err = run(capsys, "ingest", f"data.url={archive}", f"data.md5={'0' * 32}", f"data.out_dir={out_dir}")
    assert code == 1 and len(err.splitlines()) == 1 and "md5" in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


def test_evaluate_without_a_model_says_what_to_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "evaluate", f"train.models_dir={tmp_path / 'models'}")
    assert code == 1 and len(err.splitlines()) == 1 and "mixer train" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        main(["train", "train.lr=0", "--params", PARAMS, "--debug"])
