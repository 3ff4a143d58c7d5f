# The two commands of the README. Both set up everything they need on a fresh machine (the virtualenv and
# the control-plane binaries, cached under ~/.cache) and need root for the sandbox's network namespaces.
.PHONY: demo test lint sandbox-up sandbox-down

demo:  ## the whole product on the local sandbox: control plane, helm install, a WeightSync syncing weights
	hack/demo.sh $(ARGS)

test:  ## lint, types and every test tier (GPU tests skip without GPUs)
	hack/test.sh

lint:
	$$(hack/venv.sh)/bin/ruff check . && PYTHON=$$(hack/venv.sh)/bin/python hack/typecheck.sh

sandbox-up:
	$$(hack/venv.sh)/bin/python -m weightsync.sandbox up

sandbox-down:
	$$(hack/venv.sh)/bin/python -m weightsync.sandbox down
