"""`fedmeki provision`: the project CA and the startup kits, as files an operator hands out."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.kits import Role, load_kit, parse_serial, serial_text

KIT_FILES = {"ca.crt", "tls.crt", "tls.key", "kit.yaml"}


def _provision(output: Path, *sites: str) -> int:
    return fedmeki_main(["provision", "--output", str(output), "--coordinator-host", "fl.example.org", *sites])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _certificate(folder: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "tls.crt").read_bytes())


def test_one_kit_per_site_each_with_only_its_own_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "project"
    assert _provision(out, "--silo", "st-mary", "--silo", "st-john", "--researcher", "alice") == 0
    printed = capsys.readouterr().out
    assert f"its key {out / 'ca' / 'ca.key'} is in no kit" in printed
    assert {p.name for p in out.iterdir()} == {"ca", "coordinator", "admin", "st-mary", "st-john", "alice"}
    assert {p.name for p in (out / "ca").iterdir()} == {"ca.crt", "ca.key"}
    assert _mode(out / "ca" / "ca.key") == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())

    kits = {name: out / name for name in ("coordinator", "admin", "st-mary", "st-john", "alice")}
    keys = {name: (folder / "tls.key").read_bytes() for name, folder in kits.items()}
    secrets = [(out / "ca" / "ca.key").read_bytes(), *keys.values()]
    for name, folder in kits.items():
        assert {p.name for p in folder.iterdir()} == KIT_FILES, name
        assert _mode(folder / "tls.key") == 0o600 and _mode(folder) == 0o700, name
        assert (folder / "ca.crt").read_bytes() == (out / "ca" / "ca.crt").read_bytes()
        _certificate(folder).verify_directly_issued_by(ca)
        held = b"".join(p.read_bytes() for p in folder.iterdir())
        assert [secret in held for secret in secrets].count(True) == 1, f"{name} holds a key not its own"

    expected = {
        "coordinator": (Role.COORDINATOR, "fl.example.org"),
        "admin": (Role.ADMIN, "admin"),
        "st-mary": (Role.SILO, "st-mary"),
        "st-john": (Role.SILO, "st-john"),
        "alice": (Role.RESEARCHER, "alice"),
    }
    for folder_name, (role, name) in expected.items():
        kit = load_kit(kits[folder_name])
        assert (kit.role, kit.name, kit.coordinator) == (role, name, "fl.example.org:50051")
        assert (kit.identity.role, kit.identity.name) == (role, name)  # subject OU and CN
        config = yaml.safe_load((kits[folder_name] / "kit.yaml").read_text())
        assert parse_serial(config["serial"]) == kit.identity.serial
        assert f"(serial {serial_text(kit.identity.serial)})" in printed

    names = _certificate(kits["coordinator"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = _certificate(kits["st-mary"]).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_an_ip_coordinator_host_gets_an_ip_name(tmp_path: Path) -> None:
    out = tmp_path / "project"
    assert fedmeki_main(["provision", "--output", str(out), "--coordinator-host", "10.1.2.3", "--port", "7000"]) == 0
    kit = load_kit(out / "coordinator")
    assert kit.coordinator == "10.1.2.3:7000"
    names = _certificate(out / "coordinator").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }


def test_kits_are_never_overwritten_and_new_sites_reuse_the_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "project"
    assert _provision(out, "--silo", "st-mary", "--researcher", "alice") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert _provision(out, "--silo", "st-john", "--silo", "st-mary") == 2
    assert f"{out / 'st-mary'} already exists: a kit is never overwritten" in capsys.readouterr().err
    assert not (out / "st-john").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert _provision(out, "--silo", "st-john") == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p in before} == before
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    _certificate(out / "st-john").verify_directly_issued_by(ca)
    assert {p.name for p in out.iterdir()} == {"ca", "coordinator", "admin", "st-mary", "alice", "st-john"}


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (["--silo", "admin"], "site name 'admin' is reserved"),
        (["--silo", "ca"], "site name 'ca' is reserved"),
        (["--silo", "a", "--researcher", "a"], "site name 'a' is given twice"),
        (["--silo", "bad name!"], "site name 'bad name!': use letters"),
    ],
)
def test_bad_site_names_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sites: list[str], message: str
) -> None:
    assert _provision(tmp_path / "project", *sites) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "project").exists()


def test_a_kit_of_the_wrong_role_is_refused_by_name(tmp_path: Path) -> None:
    _provision(tmp_path, "--silo", "st-mary")
    with pytest.raises(InvalidInputError, match="is the kit of silo 'st-mary'; this needs a researcher or admin kit"):
        load_kit(tmp_path / "st-mary", Role.RESEARCHER, Role.ADMIN)
    with pytest.raises(InvalidInputError, match="is not a readable startup kit"):
        load_kit(tmp_path / "nobody")


def test_serials_read_as_printed_or_as_openssl_shows_them() -> None:
    assert parse_serial("5b85123c") == parse_serial("0x5B:85:12:3C") == 0x5B85123C
    assert serial_text(0x5B85123C) == "5b85123c"
    with pytest.raises(InvalidInputError, match="not hexadecimal"):
        parse_serial("xyz")
