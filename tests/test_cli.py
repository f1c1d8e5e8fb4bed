from wbclib import cli


def test_methods_lists_every_registry(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "methods: " in out and "erm" in out
    assert "losses: " in out and "ce" in out
    assert "samplers: " in out and "instance" in out


def test_data_summary_counts_per_source_and_class(root, capsys):
    assert cli.main(["data", "summary", "--root", str(root), "--source", "zheng1"]) == 0
    out = capsys.readouterr().out
    neutrophil = next(line for line in out.splitlines() if line.startswith("neutrophil"))
    assert neutrophil.split()[-1] == "176"
    assert out.splitlines()[-1].split()[-1] == "300"


def test_missing_root_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["data", "summary", "--root", str(tmp_path / "gone")]) == 2
    assert "gone does not exist" in capsys.readouterr().err


def test_splits_are_written(root, tmp_path, capsys):
    assert cli.main(["splits", "--root", str(root), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "pbc_lt_seed0.csv").is_file() and (tmp_path / "crosslab_seed0.csv").is_file()


def test_segment_prints_mean_dice(root, capsys):
    assert cli.main(["segment", "--source", "zheng1", "--limit", "6", "--root", str(root)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mean Dice over 6 images: nucleus 0.")
    nucleus = float(last.split("nucleus ")[1].split(",")[0])
    assert nucleus > 0.7
