import pytest

from alerts.core.settings import ConfigError, Settings


def test_defaults_follow_the_spec():
    s = Settings.from_env({})
    assert (s.database_url, s.timezone, s.digest_period, s.max_attempts, s.retry_base_seconds,
            s.retry_max_seconds, s.sending_lease_seconds, s.email_backend, s.smtp_port) == (
        "sqlite:///alerts.db", "Europe/Amsterdam", "daily", 5, 60, 3600, 600, "smtp", 587)
    assert s.telegram_api_base == "https://api.telegram.org"
    assert s.twilio_api_base == "https://api.twilio.com/2010-04-01"
    assert s.hourly_digest_plans == frozenset()


@pytest.mark.parametrize("variable,value", [
    ("ALERTS_DIGEST_PERIOD", "weekly"),
    ("ALERTS_TIMEZONE", "Mars/Olympus"),
    ("ALERTS_EMAIL_BACKEND", "pigeon"),
    ("ALERTS_SMTP_TLS", "maybe"),
    ("ALERTS_MAX_ATTEMPTS", "five"),
    ("ALERTS_MAX_ATTEMPTS", "0"),
    ("ALERTS_RETRY_BASE_SECONDS", "1.5x"),
    ("ALERTS_SENDING_LEASE_SECONDS", "-1"),
    ("ALERTS_SMTP_PORT", "70000"),
    ("ALERTS_APP_BASE_URL", "javascript:alert(1)"),
    ("ALERTS_TELEGRAM_API_BASE", "not a url"),
])
def test_an_invalid_value_names_its_variable(variable, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(variable)


def test_hourly_plans_are_a_comma_separated_set():
    assert Settings.from_env({"ALERTS_HOURLY_DIGEST_PLANS": " pro, enterprise ,,"}).hourly_digest_plans == {"pro", "enterprise"}


def test_secrets_are_masked_when_settings_are_shown():
    s = Settings.from_env({"ALERTS_SMTP_PASSWORD": "hunter2", "ALERTS_TELEGRAM_BOT_TOKEN": "123:SECRET",
                           "ALERTS_TWILIO_AUTH_TOKEN": "twsecret"})
    shown = repr(s) + repr(s.redacted())
    for secret in ("hunter2", "123:SECRET", "twsecret"):
        assert secret not in shown
