from farm.settings import Settings


def test_embedded_defaults_live_under_the_data_dir(data_dir):
    s = Settings()
    assert s.data_dir == data_dir
    assert s.effective_database_url == f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}"
    assert s.broker_is_embedded and s.effective_broker_url == "filesystem://"
    assert s.effective_models_dir == data_dir / "models"


def test_environment_overrides(data_dir, monkeypatch):
    monkeypatch.setenv("TOKENFARM_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("TOKENFARM_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("TOKENFARM_WORKER_NAME", "box-1")
    s = Settings()
    assert s.effective_database_url == "postgresql+psycopg://u@h/db"
    assert s.effective_broker_url == "redis://127.0.0.1:6379/3"
    assert not s.broker_is_embedded
    assert s.worker_name == "box-1"
