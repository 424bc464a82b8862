"""A real, local Kubernetes control plane for tests and demos.

These machines have no container runtime, so kind, k3d and minikube cannot run. This package
starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from Go modules by
``hack/build-k8s.sh``) on loopback with TLS, registers GPU nodes labelled the way NVIDIA GPU
Feature Discovery labels them, and runs a node agent that plays the kubelet: it runs each bound
pod's command as a local process and reports its real state back to the API server.
"""
