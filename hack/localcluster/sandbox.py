"""Lay out a pod's volumes as local folders and build each container's process description.

A pod here is a set of local processes, so every path the pod names inside its containers
(volume mounts, the termination-message path, the working directory) is mapped to a folder of the
pod's sandbox, and the container's command, args and environment are rewritten to use it. Servers
that bind ``0.0.0.0`` are given the pod's own loopback address instead, so two pods can listen on
the same port, as two containers with their own network namespaces would.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib
import re
import shutil
from typing import Any

from kubernetes import client

from localcluster import images


class ConfigError(Exception):
    """The kubelet's CreateContainerConfigError: a referenced Secret or ConfigMap is missing."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: pathlib.Path
    log: pathlib.Path
    termination_log: pathlib.Path
    fallback_to_logs: bool
    ports: dict[str, int]


def _rewrite(value: str, mounts: list[tuple[str, pathlib.Path]], pod_ip: str) -> str:
    """Replace container paths and the wildcard address inside one string, in a single pass
    (a replaced path must not be rewritten again by a shorter mount such as ``/tmp``)."""
    if mounts:
        table = {(p.rstrip("/") or "/"): str(local) for p, local in mounts}
        alternatives = "|".join(re.escape(p) for p in sorted(table, key=len, reverse=True))
        pattern = r"(?<![\w./-])(" + alternatives + r")(?=/|\s|$|[;\"':,)])"
        value = re.sub(pattern, lambda m: table[m.group(1)], value)
    return value.replace("0.0.0.0", pod_ip)


@dataclasses.dataclass
class Sandbox:
    """One pod's folder tree: volumes/, logs/, and per-container scratch."""

    root: pathlib.Path
    pvc_root: pathlib.Path
    pod: dict[str, Any]
    pod_ip: str
    core: client.CoreV1Api
    server: str
    ca_file: pathlib.Path
    volumes: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    device_env: dict[str, str] = dataclasses.field(default_factory=dict)
    """What the simulated device plugin adds to every container (``gpus.Devices``); the pod's own
    variables win."""

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    def prepare_volumes(self) -> None:
        for volume in self.pod["spec"].get("volumes") or []:
            self.volumes[volume["name"]] = self._volume(volume)

    def _volume(self, volume: dict[str, Any]) -> pathlib.Path:
        name = volume["name"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            path: pathlib.Path = self.pvc_root / self.namespace / str(claim)
            path.mkdir(parents=True, exist_ok=True)
            return path
        if "hostPath" in volume:
            return pathlib.Path(volume["hostPath"]["path"])
        path = self.root / "volumes" / str(name)
        path.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            self._write_items(path, self._configmap(volume["configMap"]), volume["configMap"])
        elif "secret" in volume:
            self._write_items(path, self._secret(volume["secret"]), volume["secret"])
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                self._projected(path, source)
        return path

    def _write_items(self, folder: pathlib.Path, data: dict[str, str], ref: dict[str, Any]) -> None:
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"key {item['key']!r} not found")
            target = folder / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])

    def _configmap(self, ref: dict[str, Any]) -> dict[str, str]:
        name = str(ref.get("name") or ref.get("configMapRef", {}).get("name"))
        found = self._read("configmap", name, ref, self.core.read_namespaced_config_map)
        return dict(found.data or {}) if found is not None else {}

    def _secret(self, ref: dict[str, Any]) -> dict[str, str]:
        name = str(ref.get("secretName") or ref.get("name"))
        found = self._read("secret", name, ref, self.core.read_namespaced_secret)
        if found is None:
            return {}
        return {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}

    def _read(self, kind: str, name: str, ref: dict[str, Any], reader: Any) -> Any:
        """The object, None if it is missing but optional; a missing required one is a config error."""
        try:
            return reader(name, self.namespace)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            if ref.get("optional"):
                return None
            raise ConfigError(f'{kind} "{name}" not found') from exc

    def _projected(self, folder: pathlib.Path, source: dict[str, Any]) -> None:
        if "serviceAccountToken" in source:
            token = self._service_account_token(source["serviceAccountToken"])
            (folder / source["serviceAccountToken"]["path"]).write_text(token)
        elif "configMap" in source:
            self._write_items(folder, self._configmap(source["configMap"]), source["configMap"])
        elif "secret" in source:
            self._write_items(folder, self._secret(source["secret"]), source["secret"])
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                value = self.field(item.get("fieldRef", {}).get("fieldPath", ""))
                (folder / item["path"]).write_text(value)

    def _service_account_token(self, spec: dict[str, Any]) -> str:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[spec["audience"]] if spec.get("audience") else [],
            expiration_seconds=spec.get("expirationSeconds") or 3600 * 24,
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=self.pod["metadata"]["name"],
                uid=self.pod["metadata"]["uid"]),
        ))
        response = self.core.create_namespaced_service_account_token(account, self.namespace, request)
        return str(response.status.token)

    def field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        values = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": self.pod_ip, "status.hostIP": "127.0.0.1",
        }
        if path.startswith("metadata.labels['"):
            return str((meta.get("labels") or {}).get(path[17:-2], ""))
        if path.startswith("metadata.annotations['"):
            return str((meta.get("annotations") or {}).get(path[22:-2], ""))
        return str(values.get(path, ""))

    def _env(self, container: dict[str, Any], mounts: list[tuple[str, pathlib.Path]]) -> dict[str, str]:
        """The container's own variables (paths rewritten), then what the kubelet adds (not)."""
        defined: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self._configmap(source["configMapRef"])
            else:
                data = self._secret(source["secretRef"])
            defined.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            defined[var["name"]] = self._env_value(var, defined)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root / "home"),
            "HOSTNAME": self.pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": self.server.rsplit(":", 1)[1],
            "PYTHONSAFEPATH": "1",
        }
        (self.root / "home").mkdir(exist_ok=True)
        env.update(self.device_env)
        env.update({k: _rewrite(v, mounts, self.pod_ip) for k, v in defined.items()})
        kubeconfig = self._kubeconfig(mounts)
        if kubeconfig:
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    def _env_value(self, var: dict[str, Any], env: dict[str, str]) -> str:
        if "value" in var:
            return self._expand(str(var["value"]), env)
        source = var.get("valueFrom") or {}
        for field, kind, read in (("secretKeyRef", "Secret", self._secret),
                                  ("configMapKeyRef", "ConfigMap", self._configmap)):
            if field in source:
                ref = source[field]
                data = read(ref)
                if ref["key"] not in data and not ref.get("optional"):
                    raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} {self.namespace}/{ref["name"]}')
                return data.get(ref["key"], "")
        if "fieldRef" in source:
            return self.field(source["fieldRef"]["fieldPath"])
        return ""

    def _kubeconfig(self, mounts: list[tuple[str, pathlib.Path]]) -> pathlib.Path | None:
        """In-cluster clients read fixed paths; give them a kubeconfig for the pod's token instead."""
        for container_path, local in mounts:
            if container_path.rstrip("/") == "/var/run/secrets/kubernetes.io/serviceaccount":
                token = (local / "token").read_text()
                path = self.root / "kubeconfig"
                from localcluster import controlplane

                controlplane.write_kubeconfig(path, self.server, self.ca_file, token,
                                              user=self.pod["spec"].get("serviceAccountName", "default"))
                return path
        return None

    def process(self, container: dict[str, Any], table: images.ImageTable) -> ProcessSpec:
        name = container["name"]
        mounts: list[tuple[str, pathlib.Path]] = []
        for mount in container.get("volumeMounts") or []:
            local = self.volumes[mount["name"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
            mounts.append((mount["mountPath"], local))
        term_path = container.get("terminationMessagePath") or "/dev/termination-log"
        term_local = self.root / f"{name}.termination-log"
        term_local.unlink(missing_ok=True)
        mounts.append((term_path, term_local))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        env = self._env(container, mounts)
        own = [*(container.get("command") or []), *(container.get("args") or [])]
        own = [_rewrite(self._expand(a, env), mounts, self.pod_ip) for a in own]
        # The image's entrypoint is a host path from images.yaml: it is not rewritten.
        argv = own if container.get("command") else [*table.entrypoint(container.get("image", "")), *own]
        if argv and not os.path.isabs(argv[0]):
            argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        cwd = self.root / "home"
        if container.get("workingDir"):
            cwd = pathlib.Path(_rewrite(container["workingDir"], mounts, self.pod_ip))
            cwd.mkdir(parents=True, exist_ok=True)
        ports = {p.get("name", str(p["containerPort"])): int(p["containerPort"])
                 for p in container.get("ports") or []}
        (self.root / "logs").mkdir(exist_ok=True)
        return ProcessSpec(
            name=name, argv=argv, env=env, cwd=cwd, log=self.root / "logs" / f"{name}.log",
            termination_log=term_local,
            fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
            ports=ports,
        )

    @staticmethod
    def _expand(value: str, env: dict[str, str]) -> str:
        for name, existing in env.items():
            value = value.replace(f"$({name})", existing)
        return value
