"""Step 1 for a ``modelscope`` source: the weights from ModelScope, with the package's own client.

ModelScope is where a DeepSeek-R1 build gets its weights when the Hugging Face hub cannot be
reached (``modelscope download --model ...``). The download goes through ``modelscope_hub``, the
client that the ``modelscope`` package (1.40) delegates every hub call to, so resuming and
checking are its own: each file grows in ``<name>.incomplete`` beside its final name, a dropped
connection or a killed Job continues it with a Range request, and every file is checked against
the sha256 that the repository listing publishes before it gets its final name.

The trust rules are the Hugging Face source's (``fetch``): the repository is listed first, every
name in the listing is checked (``fetch.check_name``), the allow-patterns are applied, code and
pickles are left out unless the spec asks for them, and only the chosen files are handed to the
client (its ``file_list``): it never lists or picks anything itself.

The token comes from ``MODELSCOPE_API_TOKEN`` (the Job maps it from the Secret that
``tokenSecretRef`` names), leaves the process environment before anything runs (``take_token``),
and is given to the client in a ``HubConfig`` built here, as is the endpoint: the client reads no
environment variable and no credentials file of its own (an explicit empty token means none).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import modelscope_hub
from kquant.quantizer import fetch, redact, settings, space

log = logging.getLogger(__name__)

TOKEN_ENV = settings.MODELSCOPE_TOKEN_ENV
CLIENT_DIR = ".kquant-modelscope"
"""The client's own cache and lock files, inside the destination (a repo name cannot start so)."""
REPO_TYPE = "model"

_RETRYABLE_STATUS = (408, 429)
"""4xx answers that a rerun may not meet again."""


def take_token(environ: MutableMapping[str, str]) -> str | None:
    """Remove ``MODELSCOPE_API_TOKEN`` from ``environ`` and return it, stripped; ``redact`` remembers
    it, so no message carries it out of the pod."""
    raw = environ.pop(TOKEN_ENV, None)
    if not raw:
        return None
    redact.remember(raw)
    return raw.strip() or None


def _token(env: MutableMapping[str, str] | None) -> str:
    token = ((env or {}).get(TOKEN_ENV) or "").strip()
    if any(c.isspace() or ord(c) < 32 for c in token):
        raise fetch.FetchError(
            f"the token in {TOKEN_ENV} (from spec.source.modelscope.tokenSecretRef) has a space or line "
            "break inside it; store only the token in the Secret"
        )
    return token  # "" tells the client to use no token (not one stored on disk)


def client(
    source: settings.ModelScopeSource, dest: Path, env: MutableMapping[str, str] | None
) -> modelscope_hub.HubApi:
    """The package's client, pointed at the source's endpoint with this build's token only."""
    config = modelscope_hub.HubConfig(
        endpoint=source.url, token=_token(env), cache_dir=dest / CLIENT_DIR, config_dir=dest / CLIENT_DIR / "config"
    )
    return modelscope_hub.HubApi(config)


def _where(source: settings.ModelScopeSource) -> str:
    return f"{source.repo}@{source.revision} on {source.url}"


def is_permanent(exc: BaseException) -> bool:
    """A failure that a rerun meets again: a missing repository or revision, a refused token, a file
    that keeps failing its size check, a full disk. Network errors, 5xx, 429 and a bad checksum
    (the client removes the file, a rerun fetches it again) are not."""
    if space.is_full(exc):
        return True
    if isinstance(exc, modelscope_hub.FileDownloadError):
        return bool(exc.failed_files) and all(is_permanent(e) for e in exc.failed_files.values())
    if isinstance(exc, modelscope_hub.HubError):
        status = getattr(exc, "status_code", None)
        return not exc.retryable and status not in _RETRYABLE_STATUS
    return False


def _first_cause(exc: BaseException) -> BaseException:
    """A failed multi-file download is reported by its first file's error."""
    return next(iter(_failed_files(exc).values()), exc)


def _failed_files(exc: BaseException) -> dict[str, BaseException]:
    """The files a multi-file download could not fetch, with each one's error (empty for others)."""
    if isinstance(exc, modelscope_hub.FileDownloadError):
        return dict(exc.failed_files)
    return {}


def _missing(api: modelscope_hub.HubApi, source: settings.ModelScopeSource) -> fetch.FetchError:
    """A 404 on the listing: the repository, or only the revision? The repository's info says."""
    try:
        api.legacy.get_repo_info(source.repo, REPO_TYPE)
    except modelscope_hub.NotExistError:
        return fetch.FetchError(
            f"spec.source.modelscope.repo {source.repo!r} was not found on {source.url}, or it is private "
            f"and {TOKEN_ENV} has no access: check the repository id (owner/name as ModelScope shows it)"
        )
    except Exception:  # the reason for the 404 stays unknown: name both fields
        return fetch.FetchError(
            f"spec.source.modelscope.repo {source.repo!r} or its revision {source.revision!r} was not "
            f"found on {source.url}"
        )
    return fetch.FetchError(
        f"spec.source.modelscope.revision {source.revision!r} does not exist in {source.repo!r} on "
        f"{source.url} (ModelScope's default branch is {settings.MODELSCOPE_REVISION!r})"
    )


def translate(exc: BaseException, source: settings.ModelScopeSource, api: modelscope_hub.HubApi) -> fetch.FetchError:
    """The client's exception as a reason in the spec's terms (and no token), permanent or not."""
    cause = _first_cause(exc)
    where = _where(source)
    translated: fetch.FetchError
    if space.is_full(cause):
        translated = fetch.FetchError(f"No space left on device while downloading {where}; grow storage.pvc.size")
    elif isinstance(cause, modelscope_hub.NotExistError) and _failed_files(exc):
        name = next(iter(_failed_files(exc)))
        translated = fetch.FetchError(f"ModelScope lists {name!r} in {where} but answered 404 for its download")
    elif isinstance(cause, modelscope_hub.NotExistError):
        translated = _missing(api, source)
    elif isinstance(cause, (modelscope_hub.AuthenticationError, modelscope_hub.PermissionDeniedError)):
        translated = fetch.FetchError(
            f"spec.source.modelscope.repo {source.repo!r} refused access ({type(cause).__name__}): set "
            f"spec.source.modelscope.tokenSecretRef to a Secret with a ModelScope token that may read it ({where})"
        )
    elif isinstance(cause, modelscope_hub.APIError):
        status = getattr(cause, "status_code", None) or "an error"
        translated = fetch.FetchError(f"ModelScope answered HTTP {status} for {where}")
    else:
        text = redact.redact(str(cause))[:300]
        translated = fetch.FetchError(f"download of {where} failed: {type(cause).__name__}: {text}")
    translated.permanent = is_permanent(exc)
    return translated


def remote_files(
    source: settings.ModelScopeSource, api: modelscope_hub.HubApi
) -> list[fetch.RemoteFile]:
    """The repository's files at the revision, with the sizes and sha256s its listing publishes."""
    try:
        listing = api.list_repo_files(source.repo, REPO_TYPE, revision=source.revision)
    except Exception as exc:
        raise translate(exc, source, api) from None
    return [fetch.RemoteFile(f.path, f.size, f.sha256 or None) for f in listing if not f.is_dir and f.path]


def _file_list(files: Sequence[fetch.RemoteFile]) -> list[dict[str, Any]]:
    """The chosen files in the shape the client takes them back (the listing's own keys)."""
    return [{"Path": f.name, "Size": f.size, "Sha256": f.sha256, "Type": "blob"} for f in files]


def _progress_class(total: int, progress: Callable[[float], None]) -> type[modelscope_hub.ProgressCallback]:
    """A callback class the client instantiates per file; all of them add to one byte count."""
    lock = threading.Lock()
    done = [0]

    class _Bytes(modelscope_hub.ProgressCallback):
        def update(self, size: int) -> None:
            with lock:
                done[0] += size
                fraction = min(max(done[0], 0) / total, 1.0)
            progress(fraction)

    return _Bytes


def _check_sizes(dest: Path, files: Sequence[fetch.RemoteFile]) -> None:
    """What the client left under each name is that file, by size (it has checked the sha256)."""
    for f in files:
        fetch.check_name(f.name, dest)
        path = dest / f.name
        if not path.is_file():
            raise fetch.FetchError(f"{f.name} is missing after the download", permanent=False)
        if f.size is not None and path.stat().st_size != f.size:
            size = path.stat().st_size
            path.unlink()
            raise fetch.FetchError(
                f"{f.name} has {size} bytes, ModelScope lists {f.size}; removed it, rerun to fetch it again",
                permanent=False,
            )


def _config(
    source: settings.ModelScopeSource, api: modelscope_hub.HubApi, chosen: Sequence[fetch.RemoteFile], dest: Path
) -> dict[str, Any] | None:
    """``config.json`` (a few kilobytes, fetched first), parsed; None for a repository without one."""
    entry = next((f for f in chosen if f.name == "config.json"), None)
    if entry is None:
        return None
    try:
        path = api.download_file(
            source.repo, REPO_TYPE, "config.json", revision=source.revision, local_dir=dest,
            expected_sha256=entry.sha256, file_size=entry.size,
        )  # fmt: skip
    except Exception as exc:
        raise translate(exc, source, api) from None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def survey(
    source: settings.ModelScopeSource, scratch: Path, *, env: MutableMapping[str, str] | None = None
) -> fetch.Survey:
    """What ``fetch`` would download, and ``config.json``; no weights move (the sizing Job)."""
    scratch.mkdir(parents=True, exist_ok=True)
    api = client(source, scratch, env)
    chosen = fetch.choose(source, source.url, remote_files(source, api), scratch)
    return fetch.Survey(source.revision, tuple(chosen), _config(source, api, chosen, scratch))


def fetch_source(
    source: settings.ModelScopeSource,
    dest: Path,
    *,
    env: MutableMapping[str, str] | None = None,
    progress: Callable[[float], None] | None = None,
    before_download: fetch.ListingCheck | None = None,
    max_workers: int = 4,
) -> fetch.FetchResult:
    """Download ``source`` into ``dest`` with the ModelScope client; write the fetch manifest.

    The client keeps what it finished and the ``.incomplete`` files of what it did not, so a rerun
    (the Job's next pod) fetches only the rest. A full disk raises ``space.NoSpaceError``."""
    dest.mkdir(parents=True, exist_ok=True)
    api = client(source, dest, env)
    chosen = fetch.choose(source, source.url, remote_files(source, api), dest)
    total = sum(f.size or 0 for f in chosen)
    log.info("fetching %d file(s), %d bytes, from ModelScope %s", len(chosen), total, _where(source))
    if before_download is not None:
        before_download(chosen, _config(source, api, chosen, dest))
    needed = fetch.remaining_bytes(dest, chosen)
    callbacks = [_progress_class(total or 1, progress)] if progress is not None else None
    try:
        api.download_repo(
            source.repo, REPO_TYPE, revision=source.revision, local_dir=dest, file_list=_file_list(chosen),
            max_workers=max_workers, progress_callbacks=callbacks,
        )  # fmt: skip
    except Exception as exc:
        if space.is_full(_first_cause(exc)):
            raise space.NoSpaceError(
                space.full_message(dest, needed, f"the download of {_where(source)}")
            ) from None
        raise translate(exc, source, api) from None
    _check_sizes(dest, chosen)
    if progress is not None:
        progress(1.0)
    return fetch.write_manifest(dest, source.repo, source.revision, chosen)

