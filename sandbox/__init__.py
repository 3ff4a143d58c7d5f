"""The local sandbox: a real control plane plus a node agent that runs pods as processes."""
