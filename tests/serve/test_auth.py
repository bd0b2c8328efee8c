"""The API key without Ray: replicas hold only a salted digest, `fluid serve` verifies what they enforce,
the API docs need the key (or are off), and a replica deletes its staged export copy when it stops."""

import hashlib
import json

import pytest

from pipeline.config import ServeConfig
from pipeline.errors import FluidError
from pipeline.serve import auth
from pipeline.serve.openai_api import ApiError
from tests.serve.test_openai_api import export_tiny


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("auth") / "tiny")


def test_auth_holds_only_a_digest(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUID_TEST_KEY", raising=False)
    monkeypatch.delenv(auth.KEY_FILE_ENV, raising=False)
    off = auth.Auth.for_replica(None, None, "FLUID_TEST_KEY")
    assert not off.on and off.fingerprint() is None
    off.check(None)  # auth off
    f = tmp_path / "key"
    f.write_text("from-file\n")
    by_file = auth.Auth.for_replica(str(f), None, "FLUID_TEST_KEY")
    by_env_file = (monkeypatch.setenv(auth.KEY_FILE_ENV, str(f)), auth.Auth.for_replica(None, None, None))[1]
    monkeypatch.delenv(auth.KEY_FILE_ENV)
    by_digest = auth.Auth.for_replica(None, auth.key_digest("from-file"), None)
    legacy = auth.Auth("sha256:" + hashlib.sha256(b"from-file").hexdigest())  # an unsalted digest a user made
    digests = {a.digest for a in (by_file, by_env_file, by_digest)}
    assert len(digests) == 3 and all(d.startswith("hmac-sha256:") and "from-file" not in d for d in digests)
    for a in (by_file, by_env_file, by_digest, legacy):  # each salt is fresh; each enforces the key
        a.check("Bearer from-file")
        assert auth.fingerprint_of("from-file", a.fingerprint()) == a.fingerprint()
        assert auth.fingerprint_of("other", a.fingerprint()) != a.fingerprint()
    for header in (None, "Bearer wrong", "from-file", "Basic from-file", "Bearer "):
        with pytest.raises(ApiError) as ei:
            by_file.check(header)
        assert ei.value.status == 401 and ei.value.code == "invalid_api_key"
    with pytest.raises(FluidError, match="cannot read"):
        auth.Auth.for_replica(str(tmp_path / "missing"), None, None)
    with pytest.raises(FluidError, match="sha256"):
        auth.Auth("0123")
    # A raw key in a replica's environment would be visible and not enforced: the replica refuses.
    monkeypatch.setenv("FLUID_TEST_KEY", "s3cret")
    with pytest.raises(FluidError, match="FLUID_TEST_KEY holds a raw API key"):
        auth.Auth.for_replica(None, None, "FLUID_TEST_KEY")
    assert auth.Auth.for_replica(None, auth.key_digest("s3cret"), "FLUID_TEST_KEY").on  # inherited, hashed


def test_replica_config_never_carries_the_raw_key(export_dir, tmp_path, monkeypatch):
    """What Ray shows (the deployment's args) holds a digest or a path, never the key; a key that the
    replicas do not enforce stops `fluid serve`."""
    from pipeline.serve.app import replica_config, verify_auth

    monkeypatch.delenv(auth.KEY_FILE_ENV, raising=False)
    monkeypatch.setenv("FLUID_TEST_KEY", "raw-key-42")
    cfg = replica_config(ServeConfig(model=str(export_dir), api_key_env="FLUID_TEST_KEY"))
    assert auth.Auth(cfg.api_key_sha256).matches("raw-key-42") and "raw-key-42" not in json.dumps(cfg.__dict__)
    assert cfg.api_key_sha256.startswith("hmac-sha256:")  # salted: a random salt drawn here
    f = tmp_path / "key"
    f.write_text("k")
    with pytest.raises(FluidError, match="both set"):
        replica_config(ServeConfig(model=str(export_dir), api_key_env="FLUID_TEST_KEY", api_key_file=str(f)))

    class Handle:  # a deployment handle whose replicas report `got`
        def __init__(self, got):
            self.auth_fingerprint = self
            self.got = got

        def remote(self):
            return self

        def result(self, timeout_s):
            return self.got

    verify_auth(Handle(auth.Auth(cfg.api_key_sha256).fingerprint()), cfg)
    for got in (None, "another"):
        with pytest.raises(FluidError, match="refusing to serve"):
            verify_auth(Handle(got), cfg)
    with pytest.raises(FluidError, match="refusing to serve"):
        verify_auth(Handle("x"), ServeConfig(model=str(export_dir)))  # a key nobody configured
    by_file = ServeConfig(model=str(export_dir), api_key_file=str(f))  # replicas salt the file's key themselves
    verify_auth(Handle(auth.Auth.for_replica(str(f), None, None).fingerprint()), by_file)
    for got in (None, auth.Auth(auth.key_digest("not-k")).fingerprint()):
        with pytest.raises(FluidError, match="refusing to serve"):
            verify_auth(Handle(got), by_file)


def test_api_docs_need_the_key_or_are_off_and_the_staged_copy_goes_with_the_replica(export_dir):
    """Auth on: /docs, /redoc and /openapi.json answer 401 without the key; serve.api_docs=false removes
    them. A replica serving an fsspec URL deletes its temporary copy when it stops."""
    import fsspec
    from starlette.testclient import TestClient

    from pipeline.serve.app import FluidServer
    from pipeline.serve.http import make_app

    fs = fsspec.filesystem("memory")
    for f in export_dir.iterdir():
        fs.pipe(f"/exports/docs/{f.name}", f.read_bytes())
    srv = FluidServer(ServeConfig(model="memory://exports/docs", api_key_sha256=auth.key_digest("k"),
                                  api_key_env="FLUID_TEST_UNSET_KEY"))
    key = {"Authorization": "Bearer k"}
    with TestClient(make_app(srv)) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert c.get(path, headers=key).status_code == 200, path
        assert "/v1/completions" in c.get("/openapi.json", headers=key).json()["paths"]
        assert c.get("/healthz").status_code == 200  # load balancers need no key
    srv.cfg.api_docs = False
    with TestClient(make_app(srv)) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path, headers=key).status_code == 404, path
    staged = srv.staged
    assert staged is not None and (staged / "fluid.json").is_file()
    srv.__del__()  # what Ray Serve calls when it stops the replica
    assert not staged.exists() and srv.staged is None
