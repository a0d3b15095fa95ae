"""Airflow settings the tests that start an API server share: simple auth with two users, a fixed JWT secret."""
from __future__ import annotations

AIRFLOW_ENV = {
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
    "AIRFLOW__API_AUTH__JWT_SECRET": "plugin-test-secret-" + "s" * 64,
}
