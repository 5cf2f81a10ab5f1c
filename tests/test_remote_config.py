"""Remote configuration and preflight checks that need no server."""

from __future__ import annotations

import pytest

from ndif_vectors.remote import (
    PUBLIC_HOST, RemoteRunError, RemoteSettings, check_versions, find_deployment, preflight, served_models,
)

KEY = "nnsight.modeling.transformers.TransformersModel:" '{"repo_id": "/m/tiny", "revision": null, "task": "text-generation"}'


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_read_dotenv(clean_env):
    (clean_env / ".env").write_text("NDIF_HOST=http://127.0.0.1:8001/\nNDIF_API_KEY=from-dotenv\n")
    settings = RemoteSettings.resolve()
    assert settings.host == "http://127.0.0.1:8001"
    assert settings.api_key == "from-dotenv"
    assert "from-dotenv" not in repr(settings)


def test_settings_precedence(clean_env, monkeypatch):
    (clean_env / ".env").write_text("NDIF_HOST=http://dotenv:1\nNDIF_API_KEY=dotenv-key\n")
    monkeypatch.setenv("NDIF_HOST", "http://environment:2")
    assert RemoteSettings.resolve().host == "http://environment:2"
    assert RemoteSettings.resolve(host="http://option:3").host == "http://option:3"
    assert RemoteSettings.resolve(api_key="option-key").api_key == "option-key"


def test_default_host_is_public_service(clean_env):
    assert RemoteSettings.resolve().host == PUBLIC_HOST


def test_invalid_host_rejected(clean_env):
    with pytest.raises(RemoteRunError, match="Invalid NDIF host 'localhost:8001'.*http://"):
        RemoteSettings.resolve(host="localhost:8001")


def test_public_host_needs_key(clean_env):
    with pytest.raises(RemoteRunError, match="needs an API key.*NDIF_API_KEY"):
        preflight(RemoteSettings(PUBLIC_HOST, None), KEY, "/m/tiny")


def test_version_mismatch_names_fix():
    problems = check_versions({"packages": {"nnsight": "0.7.2", "torch": "2.13.0", "transformers": "5.22.2"}})
    assert problems == ["nnsight: client 0.8.1, server 0.7.2 (pip install nnsight==0.7.2)"]


def test_local_build_label_ignored():
    assert check_versions({"packages": {"torch": "2.13.0+cu128", "nnsight": "0.8.1"}}) == []


def test_deployment_found_by_key_in_name():
    status = {"deployments": {
        f"abc:ModelActor:{KEY}": {"application_state": "RUNNING"},
        "def:ModelActor:nnsight.modeling.transformers.TransformersModel:"
        '{"repo_id": "/m/other", "revision": null, "task": "text-generation"}': {"application_state": "RUNNING"},
    }}
    assert find_deployment(status, KEY) == {"application_state": "RUNNING"}
    assert find_deployment(status, KEY.replace("tiny", "absent")) is None
    assert served_models(status) == ["/m/other", "/m/tiny"]
