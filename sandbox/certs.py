"""The sandbox's PKI, made with the openssl CLI: a CA, serving and client certificates, the SA key pair.

The same set controller-runtime's envtest makes: one CA that signs the API server's serving cert and every
client cert (the API server trusts it as --client-ca-file), plus an RSA key pair that signs and verifies
service-account tokens. Files are made once per state directory and reused; the serving cert is remade
when its subject alternative names change (another bridge address).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "3650"


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate's user name (CN) and groups (O)."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()


ADMIN = ClientIdentity("admin", "weightsync-sandbox-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("scheduler", "system:kube-scheduler")
NODE_AGENT = ClientIdentity("node-agent", "system:node:sandbox-node-0", ("system:nodes", "system:masters"))
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, NODE_AGENT)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed in {cwd}: {proc.stderr.strip()}")


def _key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path.name, cwd=path.parent)
    path.chmod(0o600)


def _sign(pki: Path, stem: str, subject: str, extensions: str) -> None:
    _key(pki / f"{stem}.key")
    (pki / f"{stem}.ext").write_text(f"[v3]\n{extensions}\n")
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", subject, "-out", f"{stem}.csr", cwd=pki)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{stem}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        DAYS,
        "-extfile",
        f"{stem}.ext",
        "-extensions",
        "v3",
        "-out",
        f"{stem}.crt",
        cwd=pki,
    )
    (pki / f"{stem}.csr").unlink()


def _subject(identity: ClientIdentity) -> str:
    return "".join(f"/O={g}" for g in identity.groups) + f"/CN={identity.user}"


def serving_sans(ips: list[str]) -> str:
    """The API server's subject alternative names: its addresses and the in-cluster service names."""
    names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    return ",".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{n}" for n in names)])


def ensure_pki(pki: Path, serving_ips: list[str]) -> None:
    """Creates whatever of the PKI is missing under `pki`; remakes the serving cert when its SANs change."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _key(pki / "ca.key")
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=weightsync-sandbox-ca",
            "-days",
            DAYS,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-out",
            "ca.crt",
            cwd=pki,
        )
    sans = serving_sans(serving_ips)
    sans_file = pki / "apiserver.sans"
    if not (pki / "apiserver.crt").exists() or not sans_file.exists() or sans_file.read_text() != sans:
        _sign(
            pki,
            "apiserver",
            "/CN=kube-apiserver",
            f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature",
        )
        sans_file.write_text(sans)
    for client in CLIENTS:
        if not (pki / f"{client.file_stem}.crt").exists():
            _sign(
                pki,
                client.file_stem,
                _subject(client),
                "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature",
            )
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        (pki / "sa.key").chmod(0o600)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
