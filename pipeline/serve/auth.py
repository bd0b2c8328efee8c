"""The API key of the FLUID server: replicas hold only a salted digest of it, never the key.

In:  the key as a driver (`fluid serve`, the load test) finds it: a file (a mounted secret;
     $FLUID_API_KEY_FILE) or the raw key in an env var of that process; a replica's key file or digest.
Out: `key_digest(key)` → "hmac-sha256:<salt hex>:<hex>", HMAC-SHA256 with a random salt drawn where the
     key is read; `Auth` (the replica's check: 401 in OpenAI's shape, `hmac.compare_digest`);
     fingerprints (`Auth.fingerprint`, `fingerprint_of`) that let a driver check which key the replicas
     enforce without either side showing it; `key_env_hidden` keeps the raw key out of the processes
     a local Ray instance starts (they would inherit it, and Ray shows their environments).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import FluidError
from pipeline.serve.openai_api import ApiError

KEY_FILE_ENV = "FLUID_API_KEY_FILE"  # a path (mounted secret), safe to put in a runtime env or manifest


SALTED = "hmac-sha256"  # "hmac-sha256:<salt hex>:<digest hex>": what replicas hold instead of the key
SALT_BYTES = 16


def key_digest(key: str, salt: bytes | None = None) -> str:
    """The salted digest replicas are given instead of the key: HMAC-SHA256(salt, key) with a random
    salt drawn where the key is read. One HMAC, no key stretching: keys are long random strings, and a
    slow hash would only let every request with a wrong key cost the replica that much CPU."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    mac = hmac.new(salt, key.strip().encode(), hashlib.sha256).hexdigest()
    return f"{SALTED}:{salt.hex()}:{mac}"


def read_key_file(path: str) -> str:
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise FluidError(f"API key file {path}: cannot read ({e.strerror}); on a cluster, mount the secret on "
                         "every node that runs a replica") from None
    if not key:
        raise FluidError(f"API key file {path} is empty")
    return key


def _parse_digest(digest: str) -> tuple[bytes | None, str]:
    """(salt, hex digest) of a salted digest, or (None, hex) of a plain 'sha256:<hex>' one."""
    parts = digest.split(":")
    try:
        if len(parts) == 3 and parts[0] == SALTED and len(parts[1]) == 2 * SALT_BYTES and len(parts[2]) == 64:
            return bytes.fromhex(parts[1]), bytes.fromhex(parts[2]).hex()
        if len(parts) == 2 and parts[0] == "sha256" and len(parts[1]) == 64:
            return None, bytes.fromhex(parts[1]).hex()
    except ValueError:
        pass
    raise FluidError(f"serve.api_key_sha256 must be '{SALTED}:<32 hex salt>:<64 hex>' (what `fluid serve` "
                     "passes) or 'sha256:<64 hex>'")


class Auth:
    """The replica's key check. `digest` None = auth off. Only a (salted) digest is held, never the key."""

    def __init__(self, digest: str | None):
        self.salt, self._hex = _parse_digest(digest) if digest is not None else (None, None)
        self.digest = digest

    @classmethod
    def for_replica(cls, key_file: str | None, key_sha256: str | None, raw_env: str | None) -> Auth:
        """The key as the replica finds it: a key file (config, else $FLUID_API_KEY_FILE), else a digest.
        A raw key in the replica's environment (shown by Ray's dashboard and State API) is refused
        unless a file or digest is configured as well (then the environment is only inherited)."""
        key_file = key_file or os.environ.get(KEY_FILE_ENV) or None
        if key_file and key_sha256:
            raise FluidError("both an API key file and serve.api_key_sha256 are set: give one")
        if key_file:
            return cls(key_digest(read_key_file(key_file)))
        if key_sha256:
            return cls(key_sha256)
        if raw_env and os.environ.get(raw_env, "").strip():
            raise FluidError(f"${raw_env} holds a raw API key in this replica's environment, where Ray's dashboard "
                             f"shows it, and it would not be enforced: mount the key as a file and set "
                             f"{KEY_FILE_ENV} (or serve.api_key_file), or start with `fluid serve`, which passes "
                             "only its sha256 digest")
        return cls(None)

    @property
    def on(self) -> bool:
        return self.digest is not None

    def fingerprint(self) -> str | None:
        """'<salt hex>:<short id of the digest>': a driver that knows the key recomputes it with this salt
        (`fingerprint_of`), so replicas and drivers compare keys without either showing one."""
        if self.digest is None:
            return None
        return f"{self.salt.hex() if self.salt else ''}:{hashlib.sha256(self.digest.encode()).hexdigest()[:12]}"

    def matches(self, token: str) -> bool:
        if self.salt is None:
            mac = hashlib.sha256(token.strip().encode()).hexdigest()
        else:
            mac = hmac.new(self.salt, token.strip().encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(mac.encode(), self._hex.encode())

    def check(self, header: str | None) -> None:
        if self.digest is None:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or not self.matches(token):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")


def fingerprint_of(key: str, fingerprint: str) -> str:
    """The fingerprint `key` has under the salt of `fingerprint` (a replica's `Auth.fingerprint()`)."""
    salt = fingerprint.split(":")[0]
    digest = key_digest(key, bytes.fromhex(salt)) if salt else "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return Auth(digest).fingerprint()


@contextmanager
def key_env_hidden(env_name: str | None):
    """Inside, $env_name (a raw key) is out of this process's environment, so the processes started
    there (a local Ray instance: GCS, raylet, and through them every worker) never inherit it."""
    raw = os.environ.pop(env_name, None) if env_name else None
    try:
        yield
    finally:
        if raw is not None:
            os.environ[env_name] = raw


def driver_key(env_name: str | None, key_file: str | None) -> tuple[str | None, str | None]:
    """The key a driver (`fluid serve`, the load test) was given: (key file, raw key from $env_name)."""
    key_file = key_file or os.environ.get(KEY_FILE_ENV) or None
    raw = os.environ.get(env_name, "").strip() if env_name else ""
    return key_file, raw or None
