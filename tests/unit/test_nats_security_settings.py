"""Unit tests of the NATS authentication and TLS settings: combinations, secrecy, options.

No I/O: the files the settings name are never opened here (that happens when
connecting, tested against real servers in tests/integration/runtime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from omnistock.nats_client import connect_options, describe_credentials, redact_url, tls_wanted
from omnistock.settings import Settings, nats_security_problems

SECRET = "correct-horse-battery-staple"
NATS_ENVIRONMENT = (
    "OMNI_NATS_URL",
    "OMNI_NATS_USER",
    "OMNI_NATS_PASSWORD",
    "OMNI_NATS_CREDS_FILE",
    "OMNI_NATS_NKEY_SEED_FILE",
    "OMNI_NATS_TLS_CA_FILE",
    "OMNI_NATS_TLS_CERT_FILE",
    "OMNI_NATS_TLS_KEY_FILE",
)


@pytest.fixture(autouse=True)
def without_nats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test configures counts, not the shell's OMNI_NATS_* variables."""
    for variable in NATS_ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)


def refusal(**values: Any) -> str:
    """The validation error ``values`` give, as a person would read it."""
    with pytest.raises(ValidationError) as error:
        Settings(**values)
    return str(error.value)


def test_nothing_configured_is_valid_and_means_no_credentials_and_no_tls() -> None:
    settings = Settings()
    assert nats_security_problems(settings) == []
    assert connect_options(settings) == {}
    assert describe_credentials(settings) == "no credentials"


def test_a_password_without_a_user_is_refused() -> None:
    message = refusal(nats_password=SECRET)
    assert "OMNI_NATS_PASSWORD is set without OMNI_NATS_USER" in message


def test_a_user_without_a_password_is_refused() -> None:
    message = refusal(nats_user="omnistock")
    assert "OMNI_NATS_USER is set without OMNI_NATS_PASSWORD" in message


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"nats_user": "omnistock", "nats_password": SECRET, "nats_creds_file": "u.creds"},
            "OMNI_NATS_USER/OMNI_NATS_PASSWORD, OMNI_NATS_CREDS_FILE",
        ),
        (
            {"nats_creds_file": "u.creds", "nats_nkey_seed_file": "u.nk"},
            "OMNI_NATS_CREDS_FILE, OMNI_NATS_NKEY_SEED_FILE",
        ),
        (
            {"nats_password": SECRET, "nats_nkey_seed_file": "u.nk"},
            "OMNI_NATS_USER/OMNI_NATS_PASSWORD, OMNI_NATS_NKEY_SEED_FILE",
        ),
    ],
)
def test_more_than_one_way_to_authenticate_is_refused(values: dict[str, Any], named: str) -> None:
    message = refusal(**values)
    assert f"NATS authentication is configured in more than one way ({named}): choose one" in (
        message
    )


def test_credentials_in_the_url_and_in_a_setting_are_refused() -> None:
    message = refusal(nats_url="nats://a:4222,nats://someone:pw@b:4222", nats_nkey_seed_file="u.nk")
    assert "OMNI_NATS_URL carries credentials and OMNI_NATS_NKEY_SEED_FILE is set too" in message
    # Credentials in the URL alone are nats-py's to use, as before.
    assert Settings(nats_url="nats://someone:pw@b:4222").nats_user is None


def test_a_certificate_without_its_key_is_refused() -> None:
    message = refusal(nats_tls_cert_file="client.pem")
    assert "OMNI_NATS_TLS_CERT_FILE is set without OMNI_NATS_TLS_KEY_FILE" in message


def test_a_key_without_its_certificate_is_refused() -> None:
    message = refusal(nats_tls_key_file="client-key.pem", nats_tls_ca_file="ca.pem")
    assert "OMNI_NATS_TLS_KEY_FILE is set without OMNI_NATS_TLS_CERT_FILE" in message


def test_every_problem_is_named_at_once() -> None:
    message = refusal(nats_password=SECRET, nats_tls_cert_file="client.pem")
    assert "OMNI_NATS_PASSWORD is set without OMNI_NATS_USER" in message
    assert "OMNI_NATS_TLS_CERT_FILE is set without OMNI_NATS_TLS_KEY_FILE" in message


def test_a_ca_alone_and_a_client_certificate_with_its_key_are_valid() -> None:
    assert Settings(nats_tls_ca_file="ca.pem").nats_tls_ca_file == Path("ca.pem")
    both = Settings(nats_tls_cert_file="client.pem", nats_tls_key_file="client-key.pem")
    assert nats_security_problems(both) == []


def test_the_password_is_in_no_error_and_no_representation() -> None:
    message = refusal(nats_password=SECRET, nats_tls_key_file="k.pem")
    assert SECRET not in message
    settings = Settings(nats_user="omnistock", nats_password=SECRET)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())
    assert SECRET not in describe_credentials(settings)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_NATS_USER", "omnistock")
    monkeypatch.setenv("OMNI_NATS_PASSWORD", SECRET)
    monkeypatch.setenv("OMNI_NATS_TLS_CA_FILE", "certs/nats-ca.pem")
    settings = Settings()
    assert settings.nats_user == "omnistock"
    assert settings.nats_password is not None
    assert settings.nats_password.get_secret_value() == SECRET
    assert settings.nats_tls_ca_file == Path("certs/nats-ca.pem")


def test_an_environment_variable_set_empty_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in NATS_ENVIRONMENT[1:]:
        monkeypatch.setenv(variable, "")
    settings = Settings()
    assert settings.nats_user is None
    assert settings.nats_password is None
    assert settings.nats_tls_cert_file is None
    assert connect_options(settings) == {}


def test_a_bad_combination_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_NATS_PASSWORD", SECRET)
    with pytest.raises(ValidationError, match="OMNI_NATS_PASSWORD is set without") as error:
        Settings()
    assert SECRET not in str(error.value)


def test_user_and_password_become_nats_py_options() -> None:
    settings = Settings(nats_user="omnistock", nats_password=SECRET)
    assert connect_options(settings) == {"user": "omnistock", "password": SECRET}
    assert describe_credentials(settings) == "user 'omnistock' with OMNI_NATS_PASSWORD"


def test_file_credentials_are_described_by_their_variable() -> None:
    creds = Settings(nats_creds_file="secrets/omnistock.creds")
    seed = Settings(nats_nkey_seed_file="secrets/omnistock.nk")
    assert describe_credentials(creds) == (
        "the credentials file OMNI_NATS_CREDS_FILE (secrets/omnistock.creds)"
    )
    assert describe_credentials(seed) == (
        "the NKey seed file OMNI_NATS_NKEY_SEED_FILE (secrets/omnistock.nk)"
    )


def test_tls_is_wanted_with_a_tls_file_or_a_tls_url() -> None:
    assert not tls_wanted(Settings(), ["nats://a:4222"])
    assert tls_wanted(Settings(), ["nats://a:4222", "tls://b:4222"])
    assert tls_wanted(Settings(nats_tls_ca_file="ca.pem"), ["nats://a:4222"])


def test_urls_are_redacted_for_logs() -> None:
    assert redact_url("nats://someone:pw@nats-1:4222") == "nats://***@nats-1:4222"
    assert redact_url("tls://token@nats-1:4222") == "tls://***@nats-1:4222"
    assert redact_url("nats://nats-1:4222") == "nats://nats-1:4222"
