"""Kubeconfig files for the sandbox's clients, pointing at the CA and client certs by path."""

from __future__ import annotations

from pathlib import Path

import yaml
from weightsync.sandbox.certs import ClientIdentity

CONTEXT = "weightsync-sandbox"


def write_kubeconfig(path: Path, server: str, pki: Path, identity: ClientIdentity) -> None:
    """Writes a kubeconfig for `identity` (its cert and key under `pki`) against `server`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT, "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}
        ],
        "users": [
            {
                "name": identity.user,
                "user": {
                    "client-certificate": str(pki / f"{identity.file_stem}.crt"),
                    "client-key": str(pki / f"{identity.file_stem}.key"),
                },
            }
        ],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": identity.user}}],
        "current-context": CONTEXT,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
