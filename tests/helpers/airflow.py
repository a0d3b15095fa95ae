"""Airflow settings the tests that start an API server share: simple auth with two users, a fixed JWT secret."""
from __future__ import annotations

import pytest

AIRFLOW_ENV = {
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
    "AIRFLOW__API_AUTH__JWT_SECRET": "plugin-test-secret-" + "s" * 64,
}


@pytest.fixture(scope="module")
def api():
    """Airflow's api-server app (core apps: plugins, auth, middlewares) on a fresh metadata DB."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in AIRFLOW_ENV.items():
            patch.setenv(key, value)
        from airflow.api_fastapi.app import create_app, purge_cached_app
        from airflow.utils import db
        from fastapi.testclient import TestClient

        db.initdb()
        with TestClient(create_app(apps="core")) as client:
            yield client
        purge_cached_app()  # the auth manager singleton was built with this module's settings


def mint_token(username: str, role: str | None, **options) -> str:
    """A JWT minted by the configured auth manager, exactly as /auth/token would."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role), **options)
