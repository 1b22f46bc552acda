"""Board profile and site config: valid files load; bad ones are refused naming file, key, why."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrec.cli import main
from dualrec.config import ConfigError, load_board, load_site
from helpers import ROOT, write_site

SIM = ROOT / "boards" / "sim.toml"


def test_sim_board_loads():
    board = load_board(SIM)
    assert board.camera.backend == "sim" and board.sim is not None


def test_site_relative_paths_resolve(tmp_path, key_files):
    site = load_site(write_site(tmp_path / "site.toml", key_files))
    assert site.spool.dir.is_absolute() and site.recording.segment_ms == 10_000


@pytest.mark.parametrize("mutation, key, reason", [
    (("[camera]", "[camera]\nzoom = 2"), "camera.zoom", "unknown key"),
    (("fps = 30", "fps = 500"), "camera.fps", "less than or equal to 60"),
    (("width = 640", "width = 641"), "camera", "even"),
    (('backend = "sim"\nwidth', 'backend = "kinect"\nwidth'), "camera.backend", "sim"),
])
def test_bad_board_names_file_key_reason(tmp_path, mutation, key, reason):
    text = SIM.read_text().replace(*mutation, 1)
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_board(bad)
    msg = str(err.value)
    assert str(bad) in msg and key in msg and reason in msg


@pytest.mark.parametrize("extra, key, reason", [
    ("[recording]\npreroll_ms = -1", "recording.preroll_ms", "greater than or equal"),
    ("[recording]\nsegmnt_ms = 5000", "recording.segmnt_ms", "unknown key"),
    ('[recording]\nmode = "sometimes"', "recording.mode", "continuous"),
])
def test_bad_site_names_file_key_reason(tmp_path, key_files, extra, key, reason):
    path = write_site(tmp_path / "site.toml", key_files, extra=extra)
    with pytest.raises(ConfigError) as err:
        load_site(path)
    assert str(path) in str(err.value) and key in str(err.value) and reason in str(err.value)


def test_bad_recipient_and_bad_toml(tmp_path, key_files):
    path = write_site(tmp_path / "site.toml", key_files)
    path.write_text(path.read_text().replace(key_files["recipient"], "age1nonsense"))
    with pytest.raises(ConfigError, match=r"seal\.recipients.*not an age X25519 recipient"):
        load_site(path)
    path.write_text("[device\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_site(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_site(tmp_path / "missing.toml")


def test_check_config_command(tmp_path, key_files):
    site = write_site(tmp_path / "site.toml", key_files)
    ok = CliRunner().invoke(main, ["check-config", "--board", str(SIM), "--site", str(site)])
    assert ok.exit_code == 0, ok.output
    site.write_text(site.read_text() + "\n[bogus]\n")
    bad = CliRunner().invoke(main, ["check-config", "--board", str(SIM), "--site", str(site)])
    assert bad.exit_code != 0 and "bogus: unknown key" in bad.output
    assert isinstance(Path(site), Path)
