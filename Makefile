# Every target sets up what it needs; heavy builds are cached in ~/.cache/kquant by version.
export PYTHONSAFEPATH := 1
VENV := .venv/bin

.PHONY: setup tools lint crds test test-unit demo cluster-up cluster-down

.venv/.installed: pyproject.toml hack/setup-venv.sh
	bash hack/setup-venv.sh
	touch $@

setup: .venv/.installed

# The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, helm) and the
# llama.cpp tools (llama-server, llama-fit-params, rpc-server), built from source once per version.
tools:
	bash hack/build-k8s.sh
	bash hack/build-llama.sh

lint: setup
	$(VENV)/ruff check operator quantizer hack tests bench
	bash hack/typecheck.sh
	$(VENV)/python -P hack/gen_api_docs.py --check
	$(VENV)/python -P hack/gen_gitops.py --check
	$(VENV)/python -P hack/gen_crds.py --check
	$(VENV)/python -P hack/gen_chart_docs.py --check

test-unit: setup
	$(VENV)/pytest tests/unit

test: setup tools lint
	$(VENV)/pytest

cluster-up: setup
	hack/cluster up

cluster-down: setup
	hack/cluster down

demo: setup tools
	bash hack/demo.sh
