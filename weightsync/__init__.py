"""weightsync: keep inference engines' weights in step with an RL trainer on Kubernetes.

`weightsync.contract` (the env contract) and `weightsync.api` (the WeightSync resource) are shared by
both halves and import neither torch nor kopf; `weightsync.runtime` runs in the pods, `weightsync.operator`
runs the controller.
"""

__version__ = "0.1.0"

# operator/ sits at the top of a source checkout (README.md, Layout) but is the package weightsync.operator, and it
# has no __init__.py: a regular package named `operator` there would shadow the standard library. An
# editable install cannot map such a namespace directory below this regular package, so in a checkout the
# repository root joins this package's path and weightsync.operator resolves to <root>/operator. A wheel
# holds the real layout (weightsync/operator/) and skips this.
from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if (_root / "operator").is_dir() and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))
