"""Step 1: the source weights, from the Hugging Face hub (or a server that speaks its API).

Small files (config, tokenizer) come through ``huggingface_hub.snapshot_download``. LFS files
(the weights) go through huggingface_hub's own ``http_get`` into a partial file with a stable name
(``.kquant-partial/<name>.part``): a dropped connection is resumed with a Range request inside the
call, and a Job that is killed resumes on its next run where it stopped (huggingface_hub 2.x
deletes its partial files when a call fails, so it cannot do that by itself). Every LFS file is
checked against the sha256 the hub publishes before it gets its final name. The
revision is resolved to a commit first and the download pinned to it: a branch that moves during
a long download cannot mix two commits.

The token is read from ``HF_TOKEN`` only (the Job maps it from a Secret), stripped of the line
break that ``echo $T > f; kubectl create secret --from-file`` leaves in it, and passed straight to
the client. The CLI takes it out of the process environment before anything runs
(``take_token``), so no later step and no subprocess sees it, and ``redact`` masks it in every
message that leaves the pod.

A repository is untrusted data. Files that are code (``*.py``) or pickles (``*.bin``, ``*.pt``,
``*.ckpt``, ...), which run code when loaded, are not fetched unless the spec's
``allowCodeFiles`` / ``allowPickles`` asks for them (``refused_kind``); file names from the hub
are checked before anything is written (``check_name``): an absolute name, one with ``..``, glob
characters or control characters, one that would overwrite kquant's own bookkeeping, or one that
would land outside the destination through a symlink fails the fetch.

A source may also be GGUF: a single file, or shards named ``name-00001-of-0000N.gguf``;
``find_gguf_models`` groups shards and checks that none is missing.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import errors, file_download
from huggingface_hub import utils as hf_utils
from kquant.quantizer import redact, settings, space
from kquant.quantizer import shards as shard_names

log = logging.getLogger(__name__)

TOKEN_ENV = "HF_TOKEN"
TOKEN_ENV_NAMES = (TOKEN_ENV, "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
"""Every name huggingface_hub has read a token from; ``take_token`` removes them all."""
DEFAULT_ENDPOINT = settings.DEFAULT_ENDPOINT
PARTIAL_DIR = ".kquant-partial"
MANIFEST = ".kquant-fetch.json"
"""Written into the destination after a verified download: revision and file digests."""


class FetchError(Exception):
    """The source could not be fetched; the message says why in the spec's terms.

    ``permanent`` unless said otherwise: a name, a pattern or a format the quantizer refuses is
    refused again on a rerun. A download that broke, a file that failed its check (removed, so a
    rerun fetches it again) and a hub 5xx pass ``permanent=False`` (``_is_permanent``)."""

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".exe", ".sh", ".bat", ".ipynb")
"""Files that are programs: transformers imports ``*.py`` named by ``auto_map``; the rest run as
they are. Fetched only with ``allowCodeFiles``, and even then never run (``untrusted``)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill")
"""Python pickles: loading one can run code. Fetched only with ``allowPickles``."""
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
"""Pickle suffixes that hold weights (``pytorch_model.bin``): a repo with only these needs the switch."""
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f*?\[\]\\]")
"""Control characters (a name is also a path and a log line), glob characters (small files are
fetched by name through ``allow_patterns``, which would expand them) and backslashes."""


class SourceFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"
    GGUF = "gguf"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None
    """The LFS sha256 the hub publishes; None for small files kept in git."""


@dataclasses.dataclass(frozen=True)
class FetchResult:
    path: Path
    revision: str
    """The commit the download was pinned to."""
    files: tuple[RemoteFile, ...]


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """One GGUF model: a single file, or every shard of a split file in order."""

    shards: tuple[Path, ...]

    @property
    def first(self) -> Path:
        """The path llama.cpp is given; it finds the other shards by name."""
        return self.shards[0]


def endpoint_for(source: settings.HuggingFaceSource, env: dict[str, str] | None = None) -> str:
    environ = os.environ if env is None else env
    return (source.endpoint or environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


HubSource = settings.HuggingFaceSource | settings.ModelScopeSource
"""A repository on a hub: the trust rules (names, code, pickles, patterns) are the same for both."""


def field_of(source: HubSource) -> str:
    """The spec field that holds ``source`` (``huggingface`` or ``modelscope``), for reasons."""
    return "modelscope" if isinstance(source, settings.ModelScopeSource) else "huggingface"


def refused_kind(name: str, source: HubSource) -> str | None:
    """``"code"`` or ``"pickle"`` when ``name`` is a kind of file the source does not allow, else None."""
    lower = name.lower()
    if lower.endswith(CODE_SUFFIXES) and not source.allow_code_files:
        return "code"
    if lower.endswith(PICKLE_SUFFIXES) and not source.allow_pickles:
        return "pickle"
    return None


def select_files(names: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """The repository files the allow-patterns pick (all when there are none), like the hub client."""
    if not patterns:
        return sorted(names)
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))


def check_name(name: str, dest: Path | None = None) -> None:
    """Refuse a file name from the hub that could write anywhere but a plain file below ``dest``.

    With ``dest``, also refuse a name that resolves outside it: a symlink left in a shared work
    folder (``dest/sub -> /``) must not carry a download elsewhere.
    """
    parts = name.split("/")
    why = None
    if not name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        why = "is absolute"
    elif ".." in parts or "." in parts or "" in parts:
        why = "has '..', '.' or an empty part"
    elif _UNSAFE_NAME.search(name):
        why = "has a control, glob or backslash character"
    elif parts[0].startswith(".kquant") or parts[0] == ".cache":
        why = "would overwrite kquant's or huggingface_hub's own files"
    elif dest is not None:
        root = dest.resolve()
        target = (dest / name).resolve()
        if target != root and root not in target.parents:
            why = f"resolves to {target}, outside {root} (through a symlink)"
    if why:
        raise FetchError(f"the hub lists a file named {name[:200]!r}, which {why}; refusing to fetch this repository")


def take_token(environ: MutableMapping[str, str]) -> str | None:
    """Remove every hub token variable from ``environ`` and return the token, stripped.

    The quantizer calls this first thing: only the fetch step is handed the token, and nothing
    it starts later (the converter, a library reading the environment) can find it. The raw
    value is remembered by ``redact`` so that no message can carry it out of the pod.
    """
    raw = None
    for name in TOKEN_ENV_NAMES:
        value = environ.pop(name, None)
        if value and raw is None:
            raw = value
    if raw is None:
        return None
    redact.remember(raw)
    return raw.strip() or None


def find_gguf_models(files: Sequence[Path]) -> list[GGUFModel]:
    """Group GGUF files into models; raise when a split model misses a shard."""
    by_folder: dict[Path, list[str]] = {}
    for f in sorted(files):
        by_folder.setdefault(f.parent, []).append(f.name)
    models: list[GGUFModel] = []
    found: list[tuple[Path, str, int, dict[int, str]]] = []
    for parent, names in sorted(by_folder.items()):
        singles, splits = shard_names.group(names)
        models += [GGUFModel((parent / n,)) for n in singles]
        found += [(parent, stem, count, by_index) for (stem, count), by_index in splits.items()]
    for parent, stem, count, by_index in sorted(found):
        missing = [shard_names.format_name(stem, i, count) for i in range(1, count + 1) if i not in by_index]
        if missing:
            raise FetchError(f"split GGUF {parent / stem} is missing shard(s) {', '.join(missing)}")
        models.append(GGUFModel(tuple(parent / by_index[i] for i in range(1, count + 1))))
    return models


def detect_format(path: Path) -> SourceFormat:
    """safetensors when there is a ``config.json`` and weights beside it, else GGUF."""
    if path.is_file():
        if path.suffix == ".gguf":
            return SourceFormat.GGUF
        raise FetchError(f"source.local.path {path} is a file but not a .gguf file")
    if not path.is_dir():
        raise FetchError(f"source path {path} does not exist")
    has_config = (path / "config.json").is_file()
    if has_config and any(path.glob("*.safetensors")):
        return SourceFormat.SAFETENSORS
    if any(path.rglob("*.gguf")):
        return SourceFormat.GGUF
    if has_config and any(path.glob("*.bin")):
        raise FetchError(
            f"{path} holds PyTorch .bin weights only; kquant converts safetensors (add '*.safetensors' "
            "to allowPatterns or pick a repository that ships them)"
        )
    if has_config and not any(path.rglob("*.safetensors")):
        raise FetchError(
            f"{path} has config.json but no *.safetensors weights; if the repository ships its weights "
            "only as pickles (pytorch_model.bin), they are not fetched unless "
            "source.huggingface.allowPickles is true (a pickle can run code when it is loaded)"
        )
    found = ", ".join(sorted(p.name for p in path.iterdir() if not p.name.startswith("."))[:10])
    raise FetchError(f"{path} has neither config.json with *.safetensors nor *.gguf files (found: {found})")


def single_gguf_model(path: Path) -> GGUFModel:
    """The one GGUF model under ``path`` (a file, a first shard or a folder)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.gguf"))
    if path.is_file() and shard_names.is_shard(path.name):
        files = sorted(path.parent.glob("*.gguf"))
    models = find_gguf_models(files)
    if path.is_file():
        models = [m for m in models if path in m.shards]
    if not models:
        raise FetchError(f"no GGUF file found at {path}")
    if len(models) > 1:
        names = ", ".join(m.first.name for m in models)
        raise FetchError(
            f"{path} holds {len(models)} GGUF models ({names}); narrow source.huggingface.allowPatterns to one"
        )
    return models[0]


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _token(env: dict[str, str] | None) -> str | bool:
    environ = os.environ if env is None else env
    raw = environ.get(TOKEN_ENV)
    if raw:
        redact.remember(raw)
    # False (not None) stops huggingface_hub from falling back to a token stored on disk. A line
    # break at the end (a Secret made from ``echo $T > file``) would make the HTTP library refuse
    # the header, and echo it, token and all, in its error.
    token = (raw or "").strip()
    if any(c.isspace() or ord(c) < 32 for c in token):
        raise FetchError(
            f"the hub token in {TOKEN_ENV} (from spec.source.huggingface.tokenSecretRef) has a space or "
            "line break inside it; store only the token in the Secret"
        )
    return token or False


def _where(source: HubSource, endpoint: str) -> str:
    return f"{source.repo}@{source.revision} on {endpoint}"


def _translate(exc: Exception, source: settings.HuggingFaceSource, endpoint: str) -> FetchError:
    """Turn huggingface_hub's exceptions into a reason a user can act on (and no token), permanent
    when a rerun would meet it again (``_is_permanent``)."""
    translated = _translated(exc, source, endpoint)
    translated.permanent = _is_permanent(exc)
    return translated


def _translated(exc: Exception, source: settings.HuggingFaceSource, endpoint: str) -> FetchError:
    where = _where(source, endpoint)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError(f"No space left on device while downloading {where}; grow storage.pvc.size")
    if isinstance(exc, errors.GatedRepoError):
        return FetchError(
            f"source.huggingface.repo {source.repo!r} is gated: the token in {TOKEN_ENV} has no access ({where})"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return FetchError(
            f"source.huggingface.repo {source.repo!r} was not found, or is private and "
            f"{TOKEN_ENV} has no access ({where})"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return FetchError(
            f"source.huggingface.revision {source.revision!r} does not exist in {source.repo!r} ({where})"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "no response"
        return FetchError(f"the hub answered HTTP {status} for {where}")
    return FetchError(f"download of {where} failed: {type(exc).__name__}: {redact.redact(str(exc))[:300]}")


def _is_permanent(exc: Exception) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, errors.LocalEntryNotFoundError):
        # A subclass of EntryNotFoundError, but it says the hub could not be reached and the cache
        # had nothing: the network, which a rerun may not meet again.
        return False
    permanent = (
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.GatedRepoError,
        errors.EntryNotFoundError,
    )
    if isinstance(exc, permanent):
        return True
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        return 400 <= exc.response.status_code < 500 and exc.response.status_code not in (408, 429)
    return False


def remote_files(
    source: settings.HuggingFaceSource, *, env: dict[str, str] | None = None
) -> tuple[str, list[RemoteFile]]:
    """Resolve the revision to a commit and list its files with sizes and LFS sha256s."""
    endpoint = endpoint_for(source, env)
    api = huggingface_hub.HfApi(endpoint=endpoint, token=_token(env))
    try:
        info = api.model_info(source.repo, revision=source.revision, files_metadata=True)
    except Exception as exc:
        raise _translate(exc, source, endpoint) from None
    files = [
        RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in (info.siblings or [])
    ]
    if not info.sha:
        raise FetchError(f"the hub did not resolve {_where(source, endpoint)} to a commit", permanent=False)
    return info.sha, files


def verify(dest: Path, files: Sequence[RemoteFile], progress: Callable[[float], None] | None = None) -> None:
    """Check sizes and LFS sha256s; a bad file is removed so the next run fetches it again."""
    total = sum(f.size or 0 for f in files) or 1
    done = 0
    for f in files:
        check_name(f.name, dest)
        path = dest / f.name
        if not path.is_file():
            raise FetchError(f"{f.name} is missing after the download", permanent=False)
        size = path.stat().st_size
        if f.size is not None and size != f.size:
            path.unlink()
            raise FetchError(
                f"{f.name} has {size} bytes, the hub says {f.size}; removed it, rerun to fetch it again",
                permanent=False,
            )
        if f.sha256 is not None:
            actual = sha256_file(path)
            if actual != f.sha256:
                path.unlink()
                raise FetchError(
                    f"{f.name} has sha256 {actual}, the hub says {f.sha256}; removed it, rerun to fetch it again",
                    permanent=False,
                )
        done += f.size or 0
        if progress is not None:
            progress(done / total)


def partial_path(dest: Path, name: str) -> Path:
    """Where an LFS file grows until it is complete and verified; kept across runs to resume."""
    return dest / PARTIAL_DIR / f"{name}.part"


def _download_resumable(repo: str, revision: str, f: RemoteFile, dest: Path, endpoint: str, token: str | bool) -> bool:
    """One LFS file, continued from its ``.part`` file with a Range request, verified, renamed.

    huggingface_hub resumes inside one call, but since 2.x it deletes a partial file when the call
    fails (each download gets a unique temporary name), so a Job that is killed would start a
    200 GB file again. Here the partial file has a stable name and survives the process.
    """
    final = dest / f.name
    if final.is_file() and final.stat().st_size == f.size:
        return False  # from an earlier run: verified with the small files
    part = partial_path(dest, f.name)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if f.size is not None and have > f.size:
        part.unlink()
        have = 0
    url = huggingface_hub.hf_hub_url(repo, f.name, revision=revision, endpoint=endpoint)
    headers = hf_utils.build_hf_headers(token=token)  # type: ignore[attr-defined]  # no __all__ there
    if have:
        log.info("resuming %s at byte %d of %s", f.name, have, f.size)
    with part.open("ab") as out:
        file_download.http_get(
            url, out, resume_size=have, headers=headers, expected_size=f.size, displayed_filename=f.name
        )
    actual = sha256_file(part)
    if actual != f.sha256:
        part.unlink()
        raise FetchError(
            f"{f.name} has sha256 {actual}, the hub says {f.sha256}; removed it, rerun to fetch it again",
            permanent=False,
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    part.replace(final)
    return True


def remaining_bytes(dest: Path, files: Sequence[RemoteFile]) -> int:
    """Bytes of ``files`` not yet in ``dest``: complete files count nothing, partial ones their rest."""
    total = 0
    for f in files:
        size = f.size or 0
        final = dest / f.name
        if final.is_file() and final.stat().st_size == size:
            continue
        # kquant's own partial file (Hugging Face), or the ModelScope client's ``<name>.incomplete``
        parts = (partial_path(dest, f.name), final.with_name(final.name + ".incomplete"))
        total += max(size - max((p.stat().st_size for p in parts if p.is_file()), default=0), 0)
    return total


ListingCheck = Callable[[list[RemoteFile], "dict[str, Any] | None"], None]
"""Called with the chosen files and the parsed ``config.json`` (None for a repository without one)
before any weights are downloaded; raises to stop the fetch (the pipeline sizes the build there)."""


def _config(
    source: settings.HuggingFaceSource, revision: str, chosen: Sequence[RemoteFile], dest: Path, endpoint: str,
    env: dict[str, str] | None,
) -> dict[str, Any] | None:  # fmt: skip
    """``config.json`` of the pinned commit (a few kilobytes, fetched first), parsed; None without one."""
    if not any(f.name == "config.json" for f in chosen):
        return None
    path = huggingface_hub.hf_hub_download(
        source.repo, "config.json", revision=revision, local_dir=dest, endpoint=endpoint, token=_token(env)
    )
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_selection(
    source: HubSource,
    endpoint: str,
    listing: Sequence[RemoteFile],
    matched: Sequence[str],
    refused: dict[str, str],
) -> None:
    """Fail early, naming the switch, when what is left to fetch cannot be a model."""
    where = _where(source, endpoint)
    field = field_of(source)
    if not matched:
        raise FetchError(
            f"source.{field}.allowPatterns {list(source.allow_patterns or [])} match none of the "
            f"{len(listing)} files in {where}"
        )
    kept = [n for n in matched if n not in refused]
    has_weights = any(n.endswith((".safetensors", ".gguf")) for n in kept)
    pickled = sorted(n for n, kind in refused.items() if kind == "pickle" and n.lower().endswith(PICKLED_WEIGHTS))
    if not has_weights and pickled:
        raise FetchError(
            f"{where} ships its weights only as pickles ({', '.join(pickled[:3])}), which can run code "
            f"when loaded; kquant does not fetch them unless source.{field}.allowPickles is true "
            "(or pick a repository with *.safetensors)"
        )
    if not kept:
        raise FetchError(
            f"every file that allowPatterns selects in {where} is code or a pickle "
            f"({', '.join(sorted(refused)[:5])}); set source.{field}.allowCodeFiles / allowPickles "
            "to fetch them"
        )


def choose(source: HubSource, endpoint: str, listing: Sequence[RemoteFile], dest: Path) -> list[RemoteFile]:
    """The files to fetch: every hub name checked, the patterns applied, code and pickles left out."""
    for f in listing:
        check_name(f.name, dest)
    matched = select_files([f.name for f in listing], source.allow_patterns)
    refused = {n: kind for n in matched if (kind := refused_kind(n, source))}
    _check_selection(source, endpoint, listing, matched, refused)
    if refused:
        log.info(
            "not fetching %d file(s) that are code or pickles (allowCodeFiles/allowPickles are off): %s",
            len(refused),
            ", ".join(sorted(refused)[:20]),
        )
    wanted = set(matched) - set(refused)
    return [f for f in listing if f.name in wanted]


@dataclasses.dataclass(frozen=True)
class Survey:
    """What a fetch of ``source`` would download, and its ``config.json``: enough to size the build."""

    revision: str
    files: tuple[RemoteFile, ...]
    config: dict[str, Any] | None


def survey(source: settings.HuggingFaceSource, scratch: Path, *, env: dict[str, str] | None = None) -> Survey:
    """List the pinned commit, choose the files as ``fetch`` would, and read ``config.json`` into
    ``scratch``; no weights move. The operator's sizing Job runs this before the first build, so a
    claim, a memory request or a deadline that cannot work is found out before any download."""
    endpoint = endpoint_for(source, env)
    revision, listing = remote_files(source, env=env)
    scratch.mkdir(parents=True, exist_ok=True)
    chosen = choose(source, endpoint, listing, scratch)
    try:
        config = _config(source, revision, chosen, scratch, endpoint, env)
    except Exception as exc:
        raise _translate(exc, source, endpoint) from None
    return Survey(revision, tuple(chosen), config)


def fetch(
    source: settings.HuggingFaceSource,
    dest: Path,
    *,
    env: dict[str, str] | None = None,
    attempts: int = 3,
    retry_delay: float = 2.0,
    progress: Callable[[float], None] | None = None,
    before_download: ListingCheck | None = None,
) -> FetchResult:
    """Download ``source`` into ``dest``, resuming partial files; verify; write the manifest.

    ``before_download`` sees the listing (and ``config.json``) before any weights move: a build that
    cannot fit is refused there. A full disk removes the partial files (they cannot complete) and
    raises ``space.NoSpaceError`` saying how much the download needs."""
    endpoint = endpoint_for(source, env)
    revision, listing = remote_files(source, env=env)
    dest.mkdir(parents=True, exist_ok=True)
    chosen = choose(source, endpoint, listing, dest)
    log.info(
        "fetching %d file(s), %d bytes, from %s (commit %s)",
        len(chosen),
        sum(f.size or 0 for f in chosen),
        _where(source, endpoint),
        revision,
    )
    if before_download is not None:
        try:
            config = _config(source, revision, chosen, dest, endpoint, env)
        except Exception as exc:
            raise _translate(exc, source, endpoint) from None
        before_download(chosen, config)
    needed = remaining_bytes(dest, chosen)
    large = [f for f in chosen if f.sha256 is not None]
    small = sorted(f.name for f in chosen if f.sha256 is None)
    verified: set[str] = set()
    for attempt in range(1, attempts + 1):
        try:
            total = sum(f.size or 0 for f in large) or 1
            for i, f in enumerate(large):
                if f.name not in verified and _download_resumable(
                    source.repo, revision, f, dest, endpoint, _token(env)
                ):
                    verified.add(f.name)
                if progress is not None:
                    progress(0.5 * sum(g.size or 0 for g in large[: i + 1]) / total)
            if small:
                huggingface_hub.snapshot_download(
                    source.repo,
                    revision=revision,
                    allow_patterns=small,
                    local_dir=dest,
                    endpoint=endpoint,
                    token=_token(env),
                )
            break
        except Exception as exc:
            if space.is_full(exc):
                shutil.rmtree(dest / PARTIAL_DIR, ignore_errors=True)
                raise space.NoSpaceError(
                    space.full_message(dest, needed, f"the download of {_where(source, endpoint)}")
                ) from None
            if _is_permanent(exc) or attempt == attempts:
                raise _translate(exc, source, endpoint) from None
            log.warning("download attempt %d/%d failed (%s); resuming", attempt, attempts, type(exc).__name__)
            time.sleep(retry_delay * attempt)
    if progress is not None:
        progress(0.5)
    unchecked = [f for f in chosen if f.name not in verified]
    verify(dest, unchecked, None if progress is None else (lambda f: progress(0.5 + f / 2)))
    return write_manifest(dest, source.repo, revision, chosen)


def write_manifest(dest: Path, repo: str, revision: str, chosen: Sequence[RemoteFile]) -> FetchResult:
    """Record a verified download: the fetch step's output, read back by ``read_manifest``."""
    manifest: dict[str, Any] = {
        "repo": repo,
        "revision": revision,
        "files": [dataclasses.asdict(f) for f in chosen],
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return FetchResult(dest, revision, tuple(chosen))


def read_manifest(dest: Path) -> FetchResult | None:
    """The result of an earlier verified fetch into ``dest``, if any."""
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = tuple(RemoteFile(**f) for f in data["files"])
    return FetchResult(dest, data["revision"], files)
