"""The local sandbox: a real control plane plus a node agent that runs pods as processes."""

from weightsync.sandbox.controlplane import Sandbox, SandboxStatus

__all__ = ["Sandbox", "SandboxStatus"]
