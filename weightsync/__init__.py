"""weightsync: keep inference engines' weights in step with an RL trainer on Kubernetes.

`weightsync.contract` (the env contract) and `weightsync.api` (the WeightSync resource) are shared by
both halves and import neither torch nor kopf; `weightsync.runtime` runs in the pods, `weightsync.operator`
runs the controller.
"""

__version__ = "0.1.0"
