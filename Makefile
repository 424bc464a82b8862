# Every target sets up what it needs; heavy builds are cached in ~/.cache/kquant by version.
export PYTHONSAFEPATH := 1
VENV := .venv/bin

.PHONY: setup tools node-tools lint crds test test-unit test-realnode demo cluster-up cluster-down images images-cpu images-cuda

.venv/.installed: pyproject.toml hack/setup-venv.sh
	bash hack/setup-venv.sh
	touch $@

setup: .venv/.installed

# The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, helm), the real
# node's kubelet, kube-proxy and pause, its NetworkPolicy enforcer (kube-router's firewall), and the
# llama.cpp tools (llama-server, llama-fit-params, rpc-server), built from source once per version.
tools:
	bash hack/build-k8s.sh
	bash hack/build-node.sh
	bash hack/build-netpolicy.sh
	bash hack/build-llama.sh

# kubelet, kube-proxy and the pause binary for the real node (hack/localcluster/realnode.py), and
# kube-router, which enforces NetworkPolicies there (hack/localcluster/netpolicy.py).
node-tools:
	bash hack/build-node.sh
	bash hack/build-netpolicy.sh

# kquant's images (images/), tagged with the chart's appVersion and pushed to the local registry
# on 127.0.0.1:5000; dockerd and the registry are started (and Debian's packages installed) first.
# `images` is all of them; the CUDA builds compile llama.cpp's kernels and take long on 2 cores, so
# CI and the real-node tests use `images-cpu`.
images:
	bash images/build.sh all

images-cpu:
	bash images/build.sh cpu

images-cuda:
	bash images/build.sh cuda

# The tests that run kquant's images on a real node (kubelet + containerd), the SmolLM2 example
# from `helm install` to a promotion included (tests/e2e/test_real_node_smollm2.py runs only here:
# its images' cold build is longer than CI allows).
test-realnode: setup images-cpu node-tools
	KQUANT_REALNODE_E2E=1 $(VENV)/pytest -m realnode

lint: setup
	$(VENV)/ruff check operator quantizer hack tests bench
	bash hack/typecheck.sh
	$(VENV)/python -P hack/gen_api_docs.py --check
	$(VENV)/python -P hack/gen_gitops.py --check
	$(VENV)/python -P hack/gen_crds.py --check
	$(VENV)/python -P hack/gen_chart_docs.py --check
	bash hack/lint-workflows.sh

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
