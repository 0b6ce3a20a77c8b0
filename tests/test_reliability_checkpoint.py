"""Restore faults: checksums recorded and verified, metadata checked against what is stored, parse errors and missing
or damaged files named in one line (docs/reliability.md)."""

import json
import shutil

import pytest

import neox_jax
from conftest import micro_config
from neox_jax.model.neox import init_params
from neox_jax.store import checkpoint

CFG = micro_config()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_params(out, CFG, init_params(CFG, seed=1))
    return out


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy each test may damage."""
    return shutil.copytree(saved, tmp_path / "copy")


def _meta(path):
    return json.loads((path / "metadata.json").read_text())


def _edit_meta(path, fn):
    meta = _meta(path)
    fn(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def _largest_file(path, group):
    return max((p for p in (path / "params" / group).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_every_stored_file_has_a_checksum(saved):
    files = _meta(saved)["checksums"]["files"]
    stored = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert sorted(files) == [f for f in stored if f != "metadata.json"]
    assert checkpoint.verify(saved) == sum(f["bytes"] for f in files.values()) > 0


def test_flipped_byte_is_found_by_verify_and_names_the_group(ckpt):
    f = _largest_file(ckpt, "layers.1")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    neox_jax.load(ckpt)  # same size: the cheap checks of a plain load do not hash (restore stays fast)
    with pytest.raises(checkpoint.ChecksumError, match=r"1 group\(s\) differ.*layers\.1: .*sha256 differs"):
        checkpoint.verify(ckpt)
    with pytest.raises(checkpoint.ChecksumError, match=r"layers\.1"):
        neox_jax.load(ckpt, verify=True)


def test_convert_verify_command(ckpt, capsys):
    from convert.__main__ import main

    assert main(["verify", str(ckpt)]) == 0
    assert "ok" in capsys.readouterr().out
    (ckpt / "params" / "embed_out").joinpath("stray").write_text("x")
    assert main(["verify", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "embed_out" in err and "not recorded" in err


def test_metadata_with_fewer_layers_than_stored_is_refused(ckpt):
    _edit_meta(ckpt, lambda m: (m["config"].update(num_hidden_layers=1), m.update(groups=None)))
    with pytest.raises(checkpoint.CheckpointError, match=r"stores groups \['layers\.1'\].*num_hidden_layers 1"):
        neox_jax.load(ckpt)


def test_groups_disagreeing_with_config_are_refused(ckpt):
    _edit_meta(ckpt, lambda m: m["config"].update(num_hidden_layers=1))
    with pytest.raises(checkpoint.CheckpointError, match=r"metadata\.json: `groups` lists 5 groups.*has 4"):
        neox_jax.load(ckpt)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", r"metadata\.json: not valid JSON"),
        ("[1, 2]", r"metadata\.json: expected a JSON object"),
    ],
)
def test_unparsable_metadata_names_the_file(ckpt, text, match):
    (ckpt / "metadata.json").write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        neox_jax.load(ckpt)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("config"), r"`config` is missing"),
        (lambda m: m["config"].update(hidden_size="big"), r"bad `config`: NeoXConfig\.hidden_size"),
        (lambda m: m["config"].update(colour=1), r"bad `config`: unknown NeoXConfig fields"),
        (lambda m: m.update(dtype="float8"), r"`dtype` is 'float8'"),
        (lambda m: m.update(checksums={"files": []}), r"bad `checksums`"),
    ],
)
def test_broken_metadata_fields_name_the_file(ckpt, edit, match):
    _edit_meta(ckpt, edit)
    with pytest.raises(checkpoint.CheckpointError, match=r"metadata\.json: " + match):
        neox_jax.load(ckpt)


def test_deleted_data_file_is_named_before_reading(ckpt):
    f = _largest_file(ckpt, "embed_in")
    f.unlink()
    with pytest.raises(checkpoint.ChecksumError, match=rf"embed_in: params/embed_in/.*{f.name}: missing"):
        neox_jax.load(ckpt)


def test_deleted_data_file_without_checksums_is_one_line(ckpt):
    """A checkpoint written before checksums: Orbax's failure becomes one error naming the group directory."""
    _edit_meta(ckpt, lambda m: m.pop("checksums"))
    _largest_file(ckpt, "layers.0").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"params/layers\.0: cannot read") as e:
        neox_jax.load(ckpt)
    assert "\n" not in str(e.value)
    with pytest.raises(checkpoint.CheckpointError, match="no checksums recorded"):
        checkpoint.verify(ckpt)


def test_identity_follows_the_stored_bytes(saved, tmp_path):
    other = checkpoint.save_params(tmp_path / "other", CFG, init_params(CFG, seed=2))
    assert checkpoint.identity(saved) == checkpoint.identity(saved)
    assert checkpoint.identity(saved) != checkpoint.identity(other)
