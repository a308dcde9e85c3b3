"""``cps4 train`` and ``cps4 bench`` on the command line: a tiny run, bad input, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _stage2_data import write_dataset, write_stage1_run
from cps4_engine.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cli_stage2") / "data", cases=5)


def _train(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(dataset), "--out", str(out), "--preset", "tiny", "--max-steps", "3",
            "--device", "cpu", "--validation", "1", *extra]


def test_train_writes_a_stage2_run(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--labeled", "2", "--method", "mean-teacher")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == 2 and config["method"] == "mean-teacher" and config["max_steps"] == 3
    assert (out / "model.safetensors").is_file()
    assert "stage 2 done: run written to" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "expected"), [((), False), (("--cpu-bf16",), True)])
def test_train_records_whether_cpu_steps_ran_in_bfloat16(
    dataset: Path, tmp_path: Path, extra: tuple[str, ...], expected: bool
) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--labeled", "2", "--method", "supervised", *extra)) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["cpu_bf16"] is expected


def test_train_unimatch_writes_a_run_of_its_own_base(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--labeled", "2", "--method", "unimatch", "--feature-dropout", "0.3")) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["base"]) == ("unimatch", "unimatch")
    assert config["settings"]["feature_dropout"] == 0.3
    assert main(_train(dataset, out, "--labeled", "2", "--method", "unimatch", "--max-steps", "4", "--resume")) == 0
    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["steps"]] == [1, 2, 3, 4]


def test_cps4_on_unimatch_weighs_class_maps_by_their_recorded_reliability(dataset: Path, tmp_path: Path) -> None:
    from cps4_engine.fusion import class_weights, read_class_reliability

    vlm = tmp_path / "vlm"
    assert main(["pretrain", str(dataset), "--out", str(vlm), "--labeled", "2", "--preset", "tiny",
                 "--max-steps", "2", "--device", "cpu", "--validation", "1", "--text-encoder", "tiny"]) == 0
    reliability = read_class_reliability(vlm)
    assert reliability is not None and len(reliability) == 19
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--labeled", "2", "--method", "cps4", "--base", "unimatch",
                       "--vlm", str(vlm))) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["base"], config["prompt_weighting"]) == ("cps4", "unimatch", "reliability")
    assert config["prompt_weights"] == pytest.approx(class_weights("reliability", 0.25, reliability))
    assert main(_train(dataset, out, "--labeled", "2", "--method", "cps4", "--vlm", str(vlm),
                       "--max-steps", "4", "--resume")) == 2


def test_bad_base_is_one_line_and_exit_2(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_train(dataset, tmp_path / "run", "--labeled", "2", "--method", "cps4", "--base", "fixmatch"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "--base" in error and "fixmatch" in error and len(error.splitlines()) == 1


def test_help_names_the_bases_and_the_default_prompt_weighting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{mean-teacher,unimatch}" in text and "unimatch" in text
    assert "default reliability when the stage-1 run has class_reliability.json, else global" in text


def test_labeled_fraction_is_accepted(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_train(dataset, out, "--labeled", "0.4", "--method", "supervised")) == 0
    assert len(json.loads((out / "split.json").read_text())["labeled"]) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labeled", "2", "--method", "cps4"], "needs --vlm"),
        (["--labeled", "0", "--method", "mean-teacher"], "no labeled volume"),
        (["--labeled", "7", "--method", "supervised"], "more than the 5 labeled"),
        (["--labeled", "4", "--method", "cps4", "--vlm", "VLM2"], "not a stage-1 run"),
        (["--labeled", "4", "--method", "mean-teacher"], "no unlabeled training volume"),
        (["--labeled", "2", "--method", "supervised", "--preset", "huge"], "unknown preset"),
        (["--labeled", "2", "--method", "mean-teacher", "--base", "unimatch"], "applies to --method cps4 only"),
        (["--labeled", "2", "--method", "cps4", "--vlm", "VLM1", "--prompt-weighting", "reliability"],
         "needs the stage-1 run's class_reliability.json"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    write_stage1_run(tmp_path / "VLM2", stage=2)
    write_stage1_run(tmp_path / "VLM1")
    extra = [str(tmp_path / item) if item in ("VLM1", "VLM2") else item for item in extra]
    assert main(_train(dataset, tmp_path / "run", *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()


def test_unparsable_labeled_is_refused(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_train(dataset, tmp_path / "run", "--labeled", "two"))
    assert exit_info.value.code == 2


def test_subprocess_prints_no_traceback(dataset: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cps4_engine", *_train(dataset, tmp_path / "run", "--labeled", "2", "--method", "cps4")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "needs --vlm" in result.stderr


def test_bench_rejects_unknown_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--out", str(tmp_path), "--datasets", "mnist"]) == 2
    assert "mnist" in capsys.readouterr().err


def test_bench_methods_option_picks_the_rows(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from cps4_engine import bench

    assert main(["bench", "--out", str(tmp_path / "bad"), "--methods", "unimatch,fixmatch"]) == 2
    error = capsys.readouterr().err
    assert "--methods fixmatch unknown; choose from supervised, mean-teacher, unimatch, cps4, cps4-unimatch" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert main(["bench", "--out", str(tmp_path / "empty"), "--methods", ","]) == 2
    assert "--methods lists no method" in capsys.readouterr().err

    chosen: list[tuple[str, ...]] = []
    monkeypatch.setattr(bench, "run_bench", lambda settings: chosen.append(settings.methods))
    assert main(["bench", "--out", str(tmp_path / "some"), "--methods", "unimatch, cps4-unimatch"]) == 0
    assert main(["bench", "--out", str(tmp_path / "all")]) == 0
    assert chosen == [("unimatch", "cps4-unimatch"), tuple(bench.BENCH_METHODS)]


def test_bench_smoke_writes_every_table(tmp_path: Path) -> None:
    from cps4_engine.bench import run_bench, smoke_settings

    report = run_bench(smoke_settings(tmp_path / "bench", command="pytest smoke"), log=lambda line: None)
    rows = {(row["labeled"], row["method"]): row for row in report["summary"]["table"]}
    assert set(rows) == {(1, "supervised"), (1, "mean-teacher"), (1, "unimatch"), (1, "cps4"),
                         (1, "cps4-unimatch"), ("full", "supervised")}
    assert all(row["runs"] == 1 and 0.0 <= row["dice_mean"] <= 1.0 for row in rows.values()), rows
    sources = {row["source"] for row in report["summary"]["pseudo_labels"] if row["method"] == "cps4"}
    assert sources == {"teacher", "prompt", "fused"}
    on_unimatch = json.loads(Path(report["results"]["train/synthetic/seed0/labeled1/cps4-unimatch"]["run"],
                                  "config.json").read_text())
    assert (on_unimatch["method"], on_unimatch["base"]) == ("cps4", "unimatch")
    assert report["results"]["train/synthetic/seed0/labeled1/cps4"]["vlm_labeled_match"] is True
    assert report["step_time"]["ratio_cps4_over_mean_teacher"] > 0
    assert len(report["predict"]["volumes"]) == 1
    markdown = (tmp_path / "bench" / "bench.md").read_text()
    assert "| synthetic | 1 | cps4 |" in markdown and "ratio CPS4 / mean teacher" in markdown
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["settings"]["command"] == "pytest smoke"


def test_bench_runs_only_the_chosen_methods_and_refuses_unknown_ones(tmp_path: Path) -> None:
    from cps4_engine.bench import run_bench, smoke_settings
    from cps4_engine.errors import CPS4Error

    with pytest.raises(CPS4Error, match="bench methods fixmatch unknown"):
        run_bench(smoke_settings(tmp_path / "bad", methods=("supervised", "fixmatch")), log=lambda line: None)
    report = run_bench(smoke_settings(tmp_path / "bench", methods=("unimatch",), full_supervision=False),
                       log=lambda line: None)
    assert [(row["labeled"], row["method"]) for row in report["summary"]["table"]] == [(1, "unimatch")]
    assert report["summary"]["table"][0]["runs"] == 1
